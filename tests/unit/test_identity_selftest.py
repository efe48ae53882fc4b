"""An identity's start-up self-tests: the certificate's validity, the probe signature, and an encryption key's round
trip; and the warnings it carries while the agent runs (a certificate about to expire, with an injected clock)."""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from signing_agent.backends.base import DecryptionKey, KeyInfo, Priority
from signing_agent.backends.keystores import KeyStores
from signing_agent.config import FileKeyConfig, IdentityConfig, KeyConfig
from signing_agent.errors import IdentityError, UnsupportedOperationError
from signing_agent.identity import open_identity
from signing_agent.metrics import Metrics
from tests.support.pki import Member, make_member, make_rsa_key, pem_private

DAY = datetime.timedelta(days=1)


def identity_config(tmp_path: Path, member: Member, *, encryption: Path | None = None) -> IdentityConfig:
    key, cert = member.write(tmp_path)
    enc = FileKeyConfig(path=encryption) if encryption is not None else None
    return IdentityConfig(name="m0", certificate=cert, signing_key=FileKeyConfig(path=key), encryption_key=enc)


def rsa_file(tmp_path: Path, key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "enc.pem"
    path.write_bytes(pem_private(key))
    path.chmod(0o600)
    return path


async def test_a_certificate_out_of_its_validity_is_refused_with_how_to_renew(tmp_path: Path) -> None:
    member = make_member("m0", valid_from=-DAY, valid_until=10 * DAY)
    cfg = identity_config(tmp_path, member)
    now = datetime.datetime.now(datetime.UTC)
    for when, said in ((now + 11 * DAY, "expired on"), (now - 2 * DAY, "is not valid before")):
        with pytest.raises(IdentityError, match=rf"identities\.m0\.certificate: .*m0_cert\.pem {said} ") as info:
            await open_identity(cfg, KeyStores(), clock=functools.partial(lambda t: t, when))
        assert info.value.hint is not None
        assert "set_member" in info.value.hint


async def test_a_certificate_about_to_expire_is_a_warning_that_follows_the_clock(tmp_path: Path) -> None:
    member = make_member("m0", valid_from=-DAY, valid_until=40 * DAY)
    ident = await open_identity(identity_config(tmp_path, member), KeyStores(), expiry_warning=30 * DAY)
    try:
        now = datetime.datetime.now(datetime.UTC)
        assert ident.current_warnings(now) == ()
        assert ident.certificate_warning(now + 9 * DAY) is None
        [warning] = ident.current_warnings(now + 11 * DAY)
        assert warning.startswith("the member certificate expires on ")
        assert warning.endswith(" days)")
        assert ident.certificate_problem(now + 11 * DAY) is None
        assert ident.certificate_problem(now + 41 * DAY) is not None
        assert ident.current_warnings(now + 41 * DAY)[0].startswith("the member certificate expired on ")
    finally:
        await ident.aclose()


async def test_an_encryption_key_decrypts_a_test_message_at_start_up(tmp_path: Path) -> None:
    enc = rsa_file(tmp_path, make_rsa_key())
    ident = await open_identity(identity_config(tmp_path, make_member("m0"), encryption=enc), KeyStores())
    assert ident.encryption_error is None
    assert ident.current_warnings() == ()
    await ident.aclose()


class _Refusing:
    """A decryption key whose store cannot do OAEP-SHA256 (as SoftHSM2 2.6), or that returns the wrong bytes."""

    def __init__(self, public_key: rsa.RSAPublicKey, *, refuse: bool) -> None:
        self.public_key = public_key
        self.refuse = refuse
        self.asked: list[Priority] = []

    async def describe(self) -> KeyInfo:
        return KeyInfo(backend="pkcs11", location="pkcs11:object=enc", public_key=self.public_key)

    async def decrypt_oaep_sha256(self, ciphertext: bytes, *, priority: Priority = Priority.HIGH) -> bytes:
        self.asked.append(priority)
        if self.refuse:
            raise UnsupportedOperationError(
                "identities.m0.encryption_key: the token lacks RSA-OAEP with SHA-256", hint='set oaep = "host"'
            )
        return b"\0" * 32

    async def aclose(self) -> None:
        return None


class _Stores(KeyStores):
    def __init__(self, key: DecryptionKey) -> None:
        super().__init__()
        self.key = key

    def decryption_key(self, cfg: KeyConfig, *, name: str) -> DecryptionKey:
        return self.key


@pytest.mark.parametrize("refuse", [True, False])
async def test_an_encryption_key_that_fails_its_round_trip_is_carried_not_fatal(tmp_path: Path, refuse: bool) -> None:
    """The identity still signs (it votes); why its recovery shares would fail is carried, with the store's hint."""
    enc = rsa_file(tmp_path, make_rsa_key())
    key = _Refusing(make_rsa_key().public_key(), refuse=refuse)
    ident = await open_identity(identity_config(tmp_path, make_member("m0"), encryption=enc), _Stores(key))
    try:
        error = ident.encryption_error
        assert error is not None
        assert error.message.startswith("identities.m0.encryption_key: failed its self-test (decrypting a message")
        if refuse:
            assert error.message.endswith(": the token lacks RSA-OAEP with SHA-256")  # its name said once
            assert error.hint == 'set oaep = "host"'
        else:
            assert error.message.endswith(": the decryption came back wrong")
        assert key.asked == [Priority.NORMAL]  # a self-test never jumps the queue of a recovery
        assert ident.current_warnings() == (f"{error.message} (recovery shares will fail)",)
    finally:
        await ident.aclose()


def test_the_certificate_expiry_metric_counts_down_and_forgets_removed_identities() -> None:
    metrics = Metrics()
    now = [1000.0]
    metrics.set_certificate_expiries({"m0": 5000.0, "m1": 9000.0}, clock=lambda: now[0])
    name = "signing_agent_certificate_expiry_seconds"
    assert metrics.value(name, {"identity": "m0"}) == 4000.0
    now[0] = 6000.0
    assert metrics.value(name, {"identity": "m0"}) == -1000.0  # expired: negative
    metrics.set_certificate_expiries({"m1": 9000.0}, clock=lambda: now[0])  # a reload removed m0
    assert metrics.registry.get_sample_value(name, {"identity": "m0"}) is None
    assert metrics.value(name, {"identity": "m1"}) == 3000.0
