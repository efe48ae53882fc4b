"""Independent COSE_Sign1 parsing and verification for the CCF governance sandbox.

This module owns the sandbox's view of a governance envelope: it decodes the bytes with cbor2 and verifies
the signature with ``cryptography``. It deliberately shares no code with the agent's own COSE encoder, so
the sandbox can catch the agent's mistakes instead of repeating them.

Parse failures raise :class:`CoseParseError`; CCF turns these into ``500 InternalError`` (its authentication
throws). Authentication failures (unsupported alg, bad signature) are reported by the caller as 401s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

COSE_SIGN1_TAG: Final = 18
HEADER_ALG: Final = 1
HEADER_KID: Final = 4
HEADER_MSG_TYPE: Final = "ccf.gov.msg.type"
HEADER_CREATED_AT: Final = "ccf.gov.msg.created_at"
HEADER_PROPOSAL_ID: Final = "ccf.gov.msg.proposal_id"


@dataclass(frozen=True, slots=True)
class _AlgInfo:
    curve_name: str
    hash_factory: type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512]
    half_size: int


# ES256 / ES384 / ES512: the only algorithms CCF accepts for governance (cose_common.h is_ecdsa_alg).
SUPPORTED_ALGS: Final[dict[int, _AlgInfo]] = {
    -7: _AlgInfo("secp256r1", hashes.SHA256, 32),
    -35: _AlgInfo("secp384r1", hashes.SHA384, 48),
    -36: _AlgInfo("secp521r1", hashes.SHA512, 66),
}


class CoseParseError(Exception):
    """The envelope is malformed; the text mirrors CCF's (5.x/6.x) exception text."""


@dataclass(frozen=True, slots=True)
class GovEnvelope:
    """A parsed (not yet verified) governance COSE_Sign1."""

    alg: int
    kid: bytes
    created_at: int
    msg_type: str | None
    proposal_id: str | None
    protected: bytes
    payload: bytes
    signature: bytes


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_envelope(data: bytes) -> GovEnvelope:
    """Decode a tagged COSE_Sign1 and its governance protected headers, or raise :class:`CoseParseError`."""
    try:
        outer = cbor2.loads(data)
    except Exception as exc:
        raise CoseParseError("Failed to parse COSE_Sign1 outer array") from exc
    if not isinstance(outer, cbor2.CBORTag):
        raise CoseParseError("COSE_Sign1 is not tagged")
    if outer.tag != COSE_SIGN1_TAG:
        raise CoseParseError("COSE_Sign1 is not tagged")
    items = outer.value
    if not isinstance(items, list | tuple) or len(items) != 4:
        raise CoseParseError("Failed to parse COSE_Sign1 outer array")
    protected, unprotected, payload, signature = items
    if not isinstance(protected, bytes):
        raise CoseParseError("Failed to decode protected header: protected header is not a byte string")
    if not isinstance(unprotected, dict):
        raise CoseParseError("Failed to decode COSE_Sign1")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise CoseParseError("Failed to decode COSE_Sign1")
    try:
        header = cbor2.loads(protected)
    except Exception as exc:
        raise CoseParseError(f"Failed to decode protected header: {exc}") from exc
    if not isinstance(header, dict):
        raise CoseParseError("Failed to decode protected header: protected header is not a map")
    return GovEnvelope(
        alg=_alg(header),
        kid=_kid(header),
        created_at=_created_at(header),
        msg_type=_optional_text(header, HEADER_MSG_TYPE),
        proposal_id=_optional_text(header, HEADER_PROPOSAL_ID),
        protected=protected,
        payload=payload,
        signature=signature,
    )


def _alg(header: dict[Any, Any]) -> int:
    if HEADER_ALG not in header:
        raise CoseParseError("Missing algorithm in protected header")
    alg = header[HEADER_ALG]
    if not _is_int(alg):
        raise CoseParseError("Failed to decode protected header: alg is not an integer")
    return int(alg)


def _kid(header: dict[Any, Any]) -> bytes:
    if HEADER_KID not in header:
        raise CoseParseError("Missing kid in protected header")
    kid = header[HEADER_KID]
    if not isinstance(kid, bytes):
        raise CoseParseError("Failed to decode protected header: kid is not a byte string")
    return kid


def _created_at(header: dict[Any, Any]) -> int:
    if HEADER_CREATED_AT not in header:
        raise CoseParseError("Missing created_at in protected header")
    created_at = header[HEADER_CREATED_AT]
    if not _is_int(created_at):
        raise CoseParseError("Failed to decode protected header: created_at is not an integer")
    if created_at < 0:
        raise CoseParseError("Header parameter created_at must be positive")
    if created_at > 2**63 - 1:
        raise CoseParseError("Failed to decode protected header: created_at does not fit in int64")
    return int(created_at)


def _optional_text(header: dict[Any, Any], label: str) -> str | None:
    if label not in header:
        return None
    value = header[label]
    if not isinstance(value, str):
        raise CoseParseError(f"Failed to decode protected header: {label} is not a text string")
    return value


def sig_structure(envelope: GovEnvelope) -> bytes:
    """The bytes that were signed: ``["Signature1", protected, h'', payload]``."""
    return cbor2.dumps(["Signature1", envelope.protected, b"", envelope.payload])


def verify_envelope(envelope: GovEnvelope, public_key: ec.EllipticCurvePublicKey) -> bool:
    """Check the raw ``r||s`` signature; the alg must match the key's curve (as newest CCF requires)."""
    info = SUPPORTED_ALGS.get(envelope.alg)
    if info is None or public_key.curve.name != info.curve_name:
        return False
    if len(envelope.signature) != 2 * info.half_size:
        return False
    r = int.from_bytes(envelope.signature[: info.half_size], "big")
    s = int.from_bytes(envelope.signature[info.half_size :], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), sig_structure(envelope), ec.ECDSA(info.hash_factory()))
    except InvalidSignature:
        return False
    return True
