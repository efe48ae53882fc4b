"""PKCS11Registry against real tokens: SoftHSM2 2.6 and NSS softoken (session-scoped tokens in temp folders)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pkcs11.exceptions
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signing_agent.algorithms import ES256, ES384, ES512, SignatureAlgorithm, verify_digest
from signing_agent.backends._p11session import load_module
from signing_agent.backends.pkcs11 import (
    DECRYPTION_FAILED,
    PKCS11DecryptionKey,
    PKCS11Registry,
    PKCS11SigningKey,
    oaep_sha256_decode,
)
from signing_agent.config import PKCS11KeyConfig, parse_config
from signing_agent.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    KeyNotFoundError,
    PinRejectedError,
    SigningFailedError,
    UnsupportedOperationError,
)
from signing_agent.pkcs11_uri import format_uri
from tests.support import pki, tokens
from tests.support.tokens import (
    TokenInfo,
    close_all_sessions,
    generate_ec,
    generate_rsa,
    import_member,
    import_rsa,
)

# The token fixtures live in tests.support.tokens (session-scoped); bind them here so pytest finds them.
softhsm = tokens.softhsm
nss_token = tokens.nss_token
p11_token = tokens.p11_token

OAEP256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture
async def registry() -> AsyncIterator[PKCS11Registry]:
    reg = PKCS11Registry()
    yield reg
    await reg.aclose()


@pytest.mark.parametrize(
    ("curve", "alg"),
    [("secp256r1", ES256), ("secp384r1", ES384), ("secp521r1", ES512)],
    ids=["P-256", "P-384", "P-521"],
)
async def test_describe_sign_verify(
    p11_token: TokenInfo, registry: PKCS11Registry, curve: str, alg: SignatureAlgorithm
) -> None:
    key = generate_ec(p11_token, curve)
    signer = registry.signing_key(p11_token.key_config(key.label), name="identities.m0.signing_key")
    info = await signer.describe()
    assert info.backend == "pkcs11"
    assert isinstance(info.public_key, ec.EllipticCurvePublicKey)
    assert info.public_key.public_numbers() == key.public_key.public_numbers()
    assert info.location.startswith(f"pkcs11:token={format_uri(token=p11_token.token_label)[len('pkcs11:token=') :]}")
    digest = alg.digest(b"governance payload")
    raw = await signer.sign_digest(alg, digest)
    assert len(raw) == alg.signature_size
    verify_digest(info.public_key, alg, digest, raw)
    with pytest.raises(SigningFailedError):
        verify_digest(info.public_key, alg, alg.digest(b"another payload"), raw)


async def test_select_by_id_and_by_uri(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    key = generate_ec(p11_token)
    by_id = registry.signing_key(p11_token.key_config(key_id=key.key_id), name="a.signing_key")
    uri = format_uri(token=p11_token.token_label, id=key.key_id, type="private", module_path=p11_token.module)
    table: dict[str, Any] = {"backend": "pkcs11", "uri": uri, "pin_file": str(p11_token.pin_file)}
    if p11_token.init_params is not None:
        table["init_params"] = p11_token.init_params
    config = parse_config({"identities": {"b": {"certificate": "c.pem", "signing_key": table}}}, path=Path("/a.toml"))
    parsed = config.identities["b"].signing_key
    assert isinstance(parsed, PKCS11KeyConfig)
    by_uri = registry.signing_key(parsed, name="b.signing_key")
    for signer in (by_id, by_uri):
        info = await signer.describe()
        assert info.public_key == key.public_key
    assert len(registry.status()) == 1


async def test_unknown_key(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    signer = registry.signing_key(p11_token.key_config("no-such-key"), name="identities.m0.signing_key")
    with pytest.raises(KeyNotFoundError, match=r"identities\.m0\.signing_key: no EC private key with label"):
        await signer.describe()
    with pytest.raises(KeyNotFoundError):
        await signer.sign_digest(ES384, bytes(48))
    # An RSA key is not a signing key, whatever its label.
    rsa_key = generate_rsa(p11_token)
    wrong_type = registry.signing_key(p11_token.key_config(rsa_key.label), name="m1.signing_key")
    with pytest.raises(KeyNotFoundError, match="no EC private key"):
        await wrong_type.describe()


async def test_a_missing_key_or_token_is_named_with_what_exists(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    key = generate_ec(p11_token)
    typo = key.label[:-1] + ("0" if key.label[-1] != "0" else "1")
    signer = registry.signing_key(p11_token.key_config(typo), name="identities.m0.signing_key")
    with pytest.raises(KeyNotFoundError) as info:
        await signer.describe()
    # The private keys the token holds (label, id, type), the closest to the label asked for first.
    assert f"its private keys: {key.label!r} (id {key.key_id.hex()}, EC)" in info.value.message
    assert "keys list" in info.value.diagnostics()

    lib = load_module(p11_token.module, p11_token.init_params)
    shown = [(s.slot_id, s.get_token()) for s in lib.get_slots(token_present=True)]
    absent = registry.signing_key(p11_token.key_config("k", token_label="no-such-token"), name="m1.signing_key")
    with pytest.raises(BackendUnavailableError) as unavailable:
        await absent.describe()
    message = unavailable.value.message
    assert "no token labelled 'no-such-token'" in message
    for slot_id, token in shown:  # every token the module shows: label, serial and slot
        if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
            serial = token.serial.decode().strip()
            assert f"{token.label!r} (serial {serial or '-'}, slot {slot_id})" in message
        else:
            assert f"an uninitialised token (slot {slot_id})" in message
    assert unavailable.value.hint is not None
    assert unavailable.value.hint.endswith("and that this is the module that serves it")


async def test_wrong_digest_or_algorithm(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    key = generate_ec(p11_token, "secp256r1")
    signer = registry.signing_key(p11_token.key_config(key.label), name="m0.signing_key")
    with pytest.raises(SigningFailedError, match="32-byte digest"):
        await signer.sign_digest(ES256, bytes(31))
    with pytest.raises(SigningFailedError, match="does not match"):
        await signer.sign_digest(ES384, bytes(48))


@pytest.fixture(params=["softhsm", "nss"])
def wrong_pin_token(request: pytest.FixtureRequest, tmp_path: Path) -> TokenInfo:
    # SoftHSM gets a dedicated token, so a lockout policy could never spoil the others.
    base: TokenInfo = (
        request.getfixturevalue("softhsm").tokens["agent-pin"]
        if request.param == "softhsm"
        else request.getfixturevalue("nss_token")
    )
    bad = tmp_path / "bad.pin"
    bad.write_text("987654\n")
    bad.chmod(0o600)
    return TokenInfo(base.kind, base.module, base.token_label, "987654", bad, base.init_params, base.env)


async def test_wrong_pin_is_clear_and_not_retried(wrong_pin_token: TokenInfo, registry: PKCS11Registry) -> None:
    signer = registry.signing_key(wrong_pin_token.key_config("any"), name="identities.m0.signing_key")
    with pytest.raises(PinRejectedError) as info:  # typed: a ConfigError that is the token's refusal of the PIN
        await signer.describe()
    assert isinstance(info.value, ConfigError)
    assert info.value.code == "PinRejected"
    text = info.value.diagnostics() + repr(info.value) + str(info.value)
    assert "rejected the PIN" in text
    assert str(wrong_pin_token.pin_file) in text
    assert "987654" not in text
    assert info.value.__cause__ is None  # raised "from None": no vendor exception travels along
    # No second login attempt (a token could lock): the refusal is remembered until reset().
    with pytest.raises(PinRejectedError, match="rejected the PIN"):
        await signer.describe()
    assert registry.status()[0].logins == 0


async def test_pin_file_must_be_private(p11_token: TokenInfo, registry: PKCS11Registry, tmp_path: Path) -> None:
    loose = tmp_path / "loose.pin"
    loose.write_text(p11_token.pin)
    loose.chmod(0o640)
    with pytest.raises(ConfigError, match=r"m0\.signing_key: pin_file .* lets group or others") as info:
        registry.signing_key(p11_token.key_config("x", pin_file=loose), name="m0.signing_key")
    assert p11_token.pin not in info.value.diagnostics()
    with pytest.raises(ConfigError, match="not a regular file"):
        registry.signing_key(p11_token.key_config("x", pin_file=tmp_path), name="m0.signing_key")
    with pytest.raises(ConfigError, match="SA_TEST_UNSET_PIN"):
        registry.signing_key(
            p11_token.key_config("x", pin_file=None, pin_env="SA_TEST_UNSET_PIN"), name="m0.signing_key"
        )


async def test_pin_from_env(p11_token: TokenInfo, registry: PKCS11Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_ec(p11_token)
    monkeypatch.setenv("SA_TEST_PIN", p11_token.pin)
    signer = registry.signing_key(p11_token.key_config(key.label, pin_file=None, pin_env="SA_TEST_PIN"), name="m0")
    assert (await signer.describe()).public_key == key.public_key


@pytest.mark.softhsm
async def test_module_path_checks(softhsm: object, tmp_path: Path) -> None:
    token = softhsm.tokens["agent-a"]  # type: ignore[attr-defined]
    copy = tmp_path / "libcopy.so"
    shutil.copy(token.module, copy)
    with pytest.raises(ConfigError, match="outside the allowed folders"):
        PKCS11Registry().signing_key(token.key_config("x", module=copy), name="m0.signing_key")
    copy.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        PKCS11Registry(allowed_module_dirs=None).signing_key(token.key_config("x", module=copy), name="m0")
    with pytest.raises(ConfigError, match="No such file"):
        PKCS11Registry().signing_key(token.key_config("x", module=tmp_path / "nope.so"), name="m0")


async def test_two_identities_share_one_login(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    k1, k2 = generate_ec(p11_token), generate_ec(p11_token, "secp256r1")
    s1 = registry.signing_key(p11_token.key_config(k1.label), name="identities.m0.signing_key")
    s2 = registry.signing_key(p11_token.key_config(k2.label), name="identities.m1.signing_key")
    await s1.sign_digest(ES384, bytes(48))
    await s2.sign_digest(ES256, bytes(32))
    [status] = registry.status()
    assert status.connected
    assert status.logins == 1
    assert status.reconnects == 0


async def test_concurrent_signs(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    keys = [generate_ec(p11_token), generate_ec(p11_token)]
    signers = [registry.signing_key(p11_token.key_config(k.label), name=f"m{i}") for i, k in enumerate(keys)]
    digests = [ES384.digest(i.to_bytes(4, "big")) for i in range(200)]
    start = time.perf_counter()
    sigs = await asyncio.gather(*(signers[i % 2].sign_digest(ES384, d) for i, d in enumerate(digests)))
    rate = len(sigs) / (time.perf_counter() - start)
    print(f"{p11_token.kind}: {rate:.0f} ES384 signatures/s through the registry")
    for i, (d, sig) in enumerate(zip(digests, sigs, strict=True)):
        verify_digest(keys[i % 2].public_key, ES384, d, sig)
    assert registry.status()[0].logins == 1


async def test_reconnects_after_session_loss(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    key = generate_ec(p11_token)
    signer = registry.signing_key(p11_token.key_config(key.label), name="m0.signing_key")
    await signer.sign_digest(ES384, bytes(48))
    close_all_sessions(p11_token)  # behind the backend's back: sessions and login are gone
    digest = ES384.digest(b"after the loss")
    raw = await signer.sign_digest(ES384, digest)
    verify_digest(key.public_key, ES384, digest, raw)
    [status] = registry.status()
    assert status.reconnects == 1
    assert status.logins == 2
    # reset() (SIGHUP) drops the session; the next call logs in again.
    await registry.reset()
    await signer.sign_digest(ES384, digest)
    assert registry.status()[0].logins == 3


async def test_persistent_loss_is_retryable_unavailable(
    p11_token: TokenInfo, registry: PKCS11Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = generate_ec(p11_token)
    signer = registry.signing_key(p11_token.key_config(key.label), name="m0.signing_key")
    await signer.describe()
    calls = 0

    def removed(self: object, session: object, digest: bytes) -> bytes:
        nonlocal calls
        calls += 1
        raise pkcs11.exceptions.DeviceRemoved()

    monkeypatch.setattr(PKCS11SigningKey, "_sign_sync", removed)
    with pytest.raises(BackendUnavailableError, match=r"m0\.signing_key: token .* is unavailable") as info:
        await signer.sign_digest(ES384, bytes(48))
    assert info.value.retryable
    assert calls == 3  # as it was, on a fresh session, and after the module was initialised again
    assert not isinstance(info.value.__cause__, pkcs11.exceptions.PKCS11Error)
    [status] = registry.status()
    assert (status.available, status.connected, status.error) == (False, False, "DeviceRemoved")

    # While unavailable, calls fail at once: the module is not touched, nothing more is logged.
    logged = len(caplog.records)
    for _ in range(5):
        with pytest.raises(BackendUnavailableError, match=rf"token '{p11_token.token_label}' is unavailable since"):
            await signer.sign_digest(ES384, bytes(48))
    assert calls == 3
    assert len(caplog.records) == logged

    # SIGHUP (reset) lets the next call try at once; when the token answers again the outage is over.
    monkeypatch.undo()
    await registry.reset()
    digest = ES384.digest(b"back")
    verify_digest(key.public_key, ES384, digest, await signer.sign_digest(ES384, digest))
    [status] = registry.status()
    assert (status.available, status.connected, status.error) == (True, True, None)
    assert "is available again" in caplog.records[-1].getMessage()


@pytest.mark.nss
async def test_nss_decrypts_oaep_sha256(nss_token: TokenInfo, registry: PKCS11Registry) -> None:
    generated = generate_rsa(nss_token)
    host_key = pki.make_rsa_key()
    imported = import_rsa(nss_token, host_key)
    for key in (generated, imported):
        dec = registry.decryption_key(nss_token.key_config(key.label), name="identities.m0.encryption_key")
        info = await dec.describe()
        assert isinstance(info.public_key, rsa.RSAPublicKey)
        assert info.public_key.public_numbers() == key.public_key.public_numbers()
        share = os.urandom(64)
        assert await dec.decrypt_oaep_sha256(info.public_key.encrypt(share, OAEP256)) == share
        with pytest.raises(BackendError, match=f"^{DECRYPTION_FAILED}$"):
            await dec.decrypt_oaep_sha256(bytes(256))


@pytest.mark.softhsm
async def test_softhsm_oaep_sha256_is_unsupported_with_a_clear_message(
    softhsm: object, registry: PKCS11Registry
) -> None:
    token: TokenInfo = softhsm.tokens["agent-b"]  # type: ignore[attr-defined]
    key = generate_rsa(token)
    dec = registry.decryption_key(token.key_config(key.label), name="identities.m0.encryption_key")
    ct = key.public_key.encrypt(b"share", OAEP256)
    with pytest.raises(UnsupportedOperationError) as info:
        await dec.decrypt_oaep_sha256(ct)
    text = info.value.diagnostics()
    assert "'agent-b' lacks RSA-OAEP with SHA-256" in text
    assert 'oaep = "host"' in text


@pytest.mark.softhsm
async def test_softhsm_host_oaep(softhsm: object, registry: PKCS11Registry) -> None:
    token: TokenInfo = softhsm.tokens["agent-b"]  # type: ignore[attr-defined]
    host_key = pki.make_rsa_key()
    key = import_rsa(token, host_key)
    dec = registry.decryption_key(token.key_config(key.label, oaep="host"), name="identities.m0.encryption_key")
    share = os.urandom(100)
    ct = host_key.public_key().encrypt(share, OAEP256)
    assert await dec.decrypt_oaep_sha256(ct) == share
    tampered = bytearray(ct)
    tampered[-1] ^= 1
    sha1 = host_key.public_key().encrypt(
        share,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303 -- a wrong hash on purpose
    )
    labelled = host_key.public_key().encrypt(
        share, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"x")
    )
    pkcs1 = host_key.public_key().encrypt(share, padding.PKCS1v15())
    too_big = (host_key.public_key().public_numbers().n + 1).to_bytes(256, "big")
    messages = set()
    for bad in (bytes(tampered), sha1, labelled, pkcs1, ct[:-1], too_big):
        with pytest.raises(BackendError) as info:
            await dec.decrypt_oaep_sha256(bad)
        assert type(info.value) is BackendError
        messages.add(info.value.diagnostics())
    assert messages == {DECRYPTION_FAILED}


@pytest.mark.softhsm
async def test_a_request_the_token_refuses_does_not_take_the_token_down(
    softhsm: object, registry: PKCS11Registry
) -> None:
    """SoftHSM2 answers CKR_GENERAL_ERROR, the error tpm2-pkcs11 gives for a lost TPM, to a raw RSA input above
    the modulus. Reaching the token with one (the host-side check bypassed) must fail that request only: no
    reconnection, no re-initialised module, no outage for the token's other keys."""
    token: TokenInfo = softhsm.tokens["agent-b"]  # type: ignore[attr-defined]
    host_key = pki.make_rsa_key()
    key = import_rsa(token, host_key)
    dec = registry.decryption_key(token.key_config(key.label, oaep="host"), name="identities.m0.encryption_key")
    assert isinstance(dec, PKCS11DecryptionKey)
    await dec.describe()
    too_big = (host_key.public_key().public_numbers().n + 1).to_bytes(256, "big")
    with pytest.raises(BackendError) as info:
        await dec._conn.run(lambda s: dec._raw_rsa_sync(s, too_big), where="identities.m0.encryption_key")
    assert type(info.value) is BackendError
    assert info.value.message == DECRYPTION_FAILED
    [status] = registry.status()
    assert (status.available, status.connected, status.reconnects, status.logins) == (True, True, 0, 1)


def test_oaep_decoder_matches_cryptography() -> None:
    key = pki.make_rsa_key()
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    for size in (0, 1, 32, 190):
        msg = os.urandom(size)
        ct = key.public_key().encrypt(msg, OAEP256)
        em = pow(int.from_bytes(ct, "big"), d, n).to_bytes(256, "big")
        assert oaep_sha256_decode(em, 256) == msg
        bad = bytearray(em)
        bad[0] = 1
        with pytest.raises(BackendError, match=f"^{DECRYPTION_FAILED}$"):
            oaep_sha256_decode(bytes(bad), 256)
    with pytest.raises(BackendError, match=f"^{DECRYPTION_FAILED}$"):
        oaep_sha256_decode(bytes(255), 256)


async def test_imported_member_key_signs(p11_token: TokenInfo, registry: PKCS11Registry) -> None:
    member = pki.make_member("member7")
    key = import_member(p11_token, member.key)
    signer = registry.signing_key(p11_token.key_config(key.label), name="identities.member7.signing_key")
    digest = ES384.digest(b"ballot")
    raw = await signer.sign_digest(ES384, digest)
    cert_key = member.cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    verify_digest(cert_key, ES384, digest, raw)


async def test_closed_registry_refuses(p11_token: TokenInfo) -> None:
    key = generate_ec(p11_token)
    reg = PKCS11Registry()
    signer = reg.signing_key(p11_token.key_config(key.label), name="m0")
    await signer.describe()
    await reg.aclose()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await signer.sign_digest(ES384, bytes(48))
