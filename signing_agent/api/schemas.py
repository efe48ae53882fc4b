"""Strict parsing of API request bodies: exact JSON types, unknown fields refused, base64 only here.

Digests, payloads and COSE are ``bytes`` everywhere else; this module is where base64 and JSON meet them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any

from signing_agent import strict_json
from signing_agent.cose.governance import MsgType, check_created_at, check_proposal_id, compact_json
from signing_agent.errors import InvalidRequestError
from signing_agent.signer import SignRequest


def parse_json(raw: bytes) -> Any:
    """Parse a JSON body as strictly as CCF would (``signing_agent.strict_json``): UTF-8 only, no NaN/Infinity, no
    lone surrogates or duplicate keys, 64-bit integers, bounded nesting."""
    return strict_json.loads(raw, "the body")


def parse_object(raw: bytes, allowed: frozenset[str], required: frozenset[str] = frozenset()) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(body))
    if missing:
        raise InvalidRequestError(f"missing field(s): {', '.join(missing)}")
    return body


def get_str(body: dict[str, Any], key: str) -> str:
    value = body[key]
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{key} must be a non-empty string")
    return value


def decode_base64(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{key} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{key} is not valid standard base64") from None


_SIGN_FIELDS = frozenset({"identity", "msg_type", "proposal_id", "created_at", "payload", "payload_base64"})


def parse_sign_request(raw: bytes) -> SignRequest:
    """``POST /v1/sign``: identity, msg_type, and optionally proposal_id, created_at, payload or payload_base64."""
    body = parse_object(raw, _SIGN_FIELDS, frozenset({"identity", "msg_type"}))
    if "payload" in body and "payload_base64" in body:
        raise InvalidRequestError("give payload (a JSON value) or payload_base64 (exact bytes), not both")
    if "payload_base64" in body:
        payload = decode_base64(body["payload_base64"], "payload_base64")
    elif "payload" in body:
        payload = compact_json(body["payload"])
    else:
        payload = b""
    created_at = body.get("created_at")
    proposal_id = body.get("proposal_id")
    return SignRequest(
        identity=get_str(body, "identity"),
        msg_type=MsgType.parse(body["msg_type"]),
        payload=payload,
        created_at=None if created_at is None else check_created_at(created_at),
        proposal_id=None if proposal_id is None else check_proposal_id(proposal_id),
    )


def parse_explain_request(raw: bytes) -> SignRequest:
    """``POST /v1/explain``: the fields of ``/v1/sign`` plus an optional ``service`` it would be submitted to."""
    body = parse_object(raw, _SIGN_FIELDS | {"service"}, frozenset({"identity", "msg_type"}))
    service = get_str(body, "service") if "service" in body else None
    body.pop("service", None)
    return dataclasses.replace(parse_sign_request(compact_json(body)), service=service)
