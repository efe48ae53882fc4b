"""The signing use case with in-memory fakes: audit order, fail closed, and the audit-failure metric."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signing_agent.backends.keystores import KeyStores
from signing_agent.config import FileKeyConfig, IdentityConfig
from signing_agent.cose.governance import MsgType
from signing_agent.cose.sign1 import decode, verify
from signing_agent.denials import DenialThrottle
from signing_agent.errors import AuditError, InvalidRequestError, PolicyDeniedError, TooManyRequestsError
from signing_agent.identity import open_identity
from signing_agent.metrics import METRICS
from signing_agent.policy import Policy, default_policy
from signing_agent.signer import Signer, SignRequest
from tests.support.fakes import MemoryAuditSink, as_agent, as_peer, denials, memory_auditor
from tests.support.pki import make_member


async def service_with(tmp_path: Path, audit: MemoryAuditSink) -> Signer:
    member = make_member("m0", "secp256r1")
    key, cert = member.write(tmp_path)
    ident = await open_identity(
        IdentityConfig(name="m0", certificate=cert, signing_key=FileKeyConfig(path=key)), KeyStores()
    )
    return Signer(
        {"m0": ident},
        policy=default_policy(os.getuid()),
        auditor=memory_auditor(audit),
        denials=denials(),
        clock=lambda: 1_700_000_000.5,
    )


def state_digest(created_at: int | None = None) -> SignRequest:
    return SignRequest(identity="m0", msg_type=MsgType.STATE_DIGEST, payload=b"", created_at=created_at)


async def test_received_then_signed_and_the_message_verifies(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)
    with as_peer(os.getuid(), request_id="r1"):
        signed = await service.sign(state_digest())
    assert [r["event"] for r in audit.records] == ["received", "signed"]
    assert audit.durable == [False, True]  # one fsync per request: the decision's
    assert {r["request_id"] for r in audit.records} == {"r1"}
    assert {r["peer"]["uid"] for r in audit.records} == {os.getuid()}
    assert audit.records[1]["cose_sha256"] == signed.cose_sha256
    assert signed.created_at == 1_700_000_000
    verify(decode(signed.cose), service.identity("m0").public_key)
    await service.identity("m0").aclose()


async def test_no_signature_without_an_audit_record_and_the_failure_is_counted(tmp_path: Path) -> None:
    audit = MemoryAuditSink(fail=True)
    service = await service_with(tmp_path, audit)
    failures = METRICS.registry.get_sample_value("signing_agent_audit_write_failures_total") or 0.0
    with pytest.raises(AuditError), as_peer(os.getuid()):
        await service.sign(state_digest())
    assert METRICS.registry.get_sample_value("signing_agent_audit_write_failures_total") == failures + 1
    await service.identity("m0").aclose()


async def test_a_failing_log_stops_a_request_before_any_key_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``received`` record is normally queued while the signing goes on; while the log is failing, the request
    waits for it first, so nothing is asked of a key store (a vault request, a token operation) for a request that
    cannot be audited."""
    audit = MemoryAuditSink(fail=True)
    service = await service_with(tmp_path, audit)
    key = service.identity("m0").signing_key
    asked: list[bytes] = []

    async def sign_digest(alg: object, digest: bytes, **_: object) -> bytes:
        asked.append(digest)
        raise AssertionError("the key store was asked")

    monkeypatch.setattr(key, "sign_digest", sign_digest)
    with pytest.raises(AuditError), as_peer(os.getuid()):
        await service.sign(state_digest())
    assert asked == []
    await service.identity("m0").aclose()


async def test_a_caller_created_at_must_be_within_the_skew_of_the_clock(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)  # clock: 1_700_000_000.5, default skew 300 s
    with as_peer(os.getuid()):
        await created_at_checks(service)
    assert [r["event"] for r in audit.records].count("signed") == 2
    await service.identity("m0").aclose()


async def created_at_checks(service: Signer) -> None:
    for edge in (1_700_000_000 - 300, 1_700_000_000 + 300):
        assert (await service.sign(state_digest(edge))).created_at == edge
    for outside in (1_700_000_000 - 301, 1_700_000_000 + 301, 9_999_999_999):
        with pytest.raises(InvalidRequestError, match=rf"created_at {outside} is [+-]\d+ s from the agent's clock"):
            await service.sign(state_digest(outside))
        with pytest.raises(InvalidRequestError, match=r"agent\.max_created_at_skew allows 300 s"):
            await service.explain(state_digest(outside))


async def test_nothing_is_signed_or_audited_without_a_request_context(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)
    with pytest.raises(LookupError, match="no request context"):
        await service.sign(state_digest())
    assert audit.records == []
    await service.identity("m0").aclose()


async def test_a_peers_denials_are_charged_to_its_budget_the_agents_own_never(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)
    service.policy = Policy([])  # no rule: everyone is denied
    service.denials = DenialThrottle(1, 3600.0)
    with as_peer(1000, request_id="p1"), pytest.raises(PolicyDeniedError):
        await service.sign(state_digest())
    with as_peer(1000, request_id="p2"), pytest.raises(TooManyRequestsError):
        await service.sign(state_digest())  # past the budget: refused, and not audited one by one
    for _ in range(3):
        with as_agent(), pytest.raises(PolicyDeniedError):
            await service.sign(state_digest())
    peers = [(r["event"], r["request_id"]) for r in audit.records if not r["request_id"].startswith("watcher-")]
    assert peers == [("received", "p1"), ("denied", "p1")]
    agent = [r for r in audit.records if r["request_id"].startswith("watcher-")]
    assert [r["event"] for r in agent] == ["received", "denied"] * 3
    assert {r["peer"]["uid"] for r in agent} == {os.getuid()}
    await service.identity("m0").aclose()


async def test_explain_decides_for_the_current_caller_and_writes_nothing(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)
    with as_peer(os.getuid()):
        assert (await service.explain(state_digest())).decision.allowed
    with as_peer(65534):
        refused = await service.explain(state_digest())
    assert not refused.decision.allowed
    assert "no policy rule matches peer uid 65534" in refused.decision.reason
    assert audit.records == []  # explain decides nothing: it costs no disk, whoever asks
    await service.identity("m0").aclose()
