"""The typed audit records encode to the lines the log has always had: the same names, the same values.

Each expected dict is what the call site built by hand before the records were typed (with ``None`` left out, as
``bound_fields`` always did), so a log written before and one written after read the same.
"""

from __future__ import annotations

import typing

import pytest

from signing_agent.audit import (
    AuditEvent,
    AuditRecord,
    Denied,
    Discontinuity,
    Failed,
    Forwarded,
    IdentityAdopted,
    IdentityApproved,
    Payload,
    PeerRefused,
    Pruned,
    Received,
    RecoveryStateRefused,
    Rotated,
    Share,
    ShareFailed,
    ShareSubmitted,
    Signed,
    Started,
    Subject,
    Throttled,
    actions_digest,
    encode,
)
from signing_agent.context import Caller, RequestContext

CTX = RequestContext("r1", Caller(uid=1000, gid=100, pid=7, exe="/usr/bin/signing-agent"))
WHO = {"request_id": "r1", "peer": {"uid": 1000, "gid": 100, "pid": 7, "exe": "/usr/bin/signing-agent"}}
MEMBER = {"identity": "m0", "member_id": "ab" * 32}
BALLOT = Subject(identity="m0", member_id="ab" * 32, msg_type="ballot", proposal_id="cd" * 32, service="prod")
BALLOT_FIELDS = {**MEMBER, "msg_type": "ballot", "proposal_id": "cd" * 32, "service": "prod"}
SHARE = Share(recovery_count=2, creation_transaction_id="2.41", unattended=True)
SHARE_FIELDS = {"recovery_count": 2, "creation_transaction_id": "2.41", "unattended": True}
SHARER = Subject(identity="m0", member_id="ab" * 32, service="prod")
SHARER_FIELDS = {**MEMBER, "service": "prod"}
VOTED = Payload(sha256="11" * 32, actions=("set_member",), ballot_sha256="22" * 32)
VOTED_FIELDS = {
    "payload_sha256": "11" * 32,
    "proposal_actions": ["set_member"],
    "proposal_actions_count": 1,
    "proposal_actions_sha256": actions_digest(["set_member"]),
    "ballot_sha256": "22" * 32,
}

CASES: list[tuple[AuditRecord, dict[str, object]]] = [
    (Received(request=CTX, subject=BALLOT, payload=VOTED), {**WHO, **BALLOT_FIELDS, **VOTED_FIELDS}),
    (
        Denied(request=CTX, subject=BALLOT, payload=VOTED, rule="voters", reason="no"),
        {**WHO, **BALLOT_FIELDS, **VOTED_FIELDS, "rule": "voters", "reason": "no"},
    ),
    (
        Denied(
            request=CTX,
            subject=Subject(identity="m0", member_id="ab" * 32, msg_type="recovery_share", service="prod"),
            rule=None,
            reason="no policy rule matches",
        ),
        {**WHO, **SHARER_FIELDS, "msg_type": "recovery_share", "reason": "no policy rule matches"},
    ),
    (
        PeerRefused(request=CTX, route="GET /v1/identities", rule=None, reason="no rule"),
        {**WHO, "route": "GET /v1/identities", "reason": "no rule"},
    ),
    (
        Signed(request=CTX, subject=BALLOT, payload=VOTED, rule="voters", cose_sha256="33" * 32),
        {**WHO, **BALLOT_FIELDS, **VOTED_FIELDS, "rule": "voters", "cose_sha256": "33" * 32},
    ),
    (
        Failed(request=CTX, subject=BALLOT, payload=VOTED, rule="voters", error="BackendUnavailable"),
        {**WHO, **BALLOT_FIELDS, **VOTED_FIELDS, "rule": "voters", "error": "BackendUnavailable"},
    ),
    (
        Failed(
            request=CTX, subject=BALLOT, payload=Payload(sha256="11" * 32), cose_sha256="33" * 32, error="CCFTimeout"
        ),
        {**WHO, **BALLOT_FIELDS, "payload_sha256": "11" * 32, "cose_sha256": "33" * 32, "error": "CCFTimeout"},
    ),
    (
        Forwarded(
            request=CTX,
            subject=BALLOT,
            payload=Payload(sha256="11" * 32),
            cose_sha256="33" * 32,
            ccf_status=200,
            ccf_error=None,
            transaction_id="2.42",
            attempts=1,
        ),
        {
            **WHO,
            **BALLOT_FIELDS,
            "payload_sha256": "11" * 32,
            "cose_sha256": "33" * 32,
            "ccf_status": 200,
            "transaction_id": "2.42",
            "attempts": 1,
        },
    ),
    (
        ShareSubmitted(
            request=CTX,
            subject=SHARER,
            share=SHARE,
            ccf_status=200,
            transaction_id="2.50",
            attempts=1,
            ccf_message="1/2 recovery shares successfully submitted",
            submitted_count=1,
            recovery_threshold=2,
        ),
        {
            **WHO,
            **SHARER_FIELDS,
            **SHARE_FIELDS,
            "ccf_status": 200,
            "transaction_id": "2.50",
            "attempts": 1,
            "ccf_message": "1/2 recovery shares successfully submitted",
            "submitted_count": 1,
            "recovery_threshold": 2,
        },
    ),
    (
        ShareFailed(request=CTX, subject=SHARER, share=SHARE, error="UnsupportedOperation", ccf_message=""),
        {**WHO, **SHARER_FIELDS, **SHARE_FIELDS, "error": "UnsupportedOperation", "ccf_message": ""},
    ),
    (
        ShareFailed(
            request=CTX,
            subject=SHARER,
            share=SHARE,
            ccf_status=400,
            ccf_error="ServiceNotWaitingForRecoveryShares",
            ccf_message="not waiting",
            transaction_id="2.51",
            attempts=1,
        ),
        {
            **WHO,
            **SHARER_FIELDS,
            **SHARE_FIELDS,
            "ccf_status": 400,
            "ccf_error": "ServiceNotWaitingForRecoveryShares",
            "ccf_message": "not waiting",
            "transaction_id": "2.51",
            "attempts": 1,
        },
    ),
    (
        IdentityAdopted(
            subject=Subject(service="prod", proposal_id="cd" * 32),
            certificate_sha256="44" * 32,
            previous_sha256="55" * 32,
            trust="provisional",
            restored_from="/var/lib/signing-agent/recovery-prod.json",
        ),
        {
            "service": "prod",
            "proposal_id": "cd" * 32,
            "certificate_sha256": "44" * 32,
            "previous_sha256": "55" * 32,
            "trust": "provisional",
            "restored_from": "/var/lib/signing-agent/recovery-prod.json",
        },
    ),
    (
        IdentityApproved(
            request=CTX,
            subject=Subject(identity="m0", member_id="ab" * 32, proposal_id="cd" * 32, service="prod"),
            certificate_sha256="44" * 32,
            previous_sha256="55" * 32,
            ballot_transaction_id="2.60",
        ),
        {
            **WHO,
            **MEMBER,
            "proposal_id": "cd" * 32,
            "service": "prod",
            "certificate_sha256": "44" * 32,
            "previous_sha256": "55" * 32,
            "ballot_transaction_id": "2.60",
        },
    ),
    (
        RecoveryStateRefused(subject=Subject(service="prod"), path="/s/recovery-prod.json", reason="mode 0644"),
        {"service": "prod", "path": "/s/recovery-prod.json", "reason": "mode 0644"},
    ),
    (Started(pid=42, config=None), {"pid": 42}),
    (
        Throttled.summary(uid=7, denied=1, malformed=2, first_ts=1000.0, last_ts=1001.5),
        {
            "peer": {"uid": 7},
            "dropped": 3,
            "denied": 1,
            "malformed": 2,
            "first_ts": "1000.000000",
            "last_ts": "1001.500000",
        },
    ),
    (Rotated(prev_file="audit.jsonl.20260101T000000Z-9"), {"prev_file": "audit.jsonl.20260101T000000Z-9"}),
    (
        Pruned(removed=("a.1", "a.2"), oldest_kept="a.3", oldest_kept_seq=12, oldest_kept_prev="66" * 32),
        {"removed": ["a.1", "a.2"], "oldest_kept": "a.3", "oldest_kept_seq": 12, "oldest_kept_prev": "66" * 32},
    ),
    (Discontinuity(reason="the live file was removed", found_file=None), {"reason": "the live file was removed"}),
]


@pytest.mark.parametrize(("record", "fields"), CASES, ids=lambda v: type(v).__name__ if not isinstance(v, dict) else "")
def test_each_record_encodes_to_the_historic_line(record: AuditRecord, fields: dict[str, object]) -> None:
    assert encode(record) == (record.event, fields)


def test_the_union_is_closed_over_every_event_name() -> None:
    """Every event name has a record type, every record type has a known event name, and each is covered above."""
    types = typing.get_args(AuditRecord)
    assert {t.event for t in types} == set(typing.get_args(AuditEvent))
    assert "explained" not in typing.get_args(AuditEvent)  # declared once, never written: removed
    assert {type(record) for record, _ in CASES} == set(types)
    unsynced = {t.__name__ for t in types if not t.durable}
    assert unsynced == {"Received", "PeerRefused"}  # the only records that wait for the next sync
