"""Key creation in Azure Key Vault (``azure_keyvault.create_key`` and ``azure_keyvault_admin.generate_member``) with
the real Azure SDK and ManagedIdentityCredential against the HTTPS Key Vault double: what is sent, what is checked in
the answer, and what the user is told when a step fails after a key was made."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.backends.azure_keyvault import AzureKeyVaultRegistry, AzureKeyVaultSettings, NewKey, create_key
from signing_agent.backends.azure_keyvault_admin import generate_member
from signing_agent.backends.member_cert import member_id
from signing_agent.config import AzureKeyVaultKeyConfig
from signing_agent.errors import BackendError, BackendUnavailableError, ConfigError, IdentityError
from tests.doubles.keyvault import RunningKeyVault

FAST = AzureKeyVaultSettings(max_attempts=4, total_timeout=10.0, attempt_timeout=2.0, backoff_initial=0.05)
WHERE = "identities.m0.signing_key"


@pytest.fixture
async def registry(kv: RunningKeyVault) -> AsyncIterator[AzureKeyVaultRegistry]:
    reg = AzureKeyVaultRegistry(settings=FAST)
    yield reg
    await reg.aclose()


def _cfg(kv: RunningKeyVault, key_name: str) -> AzureKeyVaultKeyConfig:
    return AzureKeyVaultKeyConfig(
        vault_url=kv.vault_url, key_name=key_name, credential="managed-identity", ca_bundle=kv.ca_bundle
    )


async def test_generate_member_makes_keys_and_a_certificate_signed_in_the_vault(kv: RunningKeyVault) -> None:
    made = await generate_member(
        _cfg(kv, "m0"), name="m0", curve="P-521", common_name="member zero", hsm=True,
        encryption=_cfg(kv, "m0-enc"), rsa_bits=2048, settings=FAST,
    )  # fmt: skip
    vault_key = kv.vault.latest("m0")
    assert made.signing.config.key_version == vault_key.version
    assert made.signing.kid == kv.vault.kid(vault_key)
    assert made.signing.key_type == "EC-HSM"
    cert = made.certificate
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == vault_key.private_key.public_key()
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert len(member_id(cert)) == 64
    enc = made.encryption
    assert enc is not None
    assert isinstance(enc.public_key, rsa.RSAPublicKey)
    assert enc.public_key.key_size == 2048
    assert enc.config.key_version == kv.vault.latest("m0-enc").version
    assert [(c["name"], c["kty"]) for c in kv.vault.created] == [("m0", "EC-HSM"), ("m0-enc", "RSA-HSM")]
    assert kv.vault.operations["sign"] == 1
    assert kv.vault.operations["decrypt"] == 1  # the test message


async def test_a_vault_that_makes_a_software_key_for_an_hsm_one_is_caught(
    kv: RunningKeyVault, registry: AzureKeyVaultRegistry
) -> None:
    kv.vault.downgrade_hsm = True
    with pytest.raises(IdentityError, match=r"the vault made key .*/keys/m0/\w+ with key type EC, not EC-HSM") as info:
        await create_key(registry, _cfg(kv, "m0"), NewKey(purpose="sign"), where=WHERE)
    assert info.value.hint == "do not use it; delete it in the vault"


async def test_a_create_is_tried_once(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.inject(status=503, count=5, ops=frozenset({"create"}))
    with pytest.raises(BackendUnavailableError, match="after 1 attempts") as info:
        await create_key(registry, _cfg(kv, "m0"), NewKey(purpose="sign"), where=WHERE)
    assert len(kv.vault.requests_for("create")) == 1
    assert "the vault may have made the key anyway" in (info.value.hint or "")


async def test_a_refused_create_says_which_permission(kv: RunningKeyVault, registry: AzureKeyVaultRegistry) -> None:
    kv.vault.inject(status=403, ops=frozenset({"create"}), code="Forbidden")
    with pytest.raises(BackendError, match=r"refused to create key 'm0' \(EC-HSM P-384\): HTTP 403") as info:
        await create_key(registry, _cfg(kv, "m0"), NewKey(purpose="sign"), where=WHERE)
    assert "keys/create" in (info.value.hint or "")
    assert "Key Vault Crypto Officer" in (info.value.hint or "")


async def test_a_taken_encryption_key_name_stops_before_anything_is_made(kv: RunningKeyVault) -> None:
    kv.vault.add_key("m0-enc", "RSA-2048")
    with pytest.raises(ConfigError, match=r"identities\.m0\.encryption_key: .* already has a key named 'm0-enc'"):
        await generate_member(_cfg(kv, "m0"), name="m0", curve="P-384", common_name="m0", hsm=True,
                              encryption=_cfg(kv, "m0-enc"), settings=FAST)  # fmt: skip
    assert kv.vault.created == []


async def test_a_certificate_the_vault_will_not_sign_names_the_key_it_made(kv: RunningKeyVault) -> None:
    kv.vault.inject(status=403, ops=frozenset({"sign"}), code="Forbidden")
    with pytest.raises(BackendError, match=r"created https://.*/keys/m0/\w+, but the vault did not sign") as info:
        await generate_member(_cfg(kv, "m0"), name="m0", curve="P-384", common_name="m0", hsm=True, settings=FAST)
    assert "delete that key in the vault" in (info.value.hint or "")
    assert [c["name"] for c in kv.vault.created] == ["m0"]


@pytest.mark.parametrize(
    ("vault_url", "key_name", "hsm", "expected"),
    [
        ("https://hsm1.managedhsm.azure.net", "m0", False, "a Managed HSM makes HSM keys only"),
        ("https://v1.vault.azure.net", "m_0", True, "is not a Key Vault key name"),
        ("https://v1.vault.azure.net", "x" * 128, True, "is not a Key Vault key name"),
    ],
)
async def test_refused_before_any_request(
    registry: AzureKeyVaultRegistry, vault_url: str, key_name: str, hsm: bool, expected: str
) -> None:
    cfg = AzureKeyVaultKeyConfig(vault_url=vault_url, key_name=key_name)
    with pytest.raises(ConfigError, match=expected):
        await create_key(registry, cfg, NewKey(purpose="sign", hsm=hsm), where=WHERE)
