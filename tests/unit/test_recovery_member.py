"""Recovery against an in-memory CCF: the share flow (fetch, decrypt in the key store, sign, submit, remember) and the
trust rules after a disaster recovery (adopt provisionally on the endpoint's word, approve with the member's
fingerprint and this agent's accepting ballot).

The same flows through the daemon, against the sandbox and forged services, are in tests/e2e/test_recovery*.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from signing_agent.ccf.api import ServiceInfo
from signing_agent.config import PolicyConfig, PolicyRuleConfig, RecoveryConfig
from signing_agent.cose.governance import HEADER_MSG_TYPE, MsgType, summarise_payload
from signing_agent.errors import (
    CCFError,
    CCFTrustError,
    ConflictError,
    InvalidRequestError,
    PolicyDeniedError,
)
from signing_agent.governance import Governance, Relay
from signing_agent.metrics import METRICS, Metrics
from signing_agent.policy import Action, Policy
from signing_agent.recovery import (
    RecoveryKey,
    RecoveryMember,
    RecoveryStateStore,
    RecoveryWatcher,
    ShareResult,
)
from signing_agent.recovery.trust import MAX_PROPOSALS_EXAMINED
from signing_agent.signer import Signer, SignRequest
from tests.support.fake_ccf import FakeGovernanceAPI, FakeService, FakeWorld, fake_world, file_identity
from tests.support.fakes import signing_service
from tests.support.pki import make_member

pytestmark = pytest.mark.usefixtures("own_peer")
SHARE = bytes(range(44))
PID = "d" * 64


@dataclass
class World(FakeWorld):
    recovery: RecoveryMember


async def make_world(tmp_path: Path, **settings: object) -> World:
    """``prod`` waits for recovery shares, and has one for ``m0``."""
    base = await fake_world(tmp_path, encryption=True, state={"status": "WaitingForRecoveryShares",
                            "recovery_count": 1}, **settings)  # fmt: skip
    base.service.encrypted_shares[base.m0.member_id] = base.m0.encrypt_share(SHARE)
    config = RecoveryConfig(state_dir=tmp_path / "state")
    return World(**vars(base), recovery=RecoveryMember(base.gov.signer, base.gov, config, auditor=base.gov.auditor))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    await w.gov.aclose()


async def test_a_share_is_decrypted_in_the_key_store_signed_and_submitted(world: World) -> None:
    result = await world.recovery.submit_share("prod", "m0")
    assert result.submitted
    assert (result.key.recovery_count, result.key.creation_txid) == (1, "2.1")
    assert world.service.calls == ["service_info", "encrypted_share", "submit_recovery_share"]
    ((_, message),) = world.service.received
    assert message.headers[HEADER_MSG_TYPE] == "recovery_share"
    assert json.loads(message.payload) == {"share": base64.b64encode(SHARE).decode()}
    assert world.service.status == "Open"
    assert result.relay.status == 200
    assert result.relay.from_ccf
    assert world.events() == ["received", "signed", "forwarded", "share_submitted"]
    submitted = world.record("share_submitted")
    assert submitted["ccf_message"] == "1/1 recovery shares successfully submitted\nEnd of recovery procedure initiated"
    assert (submitted["submitted_count"], submitted["recovery_threshold"]) == (1, 1)
    assert base64.b64encode(SHARE).decode() not in json.dumps(world.audit.records)
    state = await world.recovery.store("prod").load()
    assert state["submissions"]["m0"]["recoveryCount"] == 1


async def test_the_watcher_submits_once_per_recovery(world: World) -> None:
    assert (await world.recovery.submit_share("prod", "m0", unattended=True)).submitted
    world.service.status = "WaitingForRecoveryShares"
    again = await world.recovery.submit_share("prod", "m0", unattended=True)
    assert again.skipped
    assert not again.submitted
    assert world.service.calls.count("encrypted_share") == 1


async def test_ccf_s_refusal_is_relayed_and_audited_as_share_failed(world: World) -> None:
    world.service.status = "Open"
    result = await world.recovery.submit_share("prod", "m0")
    assert not result.submitted
    assert (result.relay.status, result.ccf_error) == (403, "ServiceNotWaitingForRecoveryShares")
    failed = world.record("share_failed")
    assert (failed["ccf_status"], failed["ccf_error"]) == (403, "ServiceNotWaitingForRecoveryShares")


async def test_no_share_for_the_member_is_relayed(world: World) -> None:
    del world.service.encrypted_shares[world.m0.member_id]
    result = await world.recovery.submit_share("prod", "m0")
    assert (result.relay.status, result.ccf_error) == (404, "ResourceNotFound")
    assert world.service.received == []  # nothing decrypted, nothing signed
    assert world.events() == ["share_failed"]


async def test_a_share_that_is_not_base64_is_an_error_and_nothing_is_decrypted(world: World) -> None:
    world.service.answer_next("encrypted_share", 200, {"encryptedShare": "not base64!"})
    with pytest.raises(CCFError, match="answered an encrypted share that is not base64"):
        await world.recovery.submit_share("prod", "m0")
    assert world.record("share_failed")["ccf_message"] == "malformed encryptedShare"
    assert world.service.received == []


async def test_an_identity_without_an_encryption_key_cannot_submit(tmp_path: Path, world: World) -> None:
    m1 = await file_identity(tmp_path, "m1")
    signer = signing_service({"m1": m1.identity}, world.gov.auditor)
    recovery = RecoveryMember(signer, world.gov, world.recovery.config, auditor=world.gov.auditor)
    with pytest.raises(InvalidRequestError, match="has no encryption_key"):
        await recovery.submit_share("prod", "m1")
    assert world.service.calls == []


def only(**rule: object) -> Policy:
    """A policy of one rule for the test's own uid (no default rule)."""
    cfg = PolicyConfig(rules=(PolicyRuleConfig(name="r", uids=(os.getuid(),), **rule),), default_rule=False)  # type: ignore[arg-type]
    return Policy.from_config(cfg, daemon_uid=os.getuid())


@pytest.mark.parametrize(
    "rule",
    [{"msg_types": ("proposal",)}, {"identities": ("m1",)}, {"services": ("staging",)}],
    ids=["another message type", "another identity", "another service"],
)
async def test_the_policy_is_asked_before_anything_is_fetched_or_decrypted(
    world: World, rule: dict[str, object]
) -> None:
    world.gov.signer.policy = only(**rule)
    with pytest.raises(PolicyDeniedError, match="denied by rule 'r'"):
        await world.recovery.submit_share("prod", "m0")
    assert world.service.calls == []  # no state read from the service, no encrypted share fetched
    assert world.events() == ["denied"]
    denied = world.record("denied")
    assert (denied["msg_type"], denied["service"], denied["identity"], denied["rule"]) == (
        "recovery_share",
        "prod",
        "m0",
        "r",
    )


async def test_the_question_charges_no_rate_limit_the_signature_does(world: World) -> None:
    world.gov.signer.policy = only(msg_types=("recovery_share",), services=("prod",), rate_limit=1, rate_window=3600.0)
    assert (await world.recovery.submit_share("prod", "m0")).submitted
    with pytest.raises(PolicyDeniedError, match="rate limit of 1 per 3600 s"):
        await world.recovery.submit_share("prod", "m0")
    assert world.service.calls.count("encrypted_share") == 1


def test_the_question_before_decryption_is_the_one_the_share_s_signature_gets() -> None:
    payload = json.dumps({"share": base64.b64encode(SHARE).decode()}).encode()
    req = SignRequest(identity="m0", msg_type=MsgType.RECOVERY_SHARE, payload=payload, service="prod")
    signed = Signer._action("m0", req, summarise_payload(req.msg_type, req.payload))
    assert Action.recovery_share("m0", "prod") == signed


async def test_no_share_goes_to_an_identity_that_is_not_the_pinned_one(world: World) -> None:
    world.ccf.configured["prod"] = make_member("another-service").cert_pem
    with pytest.raises(CCFTrustError):
        await world.recovery.submit_share("prod", "m0")
    assert world.service.calls == []


async def test_no_share_when_the_service_reports_an_identity_not_trusted_for_shares(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection presented the pinned identity, but the service reports another for itself (a connection made
    before a recovery, still open to the recovered service): the reported identity must be trusted for shares too."""
    info = world.service.info
    recovered = make_member("recovered-service").cert_pem.decode()
    monkeypatch.setattr(world.service, "info", lambda: {**info(), "certificate": recovered})
    with pytest.raises(CCFTrustError, match=r"reports the service identity .* not an identity trusted for recovery"):
        await world.recovery.submit_share("prod", "m0")
    assert world.service.calls == ["service_info"]  # no share fetched, nothing decrypted, signed or sent
    assert "signed" not in world.events()


# --- trust after a disaster recovery ---------------------------------------------------------------------------------

OLD = make_member("old-service")
NEW = make_member("new-service")


def transition(previous: bytes, following: bytes) -> list[dict[str, object]]:
    args = {"previous_service_identity": previous.decode(), "next_service_identity": following.decode()}
    return [{"name": "transition_service_to_open", "args": args}]


@pytest.fixture
async def recovered(tmp_path: Path) -> AsyncIterator[World]:
    """The service came back with a new identity; the configuration still pins the old one."""
    w = await make_world(tmp_path, accept_transition_to=True)
    w.service.identity = NEW.cert_pem
    w.ccf.configured["prod"] = OLD.cert_pem
    w.service.add_proposal(PID, transition(OLD.cert_pem, NEW.cert_pem))
    yield w
    await w.gov.aclose()


async def test_a_new_identity_named_by_a_transition_proposal_is_trusted_for_reads_only(recovered: World) -> None:
    assert await recovered.recovery.adopt_by_proposal("prod")
    assert recovered.gov.ccf.provisional_identity("prod") == NEW.cert_pem
    adopted = recovered.record("identity_adopted")
    expected = ("provisional", NEW.member_id, PID)
    assert (adopted["trust"], adopted["certificate_sha256"], adopted["proposal_id"]) == expected
    assert adopted["peer"]["uid"] == os.getuid()  # the request that adopted it, as every decision record carries
    assert (await recovered.recovery.service_info("prod")).status == "WaitingForRecoveryShares"
    with pytest.raises(CCFTrustError, match=f"trusted provisionally only, after transition_service_to_open "
                       f"proposal {PID}: no share was decrypted or sent"):  # fmt: skip
        await recovered.recovery.submit_share("prod", "m0")
    assert "encrypted_share" not in recovered.service.calls


async def next_generation(world: World, tmp_path: Path, **settings: object) -> RecoveryMember:
    """What a reload opens beside the serving generation: its own governance and recovery, on the same signer, fake
    service and state folder, with the state files restored. The caller closes ``.governance``."""
    gov = Governance(world.gov.signer, {"prod": world.ccf.config("prod", **settings)}, auditor=world.gov.auditor,
                     connector=world.ccf)  # fmt: skip
    newer = RecoveryMember(gov.signer, gov, RecoveryConfig(state_dir=tmp_path / "state"), auditor=gov.auditor)
    await newer.open()
    return newer


async def test_one_share_submission_at_a_time_per_identity_across_generations(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reload, a request still running in the old generation and the new generation's watcher may ask for
    the same share at once: the lock is the state file's (one per process), so the second sees the first's
    submission and skips, rather than decrypting and submitting it again."""
    newer = await next_generation(world, tmp_path)
    real = FakeGovernanceAPI.encrypted_share

    async def slow(self: FakeGovernanceAPI, member_id: str) -> Any:
        await asyncio.sleep(0.01)  # a real service takes a moment: the other submission runs meanwhile
        return await real(self, member_id)

    monkeypatch.setattr(FakeGovernanceAPI, "encrypted_share", slow)
    results = await asyncio.gather(
        world.recovery.submit_share("prod", "m0", unattended=True), newer.submit_share("prod", "m0", unattended=True)
    )
    assert sorted(result.skipped for result in results) == [False, True]
    assert world.service.calls.count("submit_recovery_share") == 1
    await newer.governance.aclose()


def list_behind(service: FakeService, decoys: int, decoy_state: str, transition_state: str) -> None:
    """``decoys`` proposals in ``decoy_state`` (no transition among them), then the transition, in that order."""
    del service.proposals[PID]
    for i in range(decoys):
        service.add_proposal(f"{i:064x}", [{"name": "set_member"}], state=decoy_state)
    service.add_proposal(PID, transition(OLD.cert_pem, NEW.cert_pem), state=transition_state)


async def test_adoption_reads_the_open_proposals_first(recovered: World) -> None:
    """A service keeps every accepted proposal of its life: the transition being voted on is found first."""
    list_behind(recovered.service, MAX_PROPOSALS_EXAMINED + 50, "Accepted", "Open")
    assert await recovered.recovery.adopt_by_proposal("prod")
    assert recovered.service.calls.count("proposal_actions") == 1


async def test_adoption_reads_a_bounded_number_of_proposals(recovered: World) -> None:
    """An endpoint may list any number of proposals: each costs a request for its actions, so an attempt reads at
    most ``MAX_PROPOSALS_EXAMINED`` (the operator lists an identity found past them)."""
    list_behind(recovered.service, MAX_PROPOSALS_EXAMINED + 50, "Open", "Accepted")
    assert not await recovered.recovery.adopt_by_proposal("prod")
    assert recovered.service.calls.count("proposal_actions") == MAX_PROPOSALS_EXAMINED


async def test_a_generation_catches_up_with_trust_an_older_one_wrote_after_it_restored(
    recovered: World, tmp_path: Path
) -> None:
    """A reload opens the new generation (which restores the state files) while the old one still serves: an
    adoption or approval the old one's last requests make lands in the state file after that. Once the old one has
    closed, the daemon has the new one catch up, or it would serve without the trust the log says was given."""
    newer = await next_generation(recovered, tmp_path, accept_transition_to=True)  # restored: nothing yet
    gov = newer.governance
    assert await recovered.recovery.adopt_by_proposal("prod")  # the older generation's request, still running
    assert gov.ccf.provisional_identity("prod") is None
    adopted = recovered.events().count("identity_adopted")

    await newer.catch_up()
    assert gov.ccf.provisional_identity("prod") == NEW.cert_pem
    assert recovered.events().count("identity_adopted") == adopted + 1
    await newer.catch_up()  # nothing new: nothing done, nothing audited again
    assert recovered.events().count("identity_adopted") == adopted + 1
    await gov.aclose()


async def test_a_read_that_fails_pinned_tls_adopts_the_identity_on_the_way(recovered: World) -> None:
    info = await recovered.recovery.service_info("prod")
    assert info.certificate == NEW.cert_pem.decode()
    assert recovered.gov.ccf.provisional_identity("prod") == NEW.cert_pem


@pytest.mark.parametrize("case", ["no transition", "from an untrusted identity", "info disagrees", "withdrawn"])
async def test_the_endpoint_s_claim_must_hold_together(recovered: World, case: str) -> None:
    if case == "no transition":
        recovered.service.actions[PID] = json.dumps({"actions": [{"name": "set_member"}]}).encode()
    elif case == "from an untrusted identity":
        recovered.service.add_proposal(PID, transition(make_member("x").cert_pem, NEW.cert_pem))
    elif case == "info disagrees":
        recovered.service.answer_next("service_info", 200, {"certificate": OLD.cert_pem.decode()})
    else:
        recovered.service.proposals[PID]["proposalState"] = "Withdrawn"
    assert not await recovered.recovery.adopt_by_proposal("prod")
    assert recovered.gov.ccf.provisional_identity("prod") is None
    assert all(c.trusted_pems != (NEW.cert_pem,) or c.closed for c in recovered.ccf.connections)  # probes closed


async def test_approval_needs_the_member_s_fingerprint(recovered: World) -> None:
    with pytest.raises(ConflictError, match=r"presents identity [0-9a-f]{16}\.\.\., not [0-9a-f]{16}\.\.\.: no ballot"):
        await recovered.recovery.approve_identity("prod", "m0", PID, OLD.member_id)
    assert recovered.service.ballots == {}


@pytest.mark.parametrize(
    "rule",
    [{"msg_types": ("proposal",)}, {"actions_allow": ("transition_node_to_trusted",)}, {"ballots": ("reject",)}],
    ids=["no ballots", "not this action", "not an accepting ballot"],
)
async def test_a_caller_who_may_not_cast_the_ballot_gets_no_adoption_either(
    recovered: World, rule: dict[str, object]
) -> None:
    """Approval adopts the endpoint's identity on the way: only for a caller the policy lets vote accept on it."""
    recovered.gov.signer.policy = only(**rule)
    with pytest.raises(PolicyDeniedError, match="denied by rule 'r'"):
        await recovered.recovery.approve_identity("prod", "m0", PID, NEW.member_id)
    assert recovered.service.calls == []  # no probe, no read: nothing adopted
    assert recovered.gov.ccf.provisional_identity("prod") is None
    assert recovered.events() == ["denied"]
    denied = recovered.record("denied")
    assert (denied["msg_type"], denied["proposal_id"], denied["identity"]) == ("ballot", PID, "m0")


async def test_an_approved_identity_is_pinned_after_this_agent_s_accepting_ballot(recovered: World) -> None:
    fingerprint = ":".join(NEW.member_id[i : i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints it
    relay = await recovered.recovery.approve_identity("prod", "m0", PID, fingerprint)
    assert relay.status == 200
    assert relay.body["approved"] is True
    assert relay.body["certificate_sha256"] == NEW.member_id
    assert relay.body["ballot"]["proposalId"] == PID
    assert recovered.service.ballots[(PID, recovered.m0.member_id)].startswith("export function vote")
    assert recovered.gov.ccf.provisional_identity("prod") is None
    assert (await recovered.gov.ccf.client("prod")).trusted_pems[0] == NEW.cert_pem
    approved = recovered.record("identity_approved")
    assert (approved["certificate_sha256"], approved["member_id"]) == (NEW.member_id, recovered.m0.member_id)
    state = await recovered.recovery.store("prod").load()
    assert state["approved_identity"]["sha256"] == NEW.member_id

    assert (await recovered.recovery.submit_share("prod", "m0")).submitted  # shares go to it now


async def test_an_identity_already_trusted_needs_no_approval(recovered: World) -> None:
    recovered.ccf.configured["prod"] = NEW.cert_pem
    with pytest.raises(ConflictError, match="is already trusted for recovery shares"):
        await recovered.recovery.approve_identity("prod", "m0", PID, NEW.member_id)


async def test_the_watcher_submits_when_the_service_waits_and_then_only_watches(world: World) -> None:
    watcher = RecoveryWatcher(world.recovery, "prod", "m0")
    await watcher.tick()
    assert (watcher.state, watcher.service_status) == ("submitted", "WaitingForRecoveryShares")
    assert watcher.last_submission is not None
    assert watcher.last_submission["recoveryCount"] == 1
    await watcher.tick()
    assert (watcher.state, watcher.service_status) == ("watching", "Open")
    assert world.service.calls.count("submit_recovery_share") == 1


# --- the watcher alone, against a fake of what it needs (the Recovering Protocol) -------------------------------------


@dataclass
class FakeRecovering:
    """Answers ``service_info`` from ``answers`` (an exception is raised), and records each submission."""

    config: RecoveryConfig
    answers: list[ServiceInfo | Exception]
    metrics: Metrics = METRICS
    rng: Callable[[], float] = random.random
    submitted: list[str] = field(default_factory=list)

    def store(self, service: str) -> RecoveryStateStore:
        return RecoveryStateStore(self.config.state_dir / f"recovery-{service}.json")

    def request_timeout(self, service: str) -> float:
        return 1.0

    async def service_info(self, service: str) -> ServiceInfo:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def submit_share(self, service: str, identity: str, *, unattended: bool = False) -> ShareResult:
        self.submitted.append(identity)
        return ShareResult(Relay(status=403, body=None), submitted=False, key=RecoveryKey(1, "2.1"), ccf_error="Nope")


def info(status: str) -> ServiceInfo:
    return ServiceInfo(status=status, certificate=None, recovery_count=1, creation_transaction_id="2.1", fields={})


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 -- the watcher's state is plain attributes, with no event to wait on
            await asyncio.sleep(0.005)


async def test_a_watcher_reports_an_untrusted_service_and_polls_on_until_it_is_stopped(tmp_path: Path) -> None:
    config = RecoveryConfig(enabled=True, poll_interval=0.01, max_backoff=0.02, state_dir=tmp_path)
    fake = FakeRecovering(config, [CCFTrustError("not the pinned identity"), info("Open")])
    watcher = RecoveryWatcher(fake, "prod", "m0")
    watcher.start()
    await until(lambda: watcher.service_status == "Open")
    assert watcher.state == "watching"
    assert watcher.last_error is None
    await watcher.stop()
    assert watcher.status()["state"] == "stopped"
    assert fake.submitted == []


async def test_a_watcher_whose_share_is_refused_fails_and_says_why(tmp_path: Path) -> None:
    config = RecoveryConfig(enabled=True, poll_interval=0.01, max_backoff=0.02, state_dir=tmp_path)
    fake = FakeRecovering(config, [info("WaitingForRecoveryShares")])
    watcher = RecoveryWatcher(fake, "prod", "m0")
    with pytest.raises(CCFError, match="refused the recovery share: 403 Nope"):
        await watcher.tick()
    assert (watcher.state, fake.submitted) == ("recovering", ["m0"])
    watcher.start()
    await until(lambda: watcher.state == "failed")
    assert watcher.last_error == "service 'prod' refused the recovery share: 403 Nope"
    await watcher.stop()
