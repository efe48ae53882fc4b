"""The azure-keyvault backend with the real Azure SDK and the real ManagedIdentityCredential, against the
HTTPS Key Vault double and its managed-identity token endpoint (tests/doubles/keyvault.py). No fakes in the
agent."""

from __future__ import annotations

import asyncio
import re
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from signing_agent.algorithms import ES256, ES384, ES512, SignatureAlgorithm
from signing_agent.backends.azure_keyvault import (
    AzureKeyVaultRegistry,
    AzureKeyVaultSettings,
    ThrottleSettings,
)
from signing_agent.backends.base import DecryptionKey, Priority, SigningKey
from signing_agent.config import AzureKeyVaultKeyConfig
from signing_agent.errors import (
    AgentError,
    BackendError,
    BackendUnavailableError,
    IdentityError,
    InvalidRequestError,
    KeyNotFoundError,
    SigningFailedError,
)
from tests.doubles.keyvault import Fault, RunningKeyVault, running_keyvault
from tests.support.pki import make_member, make_rsa_key

FAST = AzureKeyVaultSettings(
    max_attempts=4,
    total_timeout=10.0,
    attempt_timeout=2.0,
    connect_timeout=2.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    max_retry_after=5.0,
)
WHERE = "identities.m0.signing_key"


@pytest.fixture
async def registry(kv: RunningKeyVault) -> AsyncIterator[AzureKeyVaultRegistry]:
    # Depends on kv so that it is closed before the servers stop.
    reg = AzureKeyVaultRegistry(settings=FAST)
    yield reg
    await reg.aclose()


def _cfg(kv: RunningKeyVault, key_name: str, **kwargs: object) -> AzureKeyVaultKeyConfig:
    kwargs.setdefault("credential", "managed-identity")
    kwargs.setdefault("ca_bundle", kv.ca_bundle)
    return AzureKeyVaultKeyConfig(
        vault_url=kv.vault_url,
        key_name=key_name,
        **kwargs,  # type: ignore[arg-type]  # test helper: keyword pass-through
    )


def _verify(pub: ec.EllipticCurvePublicKey, alg: SignatureAlgorithm, digest: bytes, raw: bytes) -> None:
    n = alg.field_bytes
    der = encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))
    pub.verify(der, digest, ec.ECDSA(Prehashed(alg.hash_algorithm())))


def _assert_no_secrets(kv: RunningKeyVault, exc: BaseException) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    if isinstance(exc, AgentError):
        texts.append(exc.diagnostics())
    secrets = [*kv.token_endpoint.tokens, kv.token_endpoint.header_secret]
    assert secrets
    for text in texts:
        for secret in secrets:
            assert secret not in text


# ----- describe, sign, decrypt -----


async def test_describe_returns_the_vault_key(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    member = make_member("m0", "secp384r1")
    version = kv.vault.add_key("m0", member.key)
    key = registry.signing_key(_cfg(kv, "m0", key_version=version.version), name=WHERE)
    assert isinstance(key, SigningKey)
    info = await key.describe()
    assert info.backend == "azure-keyvault"
    assert info.location == kv.vault.kid(version)
    assert info.public_key.public_numbers() == member.key.public_key().public_numbers()
    assert info.warnings == ()
    assert await key.describe() is info  # cached: no second GET
    assert len(kv.vault.requests_for("get")) == 2  # the pinned version and the latest (drift check)


@pytest.mark.parametrize(("alg", "curve"), [(ES256, "secp256r1"), (ES384, "secp384r1"), (ES512, "secp521r1")])
async def test_sign_and_verify(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry, alg: SignatureAlgorithm, curve: str
) -> None:
    member = make_member("m0", curve)
    version = kv.vault.add_key("m0", member.key)
    key = registry.signing_key(_cfg(kv, "m0", key_version=version.version), name=WHERE)
    digest = alg.digest(b"governance payload")
    signature = await key.sign_digest(alg, digest)
    assert len(signature) == alg.signature_size
    cert_key = member.cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    _verify(cert_key, alg, digest, signature)


async def test_one_vault_request_per_signature_after_warm_up(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    version = kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0", key_version=version.version), name=WHERE)
    await key.describe()
    kv.vault.clear_log()
    for i in range(20):
        await key.sign_digest(ES384, ES384.digest(b"%d" % i))
    assert [(r.method, r.path, r.status, r.authorized) for r in kv.vault.requests] == [
        ("POST", f"/keys/m0/{version.version}/sign", 200, True)
    ] * 20
    assert kv.vault.operations == {"sign": 20}
    assert len(kv.token_endpoint.requests) == 1  # the token is cached by azure-identity


async def test_versionless_key_uses_the_version_resolved_at_start(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    v1 = kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    info = await key.describe()
    assert info.location == kv.vault.kid(v1)
    assert any("not pinned" in w for w in info.warnings)
    kv.vault.rotate("m0")  # a rotation while running does not change the key we sign with
    kv.vault.clear_log()
    digest = ES384.digest(b"x")
    _verify(info.public_key, ES384, digest, await key.sign_digest(ES384, digest))  # type: ignore[arg-type]
    assert [r.path for r in kv.vault.requests] == [f"/keys/m0/{v1.version}/sign"]


async def test_pinned_version_and_drift_warning(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    v1 = kv.vault.add_key("m0", "P-384")
    v2 = kv.vault.rotate("m0")
    key = registry.signing_key(_cfg(kv, "m0", key_version=v1.version), name=WHERE)
    info = await key.describe()
    assert info.location == kv.vault.kid(v1)
    (warning,) = info.warnings
    assert "drift" in warning
    assert v2.version in warning
    assert "a different key" in warning
    assert "member id" in warning
    kv.vault.clear_log()
    await key.sign_digest(ES384, ES384.digest(b"x"))
    assert [r.path for r in kv.vault.requests] == [f"/keys/m0/{v1.version}/sign"]


async def test_renewal_with_the_same_key_material_is_reported_as_such(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    member = make_member("m0")
    v1 = kv.vault.add_key("m0", member.key)
    kv.vault.add_key("m0", member.key)  # AutoRenew with reuseKey: new version, same key, new certificate
    info = await registry.signing_key(_cfg(kv, "m0", key_version=v1.version), name=WHERE).describe()
    (warning,) = info.warnings
    assert "same key material" in warning


async def test_a_key_that_does_not_match_the_certificate_is_visible(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    registered = make_member("m0")
    kv.vault.add_key("m0", make_member("other").key)
    info = await registry.signing_key(_cfg(kv, "m0"), name=WHERE).describe()
    assert info.public_key.public_numbers() != registered.key.public_key().public_numbers()


async def _describe_and_sign(key: SigningKey) -> None:
    await key.describe()
    await key.sign_digest(ES384, ES384.digest(b"x"))


async def test_an_answer_naming_another_vault_is_refused_before_any_token_goes_there(
    kv: RunningKeyVault, tmp_path: Path
) -> None:
    """The vault's GET answer names the key on another host (trusted by the same CA bundle, accepting the same
    tokens): the SDK would send every signature and its bearer token there. The agent refuses the key instead."""
    async with running_keyvault(tmp_path / "other") as other:
        other.vault.token_endpoint = kv.token_endpoint
        version = kv.vault.add_key("m0", "P-384")
        other.vault.add_key("m0", version.private_key).version = version.version
        kv.vault.jwk_overrides["kid"] = other.vault.kid(other.vault.latest("m0"))
        both = tmp_path / "both-ca.pem"
        both.write_bytes(kv.ca_bundle.read_bytes() + other.ca_bundle.read_bytes())
        registry = AzureKeyVaultRegistry(settings=FAST)
        try:
            key = registry.signing_key(_cfg(kv, "m0", key_version=version.version, ca_bundle=both), name=WHERE)
            with pytest.raises(IdentityError, match=f"not on {kv.vault_url}") as info:
                await _describe_and_sign(key)
        finally:
            await registry.aclose()
        assert other.vault_url in info.value.message
        assert other.vault.requests == []
        _assert_no_secrets(kv, info.value)


@pytest.mark.parametrize("answer", ["other-version", "no-version", "other-name", "off-curve"])
async def test_an_answer_for_another_key_or_an_invalid_key_is_refused(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry, answer: str
) -> None:
    """A pinned key whose GET answer names another version (the SDK would sign with that one), no version (it would
    sign with whatever is current), another key, or carries a point off its curve: a clear ``IdentityError`` naming
    the key, and no signature is asked for."""
    pinned = kv.vault.add_key("m0", "P-384")
    current = kv.vault.add_key("m0", "P-384")
    kv.vault.add_key("m1", "P-384")
    expected = {
        "other-version": (kv.vault.kid(current), f"not the pinned version {pinned.version}"),
        "no-version": (f"{kv.vault_url}/keys/m0", "no version"),
        "other-name": (kv.vault.kid(kv.vault.latest("m1")), "not key 'm0'"),
        "off-curve": (None, "the vault's public key is not valid"),
    }
    kid, problem = expected[answer]
    if kid is not None:
        kv.vault.jwk_overrides["kid"] = kid
    else:
        kv.vault.jwk_overrides["x"] = kv.vault.jwk_overrides["y"] = pinned.jwk(kv.vault_url)["y"]
    key = registry.signing_key(_cfg(kv, "m0", key_version=pinned.version), name=WHERE)
    with pytest.raises(IdentityError, match=re.escape(problem)) as info:
        await _describe_and_sign(key)
    assert "m0" in info.value.message
    assert kv.vault.requests_for("sign") == []


async def test_decrypt_rsa_oaep_256(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    private = make_rsa_key(2048)
    version = kv.vault.add_key("m0-enc", private, key_ops=["decrypt"])
    key = registry.decryption_key(_cfg(kv, "m0-enc", key_version=version.version), name="identities.m0.encryption_key")
    assert isinstance(key, DecryptionKey)
    info = await key.describe()
    assert isinstance(info.public_key, rsa.RSAPublicKey)
    share = b"\x01" * 32
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ciphertext = private.public_key().encrypt(share, oaep)
    assert await key.decrypt_oaep_sha256(ciphertext) == share
    assert kv.vault.operations["decrypt"] == 1

    with pytest.raises(InvalidRequestError):
        await key.decrypt_oaep_sha256(b"short")
    with pytest.raises(BackendError) as err:
        await key.decrypt_oaep_sha256(b"\x00" * 256)
    assert err.value.message.endswith("decryption with key 'm0-enc' failed")  # nothing about padding


async def test_signature_that_does_not_verify_is_refused(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    version = kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0", key_version=version.version), name=WHERE)
    await key.describe()
    version.private_key = ec.generate_private_key(ec.SECP384R1())  # the vault now signs with another key
    with pytest.raises(SigningFailedError):
        await key.sign_digest(ES384, ES384.digest(b"x"))


async def test_caller_mistakes(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("m0", "P-384")
    kv.vault.add_key("rsa", "RSA-2048")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    with pytest.raises(SigningFailedError, match="digest"):
        await key.sign_digest(ES384, b"\x00" * 32)
    with pytest.raises(SigningFailedError):
        await key.sign_digest(ES256, ES256.digest(b"x"))  # P-384 key
    with pytest.raises(IdentityError, match="EC key"):
        await registry.signing_key(_cfg(kv, "rsa"), name=WHERE).describe()
    with pytest.raises(KeyNotFoundError) as err:
        await registry.signing_key(_cfg(kv, "absent"), name=WHERE).describe()
    assert "absent" in err.value.message
    assert len(kv.vault.requests_for("get", authorized=True)) == 3  # no retry of a 404


# ----- retries -----


async def test_429_with_retry_after_is_retried(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    await key.describe()
    kv.vault.inject(status=429, retry_after="1", ops=frozenset({"sign"}))
    started = time.monotonic()
    await key.sign_digest(ES384, ES384.digest(b"x"))
    assert time.monotonic() - started >= 0.9  # Retry-After honoured
    assert [r.status for r in kv.vault.requests_for("sign")] == [429, 200]


async def test_429_without_retry_after_is_retried(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    await key.describe()
    kv.vault.inject(status=429, count=2, ops=frozenset({"sign"}))  # the SDK alone would give up here
    await key.sign_digest(ES384, ES384.digest(b"x"))
    assert [r.status for r in kv.vault.requests_for("sign")] == [429, 429, 200]


async def test_persistent_429_gives_up_after_bounded_attempts(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    await key.describe()
    kv.vault.inject(status=429, retry_after="0", count=100, ops=frozenset({"sign"}))
    with pytest.raises(BackendUnavailableError) as err:
        await key.sign_digest(ES384, ES384.digest(b"x"))
    assert err.value.retryable
    assert "after 4 attempts" in err.value.message
    assert len(kv.vault.requests_for("sign")) == FAST.max_attempts
    _assert_no_secrets(kv, err.value)


async def test_retry_after_beyond_the_limit_fails_at_once(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    await key.describe()
    kv.vault.inject(status=429, retry_after="3600", ops=frozenset({"sign"}))
    with pytest.raises(BackendUnavailableError, match="retry after 3600s") as err:
        await key.sign_digest(ES384, ES384.digest(b"x"))
    assert len(kv.vault.requests_for("sign")) == 1
    assert err.value.retry_after == 3600  # the API's Retry-After: the agent knows when a retry may succeed


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retried(kv: RunningKeyVault, registry: AzureKeyVaultRegistry, status: int) -> None:
    kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    kv.vault.inject(status=status, code="ServiceUnavailable", ops=frozenset({"get"}))  # also on the GET
    await key.describe()
    kv.vault.inject(status=status, code="ServiceUnavailable", ops=frozenset({"sign"}))
    await key.sign_digest(ES384, ES384.digest(b"x"))
    assert [r.status for r in kv.vault.requests_for("sign")] == [status, 200]


async def test_timeout_is_retried(kv: RunningKeyVault, tmp_path: Path) -> None:
    settings = AzureKeyVaultSettings(
        max_attempts=3, total_timeout=10.0, attempt_timeout=0.3, backoff_initial=0.01, backoff_max=0.02
    )
    kv.vault.add_key("m0", "P-384")
    registry = AzureKeyVaultRegistry(settings=settings)
    try:
        key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
        await key.describe()
        kv.vault.inject(status=None, delay=1.0, ops=frozenset({"sign"}))
        await key.sign_digest(ES384, ES384.digest(b"x"))
        await asyncio.sleep(0.8)  # let the slow first answer finish server-side
        assert len(kv.vault.requests_for("sign")) == 2
    finally:
        await registry.aclose()


# ----- authentication -----


async def test_wrong_identity_header_gives_a_clear_error(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv.vault.add_key("m0", "P-384")
    monkeypatch.setenv("IDENTITY_HEADER", "wrong")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    with pytest.raises(BackendError) as err:
        await key.describe()
    message = err.value.diagnostics()
    assert "authentication failed" in message
    assert "'managed-identity'" in message
    assert kv.vault.tenant_id in message  # from the vault's challenge
    assert f"scope https://0.0.1:{kv.vault_url.rsplit(':', 1)[1]}/.default" in message
    assert "hint:" in message
    assert not err.value.retryable
    _assert_no_secrets(kv, err.value)


async def test_token_endpoint_error_gives_a_clear_error(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("m0", "P-384")
    kv.token_endpoint.fail_with = (
        400,
        {"error": "invalid_request", "error_description": "Identity not found"},
    )
    key = registry.signing_key(_cfg(kv, "m0", client_id="11111111-2222-3333-4444-555555555555"), name=WHERE)
    with pytest.raises(BackendError) as err:
        await key.describe()
    message = err.value.diagnostics()
    assert "no token could be obtained" in message
    assert "client_id 11111111-2222-3333-4444-555555555555" in message
    assert "Identity not found" in message
    assert kv.token_endpoint.requests[0]["client_id"] == "11111111-2222-3333-4444-555555555555"


async def test_token_rejected_by_the_vault_never_shows_the_token(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    kv.vault.add_key("m0", "P-384")
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    await key.describe()
    issued = dict(kv.token_endpoint.tokens)
    kv.token_endpoint.tokens.clear()  # the vault forgets every token: it now answers 401 to the one we hold
    with pytest.raises(BackendError) as err:
        await key.sign_digest(ES384, ES384.digest(b"x"))
    assert "the vault rejected the token" in err.value.message
    kv.token_endpoint.tokens.update(issued)
    _assert_no_secrets(kv, err.value)


async def test_permission_errors_are_actionable_and_secret_free(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    kv.vault.add_key("m0", "P-384", key_ops=["verify"])  # no sign permission on the key
    key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
    info = await key.describe()
    assert any("do not include 'sign'" in w for w in info.warnings)
    with pytest.raises(BackendError) as err:
        await key.sign_digest(ES384, ES384.digest(b"x"))
    assert "403" in err.value.message
    assert "Key Vault Crypto User" in err.value.diagnostics()
    _assert_no_secrets(kv, err.value)


async def test_default_azure_credential_uses_the_managed_identity_endpoint(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    kv.vault.add_key("m0", "P-256")
    key = registry.signing_key(_cfg(kv, "m0", credential="default"), name=WHERE)
    digest = ES256.digest(b"x")
    _verify((await key.describe()).public_key, ES256, digest, await key.sign_digest(ES256, digest))  # type: ignore[arg-type]


async def test_untrusted_vault_certificate(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("m0", "P-384")
    cfg = AzureKeyVaultKeyConfig(vault_url=kv.vault_url, key_name="m0", credential="managed-identity")
    with pytest.raises(BackendError) as err:
        await registry.signing_key(cfg, name=WHERE).describe()
    assert "ca_bundle" in err.value.diagnostics()
    assert not isinstance(err.value, BackendUnavailableError)


async def test_keys_share_credential_and_throttle(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.add_key("a", "P-384")
    kv.vault.add_key("b", "P-256")
    ka = registry.signing_key(_cfg(kv, "a"), name="identities.a.signing_key")
    kb = registry.signing_key(_cfg(kv, "b"), name="identities.b.signing_key")
    await ka.describe()
    await kb.describe()  # (concurrent first requests could each fetch a token: azure-identity does not coalesce)
    await ka.sign_digest(ES384, ES384.digest(b"x"))
    await kb.sign_digest(ES256, ES256.digest(b"x"))
    assert len(kv.token_endpoint.requests) == 1
    assert registry.throttle_for(kv.vault_url) is registry.throttle_for(kv.vault_url + "/")


# ----- throttle -----


async def _signer(key: SigningKey, tag: str, priority: Priority, done: list[str]) -> None:
    await key.sign_digest(ES384, ES384.digest(tag.encode()), priority=priority)
    done.append(tag)


async def test_concurrency_cap_is_respected(kv: RunningKeyVault) -> None:
    settings = AzureKeyVaultSettings(throttle=ThrottleSettings(max_concurrency=3, rate_per_second=1000, burst=100))
    registry = AzureKeyVaultRegistry(settings=settings)
    try:
        kv.vault.add_key("m0", "P-384")
        key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
        await key.describe()
        kv.vault.clear_log()
        kv.vault.latency = 0.03
        done: list[str] = []
        await asyncio.gather(*(_signer(key, f"n{i}", Priority.NORMAL, done) for i in range(24)))
        assert len(done) == 24
        assert kv.vault.max_in_flight == 3
        assert registry.throttle_for(kv.vault_url).max_in_flight_seen == 3
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    "throttle",
    [
        pytest.param(ThrottleSettings(max_concurrency=1, rate_per_second=1000, burst=100), id="concurrency-cap"),
        pytest.param(ThrottleSettings(max_concurrency=50, rate_per_second=25, burst=1), id="token-bucket"),
    ],
)
async def test_high_priority_goes_before_queued_normal(kv: RunningKeyVault, throttle: ThrottleSettings) -> None:
    registry = AzureKeyVaultRegistry(settings=AzureKeyVaultSettings(throttle=throttle))
    try:
        kv.vault.add_key("m0", "P-384")
        key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
        await key.describe()
        await asyncio.sleep(0.1)  # let the bucket refill after the describe
        kv.vault.latency = 0.02
        done: list[str] = []
        normal = [asyncio.create_task(_signer(key, f"n{i}", Priority.NORMAL, done)) for i in range(6)]
        await asyncio.sleep(0.005)  # the first NORMAL is in flight, the others queue
        assert registry.throttle_for(kv.vault_url).queued == 5
        high = [asyncio.create_task(_signer(key, f"h{i}", Priority.HIGH, done)) for i in range(2)]
        await asyncio.gather(*normal, *high)
        assert set(done[:3]) == {"n0", "h0", "h1"}, done
        assert done[3:] == ["n1", "n2", "n3", "n4", "n5"]
    finally:
        await registry.aclose()


async def test_429_slows_down_every_caller_of_the_vault(kv: RunningKeyVault) -> None:
    registry = AzureKeyVaultRegistry(
        settings=AzureKeyVaultSettings(throttle=ThrottleSettings(max_concurrency=8, rate_per_second=100, burst=10))
    )
    try:
        kv.vault.add_key("m0", "P-384")
        key = registry.signing_key(_cfg(kv, "m0"), name=WHERE)
        await key.describe()
        kv.vault.clear_log()
        kv.vault.inject(Fault(status=429, retry_after="1", ops=frozenset({"sign"})))
        first = asyncio.create_task(key.sign_digest(ES384, ES384.digest(b"a")))
        await asyncio.sleep(0.2)  # the 429 has been answered: the bucket is drained for ~1 s
        started = time.monotonic()
        await key.sign_digest(ES384, ES384.digest(b"b"))
        assert time.monotonic() - started >= 0.5
        await first
    finally:
        await registry.aclose()
