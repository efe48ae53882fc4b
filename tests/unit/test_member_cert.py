"""The member certificate a key store signs: the shape CCF's keygenerator.sh makes, checked against its own key."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from signing_agent.algorithms import der_to_raw, for_curve
from signing_agent.backends.member_cert import member_id, self_signed_certificate
from signing_agent.errors import IdentityError


def signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    alg = for_curve(key.curve.name)
    return lambda digest: der_to_raw(alg, key.sign(digest, ec.ECDSA(Prehashed(alg.hash_algorithm()))))


@pytest.mark.parametrize(("curve", "hash_name"), [(ec.SECP256R1(), "sha256"), (ec.SECP384R1(), "sha384"),
                                                  (ec.SECP521R1(), "sha512")])  # fmt: skip
def test_the_certificate_is_self_signed_by_the_callable(curve: ec.EllipticCurve, hash_name: str) -> None:
    key = ec.generate_private_key(curve)
    cert = self_signed_certificate(key.public_key(), signer(key), common_name="member0", signer="test", days=30)
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "member0"
    assert cert.issuer == cert.subject
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == hash_name
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert len(member_id(cert)) == 64


def test_a_signature_by_another_key_is_caught() -> None:
    key, other = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(IdentityError, match="Key Vault's certificate signature does not verify"):
        self_signed_certificate(key.public_key(), signer(other), common_name="m", signer="Key Vault")
