"""Service identity and node TLS certificate, shaped like a real CCF node's.

CCF has a P-384 self-signed service identity (CN "CCF Service") and each node presents a TLS certificate
signed by it. Clients pin the service certificate as their only CA. The sandbox does the same: the node
certificate has SAN IP 127.0.0.1 and DNS localhost and is regenerated at every start; the service identity
can be loaded from files so a restarted sandbox keeps (or, with a new key, changes) its identity.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _for_a_year(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    """A certificate valid from a day ago for a year, with a random serial; the caller adds its extensions."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
    )


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    @classmethod
    def generate(cls, key: ec.EllipticCurvePrivateKey | None = None) -> ServiceIdentity:
        key = key or ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CCF Service")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            _for_a_year(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, key_pem: bytes, cert_pem: bytes | None = None) -> ServiceIdentity:
        """Load a service identity; with no certificate, issue a new one for the key."""
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the service identity key must be an EC private key")
        if cert_pem is None:
            return cls.generate(key)
        cert = x509.load_pem_x509_certificate(cert_pem)
        if cert.public_key() != key.public_key():
            raise ValueError("the service identity certificate does not match its key")
        return cls(key, cert)

    def issue_node_cert(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        node_key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            _for_a_year(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CCF Node")]),
                self.cert.subject,
                node_key.public_key(),
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(node_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA384())
        )
        return node_key, cert


def server_ssl_context(node_key: ec.EllipticCurvePrivateKey, node_cert: x509.Certificate) -> ssl.SSLContext:
    """A TLS server context presenting the node certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_node_cert(context, node_key, node_cert)
    return context


def load_node_cert(context: ssl.SSLContext, node_key: ec.EllipticCurvePrivateKey, node_cert: x509.Certificate) -> None:
    """Load (or replace) the certificate a server context presents; connections accepted later use it.

    ssl needs files: use a temp dir.
    """
    with tempfile.TemporaryDirectory(prefix="ccf-sandbox-") as folder:
        cert_path = Path(folder) / "node_cert.pem"
        key_path = Path(folder) / "node_key.pem"
        cert_path.write_bytes(node_cert.public_bytes(serialization.Encoding.PEM))
        key_path.touch(mode=0o600)
        key_path.write_bytes(_pem_key(node_key))
        context.load_cert_chain(cert_path, key_path)


def client_ssl_context(service_cert_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts only the service identity, as CCF clients do."""
    return ssl.create_default_context(cadata=service_cert_pem.decode())
