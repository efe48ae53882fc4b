"""The one place a member id, a fingerprint or a certificate file is computed or read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signing_agent.certs import (
    bundle_ders,
    certificate_der,
    der_sha256,
    load_certificate,
    member_id,
    read_certificate,
)
from signing_agent.errors import ConfigError, IdentityError, InvalidRequestError
from tests.support.pki import make_member


def test_member_id_is_sha256_of_the_der_in_lowercase_hex() -> None:
    member = make_member()
    der = member.cert.public_bytes(serialization.Encoding.DER)
    assert member_id(member.cert) == hashlib.sha256(der).hexdigest() == member.member_id
    assert member_id(member.cert) == member_id(member.cert).lower()
    assert der_sha256(der) == member.member_id


def test_a_certificate_is_read_as_pem_or_der(tmp_path: Path) -> None:
    member = make_member()
    pem, der = tmp_path / "c.pem", tmp_path / "c.der"
    pem.write_bytes(member.cert_pem)
    der.write_bytes(member.cert.public_bytes(serialization.Encoding.DER))
    assert read_certificate(pem, "x") == read_certificate(der, "x") == member.cert
    assert certificate_der(member.cert_pem) == der.read_bytes()
    assert certificate_der(member.cert_pem.decode()) == der.read_bytes()
    assert certificate_der(b"not a certificate") is None


def test_errors_name_the_setting_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^services\.s\.x: cannot read {tmp_path}/missing\.pem: No such file"):
        read_certificate(tmp_path / "missing.pem", "services.s.x")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidRequestError, match=rf"^--signing-cert: {junk}: not a PEM or DER X\.509 certificate$"):
        read_certificate(junk, "--signing-cert", error=InvalidRequestError)
    with pytest.raises(IdentityError, match=r"^identities\.m0\.certificate: not a PEM or DER X\.509 certificate$"):
        load_certificate(b"\x30\x03\x02\x01\x00", "identities.m0.certificate")


def test_validity_says_when_a_certificate_is_not_valid_or_expires_soon() -> None:
    import datetime

    from signing_agent.certs import Validity

    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    validity = Validity(start, start + datetime.timedelta(days=100))
    month = datetime.timedelta(days=30)
    assert validity.problem(start - datetime.timedelta(seconds=1)) == "is not valid before 2030-01-01 00:00:00Z"
    assert validity.problem(start) is None
    assert validity.problem(start + datetime.timedelta(days=100)) is None  # notAfter itself is still valid
    assert validity.problem(start + datetime.timedelta(days=101)) == "expired on 2030-04-11 00:00:00Z"
    assert validity.expiry_warning(start + datetime.timedelta(days=69), month) is None
    assert validity.expiry_warning(start + datetime.timedelta(days=70), month) == (
        "expires on 2030-04-11 00:00:00Z (in 30.0 days)"
    )
    assert validity.expiry_warning(start + datetime.timedelta(days=99, hours=12), month) == (
        "expires on 2030-04-11 00:00:00Z (in 0.5 days)"
    )
    assert validity.expiry_warning(start + datetime.timedelta(days=101), month) is None  # a problem, not a warning
    assert validity.expiry_warning(start + datetime.timedelta(days=99), datetime.timedelta(0)) is None
    assert validity.seconds_left(start + datetime.timedelta(days=99)) == 86400.0
    member = make_member(valid_from=datetime.timedelta(days=-1), valid_until=datetime.timedelta(days=5))
    assert Validity.of(member.cert) == Validity(member.cert.not_valid_before_utc, member.cert.not_valid_after_utc)


def test_a_bundle_is_every_certificate_in_it_or_nothing() -> None:
    a, b = make_member("a"), make_member("b")
    der_a, der_b = (m.cert.public_bytes(serialization.Encoding.DER) for m in (a, b))
    assert bundle_ders(a.cert_pem.decode()) == [der_a]
    assert bundle_ders((a.cert_pem + b"\n" + b.cert_pem).decode()) == [der_a, der_b]
    unreadable = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert bundle_ders(a.cert_pem.decode() + unreadable) is None  # the first alone would read
    assert bundle_ders("no certificate") is None
