"""One suite for every key store (cryptography's ``backend`` parametrisation, STYLE 3.11).

The same tests run against ``file`` (a PEM key), PKCS#11 tokens (the session-scoped tokens of
``tests.support.tokens``: ``pkcs11-softhsm``, ``pkcs11-nss``, ``pkcs11-tpm`` (tpm2-pkcs11 on swtpm), and each of
them again through p11-kit's proxy, ``pkcs11-*-p11kit``) and ``azure-keyvault`` (the HTTPS Key Vault double with
the real Azure SDK and the real ``ManagedIdentityCredential``). Keys are always opened through ``KeyStores`` from
real config dataclasses, so the key-store selection (backends/keystores.py) is exercised too. A case that does not
apply to a backend is left out of its parametrisation in ``NOT_APPLICABLE``, with the reason, and never skipped at
run time.

The last section checks that the ``[keyvault]`` config table reaches the Key Vault backend through ``KeyStores``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signing_agent.algorithms import ES256, ES384, ES512, SignatureAlgorithm, verify_digest
from signing_agent.backends.base import DecryptionKey, SigningKey
from signing_agent.backends.keystores import KeyStores
from signing_agent.config import (
    AzureKeyVaultKeyConfig,
    FileKeyConfig,
    IdentityConfig,
    KeyConfig,
    KeyVaultConfig,
)
from signing_agent.errors import (
    AgentError,
    BackendError,
    BackendUnavailableError,
    ConfigError,
    IdentityError,
    KeyNotFoundError,
    SigningFailedError,
)
from signing_agent.identity import open_identity
from tests.doubles.keyvault import RunningKeyVault, managed_identity_env, running_keyvault
from tests.support import pki, tokens
from tests.support.pki import make_member, pem_public
from tests.support.tokens import TokenInfo, close_all_sessions, import_member

# The token fixtures are session-scoped in tests.support.tokens; bind them here so pytest finds them.
softhsm = tokens.softhsm
nss_token = tokens.nss_token
tpm_token = tokens.tpm_token
p11kit_tokens = tokens.p11kit_tokens

WHERE = "identities.m0.signing_key"
TOKENS = ("softhsm", "nss", "tpm")
PKCS11 = tuple(f"pkcs11-{t}" for t in TOKENS) + tuple(f"pkcs11-{t}-p11kit" for t in TOKENS)
BACKENDS = ("file", *PKCS11, "azure-keyvault")
_TOKEN_MARKS = {"softhsm": pytest.mark.softhsm, "nss": pytest.mark.nss, "tpm": pytest.mark.tpm}
_MARKS: dict[str, list[pytest.MarkDecorator]] = {
    **{f"pkcs11-{t}": [m] for t, m in _TOKEN_MARKS.items()},
    **{f"pkcs11-{t}-p11kit": [m, pytest.mark.p11kit] for t, m in _TOKEN_MARKS.items()},
}

_NO_KEY_CREATION = "the suite adds keys to it directly; key creation in Key Vault is not the agent's yet"
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("recovery", "file"): "a PEM key in memory has no session to lose and no service that throttles",
    ("keys-generate", "file"): "a PEM key is made by openssl or keygenerator.sh, not by the agent",
    ("keys-generate", "azure-keyvault"): _NO_KEY_CREATION,
    ("keys-import", "file"): "a PEM key is already where the file backend reads it",
    ("keys-import", "azure-keyvault"): _NO_KEY_CREATION,
    ("keys-import", "pkcs11-tpm"): "tpm2-pkcs11 cannot C_CreateObject a private key: keys are made in the TPM",
    ("keys-import", "pkcs11-tpm-p11kit"): "tpm2-pkcs11 cannot C_CreateObject a private key: keys are made in the TPM",
    ("keys-list", "file"): "there is no key store to list",
    **dict.fromkeys(
        [(case, f"pkcs11-tpm{via}") for case in ("sign-ES512", "keys-generate-ES512") for via in ("", "-p11kit")],
        "tpm2-pkcs11 1.9 stores a P-521 point with a malformed DER length and then cannot sign with the key "
        "(C_SignInit: CKR_HOST_MEMORY, 'd2i_ASN1_OCTET_STRING: too long'), whoever made it",
    ),
    ("keys-list", "azure-keyvault"): "listing a vault's keys is the Azure CLI's job, not the agent's",
}
"""(case, backend) pairs that are parametrised away, with the reason."""

KNOWN_BUGS: dict[tuple[str, str], pytest.MarkDecorator] = {}
"""(case, backend) pairs with a known defect: a strict xfail, so the fix turns them red until the mark goes."""

ALGORITHMS: dict[str, tuple[SignatureAlgorithm, str]] = {
    "ES256": (ES256, "secp256r1"),
    "ES384": (ES384, "secp384r1"),
    "ES512": (ES512, "secp521r1"),
}

OAEP256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _not_applicable(case: str, backend: str) -> bool:
    """``(case, backend)`` or a family of the case (``keys-generate`` for ``keys-generate-ES512``) is listed."""
    parts = case.split("-")
    return any(("-".join(parts[:n]), backend) in NOT_APPLICABLE for n in range(len(parts), 0, -1))


def cases(case: str) -> list[ParameterSet]:
    """The backends ``case`` runs on (as ``backend`` params), with their prerequisite marks."""
    return [
        pytest.param(b, marks=[*_MARKS.get(b, []), *([KNOWN_BUGS[case, b]] if (case, b) in KNOWN_BUGS else [])], id=b)
        for b in BACKENDS
        if not _not_applicable(case, b)
    ]


def sign_cases(case: str = "sign") -> list[ParameterSet]:
    """Every (backend, algorithm) pair of ``case``; a backend without P-521 is parametrised away as
    ``<case>-ES512``."""
    return [
        pytest.param(p.values[0], name, marks=p.marks, id=f"{p.values[0]}-{name}")
        for name in ALGORITHMS
        for p in cases(f"{case}-{name}")
    ]


@dataclass(frozen=True)
class StoredKey:
    """A member key where the backend keeps it (imported, or made there), its certificate, and its config."""

    name: str
    cert: x509.Certificate
    config: KeyConfig

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        pub = self.cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        return pub

    @property
    def member_id(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def write_cert(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}_cert.pem"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


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

    def store(self, name: str = "m0", curve: str = "secp384r1") -> StoredKey:
        """A new member key in the backend: a PEM key imported (or written, or uploaded), or made in a TPM."""
        if self.token is not None and not self.token.imports_private_keys:
            return self.generate(name, curve)
        member = make_member(name, curve)
        if self.token is not None:
            cfg: KeyConfig = self.token.key_config(import_member(self.token, member.key).label)
        elif self.kv is not None:
            version = self.kv.vault.add_key(member.name, member.key)
            cfg = self._kv_config(member.name, key_version=version.version)
        else:
            key_path, _ = member.write(self.folder / "keys")
            cfg = FileKeyConfig(path=key_path)
        return StoredKey(name, member.cert, cfg)

    def generate(self, name: str, curve: str = "secp384r1") -> StoredKey:
        """A member key made in the token (``keys generate``'s code) and its token-signed certificate."""
        from signing_agent.backends import pkcs11_admin

        assert self.token is not None
        key = tokens.generate_ec(self.token, curve)
        cert = pkcs11_admin.self_signed_certificate(self.token.target(), key, common_name=name)
        return StoredKey(name, cert, self.token.key_config(key.label))

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

    def open_decryption_key(self) -> tuple[DecryptionKey, rsa.RSAPublicKey]:
        """A new RSA encryption key in the backend, opened as a ``DecryptionKey``, and its public key."""
        where = "identities.m0.encryption_key"
        if self.token is not None:
            key = tokens.generate_rsa(self.token)
            assert isinstance(key.public_key, rsa.RSAPublicKey)
            cfg: KeyConfig = self.token.key_config(key.label, oaep=self.token.oaep)
            return self.stores.decryption_key(cfg, name=where), key.public_key
        private = pki.make_rsa_key()
        if self.kv is not None:
            version = self.kv.vault.add_key("m0-enc", private)
            cfg = self._kv_config("m0-enc", key_version=version.version)
        else:
            path = self.folder / "m0_enc_privk.pem"
            path.write_bytes(pki.pem_private(private))
            path.chmod(0o600)
            cfg = FileKeyConfig(path=path)
        return self.stores.decryption_key(cfg, name=where), private.public_key()


@dataclass
class Opened:
    harness: Harness
    stored: StoredKey
    key: SigningKey

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.stored.public_key


def _token(request: pytest.FixtureRequest, kind: str) -> TokenInfo | None:
    if not kind.startswith("pkcs11-"):
        return None
    name = kind.removeprefix("pkcs11-")
    if name.endswith("-p11kit"):
        base = name.removesuffix("-p11kit")
        p11kit: dict[str, TokenInfo] = request.getfixturevalue("p11kit_tokens")
        if base not in p11kit:  # its module is missing: p11kit_tokens left it out
            request.getfixturevalue({"softhsm": "softhsm", "nss": "nss_token", "tpm": "tpm_token"}[base])
        return p11kit[base]
    if name == "softhsm":
        token: TokenInfo = request.getfixturevalue("softhsm").tokens["agent-a"]
        return token
    return request.getfixturevalue({"nss": "nss_token", "tpm": "tpm_token"}[name])  # type: ignore[no-any-return]


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
    token = _token(request, kind)
    stores = KeyStores()
    try:
        yield Harness(kind, stores, tmp_path, token=token)
    finally:
        await stores.aclose()


@pytest.fixture
async def signing_key(backend: Harness) -> AsyncIterator[Opened]:
    """An opened P-384 ``SigningKey`` in the backend, and the member key (and certificate) it belongs to."""
    stored = backend.store("m0", "secp384r1")
    key = backend.open(stored.config)
    try:
        yield Opened(backend, stored, key)
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
    stored = backend.store("m0", curve)
    key = backend.open(stored.config)
    try:
        pub = stored.public_key
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
    key = backend.open(backend.store("m0", "secp384r1").config)
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
    stored, stranger = backend.store("m0", "secp384r1"), make_member("stranger", cert_curve)
    cfg = stored.config
    _, wrong_cert = stranger.write(tmp_path / "certs")
    with pytest.raises(IdentityError) as info:
        await open_identity(IdentityConfig(name="m0", certificate=wrong_cert, signing_key=cfg), backend.stores)
    message = info.value.message
    assert message.startswith("identities.m0: the signing key at ")
    assert f"does not match the certificate {wrong_cert} (member id {stranger.member_id})" in message

    # The control: the key's own certificate opens, and the member id comes from it.
    own_cert = stored.write_cert(tmp_path / "certs")
    ident = await open_identity(IdentityConfig(name="m0", certificate=own_cert, signing_key=cfg), backend.stores)
    try:
        assert ident.member_id == stored.member_id
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
    **dict.fromkeys(PKCS11, ("close-all-sessions",)),
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


# ----- keys made, moved in and listed by the key tooling; decryption -----


@pytest.mark.parametrize(("backend", "alg_name"), sign_cases("keys-generate"), indirect=["backend"])
async def test_a_generated_key_signs_and_its_certificate_verifies(backend: Harness, alg_name: str) -> None:
    alg, curve = ALGORITHMS[alg_name]
    stored = backend.generate("m0", curve)
    stored.cert.verify_directly_issued_by(stored.cert)  # self-signed in the token
    key = backend.open(stored.config)
    try:
        assert pem_public((await key.describe()).public_key) == pem_public(stored.public_key)
        digest = alg.digest(b"ballot")
        verify_digest(stored.public_key, alg, digest, await key.sign_digest(alg, digest))
    finally:
        await key.aclose()


@pytest.mark.parametrize("backend", cases("keys-import"), indirect=True)
async def test_an_imported_key_signs(backend: Harness) -> None:
    from signing_agent.backends import pkcs11_admin

    assert backend.token is not None
    member = make_member("m0", "secp384r1")
    imported = pkcs11_admin.import_ec_key(backend.token.target(), member.key, label=tokens.unique_label("imp"))
    pkcs11_admin.check_signs(backend.token.target(), imported)
    key = backend.open(backend.token.key_config(key_id=imported.key_id))
    try:
        cert_key = member.cert.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        verify_digest(cert_key, ES384, ES384.digest(b"x"), await key.sign_digest(ES384, ES384.digest(b"x")))
    finally:
        await key.aclose()


@pytest.mark.parametrize("backend", [p for p in cases("import-refused") if "tpm" in str(p.values[0])],
                         indirect=True)  # fmt: skip
def test_a_token_that_cannot_import_says_so(backend: Harness) -> None:
    from signing_agent.backends import pkcs11_admin

    assert backend.token is not None
    with pytest.raises(BackendError) as info:
        pkcs11_admin.import_ec_key(backend.token.target(), make_member().key, label=tokens.unique_label("imp"))
    assert "keys generate" in info.value.diagnostics()


@pytest.mark.parametrize("backend", cases("keys-list"), indirect=True)
def test_keys_list_shows_every_private_key(backend: Harness) -> None:
    from signing_agent.backends import pkcs11_admin

    assert backend.token is not None
    ec_key = tokens.generate_ec(backend.token)
    rsa_key = tokens.generate_rsa(backend.token)
    listed = {(k.label, k.key_id): k for k in pkcs11_admin.list_keys(backend.token.target())}
    assert listed[ec_key.label, ec_key.key_id].description == "P-384"
    assert listed[rsa_key.label, rsa_key.key_id].description == "RSA-2048"
    assert listed[ec_key.label, ec_key.key_id].public_key == ec_key.public_key


async def test_decrypts_rsa_oaep_sha256(backend: Harness) -> None:
    key, public = backend.open_decryption_key()
    try:
        assert pem_public((await key.describe()).public_key) == pem_public(public)
        share = os.urandom(64)
        assert await key.decrypt_oaep_sha256(public.encrypt(share, OAEP256)) == share
        tampered = bytearray(public.encrypt(share, OAEP256))
        tampered[-1] ^= 1
        with pytest.raises(BackendError):
            await key.decrypt_oaep_sha256(bytes(tampered))
    finally:
        await key.aclose()


# ----- [keyvault] settings reach the Key Vault backend through KeyStores -----


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
