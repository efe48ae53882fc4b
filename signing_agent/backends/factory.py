"""Open keys by configuration. The one place that maps a backend name to its implementation.

Vendor SDKs are imported lazily, so an install without the ``pkcs11`` or ``azure`` extra still runs the other
backends, and a config that names a missing one gets a ``ConfigError`` that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, assert_never

from signing_agent.backends.base import DecryptionKey, SigningKey
from signing_agent.backends.file import FileDecryptionKey, FileSigningKey
from signing_agent.config import AzureKeyVaultKeyConfig, FileKeyConfig, KeyConfig, PKCS11KeyConfig
from signing_agent.errors import ConfigError

if TYPE_CHECKING:
    from signing_agent.backends.azure_keyvault import AzureKeyVaultRegistry
    from signing_agent.backends.pkcs11 import PKCS11Registry


class KeyStores:
    """Opens signing and decryption keys, and owns what they share (PKCS#11 logins, Key Vault credentials)."""

    def __init__(self) -> None:
        self._pkcs11: PKCS11Registry | None = None
        self._azure: AzureKeyVaultRegistry | None = None

    def _pkcs11_registry(self, name: str) -> PKCS11Registry:
        if self._pkcs11 is None:
            try:
                from signing_agent.backends.pkcs11 import PKCS11Registry
            except ImportError as exc:
                raise ConfigError(
                    f"{name}: the pkcs11 backend needs python-pkcs11",
                    hint="pip install 'signing-agent[pkcs11]'",
                ) from exc
            self._pkcs11 = PKCS11Registry()
        return self._pkcs11

    def _azure_registry(self, name: str) -> AzureKeyVaultRegistry:
        if self._azure is None:
            try:
                from signing_agent.backends.azure_keyvault import AzureKeyVaultRegistry
            except ImportError as exc:
                raise ConfigError(
                    f"{name}: the azure-keyvault backend needs the Azure SDK",
                    hint="pip install 'signing-agent[azure]'",
                ) from exc
            self._azure = AzureKeyVaultRegistry()
        return self._azure

    def signing_key(self, cfg: KeyConfig, *, name: str) -> SigningKey:
        """Open a signing key; ``name`` is its dotted config path, for messages."""
        match cfg:
            case FileKeyConfig():
                return FileSigningKey(cfg.path, name=name)
            case PKCS11KeyConfig():
                return self._pkcs11_registry(name).signing_key(cfg, name=name)
            case AzureKeyVaultKeyConfig():
                return self._azure_registry(name).signing_key(cfg, name=name)
            case _:  # pragma: no cover -- exhaustive
                assert_never(cfg)

    def decryption_key(self, cfg: KeyConfig, *, name: str) -> DecryptionKey:
        match cfg:
            case FileKeyConfig():
                return FileDecryptionKey(cfg.path, name=name)
            case PKCS11KeyConfig():
                return self._pkcs11_registry(name).decryption_key(cfg, name=name)
            case AzureKeyVaultKeyConfig():
                return self._azure_registry(name).decryption_key(cfg, name=name)
            case _:  # pragma: no cover -- exhaustive
                assert_never(cfg)

    async def aclose(self) -> None:
        if self._pkcs11 is not None:
            await self._pkcs11.aclose()
            self._pkcs11 = None
        if self._azure is not None:
            await self._azure.aclose()
            self._azure = None
