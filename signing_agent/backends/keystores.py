"""Open keys by configuration. The one place that maps a backend name to its implementation.

Vendor SDKs are imported lazily, so an install without the ``pkcs11`` or ``azure`` extra still runs the other
backends, and a config that names a missing one gets a ``ConfigError`` that says what to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar, assert_never

from signing_agent.algorithms import SignatureAlgorithm
from signing_agent.backends._secrets import take_secret_env
from signing_agent.backends.base import DecryptionKey, KeyInfo, Priority, SigningKey
from signing_agent.backends.file import FileDecryptionKey, FileSigningKey
from signing_agent.config import (
    AgentConfig,
    AzureKeyVaultKeyConfig,
    BackendKind,
    FileKeyConfig,
    KeyConfig,
    KeyVaultConfig,
    PKCS11KeyConfig,
)
from signing_agent.errors import ConfigError
from signing_agent.waits import waiting_for
from signing_agent.workers.pool import CryptoPool

if TYPE_CHECKING:
    from signing_agent.backends.azure_keyvault import AzureKeyVaultRegistry
    from signing_agent.backends.pkcs11 import PKCS11Registry


SignObserver = Callable[[str, float, bool], None]
"""``(backend, seconds, ok)`` after every signature a key store made (metrics)."""


def secret_env_names(config: AgentConfig) -> set[str]:
    """The environment variables the configuration reads secrets from: every ``pin_env`` and ``client_secret_env``."""
    names: set[str] = set()
    for ident in config.identities.values():
        for key in (ident.signing_key, ident.encryption_key):
            if isinstance(key, PKCS11KeyConfig) and key.pin_env:
                names.add(key.pin_env)
            elif isinstance(key, AzureKeyVaultKeyConfig) and key.client_secret_env:
                names.add(key.client_secret_env)
    return names


def take_configured_secrets(config: AgentConfig) -> None:
    """Take every secret variable the configuration names out of the environment before any key store opens.

    All at once, not key by key: an identity whose credential spawns a process (the Azure CLI) may open before the
    identity whose PIN or client secret is in the environment.
    """
    take_secret_env(sorted(secret_env_names(config)))


_Key = TypeVar("_Key", SigningKey, DecryptionKey)


class _WaitedKey(Generic[_Key]):
    """A key whose every operation is a marked wait (``signing_agent.waits``): a request's deadline names the key
    store and the key's config path (never a PIN, a secret or a credential). Everything else is delegated."""

    def __init__(self, key: _Key, backend: BackendKind, name: str) -> None:
        self.inner: _Key = key
        self.backend = backend
        self._waiting = f"the key store ({backend}, {name})" if name else f"the key store ({backend})"

    def __repr__(self) -> str:
        return repr(self.inner)

    async def describe(self) -> KeyInfo:
        with waiting_for(self._waiting):
            return await self.inner.describe()

    async def aclose(self) -> None:
        await self.inner.aclose()


class ObservedSigningKey(_WaitedKey[SigningKey]):
    """A signing key whose signatures are marked waits and, with an observer, report their latency and outcome."""

    def __init__(self, key: SigningKey, backend: BackendKind, observer: SignObserver | None, *, name: str = "") -> None:
        super().__init__(key, backend, name)
        self._observer = observer

    async def sign_digest(
        self, alg: SignatureAlgorithm, digest: bytes, *, priority: Priority = Priority.NORMAL
    ) -> bytes:
        started = time.monotonic()
        ok = False
        try:
            with waiting_for(self._waiting):
                signature = await self.inner.sign_digest(alg, digest, priority=priority)
            ok = True
        finally:
            if self._observer is not None:
                self._observer(self.backend, time.monotonic() - started, ok)
        return signature


class ObservedDecryptionKey(_WaitedKey[DecryptionKey]):
    """A decryption key whose every operation is a marked wait."""

    def __init__(self, key: DecryptionKey, backend: BackendKind, *, name: str) -> None:
        super().__init__(key, backend, name)

    async def decrypt_oaep_sha256(self, ciphertext: bytes, *, priority: Priority = Priority.HIGH) -> bytes:
        with waiting_for(self._waiting):
            return await self.inner.decrypt_oaep_sha256(ciphertext, priority=priority)


class KeyStores:
    """Opens signing and decryption keys, and owns what they share (PKCS#11 logins, Key Vault credentials).

    ``on_sign`` observes every signature and ``on_throttle_wait(host, seconds)`` every wait in a Key Vault throttle:
    hooks for metrics that keep this package free of them.
    """

    def __init__(
        self,
        *,
        keyvault: KeyVaultConfig | None = None,
        on_sign: SignObserver | None = None,
        on_throttle_wait: Callable[[str, float], None] | None = None,
        crypto: CryptoPool | None = None,
    ) -> None:
        """``keyvault`` is the config's ``[keyvault]`` table (default: its defaults); file keys sign in ``crypto``'s
        workers when there is one."""
        self._crypto = crypto
        self._keyvault = keyvault if keyvault is not None else KeyVaultConfig()
        self._pkcs11: PKCS11Registry | None = None
        self._azure: AzureKeyVaultRegistry | None = None
        self._on_sign = on_sign
        self._on_throttle_wait = on_throttle_wait

    @property
    def pkcs11(self) -> PKCS11Registry | None:
        """The PKCS#11 registry, once a pkcs11 key was opened (its ``status()`` feeds health checks)."""
        return self._pkcs11

    async def reset(self) -> None:
        """Drop PKCS#11 sessions (the next operation logs in again) and forget refused PINs: for SIGHUP."""
        if self._pkcs11 is not None:
            await self._pkcs11.reset()

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
                from signing_agent.backends.azure_keyvault import (
                    AzureKeyVaultRegistry,
                    AzureKeyVaultSettings,
                    ThrottleSettings,
                )
            except ImportError as exc:
                raise ConfigError(
                    f"{name}: the azure-keyvault backend needs the Azure SDK",
                    hint="pip install 'signing-agent[azure]'",
                ) from exc
            kv = self._keyvault
            settings = AzureKeyVaultSettings(
                max_attempts=kv.max_attempts,
                total_timeout=kv.total_timeout,
                throttle=ThrottleSettings(
                    max_concurrency=kv.max_concurrency, rate_per_second=kv.rate_per_second, burst=kv.burst
                ),
            )
            self._azure = AzureKeyVaultRegistry(settings=settings, on_throttle_wait=self._on_throttle_wait)
        return self._azure

    def signing_key(self, cfg: KeyConfig, *, name: str) -> SigningKey:
        """Open a signing key; ``name`` is its dotted config path, for messages."""
        return ObservedSigningKey(self._signing_key(cfg, name=name), cfg.backend, self._on_sign, name=name)

    def _signing_key(self, cfg: KeyConfig, *, name: str) -> SigningKey:
        match cfg:
            case FileKeyConfig():
                return FileSigningKey(cfg.path, name=name, pool=self._crypto)
            case PKCS11KeyConfig():
                return self._pkcs11_registry(name).signing_key(cfg, name=name)
            case AzureKeyVaultKeyConfig():
                return self._azure_registry(name).signing_key(cfg, name=name)
            case _:  # pragma: no cover -- exhaustive
                assert_never(cfg)

    def decryption_key(self, cfg: KeyConfig, *, name: str) -> DecryptionKey:
        """Open a decryption key; ``name`` is its dotted config path, for messages."""
        return ObservedDecryptionKey(self._decryption_key(cfg, name=name), cfg.backend, name=name)

    def _decryption_key(self, cfg: KeyConfig, *, name: str) -> DecryptionKey:
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
