"""What the governance layer hands the policy about the proposal a ballot votes on, from each kind of CCF answer.

A fake CCF client stands in for the service: the real one, against the sandbox, is in tests/e2e/test_ballot_policy.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from signing_agent.ccf.client import CCFClient, CCFResponse
from signing_agent.config import ServiceConfig
from signing_agent.errors import CCFUnavailableError, UnknownServiceError
from signing_agent.governance import GovernanceService
from signing_agent.policy import default_policy
from signing_agent.service import SigningService, VotedProposal
from tests.support.fakes import denials, memory_auditor

PID = "b" * 64


def governance(services: dict[str, ServiceConfig]) -> GovernanceService:
    auditor = memory_auditor()
    signer = SigningService({}, policy=default_policy(os.getuid()), auditor=auditor, denials=denials())
    return GovernanceService(signer, services, auditor=auditor)


class FakeCCF:
    """Answers every GET with ``answer`` (or raises it), and remembers the paths asked for."""

    def __init__(self, answer: CCFResponse | Exception) -> None:
        self.answer = answer
        self.paths: list[str] = []

    async def get(self, path: str, **_: Any) -> CCFResponse:
        self.paths.append(path)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def answer(status: int, raw: bytes, body: Any = None) -> CCFResponse:
    return CCFResponse(
        status=status, body=body if body is not None else raw, raw=raw, content_type="", transaction_id=None
    )


async def voted(monkeypatch: pytest.MonkeyPatch, reply: CCFResponse | Exception) -> tuple[VotedProposal, FakeCCF]:
    fake = FakeCCF(reply)

    async def open_fake(config: ServiceConfig, **_: Any) -> FakeCCF:
        return fake

    monkeypatch.setattr(CCFClient, "open", open_fake)
    gov = governance({"prod": ServiceConfig(name="prod", url="https://ccf")})
    return await gov.voted_proposal("prod", PID), fake


async def test_the_actions_are_read_as_the_proposal_was_proposed(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"actions":[{"name":"set_member","args":{}},{"name":"set_constitution","args":{}}]}'
    got, fake = await voted(monkeypatch, answer(200, body))
    assert got == VotedProposal(("set_member", "set_constitution"))
    assert fake.paths == [f"/gov/members/proposals/{PID}/actions"]


async def test_an_error_answer_leaves_the_actions_unknown_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    error = {"error": {"code": "ProposalNotFound", "message": "no"}}
    got, _ = await voted(monkeypatch, answer(404, b"{}", error))
    assert got == VotedProposal(None, "service 'prod' answered 404 ProposalNotFound when asked for them")


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b'{"actions": "set_constitution"}',
        b'{"actions": []}',
        b'{"actions": [{"args": {}}]}',
        b"[]",
    ],
)
async def test_a_body_that_is_not_a_proposal_leaves_the_actions_unknown(
    monkeypatch: pytest.MonkeyPatch, raw: bytes
) -> None:
    got, _ = await voted(monkeypatch, answer(200, raw))
    assert got.actions is None
    assert got.unknown is not None
    assert got.unknown.startswith("service 'prod' answered with something that is not a proposal: ")


async def test_no_answer_leaves_the_actions_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    got, _ = await voted(monkeypatch, CCFUnavailableError("cannot connect: refused"))
    assert got == VotedProposal(None, "service 'prod' could not be asked for them: cannot connect: refused")


async def test_an_unknown_service_is_an_error_not_an_unknown_proposal() -> None:
    gov = governance({})
    with pytest.raises(UnknownServiceError):
        await gov.voted_proposal("prod", PID)
