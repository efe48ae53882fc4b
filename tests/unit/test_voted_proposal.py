"""What the governance layer hands the policy about the proposal a ballot votes on, from each kind of CCF answer.

An in-memory CCF (tests/support/fake_ccf.py) stands in for the service: the real one, against the sandbox, is in
tests/e2e/test_ballot_policy.py.
"""

from __future__ import annotations

import pytest

from signing_agent.errors import CCFUnavailableError, UnknownServiceError
from signing_agent.governance import Governance
from signing_agent.signer import VotedProposal
from tests.support.fake_ccf import FakeCCF, FakeService
from tests.support.fakes import memory_auditor, signing_service

PID = "b" * 64


async def voted(reply: tuple[int, object] | Exception) -> tuple[VotedProposal, FakeService]:
    """What ``voted_proposal`` hands the policy when the service answers ``reply`` (status, body) for the actions."""
    fake = FakeCCF()
    service = fake.add("prod")
    if isinstance(reply, Exception):
        service.fail_next("proposal_actions", reply)
    else:
        service.answer_next("proposal_actions", *reply)
    auditor = memory_auditor()
    gov = Governance(signing_service({}, auditor), {"prod": fake.config("prod")}, auditor=auditor, connector=fake)
    try:
        return await gov.voted_proposal("prod", PID), service
    finally:
        await gov.aclose()


async def test_the_actions_are_read_as_the_proposal_was_proposed() -> None:
    body = b'{"actions":[{"name":"set_member","args":{}},{"name":"set_constitution","args":{}}]}'
    got, service = await voted((200, body))
    assert got == VotedProposal(("set_member", "set_constitution"))
    assert service.calls == ["proposal_actions"]


async def test_an_error_answer_leaves_the_actions_unknown_and_says_why() -> None:
    error = {"error": {"code": "ProposalNotFound", "message": "no"}}
    got, _ = await voted((404, error))
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
async def test_a_body_that_is_not_a_proposal_leaves_the_actions_unknown(raw: bytes) -> None:
    got, _ = await voted((200, raw))
    assert got.actions is None
    assert got.unknown is not None
    assert got.unknown.startswith("service 'prod' answered with something that is not a proposal: ")


async def test_no_answer_leaves_the_actions_unknown() -> None:
    got, _ = await voted(CCFUnavailableError("cannot connect: refused"))
    assert got == VotedProposal(None, "service 'prod' could not be asked for them: cannot connect: refused")


async def test_an_unknown_service_is_an_error_not_an_unknown_proposal() -> None:
    auditor = memory_auditor()
    gov = Governance(signing_service({}, auditor), {}, auditor=auditor)
    with pytest.raises(UnknownServiceError):
        await gov.voted_proposal("prod", PID)
