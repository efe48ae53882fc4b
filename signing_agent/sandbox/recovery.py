"""Recovery share cryptography of the CCF sandbox, shaped like CCF's ``crypto/sharing.h`` and ``share_manager.h``.

- The secret is 10 random limbs over the prime field 2^31 - 1 (CCF samples ~31 bits per limb, 10 limbs). Each
  limb is split with Shamir's scheme (k-of-n, same x for all limbs); any k distinct shares reconstruct it, fewer
  do not.
- A share is serialised as 44 bytes: uint32 little-endian ``x`` then 10 x uint32 ``y`` limbs. ``x`` >= 1 is a
  partial share; ``x == 0`` is the full key (what a recovery Owner gets).
- Each member's share is encrypted with RSA-OAEP (SHA-256, MGF1-SHA-256, no label) under the member's registered
  encryption key, as CCF's ``rsa_oaep_wrap`` does.

Real CCF wraps the ledger secret with a key derived (HKDF) from the full key, and finds out that a combination of
shares is wrong when unwrapping fails. The sandbox has no ledger secret: it keeps the serialised full key and
compares the reconstruction with it, which fails in the same cases.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

PRIME: Final = 2**31 - 1
LIMBS: Final = 10
SHARE_SIZE: Final = 4 + 4 * LIMBS
_FORMAT: Final = f"<{1 + LIMBS}I"


@dataclass(frozen=True, slots=True)
class Share:
    """One share (``x`` >= 1) or the full key (``x`` == 0)."""

    x: int
    y: tuple[int, ...]

    def serialise(self) -> bytes:
        return struct.pack(_FORMAT, self.x, *self.y)

    @classmethod
    def parse(cls, data: bytes) -> Share:
        if len(data) != SHARE_SIZE:
            raise ValueError("Invalid serialised share size")
        x, *y = struct.unpack(_FORMAT, data)
        return cls(x, tuple(y))


def is_full_key(data: bytes) -> bool:
    """CCF's ``ShareManager::is_full_key``: a 44-byte share with x == 0."""
    return len(data) == SHARE_SIZE and Share.parse(data).x == 0


def sample_secret_and_shares(num_shares: int, threshold: int) -> tuple[Share, list[Share]]:
    """A random secret and ``num_shares`` shares of it, any ``threshold`` of which reconstruct it."""
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {num_shares}")
    polynomials = [[secrets.randbelow(PRIME) for _ in range(threshold)] for _ in range(LIMBS)]
    secret = Share(0, tuple(poly[0] for poly in polynomials))
    shares = [Share(x, tuple(_evaluate(poly, x) for poly in polynomials)) for x in range(1, num_shares + 1)]
    return secret, shares


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def recover_secret(shares: Sequence[Share], threshold: int) -> Share:
    """Lagrange interpolation at 0 over the first ``threshold`` shares (CCF ignores any excess)."""
    if len(shares) < threshold:
        raise ValueError(f"only {len(shares)} shares were submitted but recovery threshold is {threshold}")
    used = shares[:threshold]
    xs = [share.x for share in used]
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError("shares must have distinct, non-zero x coordinates")
    limbs: list[int] = []
    for limb in range(LIMBS):
        total = 0
        for i, share in enumerate(used):
            numerator, denominator = 1, 1
            for j, other in enumerate(xs):
                if j != i:
                    numerator = numerator * other % PRIME
                    denominator = denominator * (other - share.x) % PRIME
            total = (total + share.y[limb] * numerator * pow(denominator, -1, PRIME)) % PRIME
        limbs.append(total)
    return Share(0, tuple(limbs))


def load_encryption_key(pem: str | bytes) -> rsa.RSAPublicKey:
    """A member's RSA public encryption key (ValueError if it is not an RSA public key in PEM)."""
    key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the encryption key must be an RSA public key")  # noqa: TRY004 -- a bad value, like a bad PEM
    return key


def rsa_oaep_wrap(public_key_pem: str, plaintext: bytes) -> bytes:
    """RSA-OAEP with SHA-256 and MGF1-SHA-256 and no label (AKV's ``RSA-OAEP-256``)."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return load_encryption_key(public_key_pem).encrypt(plaintext, oaep)
