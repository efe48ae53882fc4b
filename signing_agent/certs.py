"""X.509 certificates as the agent uses them: read one from a file with an error that names the setting, its DER,
the SHA-256 of its DER, which is both CCF's member id and a service certificate's fingerprint (what ``openssl
x509 -fingerprint -sha256`` prints, without the colons, in lower case), and its validity period (``Validity``).

Every member id and fingerprint in the agent comes from here. Imports nothing from the package but ``errors``.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signing_agent.errors import AgentError, ConfigError, IdentityError


def der_sha256(der: bytes) -> str:
    """The lowercase hex SHA-256 of a certificate's DER: CCF's member id, a service certificate's fingerprint."""
    return hashlib.sha256(der).hexdigest()


def member_id(cert: x509.Certificate) -> str:
    """CCF's member id of ``cert`` (and its fingerprint): the SHA-256 of its DER, lowercase hex."""
    return der_sha256(cert.public_bytes(serialization.Encoding.DER))


def load_certificate(data: bytes, where: str, *, error: type[AgentError] = IdentityError) -> x509.Certificate:
    """A PEM (or DER) X.509 certificate; ``error`` naming ``where`` when ``data`` is not one."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise error(f"{where}: not a PEM or DER X.509 certificate") from None


def read_certificate(path: Path, where: str, *, error: type[AgentError] = ConfigError) -> x509.Certificate:
    """The certificate in the file ``path`` (PEM or DER), or ``error`` naming ``where`` (a setting or an option)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{where}: cannot read {path}: {exc.strerror}") from None
    return load_certificate(data, f"{where}: {path}", error=error)


def certificate_der(pem: bytes | str) -> bytes | None:
    """The DER of a PEM certificate, or None when it is not one."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        return None
    return cert.public_bytes(serialization.Encoding.DER)


_END_CERTIFICATE = "-----END CERTIFICATE-----"


def bundle_ders(pem: str) -> list[bytes] | None:
    """The DER of each certificate of a PEM bundle, split as CCF splits one (after each ``-----END
    CERTIFICATE-----``); None when one of them is not a certificate, or there is none. CCF reads every certificate of
    a bundle it is given (``isValidX509CertBundle``), so a bundle is only as good as its worst block."""
    ders = [certificate_der(block + _END_CERTIFICATE) for block in pem.split(_END_CERTIFICATE)[:-1]]
    if not ders or any(der is None for der in ders):
        return None
    return [der for der in ders if der is not None]


def single_certificate_pem(pem: bytes) -> bytes | None:
    """The one certificate in ``pem``, re-encoded as plain PEM; None when ``pem`` holds no certificate, or more.

    For a service identity an endpoint claims (``/node/network``): what the agent keeps and trusts of it must be
    exactly the certificate whose fingerprint it shows and checks. A bundle would add trust anchors no one checked
    (every certificate in a PEM becomes one, but only the first is fingerprinted), and text around the block would
    be kept as it came."""
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return None
    return found[0].public_bytes(serialization.Encoding.PEM) if len(found) == 1 else None


def _utc(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Validity:
    """A certificate's validity period (``notBefore`` .. ``notAfter``, UTC), and what an operator must hear of it."""

    not_before: datetime.datetime
    not_after: datetime.datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> Validity:
        return cls(cert.not_valid_before_utc, cert.not_valid_after_utc)

    def seconds_left(self, now: datetime.datetime) -> float:
        """Seconds from ``now`` until it expires (negative once it has)."""
        return (self.not_after - now).total_seconds()

    def problem(self, now: datetime.datetime) -> str | None:
        """Why it is not valid at ``now`` (expired, or not valid yet), or None."""
        if now > self.not_after:
            return f"expired on {_utc(self.not_after)}"
        if now < self.not_before:
            return f"is not valid before {_utc(self.not_before)}"
        return None

    def expiry_warning(self, now: datetime.datetime, within: datetime.timedelta) -> str | None:
        """A warning when it expires within ``within`` of ``now`` (and is still valid), else None."""
        left = self.not_after - now
        if self.problem(now) is not None or left > within:
            return None
        days = left.total_seconds() / 86400
        return f"expires on {_utc(self.not_after)} (in {days:.1f} days)"
