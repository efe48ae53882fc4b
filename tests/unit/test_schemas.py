"""Strict request parsing: exact types, unknown fields refused, hostile JSON turned into clear 400s."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signing_agent.api.schemas import parse_sign_request
from signing_agent.cose.governance import MsgType, compact_json
from signing_agent.errors import InvalidRequestError


def body(**fields: object) -> bytes:
    return json.dumps({"identity": "m0", "msg_type": "proposal", **fields}).encode()


def test_payload_json_is_serialised_compactly_as_utf8() -> None:
    req = parse_sign_request(body(payload={"actions": [{"name": "ü", "args": {"a": 1}}]}))
    assert req.payload == '{"actions":[{"name":"ü","args":{"a":1}}]}'.encode()
    assert req.msg_type is MsgType.PROPOSAL


def test_the_edges_of_strict_json_still_parse() -> None:
    """Escaped surrogate pairs, the 64-bit integer range and big finite numbers are valid JSON, kept exactly."""
    edges = b'["\\ud83d\\ude00",18446744073709551615,-9223372036854775808,1e308]'
    raw = b'{"identity":"m0","msg_type":"proposal","payload":' + edges + b"}"
    payload = parse_sign_request(raw).payload
    assert json.loads(payload) == ["\U0001f600", 2**64 - 1, -(2**63), 1e308]


def test_payload_base64_is_exact_bytes_and_default_is_empty() -> None:
    assert parse_sign_request(body(payload_base64=base64.b64encode(b"\x00\xff").decode())).payload == b"\x00\xff"
    assert parse_sign_request(body()).payload == b""


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "JSON object"),
        (b'{"identity":"m0","msg_type":"proposal","payload":NaN}', "NaN"),
        (b'{"identity":"m0","msg_type":"proposal","payload":' + b"9" * 5000 + b"}", "acceptable JSON"),
        (
            b'{"identity":"m0","msg_type":"proposal","payload":' + b"[" * 100000 + b"]" * 100000 + b"}",
            "nested",
        ),
        (b'{"identity":"m0","msg_type":"proposal","payload":[Infinity]}', "Infinity"),
        (b'{"identity":"m0","msg_type":"proposal","payload":{"a":-1E400}}', "overflows to Infinity"),
        (b'{"identity":"m0","msg_type":"proposal","payload":{"a":"x\\udfff"}}', "lone surrogate"),
        (b'{"identity":"\\ud800","msg_type":"proposal"}', "lone surrogate"),
        (b'{"identity":"m0","msg_type":"proposal","payload":{"\\udbff":1}}', "lone surrogate"),
        (b'{"identity":"m0","msg_type":"proposal","payload":-9223372036854775809}', "64-bit"),
        (b'{"identity":"m0","identity":"m1","msg_type":"proposal"}', "appears twice"),
        (body(extra=1), "unknown field"),
        (json.dumps({"msg_type": "proposal"}).encode(), "missing field"),
        (body(identity=3), "identity must be"),
        (body(msg_type="vote"), "not a governance message type"),
        (body(created_at="2024-01-01"), "created_at"),
        (body(created_at=-5), "created_at"),
        (body(proposal_id="ABC"), "proposal_id"),
        (body(payload_base64="not base64!"), "base64"),
        (body(payload_base64=5), "base64"),
        (body(payload={}, payload_base64=""), "not both"),
    ],
)
def test_bad_requests_are_clear_400s(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_sign_request(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_invalid_request(raw: bytes) -> None:
    with contextlib.suppress(InvalidRequestError):
        parse_sign_request(raw)


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_compact_json_round_trips(value: object) -> None:
    assert json.loads(compact_json(value)) == value
