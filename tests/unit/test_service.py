"""The signing use case with in-memory fakes: audit order, fail closed, and the audit-failure metric."""

from __future__ import annotations

from pathlib import Path

import pytest

from signing_agent.audit import MemoryAuditSink
from signing_agent.backends.factory import KeyStores
from signing_agent.config import FileKeyConfig, IdentityConfig
from signing_agent.cose.governance import MsgType
from signing_agent.cose.sign1 import decode, verify
from signing_agent.errors import AuditError, InvalidRequestError
from signing_agent.identity import open_identity
from signing_agent.metrics import METRICS
from signing_agent.service import SigningService
from tests.support.pki import make_member


async def service_with(tmp_path: Path, audit: MemoryAuditSink) -> SigningService:
    member = make_member("m0", "secp256r1")
    key, cert = member.write(tmp_path)
    ident = await open_identity(
        IdentityConfig(name="m0", certificate=cert, signing_key=FileKeyConfig(path=key)), KeyStores()
    )
    return SigningService({"m0": ident}, audit=audit, clock=lambda: 1_700_000_000.5)


async def test_received_then_signed_and_the_message_verifies(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)
    signed = await service.sign("m0", MsgType.STATE_DIGEST, b"")
    assert [r["event"] for r in audit.records] == ["received", "signed"]
    assert audit.records[1]["cose_sha256"] == signed.cose_sha256
    assert signed.created_at == 1_700_000_000
    verify(decode(signed.cose), service.identity("m0").public_key)
    await service.aclose()


async def test_no_signature_without_an_audit_record_and_the_failure_is_counted(tmp_path: Path) -> None:
    audit = MemoryAuditSink(fail=True)
    service = await service_with(tmp_path, audit)
    failures = METRICS.registry.get_sample_value("signing_agent_audit_write_failures_total") or 0.0
    with pytest.raises(AuditError):
        await service.sign("m0", MsgType.STATE_DIGEST, b"")
    assert METRICS.registry.get_sample_value("signing_agent_audit_write_failures_total") == failures + 1
    await service.aclose()


async def test_a_caller_created_at_must_be_within_the_skew_of_the_clock(tmp_path: Path) -> None:
    audit = MemoryAuditSink()
    service = await service_with(tmp_path, audit)  # clock: 1_700_000_000.5, default skew 300 s
    for edge in (1_700_000_000 - 300, 1_700_000_000 + 300):
        assert (await service.sign("m0", MsgType.STATE_DIGEST, b"", created_at=edge)).created_at == edge
    for outside in (1_700_000_000 - 301, 1_700_000_000 + 301, 9_999_999_999):
        with pytest.raises(InvalidRequestError, match=rf"created_at {outside} is [+-]\d+ s from the agent's clock"):
            await service.sign("m0", MsgType.STATE_DIGEST, b"", created_at=outside)
        with pytest.raises(InvalidRequestError, match=r"agent\.max_created_at_skew allows 300 s"):
            await service.explain("m0", MsgType.STATE_DIGEST, b"", created_at=outside)
    assert [r["event"] for r in audit.records].count("signed") == 2
    await service.aclose()
