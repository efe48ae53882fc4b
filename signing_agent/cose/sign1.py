"""COSE_Sign1 (RFC 9052) with a prepare/finish split, so a key store only ever sees a digest.

``prepare()`` encodes the protected header once and returns an immutable ``ToBeSigned`` holding those exact bytes and
the digest of the ``Sig_structure``. ``finish()`` assembles the message from the same bytes, so the header that was
signed and the header that is sent cannot drift (CCF's own ``ccf.cose`` rebuilds it in both steps).

Must not import: aiohttp, asyncio, socket, key-store SDKs, ``signing_agent.backends`` or ``signing_agent.ccf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.algorithms import SignatureAlgorithm, from_cose_id, verify_digest
from signing_agent.errors import InvalidRequestError, SigningFailedError

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4

HeaderLabel = int | str


@dataclass(frozen=True, slots=True)
class ToBeSigned:
    """What a key store signs: the digest of ``["Signature1", protected, h'', payload]`` under ``alg``'s hash."""

    alg: SignatureAlgorithm
    protected: bytes
    """The encoded protected-header map, exactly as it goes on the wire."""
    payload: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class DecodedSign1:
    protected: bytes
    headers: Mapping[HeaderLabel, Any]
    payload: bytes
    signature: bytes

    @property
    def alg(self) -> SignatureAlgorithm:
        value = self.headers.get(HEADER_ALG)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequestError("COSE_Sign1: the alg header (1) must be an integer")
        try:
            return from_cose_id(value)
        except ValueError as exc:
            raise InvalidRequestError(f"COSE_Sign1: {exc}") from None


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The CBOR ``Sig_structure`` for COSE_Sign1 with empty external AAD."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def prepare(alg: SignatureAlgorithm, headers: Mapping[HeaderLabel, Any], payload: bytes) -> ToBeSigned:
    """Encode the protected header (``alg`` first, then ``headers`` in order) and hash what is to be signed."""
    if HEADER_ALG in headers:
        raise ValueError("prepare() sets the alg header itself")
    protected = cbor2.dumps({HEADER_ALG: alg.cose_id, **headers})
    return ToBeSigned(
        alg=alg, protected=protected, payload=payload, digest=alg.digest(sig_structure(protected, payload))
    )


def finish(tbs: ToBeSigned, signature: bytes) -> bytes:
    """Assemble the tagged COSE_Sign1 from the exact bytes that were hashed and a raw ``r||s`` signature."""
    if len(signature) != tbs.alg.signature_size:
        raise SigningFailedError(
            f"{tbs.alg.name} signature must be {tbs.alg.signature_size} raw bytes (r||s), got {len(signature)}"
        )
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [tbs.protected, {}, tbs.payload, signature]))


_CBOR_ERRORS = (cbor2.CBORDecodeError, ValueError, TypeError, ArithmeticError, RecursionError)
"""What ``cbor2.loads`` raises on bad input: a decimal fraction (tag 4) with a huge exponent is a
``decimal.InvalidOperation``, a big integer one an ``OverflowError``; both are ``ArithmeticError``s."""


def decode(message: bytes) -> DecodedSign1:
    """Parse a tagged COSE_Sign1 with an attached payload. Raises ``InvalidRequestError`` on anything else."""
    try:
        outer = cbor2.loads(message)
    except _CBOR_ERRORS as exc:
        raise InvalidRequestError(f"COSE_Sign1: not valid CBOR: {exc}") from None
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise InvalidRequestError("COSE_Sign1: not tagged 18")
    value = outer.value
    # cbor2 5.x decodes arrays as lists and 6.x as tuples.
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise InvalidRequestError("COSE_Sign1: expected an array of 4 elements")
    protected, unprotected, payload, signature = value
    if not isinstance(protected, bytes):
        raise InvalidRequestError("COSE_Sign1: the protected header must be a byte string")
    if not isinstance(unprotected, dict):
        raise InvalidRequestError("COSE_Sign1: the unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise InvalidRequestError("COSE_Sign1: the payload must be attached (a byte string)")
    if not isinstance(signature, bytes):
        raise InvalidRequestError("COSE_Sign1: the signature must be a byte string")
    try:
        headers = cbor2.loads(protected) if protected else {}
    except _CBOR_ERRORS as exc:
        raise InvalidRequestError(f"COSE_Sign1: the protected header is not valid CBOR: {exc}") from None
    if not isinstance(headers, dict):
        raise InvalidRequestError("COSE_Sign1: the protected header must be a map")
    return DecodedSign1(protected=protected, headers=headers, payload=payload, signature=signature)


def verify(message: DecodedSign1, public_key: ec.EllipticCurvePublicKey) -> None:
    """Verify the signature with ``public_key``. Raises ``SigningFailedError``; never returns False."""
    alg = message.alg
    verify_digest(public_key, alg, alg.digest(sig_structure(message.protected, message.payload)), message.signature)
