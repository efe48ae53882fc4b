"""The ``file`` backend: a PEM private key on disk. For development and tests only; the daemon warns.

The key is read once at open, must not be readable by group or others (as ssh insists for private keys), and is
kept in memory. With a ``CryptoPool`` (the daemon has one on a machine with two cores or more) the key is handed to
the crypto workers over their pipes and signing runs there, off the event loop; without one it runs inline.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signing_agent.algorithms import SignatureAlgorithm, der_to_raw
from signing_agent.backends._secrets import read_secret_file
from signing_agent.backends.base import KeyInfo, Priority
from signing_agent.errors import BackendError, ConfigError, SigningFailedError
from signing_agent.workers.pool import CryptoPool


def _load_private_key(path: Path, name: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    data = read_secret_file(path, f"{name}.path:")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never echo the parser's text: it may quote key material.
        raise ConfigError(f"{name}.path: {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{name}.path: {path} holds a {type(key).__name__}; expected an EC or RSA key")
    return key


class FileSigningKey:
    """An EC key from a PEM file; signed with in ``pool``'s workers when there is a pool."""

    def __init__(self, path: Path, *, name: str, pool: CryptoPool | None = None) -> None:
        key = _load_private_key(path, name)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{name}.path: {path} is not an EC key; governance signing needs P-256/P-384/P-521")
        self._key: ec.EllipticCurvePrivateKey | None = key
        self._pool = pool
        self._handle = pool.add_key(key) if pool is not None else 0
        self._info = KeyInfo(backend="file", location=str(path), public_key=key.public_key(), verifies=pool is not None)

    async def describe(self) -> KeyInfo:
        return self._info

    async def sign_digest(
        self, alg: SignatureAlgorithm, digest: bytes, *, priority: Priority = Priority.NORMAL
    ) -> bytes:
        if self._key is None:
            raise BackendError("the file key was closed")
        if len(digest) != alg.digest_size:
            raise SigningFailedError(f"{alg.name} needs a {alg.digest_size}-byte digest, got {len(digest)}")
        if self._key.curve.name != alg.curve_name:
            raise SigningFailedError(f"{alg.name} does not match the key's curve {self._key.curve.name}")
        if self._pool is not None:
            return await self._pool.sign(self._handle, alg, digest)
        der = self._key.sign(digest, ec.ECDSA(Prehashed(alg.hash_algorithm())))
        return der_to_raw(alg, der)

    async def aclose(self) -> None:
        self._key = None
        if self._pool is not None:
            self._pool.drop_key(self._handle)
            self._pool = None


class FileDecryptionKey:
    """An RSA key from a PEM file (the ``openssl pkeyutl`` way, which this agent exists to replace)."""

    def __init__(self, path: Path, *, name: str) -> None:
        key = _load_private_key(path, name)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{name}.path: {path} is not an RSA key; recovery shares need RSA-OAEP")
        self._key: rsa.RSAPrivateKey | None = key
        self._info = KeyInfo(backend="file", location=str(path), public_key=key.public_key())

    async def describe(self) -> KeyInfo:
        return self._info

    async def decrypt_oaep_sha256(self, ciphertext: bytes, *, priority: Priority = Priority.HIGH) -> bytes:
        if self._key is None:
            raise BackendError("the file key was closed")
        try:
            return self._key.decrypt(
                ciphertext,
                padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
            )
        except ValueError:
            raise BackendError("decryption failed") from None

    async def aclose(self) -> None:
        self._key = None
