"""A member identity: the exact certificate registered in CCF, its member id, and the key store key that signs.

The member id always comes from the configured certificate, never from a key store (Key Vault's AutoRenew would
silently change it). At start-up the key's public half must equal the certificate's, and a probe signature must
verify against the certificate; otherwise the identity is refused with a clear ``IdentityError``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.algorithms import SignatureAlgorithm, for_curve, verify_digest
from signing_agent.backends.base import DecryptionKey, KeyInfo, SigningKey
from signing_agent.backends.factory import KeyStores
from signing_agent.certs import member_id, read_certificate
from signing_agent.config import IdentityConfig
from signing_agent.errors import AgentError, IdentityError

_logger = logging.getLogger(__name__)

_PROBE = b"signing-agent start-up self-test"


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    certificate_pem: bytes
    member_id: str
    alg: SignatureAlgorithm
    public_key: ec.EllipticCurvePublicKey
    signing_key: SigningKey
    backend: str
    location: str
    warnings: tuple[str, ...] = ()
    decryption_key: DecryptionKey | None = None
    encryption_public_key_pem: bytes | None = None

    async def aclose(self) -> None:
        """Close its keys (the key stores' sessions stay with ``KeyStores``)."""
        await self.signing_key.aclose()
        if self.decryption_key is not None:
            await self.decryption_key.aclose()


def _same_key(a: object, b: object) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    if isinstance(a, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) and isinstance(
        b, ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    ):
        return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)
    return False


async def _prove_key(
    key: SigningKey,
    cert_key: ec.EllipticCurvePublicKey,
    alg: SignatureAlgorithm,
    *,
    where: str,
    certificate: object,
    member: str,
) -> KeyInfo:
    """The key's public half equals the certificate's, and a probe signature verifies against the certificate."""
    info = await key.describe()
    if not _same_key(info.public_key, cert_key):
        raise IdentityError(
            f"{where}: the signing key at {info.location} does not match the certificate {certificate} "
            f"(member id {member})",
            hint="point signing_key at the private key of that certificate, or certificate at the cert of that key",
        )
    digest = alg.digest(_PROBE + where.encode())
    try:
        verify_digest(cert_key, alg, digest, await key.sign_digest(alg, digest))
    except AgentError as exc:
        raise IdentityError(f"{where}: start-up self-test signature failed: {exc.message}") from exc
    return info


async def open_identity(cfg: IdentityConfig, stores: KeyStores) -> Identity:
    """Open an identity's keys and prove the signing key matches the certificate."""
    where = f"identities.{cfg.name}"
    cert = read_certificate(cfg.certificate, f"{where}.certificate", error=IdentityError)
    cert_key = cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey):
        raise IdentityError(
            f"{where}.certificate: holds a {type(cert_key).__name__}; CCF governance needs an EC member key"
        )
    try:
        alg = for_curve(cert_key.curve.name)
    except IdentityError as exc:
        raise IdentityError(f"{where}.certificate: {exc.message}") from None
    mid = member_id(cert)

    async with contextlib.AsyncExitStack() as opened:
        key = stores.signing_key(cfg.signing_key, name=f"{where}.signing_key")
        opened.push_async_callback(key.aclose)
        info = await _prove_key(key, cert_key, alg, where=where, certificate=cfg.certificate, member=mid)
        decryption_key: DecryptionKey | None = None
        enc_pem: bytes | None = None
        if cfg.encryption_key is not None:
            decryption_key = stores.decryption_key(cfg.encryption_key, name=f"{where}.encryption_key")
            opened.push_async_callback(decryption_key.aclose)
            enc_info = await decryption_key.describe()
            if not isinstance(enc_info.public_key, rsa.RSAPublicKey):
                raise IdentityError(f"{where}.encryption_key: recovery shares need an RSA key")
            enc_pem = enc_info.public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        identity = Identity(
            name=cfg.name,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
            member_id=mid,
            alg=alg,
            public_key=cert_key,
            signing_key=key,
            backend=info.backend,
            location=info.location,
            warnings=info.warnings,
            decryption_key=decryption_key,
            encryption_public_key_pem=enc_pem,
        )
        opened.pop_all()  # proven: the keys are the identity's now, closed by ``Identity.aclose``
    return identity
