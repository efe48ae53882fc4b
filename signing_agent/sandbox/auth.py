"""COSE_Sign1 member authentication, in the order and with the error texts of CCF's ``cose_auth.cpp``.

Steps: content type → parse (malformed → 500 ``InternalError``) → alg → known member → signature (alg must
match the key's curve) → message type for the endpoint → Active (for the active-member policy). Each failure
other than a parse error is a 401 ``InvalidAuthenticationInfo`` with one ``details`` entry naming the
policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from signing_agent.sandbox.cose import (
    SUPPORTED_ALGS,
    CoseParseError,
    GovEnvelope,
    parse_envelope,
    verify_envelope,
)
from signing_agent.sandbox.errors import GovError, internal_error
from signing_agent.sandbox.state import GovernanceState

Policy = Literal["member_cose_sign1", "active_member_cose_sign1"]
MEMBER_POLICY: Final[Policy] = "member_cose_sign1"
ACTIVE_MEMBER_POLICY: Final[Policy] = "active_member_cose_sign1"
WWW_AUTHENTICATE: Final = 'COSE-SIGN1 realm="Signed request access"'


@dataclass(frozen=True, slots=True)
class Authenticated:
    envelope: GovEnvelope
    member_id: str


def unauthorized(policy: Policy, reason: str) -> GovError:
    return GovError(
        401,
        "InvalidAuthenticationInfo",
        "Invalid authentication credentials.",
        details=[{"auth_policy": policy, "code": "InvalidAuthenticationInfo", "message": reason}],
        headers={"WWW-Authenticate": WWW_AUTHENTICATE},
    )


def authenticate(
    state: GovernanceState, content_type: str | None, body: bytes, policy: Policy, expected_type: str
) -> Authenticated:
    if content_type is None:
        raise unauthorized(policy, "Missing content-type header")
    if content_type != "application/cose":
        raise unauthorized(policy, "Content type is not set to application/cose")
    try:
        envelope = parse_envelope(body)
    except CoseParseError as exc:
        raise internal_error(str(exc)) from exc
    if envelope.alg not in SUPPORTED_ALGS:
        raise unauthorized(policy, f"Unsupported algorithm: {envelope.alg}")
    try:
        member_id = envelope.kid.decode("ascii")
    except UnicodeDecodeError:
        member_id = ""
    member = state.member(member_id)
    if member is None:
        raise unauthorized(policy, "Signer is not a known member")
    key = state.public_key(member_id)
    if key is None or not verify_envelope(envelope, key):
        raise unauthorized(policy, "Failed to validate COSE Sign1")
    if envelope.msg_type is None:
        raise unauthorized(policy, f"Missing ccf.gov.msg.type, expected ccf.gov.msg.type to be {expected_type}")
    if envelope.msg_type != expected_type:
        raise unauthorized(
            policy,
            f"Found ccf.gov.msg.type set to {envelope.msg_type}, expected ccf.gov.msg.type to be {expected_type}",
        )
    if policy == ACTIVE_MEMBER_POLICY and member.status != "Active":
        raise unauthorized(policy, "Signer is not an ACTIVE member")
    return Authenticated(envelope, member_id)
