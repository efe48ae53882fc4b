"""A member identity: the exact certificate registered in CCF, its member id, and the key store key that signs.

The member id always comes from the configured certificate, never from a key store (Key Vault's AutoRenew would
silently change it). At start-up the certificate must be valid now, the key's public half must equal the
certificate's, and a probe signature must verify against the certificate; otherwise the identity is refused with a
clear ``IdentityError``. An encryption key must decrypt a test message encrypted to its public key (RSA-OAEP-SHA256,
as CCF encrypts recovery shares); when it cannot, the identity still signs, and ``encryption_error`` says why its
recovery shares would fail (the daemon logs it; ``check-config`` fails on it). A certificate that expires within
``expiry_warning`` is a warning (``current_warnings``), computed when asked, so a long-running agent warns too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.algorithms import SignatureAlgorithm, for_curve, verify_digest
from signing_agent.backends.base import DecryptionKey, KeyInfo, SigningKey, decrypts_round_trip
from signing_agent.backends.keystores import KeyStores
from signing_agent.certs import Validity, member_id, read_certificate
from signing_agent.config import IdentityConfig
from signing_agent.errors import AgentError, IdentityError

_logger = logging.getLogger(__name__)

_PROBE = b"signing-agent start-up self-test"

DEFAULT_EXPIRY_WARNING = datetime.timedelta(days=30)
RENEWAL_HINT = (
    "the member id is the certificate's SHA-256, so a new certificate is a new member: propose set_member for it "
    "(with the same key, or a new one), have it accepted and activated, then point certificate at it"
)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


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
    encryption_error: IdentityError | None = None
    """Why the encryption key failed its start-up round trip (its recovery shares would fail), or None."""
    validity: Validity | None = None
    """The member certificate's validity period."""
    expiry_warning: datetime.timedelta = DEFAULT_EXPIRY_WARNING
    key_verifies: bool = False
    """The signing key verifies each signature against its public key, proved equal to the certificate's at open
    (``KeyInfo.verifies``)."""

    def certificate_problem(self, now: datetime.datetime | None = None) -> str | None:
        """Why the member certificate is not valid now (it expired while the agent ran), or None."""
        if self.validity is None:
            return None
        problem = self.validity.problem(now or utc_now())
        return None if problem is None else f"the member certificate {problem}"

    def certificate_warning(self, now: datetime.datetime | None = None) -> str | None:
        """The member certificate expires within ``expiry_warning`` (or is not valid now), or None."""
        if self.validity is None:
            return None
        when = now or utc_now()
        about = self.validity.problem(when) or self.validity.expiry_warning(when, self.expiry_warning)
        return None if about is None else f"the member certificate {about}"

    def current_warnings(self, now: datetime.datetime | None = None) -> tuple[str, ...]:
        """What an operator should know now: the key store's warnings, an encryption key that failed its round
        trip, and a member certificate that expires within ``expiry_warning`` (or is not valid)."""
        warnings = list(self.warnings)
        if self.encryption_error is not None:
            warnings.append(f"{self.encryption_error.message} (recovery shares will fail)")
        certificate = self.certificate_warning(now)
        if certificate is not None:
            warnings.append(certificate)
        return tuple(warnings)

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


async def _round_trip(key: DecryptionKey, public_key: rsa.RSAPublicKey, where: str) -> IdentityError | None:
    """None when ``key`` decrypts a test message encrypted to ``public_key``, else why not."""
    what = f"{where}.encryption_key: failed its self-test (decrypting a message encrypted to its public key)"
    try:
        same = await decrypts_round_trip(key, public_key)
    except AgentError as exc:
        return IdentityError(f"{what}: {exc.message.removeprefix(f'{where}.encryption_key: ')}", hint=exc.hint)
    if same:
        return None
    return IdentityError(f"{what}: the decryption came back wrong", hint="check that the key store holds the right key")


async def open_identity(
    cfg: IdentityConfig,
    stores: KeyStores,
    *,
    expiry_warning: datetime.timedelta = DEFAULT_EXPIRY_WARNING,
    clock: Callable[[], datetime.datetime] = utc_now,
) -> Identity:
    """Open an identity's keys: the certificate must be valid, the signing key must match it (a probe signature
    verifies), and an encryption key must decrypt a test message (else ``encryption_error``)."""
    where = f"identities.{cfg.name}"
    cert = read_certificate(cfg.certificate, f"{where}.certificate", error=IdentityError)
    validity = Validity.of(cert)
    invalid = validity.problem(clock())
    if invalid is not None:
        raise IdentityError(f"{where}.certificate: {cfg.certificate} {invalid}", hint=RENEWAL_HINT)
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
        encryption_error: IdentityError | None = None
        if cfg.encryption_key is not None:
            decryption_key = stores.decryption_key(cfg.encryption_key, name=f"{where}.encryption_key")
            opened.push_async_callback(decryption_key.aclose)
            enc_info = await decryption_key.describe()
            if not isinstance(enc_info.public_key, rsa.RSAPublicKey):
                raise IdentityError(f"{where}.encryption_key: recovery shares need an RSA key")
            enc_pem = enc_info.public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            encryption_error = await _round_trip(decryption_key, enc_info.public_key, where)
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
            encryption_error=encryption_error,
            validity=validity,
            expiry_warning=expiry_warning,
            key_verifies=info.verifies,
        )
        opened.pop_all()  # proven: the keys are the identity's now, closed by ``Identity.aclose``
    return identity
