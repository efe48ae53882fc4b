"""Each configured credential kind builds the azure-identity credential it names (nothing is sent here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from azure.identity.aio import (
    AzureCliCredential,
    CertificateCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from cryptography.hazmat.primitives import serialization

from signing_agent.backends import _secrets
from signing_agent.backends.azure_keyvault import _make_credential
from signing_agent.config import AzureKeyVaultKeyConfig
from signing_agent.errors import ConfigError
from tests.support.pki import make_rsa_key, pem_private, self_signed_cert

TENANT = "00000000-0000-0000-0000-000000000001"
CLIENT = "00000000-0000-0000-0000-000000000002"
WHERE = "identities.m0.signing_key"


def cfg(**kw: object) -> AzureKeyVaultKeyConfig:
    return AzureKeyVaultKeyConfig(vault_url="https://v.vault.azure.net", key_name="m0", **kw)  # type: ignore[arg-type]


async def built(config: AzureKeyVaultKeyConfig) -> object:
    credential = _make_credential(config, WHERE)
    await credential.close()
    return credential


@pytest.mark.parametrize(
    ("kind", "extra", "expected"),
    [
        ("default", {}, DefaultAzureCredential),
        ("default", {"client_id": CLIENT}, DefaultAzureCredential),
        ("managed-identity", {}, ManagedIdentityCredential),
        ("managed-identity", {"client_id": CLIENT}, ManagedIdentityCredential),
        ("azure-cli", {"tenant_id": TENANT}, AzureCliCredential),
    ],
)
async def test_simple_kinds(kind: str, extra: dict[str, object], expected: type) -> None:
    assert isinstance(await built(cfg(credential=kind, **extra)), expected)


async def test_workload_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("federated-token")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token))
    credential = await built(cfg(credential="workload-identity", client_id=CLIENT, tenant_id=TENANT))
    assert isinstance(credential, WorkloadIdentityCredential)


async def test_workload_identity_unconfigured_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="workload identity is not configured"):
        _make_credential(cfg(credential="workload-identity"), WHERE)


async def test_client_secret_comes_from_the_named_variable_and_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_secrets, "_TAKEN", {})
    monkeypatch.setenv("KV_SECRET", "very-secret-value")
    credential = await built(cfg(credential="client-secret", tenant_id=TENANT, client_id=CLIENT,
                                 client_secret_env="KV_SECRET"))  # fmt: skip
    assert isinstance(credential, ClientSecretCredential)
    # Read once, the secret has left the environment (no child process inherits it) and a reload still finds it.
    assert "KV_SECRET" not in os.environ
    again = await built(cfg(credential="client-secret", tenant_id=TENANT, client_id=CLIENT,
                            client_secret_env="KV_SECRET"))  # fmt: skip
    assert isinstance(again, ClientSecretCredential)
    with pytest.raises(ConfigError, match="KV_SECRET_UNSET is not set") as info:
        _make_credential(cfg(credential="client-secret", tenant_id=TENANT, client_id=CLIENT,
                             client_secret_env="KV_SECRET_UNSET"), WHERE)  # fmt: skip
    assert "very-secret-value" not in info.value.diagnostics()
    with pytest.raises(ConfigError, match="needs tenant_id, client_id and client_secret_env"):
        _make_credential(cfg(credential="client-secret"), WHERE)


async def test_client_certificate(tmp_path: Path) -> None:
    key = make_rsa_key()  # Entra ID signs client assertions with RS256
    pem = tmp_path / "sp.pem"
    pem.write_bytes(pem_private(key) + self_signed_cert(key, "sp").public_bytes(serialization.Encoding.PEM))
    pem.chmod(0o600)
    credential = await built(cfg(credential="client-certificate", tenant_id=TENANT, client_id=CLIENT,
                                 client_certificate=pem))  # fmt: skip
    assert isinstance(credential, CertificateCredential)
    with pytest.raises(ConfigError, match=r"missing\.pem: No such file"):
        _make_credential(cfg(credential="client-certificate", tenant_id=TENANT, client_id=CLIENT,
                             client_certificate=tmp_path / "missing.pem"), WHERE)  # fmt: skip
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="cannot load"):
        _make_credential(cfg(credential="client-certificate", tenant_id=TENANT, client_id=CLIENT,
                             client_certificate=garbage), WHERE)  # fmt: skip
