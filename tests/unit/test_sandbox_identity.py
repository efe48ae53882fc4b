"""The sandbox's service identity and node certificate are shaped like a CCF node's."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signing_agent.sandbox.identity import ServiceIdentity


def _common_name(name: x509.Name) -> object:
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _valid_for_a_year_from_yesterday(cert: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(hours=23) < now - cert.not_valid_before_utc <= datetime.timedelta(days=1, minutes=1)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=366)


def test_service_identity_is_a_self_signed_ca() -> None:
    identity = ServiceIdentity.generate()
    cert = identity.cert
    assert _common_name(cert.subject) == _common_name(cert.issuer) == "CCF Service"
    assert cert.public_key() == identity.key.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)
    _valid_for_a_year_from_yesterday(cert)


def test_node_certificate_is_issued_by_the_service_identity() -> None:
    identity = ServiceIdentity.generate()
    node_key, cert = identity.issue_node_cert()
    assert _common_name(cert.subject) == "CCF Node"
    assert cert.issuer == identity.cert.subject
    assert cert.public_key() == node_key.public_key()
    assert isinstance(node_key.curve, ec.SECP384R1)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(identity.cert)
    _valid_for_a_year_from_yesterday(cert)
    assert cert.serial_number != identity.cert.serial_number
