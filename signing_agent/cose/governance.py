"""CCF governance messages: the ``ccf.gov.msg.*`` protected headers, the kid, and what each message type carries.

Facts from CCF's source (see ../shared/ccf-governance.md §2): the kid is the bstr of the lowercase hex SHA-256 of the
member certificate's DER; ``created_at`` is an integer of seconds since the epoch (CCF refuses values above
9 999 999 999 for proposals); ``proposal_id`` is required for ballots and withdrawals and must equal the URL's id.
Where CCF would reject a message we refuse to sign it, with a clear error, so it is never sent.

Must not import: aiohttp, asyncio, socket, key-store SDKs, ``signing_agent.backends`` or ``signing_agent.ccf``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from signing_agent import strict_json
from signing_agent.algorithms import SignatureAlgorithm
from signing_agent.cose.sign1 import HEADER_KID, HeaderLabel, ToBeSigned, prepare
from signing_agent.errors import InvalidRequestError
from signing_agent.names import is_ccf_id

HEADER_MSG_TYPE = "ccf.gov.msg.type"
HEADER_CREATED_AT = "ccf.gov.msg.created_at"
HEADER_PROPOSAL_ID = "ccf.gov.msg.proposal_id"
MAX_CREATED_AT = 9_999_999_999


class MsgType(enum.StrEnum):
    """The governance message types of the 2024-07-01 API (``encrypted_recovery_share`` died with the classic API)."""

    PROPOSAL = "proposal"
    BALLOT = "ballot"
    WITHDRAWAL = "withdrawal"
    STATE_DIGEST = "state_digest"
    ACK = "ack"
    RECOVERY_SHARE = "recovery_share"

    @property
    def needs_proposal_id(self) -> bool:
        return self in (MsgType.BALLOT, MsgType.WITHDRAWAL)

    @classmethod
    def parse(cls, value: object) -> MsgType:
        if isinstance(value, str) and value in cls._value2member_map_:
            return cls(value)
        allowed = ", ".join(m.value for m in cls)
        raise InvalidRequestError(f"msg_type: {value!r} is not a governance message type ({allowed})")


@dataclass(frozen=True, slots=True)
class PayloadSummary:
    """What a governance payload says, for policy, explain and audit. Never holds a secret."""

    sha256: str
    actions: tuple[str, ...] = ()
    """Proposal action names, in order."""
    ballot_sha256: str | None = None
    """SHA-256 of the ballot's JavaScript, for ballots."""
    details: Mapping[str, Any] = field(default_factory=dict)


def _json_object(msg_type: MsgType, payload: bytes) -> dict[str, Any]:
    value = strict_json.loads(payload, f"a {msg_type} payload")
    if not isinstance(value, dict):
        raise InvalidRequestError(f"a {msg_type} payload must be a JSON object")
    return value


def summarise_payload(msg_type: MsgType, payload: bytes) -> PayloadSummary:
    """Check a payload the way CCF will read it, and summarise it. Raises ``InvalidRequestError``."""
    digest = hashlib.sha256(payload).hexdigest()
    match msg_type:
        case MsgType.PROPOSAL:
            body = _json_object(msg_type, payload)
            actions = body.get("actions")
            if not isinstance(actions, list) or not actions:
                raise InvalidRequestError('a proposal must be {"actions": [{"name": ..., "args": ...}, ...]}')
            names: list[str] = []
            for i, action in enumerate(actions):
                if not isinstance(action, dict) or not isinstance(action.get("name"), str) or not action["name"]:
                    raise InvalidRequestError(f"proposal actions[{i}] must be an object with a string 'name'")
                names.append(action["name"])
            return PayloadSummary(sha256=digest, actions=tuple(names))
        case MsgType.BALLOT:
            body = _json_object(msg_type, payload)
            ballot = body.get("ballot")
            if not isinstance(ballot, str):
                raise InvalidRequestError('a ballot must be {"ballot": "<JavaScript module>"}')
            return PayloadSummary(sha256=digest, ballot_sha256=hashlib.sha256(ballot.encode("utf-8")).hexdigest())
        case MsgType.ACK:
            body = _json_object(msg_type, payload)
            state_digest = body.get("stateDigest")
            if not isinstance(state_digest, str):
                raise InvalidRequestError('an ack must be {"stateDigest": "<hex>"} (the :update response)')
            return PayloadSummary(sha256=digest, details={"stateDigest": state_digest})
        case MsgType.RECOVERY_SHARE:
            body = _json_object(msg_type, payload)
            share = body.get("share")
            if not isinstance(share, str):
                raise InvalidRequestError('a recovery share must be {"share": "<base64>"}')
            try:
                base64.b64decode(share, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequestError("the recovery share is not valid base64") from None
            # The share itself is secret: the summary carries only the payload's digest.
            return PayloadSummary(sha256=digest)
        case MsgType.WITHDRAWAL | MsgType.STATE_DIGEST:
            # CCF ignores these payloads; the reference tools send them empty. Anything else must still be strict
            # JSON: the agent signs no arbitrary bytes under a governance header.
            if payload:
                strict_json.loads(payload, f"a {msg_type} payload")
            return PayloadSummary(sha256=digest)


def compact_json(value: Any) -> bytes:
    """A JSON value serialised compactly as UTF-8: the exact payload bytes that get signed."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_proposal_id(value: object) -> str:
    if not isinstance(value, str) or not is_ccf_id(value):
        raise InvalidRequestError("proposal_id must be the 64 lowercase hex characters of a CCF proposal id")
    return value


def check_created_at(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CREATED_AT:
        raise InvalidRequestError(f"created_at must be an integer number of seconds from 0 to {MAX_CREATED_AT}")
    return value


@dataclass(frozen=True, slots=True)
class GovernanceRequest:
    """A validated request to sign one governance message."""

    msg_type: MsgType
    created_at: int
    payload: bytes
    proposal_id: str | None = None

    def __post_init__(self) -> None:
        check_created_at(self.created_at)
        if self.msg_type.needs_proposal_id:
            if self.proposal_id is None:
                raise InvalidRequestError(f"a {self.msg_type} needs proposal_id (ccf.gov.msg.proposal_id)")
            check_proposal_id(self.proposal_id)
        elif self.proposal_id is not None:
            raise InvalidRequestError(f"a {self.msg_type} does not take a proposal_id")


def protected_headers(member: str, request: GovernanceRequest) -> dict[HeaderLabel, Any]:
    """The protected headers after alg, in the order CCF's ``ccf_cose_sign1`` writes them."""
    headers: dict[HeaderLabel, Any] = {
        HEADER_KID: member.encode("ascii"),
        HEADER_MSG_TYPE: str(request.msg_type),
    }
    if request.proposal_id is not None:
        headers[HEADER_PROPOSAL_ID] = request.proposal_id
    headers[HEADER_CREATED_AT] = request.created_at
    return headers


def prepare_governance(alg: SignatureAlgorithm, member: str, request: GovernanceRequest) -> ToBeSigned:
    """The digest to sign for a governance message from ``member`` (its id) with ``alg``."""
    if not is_ccf_id(member):
        raise ValueError("member id must be 64 lowercase hex characters")
    return prepare(alg, protected_headers(member, request), request.payload)
