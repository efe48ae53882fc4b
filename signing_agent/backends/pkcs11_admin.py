"""Key management in PKCS#11 tokens: generate, import, list member keys; self-signed member certs.

Owns what ``signing-agent keys`` does to a token (``cli_keys`` is only its argument parsing and printing).
This is synchronous code for a command-line tool, not for the daemon's event loop. Keys are created
non-extractable and sensitive; the member certificate (what CCF's ``keygenerator.sh`` makes: ``CN=<name>``,
self-signed with the hash that matches the curve) is assembled with asn1crypto and its TBSCertificate is
signed **by the token** (``member_cert``), so the private key never leaves it.

What standard tools expect (OpenSC's ``pkcs11-tool``, p11-kit, OpenSSL's pkcs11 provider, browsers): the
private key, its public key object and its certificate object share one ``CKA_ID`` and carry the label asked
for, so ``pkcs11-tool --id`` or a ``pkcs11:id=...`` URI finds all three. The key-pair templates set only
what every module here accepts (SoftHSM2, NSS softoken, tpm2-pkcs11): NSS refuses ``CKA_ENCRYPT``/
``CKA_DECRYPT`` on EC keys, so they are left out, and the module fills in its defaults.

Vendor imports (``pkcs11``, ``asn1crypto``) stay in ``signing_agent.backends``; PKCS#11 exceptions are
wrapped.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signing_agent.algorithms import for_curve, verify_digest
from signing_agent.backends import _p11session, member_cert
from signing_agent.backends._p11session import PinSource, describe_error, require_pkcs11
from signing_agent.backends.pkcs11 import find_private_key, oaep_sha256_decode, read_public_key
from signing_agent.certs import member_id as member_id  # re-exported: keys list/generate print it
from signing_agent.errors import AgentError, BackendError, ConfigError, IdentityError

CURVES: dict[str, str] = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}
"""Curve names on the command line -> names as ``cryptography`` and asn1crypto spell them."""


@dataclass(frozen=True, slots=True)
class TokenTarget:
    """Which token to administer and how to log in (the PIN source, never the PIN)."""

    module: str
    token_label: str | None
    pin: PinSource
    init_params: str | None = None


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A key in a token, as the tooling reports it."""

    label: str
    key_id: bytes
    key_type: Literal["EC", "RSA", "other"]
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None
    member_id: str | None = None

    @property
    def description(self) -> str:
        """``P-384`` / ``RSA-2048`` / ``EC (no public object)``."""
        if isinstance(self.public_key, ec.EllipticCurvePublicKey):
            names = {v: k for k, v in CURVES.items()}
            return names.get(self.public_key.curve.name, self.public_key.curve.name)
        if isinstance(self.public_key, rsa.RSAPublicKey):
            return f"RSA-{self.public_key.key_size}"
        return f"{self.key_type} (no public key object)"


@contextmanager
def admin_session(target: TokenTarget, *, rw: bool = True) -> Iterator[Any]:
    """A logged-in session to the target token (rw by default); PKCS#11 errors become ``AgentError``."""
    p11 = require_pkcs11()
    where = f"token {target.token_label!r}" if target.token_label else "token"
    lib = _p11session.load_module(target.module, target.init_params)
    try:
        token = _p11session.find_token(lib, target.token_label, where=where)
        session = _p11session.open_session(token, target.pin, rw=rw, where=where)
    except p11.exceptions.PKCS11Error as exc:
        raise BackendError(f"{where}: {describe_error(exc)}") from None
    try:
        yield session
    except p11.exceptions.PKCS11Error as exc:
        raise BackendError(f"{where}: the token failed: {describe_error(exc)}") from None
    finally:
        _p11session.close_session(session)


def _new_id(key_id: bytes | None) -> bytes:
    return key_id if key_id is not None else secrets.token_bytes(8)


def _refuse_duplicates(session: Any, *, label: str, key_id: bytes) -> None:
    p11 = require_pkcs11()
    for template in ({p11.Attribute.LABEL: label}, {p11.Attribute.ID: key_id}):
        template[p11.Attribute.CLASS] = p11.ObjectClass.PRIVATE_KEY
        if list(session.get_objects(template)):
            what = f"label {label!r}" if p11.Attribute.LABEL in template else f"id {key_id.hex()}"
            raise ConfigError(
                f"the token already has a private key with {what}",
                hint="choose another --label/--id, or delete the old key first",
            )


def _ec_params(curve_name: str) -> bytes:
    from asn1crypto import keys

    return bytes(keys.ECDomainParameters(name="named", value=curve_name).dump())


def _ec_point(public: ec.EllipticCurvePublicKey) -> bytes:
    from asn1crypto import core

    raw = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return bytes(core.OctetString(raw).dump())


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _generate_pair(
    session: Any,
    key_type: Any,
    *args: Any,
    label: str,
    key_id: bytes,
    capabilities: Any,
    public: dict[Any, Any],
    private: dict[Any, Any],
    **options: Any,
) -> Any:
    """A key pair made in the token, as its private key: both are token objects, the public one readable without a
    login, the private one private, sensitive and never extractable. ``public``/``private`` add what the key is
    for; ``args``/``options`` go to python-pkcs11 (key size, mechanism). Refused when the label or id is taken."""
    p11 = require_pkcs11()
    a = p11.Attribute
    _refuse_duplicates(session, label=label, key_id=key_id)
    public_template = {
        a.CLASS: p11.ObjectClass.PUBLIC_KEY, a.KEY_TYPE: key_type, a.TOKEN: True, a.PRIVATE: False, **public,
    }  # fmt: skip
    private_template = {
        a.CLASS: p11.ObjectClass.PRIVATE_KEY, a.KEY_TYPE: key_type, a.TOKEN: True, a.PRIVATE: True,
        a.SENSITIVE: True, a.EXTRACTABLE: False, **private,
    }  # fmt: skip
    _pub, priv = session.generate_keypair(
        key_type,
        *args,
        id=key_id,
        label=label,
        store=True,
        capabilities=capabilities,
        public_template=public_template,
        private_template=private_template,
        **options,
    )
    return priv


def generate_ec_key(
    target: TokenTarget, *, label: str, key_id: bytes | None = None, curve: str = "secp384r1"
) -> TokenKey:
    """Generate a non-extractable EC signing key pair in the token (token objects, private key sensitive)."""
    p11 = require_pkcs11()
    a, default = p11.Attribute, p11.DEFAULT
    for_curve(curve)  # refuse curves CCF does not accept before touching the token
    key_id = _new_id(key_id)
    with admin_session(target) as session:
        priv = _generate_pair(
            session,
            p11.KeyType.EC,
            label=label,
            key_id=key_id,
            capabilities=p11.MechanismFlag.SIGN | p11.MechanismFlag.VERIFY,
            mechanism=p11.Mechanism.EC_KEY_PAIR_GEN,
            public={a.VERIFY: True, a.ENCRYPT: default, a.WRAP: default, a.EC_PARAMS: _ec_params(curve)},
            private={a.SIGN: True, a.DECRYPT: default, a.UNWRAP: default, a.DERIVE: default},
        )
        public = read_public_key(session, priv, where=f"key {label!r}")
    return TokenKey(label=label, key_id=key_id, key_type="EC", public_key=public)


def generate_rsa_key(target: TokenTarget, *, label: str, key_id: bytes | None = None, bits: int = 2048) -> TokenKey:
    """Generate a non-extractable RSA decryption key pair (DECRYPT, UNWRAP) in the token."""
    p11 = require_pkcs11()
    a, default = p11.Attribute, p11.DEFAULT
    key_id = _new_id(key_id)
    with admin_session(target) as session:
        priv = _generate_pair(
            session,
            p11.KeyType.RSA,
            bits,
            label=label,
            key_id=key_id,
            capabilities=p11.MechanismFlag.DECRYPT | p11.MechanismFlag.UNWRAP,
            public={a.ENCRYPT: True, a.WRAP: True, a.VERIFY: default},
            private={a.DECRYPT: True, a.UNWRAP: True, a.SIGN: default, a.DERIVE: default},
        )
        public = read_public_key(session, priv, where=f"key {label!r}")
    return TokenKey(label=label, key_id=key_id, key_type="RSA", public_key=public)


@contextmanager
def _import_refusal(label: str) -> Iterator[None]:
    """A token that will not take a private key from outside says so with what to do instead."""
    p11 = require_pkcs11()
    try:
        yield
    except p11.exceptions.PKCS11Error as exc:
        raise BackendError(
            f"the token refused to import key {label!r} ({describe_error(exc)})",
            hint="some tokens make private keys only inside (tpm2-pkcs11, many HSMs): create the member key there "
            "with `signing-agent keys generate`, or use the token's own import tool (tpm2-pkcs11: tpm2_ptool "
            "import)",
        ) from None


def import_ec_key(
    target: TokenTarget, key: ec.EllipticCurvePrivateKey, *, label: str, key_id: bytes | None = None
) -> TokenKey:
    """Copy an EC private key into the token (C_CreateObject: private non-extractable, sensitive; public)."""
    p11 = require_pkcs11()
    a = p11.Attribute
    alg = for_curve(key.curve.name)
    key_id = _new_id(key_id)
    params = _ec_params(key.curve.name)
    d = key.private_numbers().private_value.to_bytes(alg.field_bytes, "big")
    with admin_session(target) as session, _import_refusal(label):
        _refuse_duplicates(session, label=label, key_id=key_id)
        session.create_object({
            a.CLASS: p11.ObjectClass.PRIVATE_KEY, a.KEY_TYPE: p11.KeyType.EC, a.TOKEN: True, a.PRIVATE: True,
            a.SENSITIVE: True, a.EXTRACTABLE: False, a.SIGN: True, a.EC_PARAMS: params, a.VALUE: d,
            a.LABEL: label, a.ID: key_id,
        })  # fmt: skip
        session.create_object({
            a.CLASS: p11.ObjectClass.PUBLIC_KEY, a.KEY_TYPE: p11.KeyType.EC, a.TOKEN: True, a.PRIVATE: False,
            a.VERIFY: True, a.EC_PARAMS: params, a.EC_POINT: _ec_point(key.public_key()), a.LABEL: label,
            a.ID: key_id,
        })  # fmt: skip
    return TokenKey(label=label, key_id=key_id, key_type="EC", public_key=key.public_key())


def import_rsa_key(target: TokenTarget, key: rsa.RSAPrivateKey, *, label: str, key_id: bytes | None = None) -> TokenKey:
    """Copy an RSA private key into the token for decryption (DECRYPT, UNWRAP), plus its public object."""
    p11 = require_pkcs11()
    a = p11.Attribute
    key_id = _new_id(key_id)
    n = key.private_numbers()
    pub = n.public_numbers
    with admin_session(target) as session, _import_refusal(label):
        _refuse_duplicates(session, label=label, key_id=key_id)
        session.create_object({
            a.CLASS: p11.ObjectClass.PRIVATE_KEY, a.KEY_TYPE: p11.KeyType.RSA, a.TOKEN: True, a.PRIVATE: True,
            a.SENSITIVE: True, a.EXTRACTABLE: False, a.DECRYPT: True, a.UNWRAP: True,
            a.MODULUS: _int_bytes(pub.n), a.PUBLIC_EXPONENT: _int_bytes(pub.e),
            a.PRIVATE_EXPONENT: _int_bytes(n.d),
            a.PRIME_1: _int_bytes(n.p), a.PRIME_2: _int_bytes(n.q), a.EXPONENT_1: _int_bytes(n.dmp1),
            a.EXPONENT_2: _int_bytes(n.dmq1), a.COEFFICIENT: _int_bytes(n.iqmp), a.LABEL: label, a.ID: key_id,
        })  # fmt: skip
        session.create_object({
            a.CLASS: p11.ObjectClass.PUBLIC_KEY, a.KEY_TYPE: p11.KeyType.RSA, a.TOKEN: True, a.PRIVATE: False,
            a.ENCRYPT: True, a.WRAP: True, a.MODULUS: _int_bytes(pub.n), a.PUBLIC_EXPONENT: _int_bytes(pub.e),
            a.LABEL: label, a.ID: key_id,
        })  # fmt: skip
    return TokenKey(label=label, key_id=key_id, key_type="RSA", public_key=key.public_key())


def sign_digest(target: TokenTarget, *, label: str | None, key_id: bytes | None, digest: bytes) -> bytes:
    """Sign a digest with CKM_ECDSA in the token (raw ``r||s``); used for certificates and self-tests."""
    p11 = require_pkcs11()
    with admin_session(target, rw=False) as session:
        key = find_private_key(
            session, label=label, key_id=key_id, key_type=p11.KeyType.EC, where="key", logged_in=target.pin.logs_in
        )
        return bytes(key.sign(digest, mechanism=p11.Mechanism.ECDSA))


OaepMode = Literal["token", "host"]


def oaep_mode(target: TokenTarget, key: TokenKey) -> OaepMode:
    """How the token decrypts RSA-OAEP-SHA256 (what CCF encrypts recovery shares with) with ``key``, proved on a
    test message: ``token`` when it does OAEP-SHA256 itself, ``host`` when it does only raw RSA (``CKM_RSA_X_509``)
    and the agent must decode OAEP (SoftHSM2 2.6); ``BackendError`` when it can do neither."""
    p11 = require_pkcs11()
    x = p11.exceptions
    public = key.public_key
    if not isinstance(public, rsa.RSAPublicKey):
        raise IdentityError(f"key {key.label!r} is not an RSA key")
    message = secrets.token_bytes(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ciphertext = public.encrypt(message, oaep)
    size = (public.key_size + 7) // 8
    with admin_session(target, rw=False) as session:
        private = find_private_key(
            session, label=key.label, key_id=key.key_id, key_type=p11.KeyType.RSA, where="key",
            logged_in=target.pin.logs_in,
        )  # fmt: skip
        try:
            decrypted = private.decrypt(
                ciphertext,
                mechanism=p11.Mechanism.RSA_PKCS_OAEP,
                mechanism_param=(p11.Mechanism.SHA256, p11.MGF.SHA256, None),
            )
        except (x.ArgumentsBad, x.MechanismInvalid, x.MechanismParamInvalid, x.FunctionNotSupported):
            raw = bytes(private.decrypt(ciphertext, mechanism=p11.Mechanism.RSA_X_509))
            if oaep_sha256_decode(raw.rjust(size, b"\0"), size) == message:
                return "host"
        else:
            if bytes(decrypted) == message:
                return "token"
    raise BackendError(f"key {key.label!r} did not decrypt a test message correctly")


def check_signs(target: TokenTarget, key: TokenKey) -> None:
    """Sign a random digest with the key in the token and verify it with the public key we expect."""
    if not isinstance(key.public_key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"key {key.label!r} is not an EC key")
    alg = for_curve(key.public_key.curve.name)
    digest = alg.digest(secrets.token_bytes(32))
    raw = sign_digest(target, label=key.label, key_id=key.key_id, digest=digest)
    verify_digest(key.public_key, alg, digest, raw)


def self_signed_certificate(
    target: TokenTarget, key: TokenKey, *, common_name: str, days: int = 365
) -> x509.Certificate:
    """A member certificate like ``keygenerator.sh`` makes (CN, self-signed, v3 CA), signed in the token."""
    public = key.public_key
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise IdentityError(f"key {key.label!r} is not an EC key")
    return member_cert.self_signed_certificate(
        public,
        lambda digest: sign_digest(target, label=key.label, key_id=key.key_id, digest=digest),
        common_name=common_name,
        signer="the token",
        days=days,
    )


def store_certificate(target: TokenTarget, key: TokenKey, cert: x509.Certificate) -> None:
    """Put the member certificate into the token next to its key: same ``CKA_ID`` and label, public.

    Standard tools pair a key with its certificate that way (``pkcs11-tool --read-object --type cert --id``,
    OpenSSL's pkcs11 provider, p11-kit's ``pkcs11:`` URIs). An existing certificate object with the key's id is
    left alone, so running ``keys import`` again never duplicates it.
    """
    from asn1crypto import core

    p11 = require_pkcs11()
    a = p11.Attribute
    if cert.public_key() != key.public_key:
        raise IdentityError(f"the certificate does not belong to key {key.label!r}")
    with admin_session(target) as session:
        existing = {a.CLASS: p11.ObjectClass.CERTIFICATE, a.ID: key.key_id}
        if list(session.get_objects(existing)):
            return
        session.create_object({
            a.CLASS: p11.ObjectClass.CERTIFICATE, a.CERTIFICATE_TYPE: p11.CertificateType.X_509, a.TOKEN: True,
            a.PRIVATE: False, a.LABEL: key.label, a.ID: key.key_id, a.SUBJECT: cert.subject.public_bytes(),
            a.ISSUER: cert.issuer.public_bytes(), a.SERIAL_NUMBER: bytes(core.Integer(cert.serial_number).dump()),
            a.VALUE: cert.public_bytes(serialization.Encoding.DER),
        })  # fmt: skip


def list_keys(target: TokenTarget, *, certificates: Sequence[x509.Certificate] = ()) -> list[TokenKey]:
    """Every private key in the token (label, id, type, public key) and member ids of given certs."""
    p11 = require_pkcs11()
    a = p11.Attribute
    result: list[TokenKey] = []
    by_spki = {
        c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo): c
        for c in certificates
    }
    with admin_session(target, rw=False) as session:
        for obj in list(session.get_objects({a.CLASS: p11.ObjectClass.PRIVATE_KEY})):
            label = _p11session.object_label(obj)
            key_id = bytes(obj[a.ID] or b"")
            kt = obj[a.KEY_TYPE]
            key_type: Literal["EC", "RSA", "other"] = (
                "EC" if kt == p11.KeyType.EC else "RSA" if kt == p11.KeyType.RSA else "other"
            )
            public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None = None
            if key_type != "other":
                try:
                    public = read_public_key(session, obj, where=f"key {label!r}")
                except AgentError:
                    public = None
            mid = None
            if public is not None:
                spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                if spki in by_spki:
                    mid = member_id(by_spki[spki])
            result.append(TokenKey(label=label, key_id=key_id, key_type=key_type, public_key=public, member_id=mid))
    return sorted(result, key=lambda k: (k.label, k.key_id))
