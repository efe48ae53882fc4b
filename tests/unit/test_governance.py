"""What each governance message type must carry, refused before signing when CCF would refuse it."""

from __future__ import annotations

import hashlib
import json

import pytest

from signing_agent.cose.governance import (
    MAX_CREATED_AT,
    GovernanceRequest,
    MsgType,
    summarise_payload,
)
from signing_agent.errors import InvalidRequestError


@pytest.mark.parametrize("msg_type", [MsgType.BALLOT, MsgType.WITHDRAWAL])
def test_ballot_and_withdrawal_need_a_proposal_id(msg_type: MsgType) -> None:
    with pytest.raises(InvalidRequestError, match="needs proposal_id"):
        GovernanceRequest(msg_type=msg_type, created_at=1, payload=b"")


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "g" * 64, "", "a" * 65])
def test_proposal_id_must_be_64_lowercase_hex(bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="64 lowercase hex"):
        GovernanceRequest(msg_type=MsgType.BALLOT, created_at=1, payload=b"", proposal_id=bad)


def test_other_types_refuse_a_proposal_id() -> None:
    with pytest.raises(InvalidRequestError, match="does not take"):
        GovernanceRequest(msg_type=MsgType.ACK, created_at=1, payload=b"", proposal_id="a" * 64)


@pytest.mark.parametrize("created_at", [-1, MAX_CREATED_AT + 1, True, 1.5, "1"])
def test_created_at_bounds_and_type(created_at: object) -> None:
    with pytest.raises(InvalidRequestError, match="created_at"):
        GovernanceRequest(msg_type=MsgType.ACK, created_at=created_at, payload=b"")  # type: ignore[arg-type]


def test_msg_type_parse() -> None:
    assert MsgType.parse("recovery_share") is MsgType.RECOVERY_SHARE
    for bad in ("encrypted_recovery_share", "Proposal", 3, None):
        with pytest.raises(InvalidRequestError, match="not a governance message type"):
            MsgType.parse(bad)


def test_proposal_summary_lists_actions() -> None:
    summary = summarise_payload(
        MsgType.PROPOSAL, b'{"actions":[{"name":"set_member","args":{}},{"name":"set_constitution"}]}'
    )
    assert summary.actions == ("set_member", "set_constitution")


@pytest.mark.parametrize(
    ("msg_type", "payload", "message"),
    [
        (MsgType.PROPOSAL, b"not json", "not valid JSON"),
        (MsgType.PROPOSAL, b"\xff", "UTF-8"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x","args":NaN}]}', "NaN"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x","args":-Infinity}]}', "Infinity"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x","args":1e999}]}', "overflows to Infinity"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x","args":"\\ud800"}]}', "lone surrogate"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x","args":' + b"9" * 5000 + b"}]}", "64-bit"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x","args":18446744073709551616}]}', "64-bit"),
        (MsgType.PROPOSAL, b'{"actions":[{"name":"x"}],"actions":[{"name":"y"}]}', "appears twice"),
        (MsgType.PROPOSAL, b"[]", "JSON object"),
        (MsgType.PROPOSAL, b'{"actions":[]}', "actions"),
        (MsgType.PROPOSAL, b'{"actions":[{"args":{}}]}', "string 'name'"),
        (MsgType.BALLOT, b'{"ballot":1}', "ballot"),
        (MsgType.ACK, b"{}", "stateDigest"),
        (MsgType.RECOVERY_SHARE, b'{"share":"***"}', "base64"),
        (MsgType.RECOVERY_SHARE, b'{"shares":"AA=="}', "share"),
    ],
)
def test_payloads_ccf_would_refuse_are_refused(msg_type: MsgType, payload: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        summarise_payload(msg_type, payload)


def test_ballot_summary_hashes_the_script() -> None:
    script = "export function vote (proposal, proposerId) { return true }"
    summary = summarise_payload(MsgType.BALLOT, json.dumps({"ballot": script}).encode())
    assert summary.ballot_sha256 == hashlib.sha256(script.encode()).hexdigest()


def test_recovery_share_summary_carries_no_share() -> None:
    summary = summarise_payload(MsgType.RECOVERY_SHARE, b'{"share":"c2VjcmV0LXNoYXJl"}')
    assert "c2VjcmV0" not in repr(summary)
