"""Self-signed member certificates whose signature is made by a key store: the private key never leaves it.

Owns the certificate that ``signing-agent keys generate`` writes, whatever the key store (a PKCS#11 token, Azure Key
Vault or Managed HSM): what CCF's ``keygenerator.sh`` makes (``CN=<name>``, self-signed, v3 with basic constraints
``CA:TRUE`` and key identifiers, the hash that matches the curve), assembled with asn1crypto.

Split in two like the COSE code (``prepare`` -> sign -> ``finish``): ``prepare_certificate`` builds the
TBSCertificate and its digest, the key store signs that digest (raw ``r||s``), and ``finish_certificate`` puts the
signature in and checks it against the certificate's own public key, so a key store that signed with another key
is caught here and not by CCF. ``self_signed_certificate`` does all three for a synchronous "sign this digest"
callable; asynchronous callers (Key Vault) call the two halves around their ``await``.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.algorithms import SignatureAlgorithm, der_to_raw, for_curve, raw_to_der
from signing_agent.certs import member_id as member_id  # re-exported: what keys generate prints
from signing_agent.errors import IdentityError

_ASN1_SIG_ALGS = {"sha256": "sha256_ecdsa", "sha384": "sha384_ecdsa", "sha512": "sha512_ecdsa"}


@dataclass(frozen=True, slots=True)
class CertificateToBeSigned:
    """The encoded TBSCertificate, the algorithm that signs it and the digest to give the key store."""

    tbs_der: bytes
    alg: SignatureAlgorithm
    public_key: ec.EllipticCurvePublicKey

    @property
    def digest(self) -> bytes:
        """What the key store signs (with ``alg``: ECDSA over this prehashed digest)."""
        return self.alg.digest(self.tbs_der)


def prepare_certificate(
    public_key: ec.EllipticCurvePublicKey, *, common_name: str, days: int = 365
) -> CertificateToBeSigned:
    """The TBSCertificate of a self-signed member certificate for ``public_key``, valid from now for ``days``."""
    from asn1crypto import algos, keys
    from asn1crypto import x509 as ax

    alg = for_curve(public_key.curve.name)
    spki = keys.PublicKeyInfo.load(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    name = ax.Name.build({"common_name": common_name})
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ski = spki.sha1
    tbs = ax.TbsCertificate(
        {
            "version": "v3",
            "serial_number": int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1,
            "signature": algos.SignedDigestAlgorithm({"algorithm": _ASN1_SIG_ALGS[alg.hash_name]}),
            "issuer": name,
            "validity": {
                "not_before": ax.Time({"utc_time": now}),
                "not_after": ax.Time({"utc_time": now + datetime.timedelta(days=days)}),
            },
            "subject": name,
            "subject_public_key_info": spki,
            "extensions": [
                {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": True}},
                {"extn_id": "key_identifier", "critical": False, "extn_value": ski},
                {
                    "extn_id": "authority_key_identifier",
                    "critical": False,
                    "extn_value": {"key_identifier": ski},
                },
            ],
        }
    )
    return CertificateToBeSigned(tbs_der=bytes(tbs.dump()), alg=alg, public_key=public_key)


def finish_certificate(tbs: CertificateToBeSigned, raw_signature: bytes, *, signer: str) -> x509.Certificate:
    """The certificate with the key store's raw ``r||s`` over ``tbs.digest``, verified against its own key.

    ``signer`` names the key store in the error (``the token``, ``Key Vault``).
    """
    from asn1crypto import algos
    from asn1crypto import x509 as ax

    signature = raw_to_der(tbs.alg, raw_signature)
    cert_der = ax.Certificate(
        {
            "tbs_certificate": ax.TbsCertificate.load(tbs.tbs_der),
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": _ASN1_SIG_ALGS[tbs.alg.hash_name]}),
            "signature_value": signature,
        }
    ).dump()
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise IdentityError(f"{signer}'s certificate signature does not verify: {exc}") from None
    der_to_raw(tbs.alg, signature)  # round-trip sanity: DER re-encodes to the same width
    return cert


def self_signed_certificate(
    public_key: ec.EllipticCurvePublicKey,
    sign_digest: Callable[[bytes], bytes],
    *,
    common_name: str,
    signer: str,
    days: int = 365,
) -> x509.Certificate:
    """A member certificate for ``public_key`` whose signature ``sign_digest(digest) -> raw r||s`` makes."""
    tbs = prepare_certificate(public_key, common_name=common_name, days=days)
    return finish_certificate(tbs, sign_digest(tbs.digest), signer=signer)
