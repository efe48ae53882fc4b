"""One suite for every key store (cryptography's ``backend`` parametrisation, STYLE 3.11).

The same tests run against ``file`` (a PEM key), ``pkcs11-softhsm`` and ``pkcs11-nss`` (the session-scoped tokens of
``tests.support.tokens``) and ``azure-keyvault`` (the HTTPS Key Vault double with the real Azure SDK and the real
``ManagedIdentityCredential``). Keys are always opened through ``KeyStores`` from real config dataclasses, so the
factory is exercised too. A case that does not apply to a backend is left out of its parametrisation in
``NOT_APPLICABLE``, with the reason, and never skipped at run time.

The last section checks that the ``[keyvault]`` config table reaches the Key Vault backend through ``KeyStores``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.algorithms import ES256, ES384, ES512, SignatureAlgorithm, verify_digest
from signing_agent.backends.base import SigningKey
from signing_agent.backends.factory import KeyStores
from signing_agent.config import (
    AzureKeyVaultKeyConfig,
    FileKeyConfig,
    IdentityConfig,
    KeyConfig,
    KeyVaultConfig,
)
from signing_agent.errors import (
    AgentError,
    BackendUnavailableError,
    ConfigError,
    IdentityError,
    KeyNotFoundError,
    SigningFailedError,
)
from signing_agent.identity import open_identity
from tests.doubles.keyvault import RunningKeyVault, managed_identity_env, running_keyvault
from tests.support import tokens
from tests.support.pki import Member, make_member, pem_public
from tests.support.tokens import TokenInfo, close_all_sessions, import_member

# The token fixtures are session-scoped in tests.support.tokens; bind them here so pytest finds them.
softhsm = tokens.softhsm
nss_token = tokens.nss_token

WHERE = "identities.m0.signing_key"
BACKENDS = ("file", "pkcs11-softhsm", "pkcs11-nss", "azure-keyvault")
_MARKS = {"pkcs11-softhsm": pytest.mark.softhsm, "pkcs11-nss": pytest.mark.nss}

NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("recovery", "file"): "a PEM key in memory has no session to lose and no service that throttles",
}
"""(case, backend) pairs that are parametrised away, with the reason."""

KNOWN_BUGS: dict[tuple[str, str], pytest.MarkDecorator] = {}
"""(case, backend) pairs with a known defect: a strict xfail, so the fix turns them red until the mark goes."""

ALGORITHMS: dict[str, tuple[SignatureAlgorithm, str]] = {
    "ES256": (ES256, "secp256r1"),
    "ES384": (ES384, "secp384r1"),
    "ES512": (ES512, "secp521r1"),
}


def cases(case: str) -> list[ParameterSet]:
    """The backends ``case`` runs on (as ``backend`` params), with their prerequisite marks."""
    return [
        pytest.param(b, marks=[m for m in (_MARKS.get(b), KNOWN_BUGS.get((case, b))) if m is not None], id=b)
        for b in BACKENDS
        if (case, b) not in NOT_APPLICABLE
    ]


def sign_cases() -> list[ParameterSet]:
    """Every (backend, algorithm) pair; a backend without P-521 would be parametrised away as ``sign-ES512``."""
    return [
        pytest.param(p.values[0], name, marks=p.marks, id=f"{p.values[0]}-{name}")
        for name in ALGORITHMS
        for p in cases(f"sign-{name}")
    ]


@dataclass
class Harness:
    """One backend: puts a member's private key where the backend finds it and opens keys through ``KeyStores``."""

    kind: str
    stores: KeyStores
    folder: Path
    token: TokenInfo | None = None
    kv: RunningKeyVault | None = None

    @property
    def backend_name(self) -> str:
        """What ``KeyInfo.backend`` says."""
        return self.kind.partition("-")[0] if self.kind.startswith("pkcs11") else self.kind

    def add(self, member: Member) -> KeyConfig:
        """Store ``member``'s private key in the backend; return the config that names it."""
        if self.token is not None:
            return self.token.key_config(import_member(self.token, member.key).label)
        if self.kv is not None:
            version = self.kv.vault.add_key(member.name, member.key)
            return self._kv_config(member.name, key_version=version.version)
        key_path, _ = member.write(self.folder / "keys")
        return FileKeyConfig(path=key_path)

    def missing(self) -> KeyConfig:
        """A config naming a key that does not exist."""
        if self.token is not None:
            return self.token.key_config(tokens.unique_label("absent"))
        if self.kv is not None:
            return self._kv_config("absent")
        return FileKeyConfig(path=self.folder / "absent_privk.pem")

    def _kv_config(self, name: str, key_version: str | None = None) -> AzureKeyVaultKeyConfig:
        assert self.kv is not None
        return AzureKeyVaultKeyConfig(
            vault_url=self.kv.vault_url,
            key_name=name,
            key_version=key_version,
            credential="managed-identity",
            ca_bundle=self.kv.ca_bundle,
        )

    def open(self, cfg: KeyConfig) -> SigningKey:
        return self.stores.signing_key(cfg, name=WHERE)


@dataclass
class Opened:
    harness: Harness
    member: Member
    key: SigningKey

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        pub = self.member.cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        return pub


@pytest.fixture(params=cases("all"))
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    kind: str = request.param
    if kind == "azure-keyvault":
        async with running_keyvault(tmp_path / "kv") as kv:
            managed_identity_env(monkeypatch, kv)
            stores = KeyStores()
            try:
                yield Harness(kind, stores, tmp_path, kv=kv)
            finally:
                await stores.aclose()  # before the servers stop
        return
    token: TokenInfo | None = None
    if kind == "pkcs11-softhsm":
        token = request.getfixturevalue("softhsm").tokens["agent-a"]
    elif kind == "pkcs11-nss":
        token = request.getfixturevalue("nss_token")
    stores = KeyStores()
    try:
        yield Harness(kind, stores, tmp_path, token=token)
    finally:
        await stores.aclose()


@pytest.fixture
async def signing_key(backend: Harness) -> AsyncIterator[Opened]:
    """An opened P-384 ``SigningKey`` in the backend, and the member (key + certificate) it belongs to."""
    member = make_member("m0", "secp384r1")
    key = backend.open(backend.add(member))
    try:
        yield Opened(backend, member, key)
    finally:
        await key.aclose()


# ----- describe, sign, verify -----


async def test_describe_returns_the_right_public_key(signing_key: Opened) -> None:
    key = signing_key.key
    assert isinstance(key, SigningKey)
    info = await key.describe()
    assert info.backend == signing_key.harness.backend_name
    assert info.location
    assert pem_public(info.public_key) == pem_public(signing_key.public_key)
    other = make_member("other", "secp384r1")
    assert pem_public(info.public_key) != pem_public(other.key.public_key())


@pytest.mark.parametrize(("backend", "alg_name"), sign_cases(), indirect=["backend"])
async def test_sign_and_verify(backend: Harness, alg_name: str) -> None:
    alg, curve = ALGORITHMS[alg_name]
    member = make_member("m0", curve)
    key = backend.open(backend.add(member))
    try:
        pub = member.cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        digest = alg.digest(b"governance payload")
        raw = await key.sign_digest(alg, digest)
        assert len(raw) == alg.signature_size
        verify_digest(pub, alg, digest, raw)
        with pytest.raises(SigningFailedError):
            verify_digest(pub, alg, alg.digest(b"another payload"), raw)
        # ECDSA is randomised (or RFC 6979 over distinct digests): two signatures never repeat.
        assert await key.sign_digest(alg, digest) != raw
    finally:
        await key.aclose()


@pytest.mark.parametrize("length", [0, 32, 47, 49, 64])
async def test_a_wrong_digest_length_is_refused(signing_key: Opened, length: int) -> None:
    with pytest.raises(SigningFailedError, match=rf"48-byte digest, got {length}|digest is 48 bytes, got {length}"):
        await signing_key.key.sign_digest(ES384, bytes(length))
    kv = signing_key.harness.kv
    if kv is not None:
        assert kv.vault.requests_for("sign") == []  # refused locally, no vault quota spent


@pytest.mark.parametrize("backend", cases("algorithm-mismatch"), indirect=True)
async def test_an_algorithm_for_another_curve_is_refused(backend: Harness) -> None:
    member = make_member("m0", "secp384r1")
    key = backend.open(backend.add(member))
    try:
        with pytest.raises(SigningFailedError, match="does not match"):
            await key.sign_digest(ES256, ES256.digest(b"x"))  # a P-384 key
    finally:
        await key.aclose()


async def _open_and_describe(backend: Harness, cfg: KeyConfig) -> None:
    key = backend.open(cfg)
    try:
        await key.describe()
    finally:
        await key.aclose()


async def test_an_unknown_key_is_refused_naming_the_config_key(backend: Harness) -> None:
    with pytest.raises((KeyNotFoundError, ConfigError)) as info:
        await _open_and_describe(backend, backend.missing())
    error = info.value
    assert isinstance(error, AgentError)
    # The file backend fails at open (a ConfigError), the key stores when asked (KeyNotFoundError).
    assert isinstance(error, ConfigError if backend.kind == "file" else KeyNotFoundError)
    assert WHERE in error.diagnostics()


# ----- the identity check -----


@pytest.mark.parametrize("cert_curve", ["secp384r1", "secp256r1"], ids=["same-curve", "other-curve"])
async def test_a_key_that_does_not_match_the_certificate_is_refused(
    backend: Harness, tmp_path: Path, cert_curve: str
) -> None:
    member, stranger = make_member("m0", "secp384r1"), make_member("stranger", cert_curve)
    cfg = backend.add(member)
    _, wrong_cert = stranger.write(tmp_path / "certs")
    with pytest.raises(IdentityError) as info:
        await open_identity(IdentityConfig(name="m0", certificate=wrong_cert, signing_key=cfg), backend.stores)
    message = info.value.message
    assert message.startswith("identities.m0: the signing key at ")
    assert f"does not match the certificate {wrong_cert} (member id {stranger.member_id})" in message

    # The control: the key's own certificate opens, and the member id comes from it.
    _, own_cert = member.write(tmp_path / "certs")
    ident = await open_identity(IdentityConfig(name="m0", certificate=own_cert, signing_key=cfg), backend.stores)
    try:
        assert ident.member_id == member.member_id
        assert ident.alg is ES384
        assert ident.backend == backend.backend_name
        assert ident.location in message  # the refusal named the key it refused
    finally:
        await ident.signing_key.aclose()


# ----- concurrency and recovery -----


async def test_100_concurrent_signs_all_verify(signing_key: Opened) -> None:
    digests = [ES384.digest(i.to_bytes(4, "big")) for i in range(100)]
    await signing_key.key.describe()
    signatures = await asyncio.gather(*(signing_key.key.sign_digest(ES384, d) for d in digests))
    for digest, raw in zip(digests, signatures, strict=True):
        verify_digest(signing_key.public_key, ES384, digest, raw)
    assert len(set(signatures)) == 100
    kv = signing_key.harness.kv
    if kv is not None:
        assert kv.vault.operations["sign"] == 100  # one vault request per signature
        assert kv.vault.max_in_flight <= KeyVaultConfig().max_concurrency


RECOVERY: dict[str, tuple[str, ...]] = {
    "pkcs11-softhsm": ("close-all-sessions",),
    "pkcs11-nss": ("close-all-sessions",),
    "azure-keyvault": ("503", "429-retry-after", "429-no-retry-after"),
}


def recovery_cases() -> list[ParameterSet]:
    out = []
    for p in cases("recovery"):
        kind = str(p.values[0])
        out += [pytest.param(kind, d, marks=p.marks, id=f"{kind}-{d}") for d in RECOVERY[kind]]
    return out


def test_every_recoverable_backend_has_a_disruption() -> None:
    assert {str(p.values[0]) for p in cases("recovery")} == set(RECOVERY)


@pytest.mark.parametrize(("backend", "disruption"), recovery_cases(), indirect=["backend"])
async def test_recovers_after_a_lost_session_or_throttling(
    backend: Harness, signing_key: Opened, disruption: str
) -> None:
    key = signing_key.key
    await key.sign_digest(ES384, ES384.digest(b"before"))  # session, login or token in place
    kv = backend.kv
    match disruption:
        case "close-all-sessions":
            assert backend.token is not None
            close_all_sessions(backend.token)  # behind the backend's back: sessions and login are gone
        case "503":
            assert kv is not None
            kv.vault.inject(status=503, count=2, ops=frozenset({"sign"}), code="ServiceUnavailable")
        case "429-retry-after":
            assert kv is not None
            kv.vault.inject(status=429, retry_after="1", count=1, ops=frozenset({"sign"}))
        case "429-no-retry-after":
            assert kv is not None
            kv.vault.inject(status=429, count=2, ops=frozenset({"sign"}))
    started = time.monotonic()
    digest = ES384.digest(b"after the disruption")
    raw = await key.sign_digest(ES384, digest)
    elapsed = time.monotonic() - started
    verify_digest(signing_key.public_key, ES384, digest, raw)

    if kv is None:
        assert backend.stores._pkcs11 is not None
        [status] = backend.stores._pkcs11.status()
        assert (status.reconnects, status.logins) == (1, 2)
        return
    statuses = [r.status for r in kv.vault.requests_for("sign")]
    expected = {"503": [503, 503], "429-retry-after": [429], "429-no-retry-after": [429, 429]}[disruption]
    assert statuses == [200, *expected, 200]
    if disruption == "429-retry-after":
        assert elapsed >= 0.95  # Retry-After: 1 was honoured


# ----- [keyvault] settings reach the Key Vault backend through KeyStores -----


@pytest.fixture
async def kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningKeyVault]:
    async with running_keyvault(tmp_path / "kv") as running:
        managed_identity_env(monkeypatch, running)
        yield running


async def _open_kv_key(kv: RunningKeyVault, settings: KeyVaultConfig) -> tuple[KeyStores, SigningKey]:
    member = make_member("m0", "secp384r1")
    version = kv.vault.add_key("m0", member.key)
    stores = KeyStores(keyvault=settings)
    cfg = AzureKeyVaultKeyConfig(
        vault_url=kv.vault_url,
        key_name="m0",
        key_version=version.version,
        credential="managed-identity",
        ca_bundle=kv.ca_bundle,
    )
    key = stores.signing_key(cfg, name=WHERE)
    await key.describe()
    return stores, key


async def test_keyvault_max_attempts_from_config(kv: RunningKeyVault) -> None:
    stores, key = await _open_kv_key(kv, KeyVaultConfig(max_attempts=2))
    try:
        kv.vault.inject(status=503, count=2, ops=frozenset({"sign"}))  # the default of 5 attempts would get through
        with pytest.raises(BackendUnavailableError, match="failed after 2 attempts"):
            await key.sign_digest(ES384, bytes(48))
        assert [r.status for r in kv.vault.requests_for("sign")] == [503, 503]
    finally:
        await stores.aclose()


async def test_keyvault_total_timeout_from_config(kv: RunningKeyVault) -> None:
    stores, key = await _open_kv_key(kv, KeyVaultConfig(total_timeout=0.5))
    try:
        kv.vault.inject(status=429, retry_after="1", count=1, ops=frozenset({"sign"}))  # the default 30 s would wait
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match=r"failed within 0\.5s"):
            await key.sign_digest(ES384, bytes(48))
        assert time.monotonic() - started < 0.9
    finally:
        await stores.aclose()


async def test_keyvault_max_concurrency_from_config(kv: RunningKeyVault) -> None:
    stores, key = await _open_kv_key(kv, KeyVaultConfig(max_concurrency=2, burst=2, rate_per_second=1000.0))
    try:
        kv.vault.clear_log()
        kv.vault.inject(status=None, delay=0.15, count=6, ops=frozenset({"sign"}))  # slow signs overlap
        await asyncio.gather(*(key.sign_digest(ES384, bytes(48)) for _ in range(6)))
        assert kv.vault.max_in_flight == 2  # the default cap of 16 would let all 6 in at once
    finally:
        await stores.aclose()


async def test_keyvault_rate_from_config(kv: RunningKeyVault) -> None:
    stores, key = await _open_kv_key(kv, KeyVaultConfig(max_concurrency=1, burst=1, rate_per_second=10.0))
    try:
        started = time.monotonic()
        await asyncio.gather(*(key.sign_digest(ES384, bytes(48)) for _ in range(6)))
        assert time.monotonic() - started >= 0.45  # 10/s with a bucket of one: 5 waits of 0.1 s
    finally:
        await stores.aclose()
