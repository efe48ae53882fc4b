"""The governance use cases against an in-memory CCF: what is signed, where it goes, what is audited and relayed.

The same flows against the sandbox, through the daemon, are in tests/e2e/test_governance.py; here each runs in
milliseconds, and CCF's odd answers (a lost answer's ProposalReplay, a :update without a digest) are one line each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from signing_agent.cose.governance import HEADER_MSG_TYPE, HEADER_PROPOSAL_ID
from signing_agent.errors import (
    CCFError,
    CCFTrustError,
    CCFUnavailableError,
    ConfigError,
    ConflictError,
    UnknownServiceError,
)
from tests.support.fake_ccf import FakeWorld, file_identity
from tests.support.fakes import signing_service

pytestmark = pytest.mark.usefixtures("own_peer")
PID = "c" * 64
PROPOSAL = {"actions": [{"name": "set_constitution", "args": {"constitution": "x"}}]}


async def test_a_proposal_is_signed_once_forwarded_audited_and_ccf_s_answer_relayed(world: FakeWorld) -> None:
    relay = await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert world.service.calls == ["create_proposal"]
    ((_, message),) = world.service.received
    assert message.headers[HEADER_MSG_TYPE] == "proposal"
    assert json.loads(message.payload) == PROPOSAL
    assert relay.from_ccf
    assert relay.status == 200
    created = json.loads(relay.raw or b"")
    assert created["proposerId"] == world.m0.member_id
    assert relay.body == created
    assert relay.transaction_id is not None
    assert world.events() == ["received", "signed", "forwarded"]
    forwarded = world.audit.records[-1]
    assert (forwarded["ccf_status"], forwarded.get("ccf_error"), forwarded["attempts"]) == (200, None, 1)
    assert forwarded["transaction_id"] == relay.transaction_id


async def test_a_ccf_refusal_is_an_answer_relayed_unchanged(world: FakeWorld) -> None:
    world.service.answer_next("create_proposal", 400, {"error": {"code": "ProposalFailedToValidate", "message": "no"}})
    relay = await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert (relay.status, relay.from_ccf) == (400, True)
    assert json.loads(relay.raw or b"") == {"error": {"code": "ProposalFailedToValidate", "message": "no"}}
    assert world.audit.records[-1]["ccf_error"] == "ProposalFailedToValidate"


async def test_no_answer_is_audited_as_failed(world: FakeWorld) -> None:
    world.service.fail_next("create_proposal", CCFUnavailableError("cannot connect"))
    with pytest.raises(CCFUnavailableError):
        await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert world.events() == ["received", "signed", "failed"]
    assert world.audit.records[-1]["error"] == "CCFUnavailable"


async def test_a_client_that_cannot_be_had_after_signing_is_audited_as_failed(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the signature and its forwarding, the service's client may have to be rebuilt (an identity pinned
    meanwhile) from a trust file gone bad: the signed message's outcome is ``failed``, as for no answer."""
    real, calls = world.gov.ccf.client, []

    async def client(service: str, *, provisional: bool = False) -> Any:
        calls.append(service)
        if len(calls) > 1:  # the first: propose's own check, before anything is signed
            raise ConfigError("services.prod.service_certificate: not a regular file")
        return await real(service, provisional=provisional)

    monkeypatch.setattr(world.gov.ccf, "client", client)
    with pytest.raises(ConfigError):
        await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert world.events() == ["received", "signed", "failed"]
    assert world.audit.records[-1]["error"] == "ConfigError"


async def test_a_proposal_whose_answer_was_lost_is_recovered_from_ccf_s_replay_answer(world: FakeWorld) -> None:
    world.service.add_proposal(PID, PROPOSAL["actions"], proposer=world.m0.member_id)
    replay = {"error": {"code": "ProposalReplay", "message": f"Proposal submission replay, already exists as "
                        f"proposal {PID}"}}  # fmt: skip
    world.service.answer_next("create_proposal", 400, replay, attempts=2)
    relay = await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert relay.status == 200
    assert relay.from_ccf
    assert relay.body == world.service.proposals[PID]
    assert world.service.calls == ["create_proposal", "proposal"]


@pytest.mark.parametrize("case", ["first attempt", "another proposer", "no id in the message"])
async def test_a_replay_answer_is_relayed_when_it_is_not_our_lost_proposal(world: FakeWorld, case: str) -> None:
    world.service.add_proposal(PID, PROPOSAL["actions"], proposer="e" * 64 if case == "another proposer" else
                               world.m0.member_id)  # fmt: skip
    message = "Proposal submission replay" if case == "no id in the message" else f"already exists as proposal {PID}"
    replay = {"error": {"code": "ProposalReplay", "message": message}}
    world.service.answer_next("create_proposal", 400, replay, attempts=1 if case == "first attempt" else 3)
    relay = await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert relay.status == 400
    assert json.loads(relay.raw or b"") == replay


async def test_a_ballot_is_signed_for_an_open_proposal_only(world: FakeWorld) -> None:
    world.service.add_proposal(PID, PROPOSAL["actions"])
    relay = await world.gov.vote("prod", "m0", PID, "export function vote (p, i) { return true }")
    assert relay.status == 200
    assert world.service.calls == ["proposal", "proposal_actions", "submit_ballot"]
    ((_, ballot),) = world.service.received
    assert ballot.headers[HEADER_PROPOSAL_ID] == PID
    assert world.service.ballots[(PID, world.m0.member_id)] == "export function vote (p, i) { return true }"
    signed = next(r for r in world.audit.records if r["event"] == "signed")
    assert signed["proposal_actions"] == ["set_constitution"]

    world.service.proposals[PID]["proposalState"] = "Accepted"
    with pytest.raises(ConflictError, match=f"proposal {PID} is Accepted, not Open: no ballot was signed"):
        await world.gov.vote("prod", "m0", PID, "x")
    assert len(world.service.received) == 1


async def test_a_ballot_for_an_unknown_proposal_relays_ccf_s_404(world: FakeWorld) -> None:
    relay = await world.gov.vote("prod", "m0", PID, "x")
    assert relay.status == 404
    assert json.loads(relay.raw or b"")["error"]["code"] == "ProposalNotFound"
    assert world.service.received == []


async def test_withdraw(world: FakeWorld) -> None:
    world.service.add_proposal(PID, PROPOSAL["actions"], proposer=world.m0.member_id)
    relay = await world.gov.withdraw("prod", "m0", PID)
    assert (relay.status, world.service.proposals[PID]["proposalState"]) == (200, "Withdrawn")
    assert world.service.calls == ["withdraw_proposal"]


async def test_activate_signs_the_update_answer_as_it_came_then_reports_the_status(world: FakeWorld) -> None:
    world.service.members[world.m0.member_id]["status"] = "Accepted"
    relay = await world.gov.activate("prod", "m0")
    assert world.service.calls == ["update_state_digest", "ack_state_digest", "member"]
    digest = world.service.digests[world.m0.member_id]
    assert relay.status == 200
    assert not relay.from_ccf
    assert relay.body == {"memberId": world.m0.member_id, "status": "Active", "stateDigest": digest}
    (_, update), (_, ack) = world.service.received
    assert (update.headers[HEADER_MSG_TYPE], ack.headers[HEADER_MSG_TYPE]) == ("state_digest", "ack")
    assert json.loads(ack.payload) == {"memberId": world.m0.member_id, "stateDigest": digest}


async def test_activate_stops_at_an_update_without_a_digest_and_relays_a_refused_ack(world: FakeWorld) -> None:
    world.service.answer_next("update_state_digest", 200, {"memberId": world.m0.member_id})
    with pytest.raises(CCFError, match="answered :update without a stateDigest"):
        await world.gov.activate("prod", "m0")
    world.service.answer_next("ack_state_digest", 400, {"error": {"code": "StateDigestMismatch", "message": "x"}})
    relay = await world.gov.activate("prod", "m0")
    assert (relay.status, relay.from_ccf) == (400, True)


async def test_status_lists_each_identity_s_membership(world: FakeWorld, tmp_path: Path) -> None:
    m1 = await file_identity(tmp_path, "m1")
    world.gov.signer = signing_service({"m0": world.m0.identity, "m1": m1.identity}, world.gov.auditor)
    relay = await world.gov.status("prod")
    assert relay.status == 200
    assert relay.body["status"] == "Open"
    assert relay.body["service"] == "prod"
    assert relay.body["url"] == "https://prod.ccf.test"
    assert relay.body["identities"] == [
        {"name": "m0", "memberId": world.m0.member_id, "status": "Active"},
        {"name": "m1", "memberId": m1.member_id, "status": "NotAMember"},
    ]
    world.service.answer_next("service_info", 503, {"error": {"code": "ServiceUnavailable", "message": "x"}})
    assert (await world.gov.status("prod")).status == 503


async def test_a_proposal_is_shown_with_its_actions_and_ballots(world: FakeWorld) -> None:
    world.service.add_proposal(PID, PROPOSAL["actions"])
    world.service.ballots[(PID, world.m0.member_id)] = "export function vote () { return false }"
    world.service.add_member("f" * 64)  # has not voted
    relay = await world.gov.proposal("prod", PID)
    assert relay.status == 200
    assert relay.body["actions"] == PROPOSAL["actions"]
    assert relay.body["ballots"] == {world.m0.member_id: "export function vote () { return false }"}
    assert (await world.gov.proposals("prod")).status == 200
    assert (await world.gov.proposal("prod", "d" * 64)).status == 404


async def test_an_unknown_service_fails_before_anything_is_signed(world: FakeWorld) -> None:
    with pytest.raises(UnknownServiceError, match=r"unknown service 'nope' \(configured: prod\)"):
        await world.gov.propose("nope", "m0", json.dumps(PROPOSAL).encode())
    assert world.audit.records == []


async def test_a_service_that_is_not_the_pinned_one_gets_nothing(world: FakeWorld) -> None:
    world.ccf.configured["prod"] = world.m0.member.cert_pem  # the configuration pins another identity
    with pytest.raises(CCFTrustError):
        await world.gov.propose("prod", "m0", json.dumps(PROPOSAL).encode())
    assert world.service.calls == []
    assert world.events() == ["received", "signed", "failed"]


async def test_a_pinned_identity_replaces_the_configured_one_for_new_requests(world: FakeWorld) -> None:
    new = world.m0.member.cert_pem
    world.gov.ccf.pin("prod", new)
    world.ccf.accepted["prod"] = (b"accepted",)
    client = await world.gov.ccf.client("prod")
    assert client.trusted_pems == (new, b"accepted")
    world.gov.ccf.trust_provisionally("prod", b"provisional")
    wider = await world.gov.ccf.client("prod", provisional=True)
    assert wider.trusted_pems == (new, b"accepted", b"provisional")
    assert await world.gov.ccf.client("prod") is client  # reads and ballots only
