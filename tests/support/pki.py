"""Test PKI: member identities (EC key + self-signed cert, as CCF's keygenerator.sh makes them) and RSA keys."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}


@dataclass(frozen=True)
class Member:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def member_id(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``<name>_privk.pem`` (0600) and ``<name>_cert.pem``; return (key path, cert path)."""
        folder.mkdir(parents=True, exist_ok=True)
        key_path = folder / f"{self.name}_privk.pem"
        cert_path = folder / f"{self.name}_cert.pem"
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        cert_path.write_bytes(self.cert_pem)
        return key_path, cert_path


def self_signed_cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    common_name: str,
    sig_hash: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
    *,
    valid_from: datetime.timedelta = datetime.timedelta(days=-1),
    valid_until: datetime.timedelta = datetime.timedelta(days=365),
) -> x509.Certificate:
    """``valid_from`` and ``valid_until``: the validity period, relative to now."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_until)
        .sign(key, sig_hash or hashes.SHA384())
    )


def make_member(
    name: str = "member0",
    curve: str = "secp384r1",
    sig_hash: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
    *,
    valid_from: datetime.timedelta = datetime.timedelta(days=-1),
    valid_until: datetime.timedelta = datetime.timedelta(days=365),
) -> Member:
    """A member identity; ``sig_hash`` signs its certificate (default SHA-384, as keygenerator.sh does), valid from
    ``valid_from`` to ``valid_until`` (relative to now)."""
    key = ec.generate_private_key(CURVES[curve])
    cert = self_signed_cert(key, name, sig_hash, valid_from=valid_from, valid_until=valid_until)
    return Member(name=name, key=key, cert=cert)


def make_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem_private(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_public(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
