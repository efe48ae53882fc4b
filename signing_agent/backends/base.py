"""The plug point between the agent and key stores: a key that signs digests, and a key that decrypts.

Narrow on purpose (the lesson of ``cryptography``'s multi-backend interface): a key store signs a digest with a key it
never exports, decrypts a ciphertext with RSA-OAEP-SHA256, and describes the key. It knows nothing of COSE or CCF.
Each backend module keeps its vendor SDK imports to itself and wraps vendor exceptions into ``signing_agent.errors``.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signing_agent.algorithms import SignatureAlgorithm
from signing_agent.config import BackendKind


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a key store says about a key: its public half and where it lives (never any secret)."""

    backend: BackendKind
    """The key store: ``file``, ``pkcs11`` or ``azure-keyvault``."""
    location: str
    """A human-readable locator, e.g. a ``pkcs11:`` URI or a Key Vault key id. Safe to log."""
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    warnings: tuple[str, ...] = ()
    """Things an operator should know, e.g. that the vault's current key version drifted from the pinned one."""
    verifies: bool = False
    """Every signature the key returns was verified against ``public_key`` first, in the same step (a file key in
    the crypto workers): the signer, which has proved ``public_key`` equal to the certificate's, need not again."""


class Priority(enum.IntEnum):
    """Who goes first when a rate-limited key store (Key Vault) is short of budget. Lower is more urgent."""

    HIGH = 0
    """Recovery shares and acks: disaster recovery and activation must not wait behind routine votes."""
    NORMAL = 1
    """Proposals, ballots, withdrawals, state digests."""


@runtime_checkable
class SigningKey(Protocol):
    """**Protocol:** an EC private key in a key store that signs digests and never leaves it."""

    async def describe(self) -> KeyInfo:
        """The public key and locator. Cached by implementations after the first call."""
        ...

    async def sign_digest(
        self, alg: SignatureAlgorithm, digest: bytes, *, priority: Priority = Priority.NORMAL
    ) -> bytes:
        """Sign ``digest`` (already hashed with ``alg``'s hash) and return the raw fixed-width ``r||s``.

        Raises ``BackendUnavailableError`` when the store cannot be reached (retryable) and ``SigningFailedError``
        when it answered with something unusable. Implementations check the length of what the store returned.
        """
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class DecryptionKey(Protocol):
    """**Protocol:** an RSA private key in a key store that decrypts and never leaves it (recovery shares)."""

    async def describe(self) -> KeyInfo: ...

    async def decrypt_oaep_sha256(self, ciphertext: bytes, *, priority: Priority = Priority.HIGH) -> bytes:
        """RSA-OAEP with SHA-256 and MGF1-SHA-256, empty label, inside the key store.

        Raises ``UnsupportedOperationError`` when the store cannot do OAEP-SHA256 (with a message that says so),
        ``BackendUnavailableError`` when it cannot be reached, and ``BackendError`` on a decryption failure
        (one uniform message: nothing about the padding).
        """
        ...

    async def aclose(self) -> None: ...


async def decrypts_round_trip(key: DecryptionKey, public_key: rsa.RSAPublicKey) -> bool:
    """Encrypt a random message to ``public_key`` here, with RSA-OAEP-SHA256 as CCF encrypts recovery shares, and have
    ``key`` decrypt it in its key store: True when it came back unchanged. The key store's errors pass through (a
    token without OAEP-SHA256 raises ``UnsupportedOperationError``, with a hint)."""
    probe = secrets.token_bytes(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    plain = await key.decrypt_oaep_sha256(public_key.encrypt(probe, oaep), priority=Priority.NORMAL)
    return secrets.compare_digest(plain, probe)
