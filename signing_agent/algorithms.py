"""COSE signature algorithms that CCF accepts for governance: ES256, ES384, ES512. A leaf module.

The curve of the member's key chooses the algorithm, and the algorithm chooses the digest. The certificate's own
signature hash plays no part (CCF's ``ccf_cose_sign1_prepare`` gets that wrong for a P-384 key in a certificate
signed with SHA-256).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from signing_agent.errors import IdentityError, SigningFailedError

AlgorithmName = Literal["ES256", "ES384", "ES512"]


@dataclass(frozen=True, slots=True)
class SignatureAlgorithm:
    """One ECDSA algorithm: its COSE id, its hash, its curve and the size of a raw ``r||s`` signature."""

    name: AlgorithmName
    cose_id: int
    hash_name: Literal["sha256", "sha384", "sha512"]
    curve_name: Literal["secp256r1", "secp384r1", "secp521r1"]
    field_bytes: int

    @property
    def signature_size(self) -> int:
        """Bytes in a raw ``r||s`` signature."""
        return 2 * self.field_bytes

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.hash_name).digest_size

    def digest(self, data: bytes) -> bytes:
        """The digest this algorithm signs."""
        return hashlib.new(self.hash_name, data).digest()

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        match self.hash_name:
            case "sha256":
                return hashes.SHA256()
            case "sha384":
                return hashes.SHA384()
            case "sha512":
                return hashes.SHA512()

    def curve(self) -> ec.EllipticCurve:
        match self.curve_name:
            case "secp256r1":
                return ec.SECP256R1()
            case "secp384r1":
                return ec.SECP384R1()
            case "secp521r1":
                return ec.SECP521R1()


ES256 = SignatureAlgorithm("ES256", -7, "sha256", "secp256r1", 32)
ES384 = SignatureAlgorithm("ES384", -35, "sha384", "secp384r1", 48)
ES512 = SignatureAlgorithm("ES512", -36, "sha512", "secp521r1", 66)

ALGORITHMS: tuple[SignatureAlgorithm, ...] = (ES256, ES384, ES512)
_BY_CURVE: dict[str, SignatureAlgorithm] = {a.curve_name: a for a in ALGORITHMS}
_BY_COSE_ID = {a.cose_id: a for a in ALGORITHMS}
_BY_NAME: dict[str, SignatureAlgorithm] = {a.name: a for a in ALGORITHMS}


def for_curve(curve_name: str) -> SignatureAlgorithm:
    """The algorithm for a curve name as ``cryptography`` spells it (``secp384r1``)."""
    try:
        return _BY_CURVE[curve_name]
    except KeyError:
        raise IdentityError(
            f"unsupported curve {curve_name!r}: CCF governance accepts P-256, P-384 and P-521 keys only"
        ) from None


def for_public_key(key: object) -> SignatureAlgorithm:
    """The algorithm for an EC public key; any other key type is an ``IdentityError``."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(
            f"unsupported key type {type(key).__name__}: CCF governance signatures need an EC key (P-256/P-384/P-521)"
        )
    return for_curve(key.curve.name)


def from_name(name: str) -> SignatureAlgorithm:
    """The algorithm named ``name`` (``ES384``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported algorithm {name!r}") from None


def from_cose_id(cose_id: int) -> SignatureAlgorithm:
    try:
        return _BY_COSE_ID[cose_id]
    except KeyError:
        raise ValueError(f"unsupported COSE algorithm {cose_id}") from None


def raw_to_der(alg: SignatureAlgorithm, raw: bytes) -> bytes:
    """Raw ``r||s`` (COSE, JWS, PKCS#11 CKM_ECDSA) to the DER that ``cryptography`` verifies."""
    if len(raw) != alg.signature_size:
        raise SigningFailedError(f"{alg.name} signature must be {alg.signature_size} bytes, got {len(raw)}")
    n = alg.field_bytes
    return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))


def der_to_raw(alg: SignatureAlgorithm, der: bytes) -> bytes:
    """DER ``ECDSA-Sig-Value`` to fixed-width raw ``r||s``, each half left-padded to the field size."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError as exc:
        raise SigningFailedError(f"malformed DER ECDSA signature: {exc}") from exc
    n = alg.field_bytes
    return r.to_bytes(n, "big") + s.to_bytes(n, "big")


def verify_digest(
    public_key: ec.EllipticCurvePublicKey, alg: SignatureAlgorithm, digest: bytes, raw_signature: bytes
) -> None:
    """Verify a raw ``r||s`` signature over a digest. Raises ``SigningFailedError``; never returns False."""
    if public_key.curve.name != alg.curve_name:
        raise SigningFailedError(f"{alg.name} does not match the key's curve {public_key.curve.name}")
    der = raw_to_der(alg, raw_signature)
    try:
        public_key.verify(der, digest, ec.ECDSA(Prehashed(alg.hash_algorithm())))
    except InvalidSignature:
        raise SigningFailedError(
            f"the {alg.name} signature does not verify against the identity's certificate",
            hint="the key store signed with a key other than the one in the certificate",
        ) from None
