"""Keys in Azure Key Vault or Managed HSM: ECDSA signing over a digest and RSA-OAEP-256 decryption, remotely.

Owns: everything that touches the Azure SDK (``azure-keyvault-keys``' async
``KeyClient``/``CryptographyClient`` and ``azure-identity``'s async credentials). Vendor imports stay in this
module and vendor exceptions never leave it: they are wrapped into ``signing_agent.errors``. It must not
import COSE, CCF or the API layers.

Design notes (why it is built this way):

- **One vault request per signature.** ``describe()`` GETs the key once (the pinned version if configured) and
  builds the ``CryptographyClient`` from the returned ``KeyVaultKey``. Built from a key-id string instead, the
  SDK would GET the key before the first operation, and before *every* operation while that GET fails. The
  client is bound to the key's versioned id, so an unpinned key keeps using the version resolved at start-up:
  the public key we cached (and that the identity layer compared with the certificate) is the one that signs
  until the agent restarts. The answer must name the configured vault host, key and (pinned) version
  (``_check_kid``): the client sends every later request, and its bearer token, to the answer's key id.
- **Our retry loop, not the SDK's.** The SDK's ``AsyncRetryPolicy`` retries POST only for 500/503/504, retries
  a 429 only when ``Retry-After`` is present, and retries a failing GET with 0.8 s, 1.6 s, ... backoff up to
  10 times. That makes throttling behaviour depend on a header. We set ``retry_total=0`` on every client and
  run one loop on the agent's ``RetryPolicy`` (``signing_agent.retry``): 429, 408, 5xx, connection errors and
  timeouts are retried, ``Retry-After`` (also ``retry-after-ms`` and ``x-ms-retry-after-ms``) is honoured,
  otherwise jittered exponential backoff; attempts and total time are bounded. Sign and decrypt are safe to
  repeat: neither changes vault state. The SDK's exceptions are mapped to the agent's in one place
  (``_AzureKey._vault_errors``, in the style of httpx's ``map_httpcore_exceptions``).
- **Throttle per vault host.** Every attempt first takes a slot from a ``PriorityThrottle`` shared by all keys
  on the host (concurrency cap + token bucket). A 429 also drains that bucket, so the other requests to the
  same vault back off too. ``Priority.HIGH`` (recovery shares, acks) is served before ``Priority.NORMAL``.
- **TLS.** ``ca_bundle`` is *extra* trust: we build one ``SSLContext`` with the system roots plus the bundle
  and give the SDK an aiohttp session that uses it. (``connection_verify=<file>`` would replace the system
  roots, and azure-core rebuilds an ``SSLContext`` from the file on every request: a blocking file read per
  signature.)
- **Secrets.** No token ever appears in a log line or an error: authentication errors are rebuilt from what we
  know (credential kind, tenant, scope) plus the vendor's message with anything token-like redacted, and are
  raised ``from None`` because the vendor exception's response object can carry the request's
  ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, assert_never
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.algorithms import SignatureAlgorithm, verify_digest
from signing_agent.backends._secrets import read_secret_file, secret_env
from signing_agent.backends.base import KeyInfo, Priority
from signing_agent.backends.ratelimit import PriorityThrottle, ThrottleSettings
from signing_agent.config import AzureKeyVaultKeyConfig, KeyVaultConfig, read_trusted_pem
from signing_agent.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    IdentityError,
    InvalidRequestError,
    KeyNotFoundError,
    SigningFailedError,
)
from signing_agent.retry import Backoff, GiveUp, RetryPolicy, retry_after_seconds

try:
    import aiohttp
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.core.pipeline.transport import AioHttpTransport
    from azure.identity.aio import (
        AzureCliCredential,
        CertificateCredential,
        ClientSecretCredential,
        DefaultAzureCredential,
        ManagedIdentityCredential,
        WorkloadIdentityCredential,
    )
    from azure.keyvault.keys import KeyVaultKey, KeyVaultKeyIdentifier
    from azure.keyvault.keys.aio import KeyClient
    from azure.keyvault.keys.crypto import EncryptionAlgorithm
    from azure.keyvault.keys.crypto import SignatureAlgorithm as AzureSignatureAlgorithm
    from azure.keyvault.keys.crypto.aio import CryptographyClient
except ImportError as _exc:  # pragma: no cover -- exercised only without the [azure] extra
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "AzureKeyVaultDecryptionKey",
    "AzureKeyVaultRegistry",
    "AzureKeyVaultSettings",
    "AzureKeyVaultSigningKey",
    "CreatedKey",
    "NewKey",
    "ThrottleSettings",
    "check_new_key",
    "create_key",
    "is_managed_hsm",
]

_logger = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TOKENISH = (
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"),  # JWTs
    re.compile(r"(?i)(bearer\s+)[^\s,\"']+"),
    re.compile(r"(?i)(\"?(?:access_token|refresh_token|client_secret|authorization)\"?\s*[:=]\s*\"?)[^\s,\"'}]+"),
)
_SYSTEM_RANDOM = secrets.SystemRandom()
_KEYVAULT_DEFAULTS = KeyVaultConfig()


@dataclass(frozen=True, slots=True, kw_only=True)
class AzureKeyVaultSettings:
    """Retry, timeout and throttle settings shared by every key of one registry (tests inject short ones). The
    defaults of ``max_attempts`` and ``total_timeout`` are ``[keyvault]``'s (``KeyVaultConfig``)."""

    max_attempts: int = _KEYVAULT_DEFAULTS.max_attempts
    """Attempts per operation, the first included."""
    total_timeout: float = _KEYVAULT_DEFAULTS.total_timeout
    """Upper bound for one operation: queueing in the throttle, all attempts and all waits between them."""
    attempt_timeout: float = 10.0
    """Upper bound for one HTTP attempt (connect + answer)."""
    connect_timeout: float = 5.0
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    max_retry_after: float = 30.0
    """A ``Retry-After`` longer than this fails the operation at once instead of waiting."""
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("total_timeout", "attempt_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def retry_policy(self) -> RetryPolicy:
        """These settings as the agent's one ``RetryPolicy``."""
        return RetryPolicy(
            max_attempts=self.max_attempts,
            total_timeout=self.total_timeout,
            backoff=Backoff(self.backoff_initial, self.backoff_max),
            max_retry_after=self.max_retry_after,
        )


def _redact(text: str, limit: int = 400) -> str:
    """Strip anything that looks like a token or secret from a vendor message and bound its length."""
    for pattern in _TOKENISH:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected_scope(vault_url: str) -> str:
    """The token scope Key Vault asks for: the vault host without its first label (``vault.azure.net``)."""
    netloc = urlsplit(vault_url).netloc
    _, _, parent = netloc.partition(".")
    return f"https://{parent or netloc}/.default"


def _challenge_info(vault_url: str) -> tuple[str | None, str | None]:
    """(tenant, scope) from the SDK's challenge cache, if the vault already answered a challenge.

    The cache is a private SDK module, so failure to read it is not an error: we fall back to what we can
    derive.
    """
    try:
        from azure.keyvault.keys._shared import http_challenge_cache

        challenge = http_challenge_cache.get_challenge_for_url(vault_url)
    except Exception:  # noqa: BLE001 -- best effort diagnostics from a private module
        return None, None
    if challenge is None:
        return None, None
    scope = challenge.get_scope() or (challenge.get_resource() + "/.default" if challenge.get_resource() else None)
    return challenge.tenant_id, scope


def _jwk_text(jwk: object, name: str) -> str:
    value = getattr(jwk, name, None)
    value = getattr(value, "value", value)  # the SDK hands out str-valued enums (KeyType, KeyCurveName)
    return str(value) if value is not None else ""


def _jwk_bytes(jwk: object, name: str) -> bytes | None:
    value = getattr(jwk, name, None)  # JsonWebKey sets its fields dynamically: no static attributes to type-check
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def _jwk_public_key(key: KeyVaultKey) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    jwk = key.key
    kty = _jwk_text(jwk, "kty")
    if kty.startswith("EC"):
        curves: dict[str, ec.EllipticCurve] = {
            "P-256": ec.SECP256R1(),
            "P-384": ec.SECP384R1(),
            "P-521": ec.SECP521R1(),
        }
        crv = _jwk_text(jwk, "crv")
        x, y = _jwk_bytes(jwk, "x"), _jwk_bytes(jwk, "y")
        if crv not in curves or x is None or y is None:
            raise IdentityError(
                f"Key Vault key {key.id} is an EC key on curve {crv or '?'}: CCF governance needs P-256, P-384 or P-521"
            )
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curves[crv]
        ).public_key()
    n, e = _jwk_bytes(jwk, "n"), _jwk_bytes(jwk, "e")
    if kty.startswith("RSA") and n is not None and e is not None:
        return rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
    raise IdentityError(f"Key Vault key {key.id} has key type {kty or '?'}: expected EC or RSA")


def _public_key_from_jwk(key: KeyVaultKey) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of a vault's answer, or an ``IdentityError`` naming the key: a point off its curve or an RSA
    modulus ``cryptography`` refuses is the vault's (or whoever answered for it) mistake, not a crash."""
    try:
        return _jwk_public_key(key)
    except ValueError as exc:
        raise IdentityError(f"Key Vault key {key.id}: the vault's public key is not valid: {exc}") from None


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or 443


def _check_kid(key: KeyVaultKey, cfg: AzureKeyVaultKeyConfig, where: str) -> None:
    """The vault's answer names the key the configuration asked for: on ``vault_url``'s host, under ``key_name``, with
    a version (the pinned one if ``key_version`` is set).

    The ``CryptographyClient`` is built from the answer and sends every later signature, decryption and bearer token
    to the answer's key id: an answer naming another host (or another version, or none) would take them elsewhere
    than the configured vault and version for as long as the agent runs.
    """
    kid = str(key.id or "")
    try:
        named = KeyVaultKeyIdentifier(kid)
        vault, name, version = named.vault_url, named.name, named.version or ""
    except (ValueError, TypeError):
        vault, name, version = "", "", ""
    problems = []
    if _origin(vault) != _origin(cfg.vault_url):
        problems.append(f"not on {cfg.vault_url}")
    if name.lower() != cfg.key_name.lower():
        problems.append(f"not key {cfg.key_name!r}")
    if not version:
        problems.append("no version")
    elif cfg.key_version and version.lower() != cfg.key_version.lower():
        problems.append(f"not the pinned version {cfg.key_version}")
    if problems:
        raise IdentityError(
            f"{where}: Key Vault {cfg.vault_url} answered for key {cfg.key_name!r} with key id {kid or '(none)'}: "
            + ", ".join(problems),
            hint="the agent signs only with the configured vault, key and version: check vault_url, key_name and "
            "key_version, and whatever answers for the vault (a private endpoint, a proxy)",
        )


@dataclass(frozen=True, slots=True)
class _CredentialKey:
    kind: str
    client_id: str | None
    tenant_id: str | None
    client_secret_env: str | None
    client_certificate: Path | None


_CHECKS: dict[str, str] = {
    "default": (
        "which credential of DefaultAzureCredential's chain applies on this host (AZURE_* environment "
        "variables, workload identity, managed identity, 'az login'); set the log level to debug to see "
        "each attempt"
    ),
    "managed-identity": (
        "that a managed identity is assigned to this host (for a user-assigned identity, that client_id is "
        "its client id) and that its token endpoint answers (IMDS, or IDENTITY_ENDPOINT/IDENTITY_HEADER)"
    ),
    "workload-identity": (
        "AZURE_FEDERATED_TOKEN_FILE (exists, fresh), AZURE_CLIENT_ID and AZURE_TENANT_ID, and the federated "
        "credential's subject on the app registration"
    ),
    "client-secret": "that the secret in client_secret_env's variable is current and belongs to client_id",
    "client-certificate": (
        "that client_certificate holds the private key and a certificate registered on the app (client_id)"
    ),
    "azure-cli": "that 'az login' was run as the agent's user and 'az account show' names the right tenant",
}


class _Vault:
    """Per vault host: the throttle that every key on that host shares."""

    def __init__(
        self, host: str, settings: ThrottleSettings, on_wait: Callable[[str, float], None] | None = None
    ) -> None:
        self.host = host
        report = None if on_wait is None else (lambda seconds: on_wait(host, seconds))
        self.throttle = PriorityThrottle(settings, on_wait=report)


class AzureKeyVaultRegistry:
    """Makes Key Vault keys and shares what they should share: one credential per distinct credential config,
    one throttle per vault host, one TLS context per CA bundle. Close it with ``aclose()`` after the keys' own
    ``aclose()`` (calling it first also closes every key it made)."""

    def __init__(
        self,
        *,
        settings: AzureKeyVaultSettings | None = None,
        on_throttle_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        """``on_throttle_wait(host, seconds)`` is told how long an operation queued in a vault's throttle."""
        self._on_throttle_wait = on_throttle_wait
        if _IMPORT_ERROR is not None:  # pragma: no cover -- exercised only without the [azure] extra
            raise ConfigError(
                f"the azure-keyvault backend needs the Azure SDK (missing: {_IMPORT_ERROR.name or 'azure'})",
                hint="pip install 'signing-agent[azure]'",
            )
        self.settings = settings or AzureKeyVaultSettings()
        self._vaults: dict[str, _Vault] = {}
        self._credentials: dict[_CredentialKey, AsyncTokenCredential] = {}
        self._credential_lock = asyncio.Lock()
        self._ssl_contexts: dict[Path | None, ssl.SSLContext] = {}
        self._keys: list[_AzureKey] = []
        self._closed = False

    def signing_key(self, cfg: AzureKeyVaultKeyConfig, *, name: str) -> AzureKeyVaultSigningKey:
        """A signing key (EC) for identity ``name``. No I/O until ``describe()`` or the first signature."""
        key = AzureKeyVaultSigningKey(self, cfg, name=name)
        self._keys.append(key)
        return key

    def decryption_key(self, cfg: AzureKeyVaultKeyConfig, *, name: str) -> AzureKeyVaultDecryptionKey:
        """A recovery-share decryption key (RSA) for identity ``name``."""
        key = AzureKeyVaultDecryptionKey(self, cfg, name=name)
        self._keys.append(key)
        return key

    def throttle_for(self, vault_url: str) -> PriorityThrottle:
        """The throttle shared by every key on ``vault_url``'s host."""
        return self._vault(vault_url).throttle

    def _vault(self, vault_url: str) -> _Vault:
        host = urlsplit(vault_url).netloc.lower()
        vault = self._vaults.get(host)
        if vault is None:
            vault = self._vaults[host] = _Vault(host, self.settings.throttle, self._on_throttle_wait)
        return vault

    async def _ssl_context(self, ca_bundle: Path | None, where: str) -> ssl.SSLContext:
        ctx = self._ssl_contexts.get(ca_bundle)
        if ctx is None:
            ctx = await asyncio.to_thread(_make_ssl_context, ca_bundle, where)
            self._ssl_contexts[ca_bundle] = ctx
        return ctx

    async def _credential(self, cfg: AzureKeyVaultKeyConfig, where: str) -> AsyncTokenCredential:
        ck = _CredentialKey(cfg.credential, cfg.client_id, cfg.tenant_id, cfg.client_secret_env, cfg.client_certificate)
        async with self._credential_lock:
            cred = self._credentials.get(ck)
            if cred is None:
                # Constructors may read files (a certificate, a token cache): keep them off the event loop.
                cred = await asyncio.to_thread(_make_credential, cfg, where)
                self._credentials[ck] = cred
            return cred

    async def aclose(self) -> None:
        """Close every key, credential and throttle. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for key in self._keys:
            await key.aclose()
        for cred in self._credentials.values():
            try:
                await cred.close()
            except Exception:  # closing must not fail the shutdown (logged with its traceback)
                _logger.warning("closing an Azure credential failed", exc_info=True)
        self._credentials.clear()
        for vault in self._vaults.values():
            vault.throttle.close()


def _make_ssl_context(ca_bundle: Path | None, where: str) -> ssl.SSLContext:
    """The system roots, plus ``ca_bundle``: a file that must be the agent's own (``config.read_trusted_pem``), as
    whoever may write it decides which endpoints pass for the vault, and get its access tokens."""
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        pem = read_trusted_pem(ca_bundle, f"{where}.ca_bundle", "which servers pass for the vault (and get its tokens)")
        try:
            ctx.load_verify_locations(cadata=pem)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}.ca_bundle: cannot load {ca_bundle}: {exc}") from exc
    return ctx


def _make_credential(cfg: AzureKeyVaultKeyConfig, where: str) -> AsyncTokenCredential:
    match cfg.credential:
        case "default":
            kwargs: dict[str, Any] = {}
            if cfg.client_id:
                kwargs["managed_identity_client_id"] = cfg.client_id
                kwargs["workload_identity_client_id"] = cfg.client_id
            if cfg.tenant_id:
                kwargs["workload_identity_tenant_id"] = cfg.tenant_id
            return DefaultAzureCredential(**kwargs)
        case "managed-identity":
            return ManagedIdentityCredential(client_id=cfg.client_id) if cfg.client_id else ManagedIdentityCredential()
        case "workload-identity":
            wkwargs: dict[str, Any] = {}
            if cfg.client_id:
                wkwargs["client_id"] = cfg.client_id
            if cfg.tenant_id:
                wkwargs["tenant_id"] = cfg.tenant_id
            try:
                return WorkloadIdentityCredential(**wkwargs)
            except ValueError as exc:
                raise ConfigError(f"{where}.credential: workload identity is not configured: {exc}") from exc
        case "client-secret":
            if not (cfg.tenant_id and cfg.client_id and cfg.client_secret_env):
                raise ConfigError(
                    f"{where}: credential 'client-secret' needs tenant_id, client_id and client_secret_env"
                )
            secret = secret_env(cfg.client_secret_env)
            if not secret:
                raise ConfigError(f"{where}.client_secret_env: variable {cfg.client_secret_env} is not set or is empty")
            return ClientSecretCredential(cfg.tenant_id, cfg.client_id, secret)
        case "client-certificate":
            if not (cfg.tenant_id and cfg.client_id and cfg.client_certificate):
                raise ConfigError(
                    f"{where}: credential 'client-certificate' needs tenant_id, client_id and client_certificate"
                )
            # Read as a secret file (ours, mode 0600): it holds the private key that gets the vault's tokens, and
            # whoever may read it can use the vault key past the agent's policy and audit log.
            pem = read_secret_file(cfg.client_certificate, f"{where}.client_certificate:")
            try:
                return CertificateCredential(cfg.tenant_id, cfg.client_id, certificate_data=pem)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"{where}.client_certificate: cannot load {cfg.client_certificate}: {_redact(str(exc))}"
                ) from None
        case "azure-cli":
            return AzureCliCredential(tenant_id=cfg.tenant_id) if cfg.tenant_id else AzureCliCredential()
        case _:  # pragma: no cover -- exhaustive: config.AzureCredential lists the kinds
            assert_never(cfg.credential)


class _TransientVaultError(BackendUnavailableError):
    """A vault operation that failed in a way a retry may fix (``_AzureKey._vault_errors``): ``reason`` for the
    final message, the wait the vault asked for, and whether the vault throttled."""

    def __init__(self, reason: str, *, retry_after: float | None = None, throttled: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.throttled = throttled


class _AzureKey:
    """What signing and decryption keys share: the one-time describe, the clients, the retry loop, error
    mapping."""

    _purpose: Literal["sign", "decrypt"]

    def __init__(self, registry: AzureKeyVaultRegistry, cfg: AzureKeyVaultKeyConfig, *, name: str) -> None:
        self._registry = registry
        self._cfg = cfg
        self._name = name
        self._settings = registry.settings
        self._throttle = registry.throttle_for(cfg.vault_url)
        self._where = name  # the key's dotted config path, e.g. identities.m0.signing_key
        self._info: KeyInfo | None = None
        self._crypto: CryptographyClient | None = None
        self._describe_lock = asyncio.Lock()
        self._closed = False

    @property
    def config(self) -> AzureKeyVaultKeyConfig:
        return self._cfg

    def _client_kwargs(self, ctx: ssl.SSLContext) -> dict[str, Any]:
        # NOTE: a fresh session per client because each client closes its transport; they share the
        # SSLContext.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=self._settings.throttle.max_concurrency),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=True,
        )
        kwargs: dict[str, Any] = {
            "transport": AioHttpTransport(
                session=session,
                session_owner=True,
                connection_timeout=self._settings.connect_timeout,
                read_timeout=self._settings.attempt_timeout,
            ),
            "retry_total": 0,  # our loop retries (see the module docstring)
        }
        if self._cfg.api_version:
            kwargs["api_version"] = self._cfg.api_version
        return kwargs

    async def describe(self) -> KeyInfo:
        """GET the key once (and the latest version when pinned, to report drift); cached afterwards."""
        if self._info is not None:
            return self._info
        async with self._describe_lock:
            if self._info is None:
                if self._closed:
                    raise BackendUnavailableError(f"Key Vault key {self._cfg.key_name} is closed")
                self._info = await self._load()
            return self._info

    async def _key_client(self) -> tuple[KeyClient, AsyncTokenCredential, ssl.SSLContext]:
        """A ``KeyClient`` for the key's vault (close it), with the credential and TLS context it uses."""
        cfg = self._cfg
        credential = await self._registry._credential(cfg, self._where)
        ctx = await self._registry._ssl_context(cfg.ca_bundle, self._where)
        kwargs = self._client_kwargs(ctx)
        try:
            return KeyClient(cfg.vault_url, credential, **kwargs), credential, ctx
        except NotImplementedError as exc:  # the SDK's answer to an unknown api_version
            await kwargs["transport"].close()
            raise ConfigError(f"{self._where}.api_version: {exc}") from None

    async def _load(self) -> KeyInfo:
        cfg = self._cfg
        key_client, credential, ctx = await self._key_client()
        try:
            version = cfg.key_version or None
            key = await self._call("get key", lambda: key_client.get_key(cfg.key_name, version), priority=Priority.HIGH)
            _check_kid(key, cfg, self._where)
            public_key = _public_key_from_jwk(key)
            warnings = self._check_key(key, public_key)
            if cfg.key_version:
                warnings += await self._check_drift(key_client, key, public_key)
            else:
                warnings.append(
                    f"key_version is not pinned: using version {key.properties.version}, the vault's current "
                    "one at start-up. A rotation (e.g. AutoRenew) is picked up only at the next start and "
                    "then no longer matches the registered certificate; pin key_version"
                )
        finally:
            await key_client.close()
        # Built from the KeyVaultKey: no GET before the first operation, so one request per signature.
        self._crypto = CryptographyClient(key, credential, **self._client_kwargs(ctx))
        info = KeyInfo(backend="azure-keyvault", location=str(key.id), public_key=public_key, warnings=tuple(warnings))
        for w in info.warnings:
            _logger.warning("Key Vault key %s: %s", key.id, w)
        return info

    def _check_key(self, key: KeyVaultKey, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> list[str]:
        warnings: list[str] = []
        if self._purpose == "sign" and not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise IdentityError(
                f"{self._where}: Key Vault key {key.id} is {key.key_type}, but governance signing needs an "
                "EC key (P-256/P-384/P-521)"
            )
        if self._purpose == "decrypt" and not isinstance(public_key, rsa.RSAPublicKey):
            raise IdentityError(f"{self._where}: Key Vault key {key.id} is {key.key_type}; recovery shares need RSA")
        ops = {str(op) for op in (key.key_operations or [])}
        needed = "sign" if self._purpose == "sign" else "decrypt"
        if ops and needed not in ops:
            warnings.append(f"the key's key_ops {sorted(ops)} do not include {needed!r}: the vault will refuse it")
        props = key.properties
        if props.enabled is False:
            warnings.append("the key is disabled in the vault: every operation will be refused")
        now = datetime.datetime.now(datetime.UTC)
        if props.expires_on is not None and props.expires_on <= now:
            warnings.append(f"the key expired on {props.expires_on.isoformat()}")
        elif props.expires_on is not None and props.expires_on - now < datetime.timedelta(days=30):
            warnings.append(f"the key expires on {props.expires_on.isoformat()}")
        return warnings

    async def _check_drift(
        self,
        key_client: KeyClient,
        key: KeyVaultKey,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    ) -> list[str]:
        try:
            latest = await self._call(
                "get latest key version",
                lambda: key_client.get_key(self._cfg.key_name),
                priority=Priority.HIGH,
            )
        except BackendError as exc:
            return [f"could not check the vault's current version of the key: {exc.message}"]
        if latest.properties.version == key.properties.version:
            return []
        same_key = _public_key_from_jwk(latest).public_numbers() == public_key.public_numbers()
        return [
            f"drift: the vault's current version of key {self._cfg.key_name!r} is "
            f"{latest.properties.version}, but key_version pins {key.properties.version}"
            + (" (same key material: a reuseKey renewal)" if same_key else " (a different key)")
            + ". The agent keeps using the pinned version and the configured certificate; the member id "
            "comes from that certificate. If the certificate was renewed (AutoRenew), its DER and so the "
            "member id changed: register the new certificate in CCF before switching to it"
        ]

    async def _client(self) -> CryptographyClient:
        if self._crypto is None:
            await self.describe()
        if self._crypto is None:  # pragma: no cover -- describe() always sets it or raises
            raise BackendUnavailableError(f"Key Vault key {self._cfg.key_name} is not available")
        return self._crypto

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, priority: Priority) -> T:
        """Run one vault operation under the throttle with bounded, jittered retries (see the module
        docstring)."""
        s = self._settings
        retry = s.retry_policy().start(rng=_SYSTEM_RANDOM.random)
        while True:
            attempt = retry.next_attempt()
            self._refuse_if_told_to_wait(what, retry.remaining)
            try:
                async with asyncio.timeout(retry.remaining):
                    await self._throttle.acquire(priority)
            except TimeoutError:
                raise BackendUnavailableError(
                    f"Key Vault {self._cfg.vault_url}: {what} for key {self._cfg.key_name!r} waited "
                    f"{s.total_timeout:g}s for the local rate limit",
                    hint="the agent is sending more than the configured Key Vault budget; raise "
                    "rate_per_second or max_concurrency if the vault's quota allows",
                ) from None
            timeout = retry.attempt_timeout(s.attempt_timeout)
            try:
                with self._vault_errors(what, timeout):
                    async with asyncio.timeout(timeout):
                        return await fn()
            except _TransientVaultError as exc:
                failure = exc
                if exc.throttled:
                    self._throttle_penalty(exc.retry_after)
            finally:
                self._throttle.release()
            wait = retry.after_failure(failure.retry_after)
            if isinstance(wait, GiveUp):
                raise self._gave_up(what, wait, attempt, failure) from None
            _logger.warning(
                "Key Vault %s: %s for key %s: %s; attempt %d/%d, retrying in %.2fs",
                self._cfg.vault_url, what, self._cfg.key_name, failure.message, attempt, s.max_attempts, wait,
            )  # fmt: skip
            await retry.sleep(wait)

    def _gave_up(self, what: str, why: GiveUp, attempts: int, failure: _TransientVaultError) -> BackendUnavailableError:
        """The error for an operation that is not retried any more, and why."""
        s, cfg, reason = self._settings, self._cfg, failure.message
        busy = "the vault is throttling or unavailable; a later retry may succeed"
        match why:
            case GiveUp.ATTEMPTS:
                return BackendUnavailableError(
                    f"Key Vault {cfg.vault_url}: {what} for key {cfg.key_name!r} failed after {attempts} attempts: "
                    f"{reason}",
                    hint=busy,
                )
            case GiveUp.RETRY_AFTER:
                return BackendUnavailableError(
                    f"Key Vault {cfg.vault_url}: {what}: the vault asked to retry after {failure.retry_after:g}s "
                    f"(more than max_retry_after={s.max_retry_after:g}s): {reason}",
                    hint="the vault's quota is exhausted; lower the agent's rate or raise the vault's limits",
                    retry_after=failure.retry_after,
                )
            case GiveUp.DEADLINE:
                return BackendUnavailableError(
                    f"Key Vault {cfg.vault_url}: {what} for key {cfg.key_name!r} failed within "
                    f"{s.total_timeout:g}s ({attempts} attempts): {reason}",
                    hint=busy,
                )
            case _:  # pragma: no cover -- exhaustive
                assert_never(why)

    @contextlib.contextmanager
    def _vault_errors(self, what: str, timeout: float) -> Iterator[None]:
        """The SDK's exceptions as the agent's, for one attempt at ``what`` bounded by ``timeout`` seconds: what a
        retry may fix (a timeout, 408/429/5xx, a connection that failed) is a ``_TransientVaultError``; the rest is
        final (authentication, a missing key, a refusal, a TLS failure, a vault URL outside the vault's domain). No
        vendor exception leaves, and none is chained: their responses can carry the request's token."""
        try:
            yield
        except TimeoutError:
            raise _TransientVaultError(f"no answer within {timeout:.3g}s") from None
        except ClientAuthenticationError as exc:
            raise self._auth_error(exc, what) from None
        except ResourceNotFoundError:
            version = self._cfg.key_version or "latest"
            raise KeyNotFoundError(
                f"Key Vault {self._cfg.vault_url} has no key {self._cfg.key_name!r} (version {version})",
                hint=f"check {self._where}.key_name and key_version; a soft-deleted key must be recovered first",
            ) from None
        except HttpResponseError as exc:
            status = exc.status_code or 0
            detail = self._vault_message(exc)
            if status not in _RETRYABLE_STATUSES:
                raise self._rejected(status, detail, what) from None
            retry_after = retry_after_seconds(getattr(exc.response, "headers", None))
            raise _TransientVaultError(
                f"HTTP {status} {detail}", retry_after=retry_after, throttled=status == 429
            ) from None
        except ServiceRequestError as exc:
            text = _redact(str(exc))
            if "CERTIFICATE_VERIFY_FAILED" in text or "SSLCertVerificationError" in text:
                raise BackendError(
                    f"Key Vault {self._cfg.vault_url}: TLS certificate verification failed: {text}",
                    hint=f"for a private CA or a test vault set {self._where}.ca_bundle to its CA (PEM)",
                ) from None
            raise _TransientVaultError(f"cannot reach the vault: {text}") from None
        except ServiceResponseError as exc:
            raise _TransientVaultError(f"the connection failed: {_redact(str(exc))}") from None
        except ValueError as exc:
            # The SDK's challenge check: the vault asked for a token scope outside its own domain.
            raise ConfigError(
                f"{self._where}.vault_url: {self._cfg.vault_url}: {_redact(str(exc))}",
                hint="vault_url must be the vault's own DNS name (https://<name>.vault.azure.net)",
            ) from None
        except AzureError as exc:
            raise BackendError(f"Key Vault {self._cfg.vault_url}: {what} failed: {_redact(str(exc))}") from None

    def _refuse_if_told_to_wait(self, what: str, remaining: float) -> None:
        """Fail at once, rather than wait out the whole deadline in the throttle, while the vault's last 429 holds
        every request back for longer than this one may take."""
        left = self._throttle.penalty_left()
        if left > remaining:
            raise BackendUnavailableError(
                f"Key Vault {self._cfg.vault_url}: {what} for key {self._cfg.key_name!r}: the vault asked to wait "
                f"{left:.0f}s more, longer than this request may take ({remaining:.0f}s)",
                hint="the vault's quota is exhausted: retry later, lower the agent's rate or raise the vault's limits",
                retry_after=left,
            )

    def _throttle_penalty(self, retry_after: float | None) -> None:
        # The vault throttles per vault, not per request: make every caller of this host slow down.
        self._throttle.penalize(retry_after if retry_after is not None else self._settings.backoff_initial)

    @staticmethod
    def _vault_message(exc: HttpResponseError) -> str:
        err = getattr(exc, "error", None)
        code = getattr(err, "code", None)
        message = getattr(err, "message", None)
        if code or message:
            return _redact(f"{code or ''}: {message or ''}".strip(": "))
        return _redact(str(exc.reason or ""))

    def _rejected(self, status: int, detail: str, what: str) -> BackendError:
        cfg = self._cfg
        if status == 403:
            op = "sign" if self._purpose == "sign" else "decrypt"
            return BackendError(
                f"Key Vault {cfg.vault_url} refused {what} for key {cfg.key_name!r} (HTTP 403 {detail})",
                hint=(
                    f"the principal of credential {cfg.credential!r} needs keys/get and keys/{op} on this "
                    "vault (RBAC role 'Key Vault Crypto User', or an access policy); also check the vault's "
                    "firewall and that the key is enabled"
                ),
            )
        if self._purpose == "decrypt" and what == "decrypt":
            # One uniform message for a failed decryption: nothing that could help a padding oracle.
            return BackendError(f"Key Vault {cfg.vault_url}: decryption with key {cfg.key_name!r} failed")
        if self._purpose == "sign" and what == "sign":
            return SigningFailedError(
                f"Key Vault {cfg.vault_url} refused to sign with key {cfg.key_name!r}: HTTP {status} {detail}"
            )
        return BackendError(
            f"Key Vault {cfg.vault_url}: {what} for key {cfg.key_name!r} failed: HTTP {status} {detail}"
        )

    def _auth_error(self, exc: ClientAuthenticationError, what: str) -> BackendError:
        cfg = self._cfg
        challenge_tenant, challenge_scope = _challenge_info(cfg.vault_url)
        tenant = cfg.tenant_id or challenge_tenant or "(the vault's tenant: not known yet)"
        scope = challenge_scope or _expected_scope(cfg.vault_url)
        who = repr(cfg.credential) + (f" (client_id {cfg.client_id})" if cfg.client_id else "")
        response = exc.response
        vault_host = urlsplit(cfg.vault_url).netloc.lower()
        from_vault = (
            response is not None
            and response.status_code == 401
            and urlsplit(str(getattr(response.request, "url", ""))).netloc.lower() == vault_host
        )
        stage = "the vault rejected the token from" if from_vault else "no token could be obtained with"
        message = (
            f"Azure Key Vault authentication failed for {what} on {cfg.vault_url} (key {cfg.key_name!r}): "
            f"{stage} credential {who}, tenant {tenant}, scope {scope}: {_redact(exc.message or str(exc))}"
        )
        hint = (
            f"check {_CHECKS.get(cfg.credential, 'the credential configuration')}; the principal needs "
            "access to the vault (RBAC role 'Key Vault Crypto User' or an access policy with keys/get and "
            "keys/sign|decrypt)"
        )
        if from_vault:
            hint += "; a token for the wrong tenant is rejected too: set tenant_id to the vault's tenant"
        return BackendError(message, hint=hint)

    async def aclose(self) -> None:
        """Close the SDK client. The credential belongs to the registry. Idempotent."""
        self._closed = True
        crypto, self._crypto = self._crypto, None
        if crypto is not None:
            await crypto.close()


class AzureKeyVaultSigningKey(_AzureKey):
    """An EC key in Key Vault / Managed HSM that signs digests (``SigningKey``)."""

    _purpose = "sign"

    async def sign_digest(
        self, alg: SignatureAlgorithm, digest: bytes, *, priority: Priority = Priority.NORMAL
    ) -> bytes:
        """Sign ``digest`` remotely with ``alg`` (ES256/ES384/ES512) and return raw ``r||s``, verified
        locally."""
        if len(digest) != alg.digest_size:
            raise SigningFailedError(f"an {alg.name} digest is {alg.digest_size} bytes, got {len(digest)}")
        info = await self.describe()
        public_key = info.public_key
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != alg.curve_name:
            raise SigningFailedError(f"{alg.name} does not match Key Vault key {info.location}")
        crypto = await self._client()
        result = await self._call(
            "sign", lambda: crypto.sign(AzureSignatureAlgorithm(alg.name), digest), priority=priority
        )
        signature = bytes(result.signature)
        if len(signature) != alg.signature_size:
            raise SigningFailedError(
                f"Key Vault returned a {len(signature)}-byte {alg.name} signature; expected raw r||s of "
                f"{alg.signature_size} bytes"
            )
        verify_digest(public_key, alg, digest, signature)
        return signature


class AzureKeyVaultDecryptionKey(_AzureKey):
    """An RSA key in Key Vault / Managed HSM that decrypts recovery shares with RSA-OAEP-256
    (``DecryptionKey``)."""

    _purpose = "decrypt"

    async def decrypt_oaep_sha256(self, ciphertext: bytes, *, priority: Priority = Priority.HIGH) -> bytes:
        """RSA-OAEP with SHA-256 (Key Vault's ``RSA-OAEP-256``) inside the vault."""
        info = await self.describe()
        public_key = info.public_key
        if isinstance(public_key, rsa.RSAPublicKey) and len(ciphertext) != (public_key.key_size + 7) // 8:
            raise InvalidRequestError(
                f"RSA-{public_key.key_size} ciphertext must be {(public_key.key_size + 7) // 8} bytes, got "
                f"{len(ciphertext)}"
            )
        crypto = await self._client()
        result = await self._call(
            "decrypt", lambda: crypto.decrypt(EncryptionAlgorithm.rsa_oaep_256, ciphertext), priority=priority
        )
        return bytes(result.plaintext)


# ----- creating keys (``signing-agent keys generate --backend azure-keyvault``) -----

_KEY_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_CREATED_OPS: dict[str, list[str]] = {"sign": ["sign", "verify"], "decrypt": ["decrypt", "unwrapKey"]}
"""What a created key may do in the vault: the agent signs with the member key and decrypts (or unwraps) with the
encryption key; public operations run locally anyway."""


def is_managed_hsm(vault_url: str) -> bool:
    """True for a Managed HSM (``https://<name>.managedhsm.azure.net`` and its sovereign-cloud twins), which
    makes HSM keys only."""
    host = urlsplit(vault_url).hostname or ""
    return host.split(".")[1:2] == ["managedhsm"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewKey:
    """A key for the vault to make: an EC member key (``sign``) or an RSA encryption key (``decrypt``)."""

    purpose: Literal["sign", "decrypt"]
    curve: str = "P-384"
    """For ``sign``: P-256, P-384 or P-521 (the curve chooses ES256/ES384/ES512)."""
    rsa_bits: int = 3072
    """For ``decrypt``: 2048, 3072 or 4096."""
    hsm: bool = True
    """``EC-HSM``/``RSA-HSM``: Managed HSM and Premium vaults; a Standard vault makes software keys only."""

    @property
    def key_type(self) -> str:
        return ("EC" if self.purpose == "sign" else "RSA") + ("-HSM" if self.hsm else "")

    @property
    def description(self) -> str:
        return f"{self.key_type} {self.curve if self.purpose == 'sign' else self.rsa_bits}"


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A key the vault made: the config that uses it (pinned to the new version) and its public key."""

    config: AzureKeyVaultKeyConfig
    kid: str
    key_type: str
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


async def create_key(
    registry: AzureKeyVaultRegistry, cfg: AzureKeyVaultKeyConfig, new: NewKey, *, where: str
) -> CreatedKey:
    """Have the vault make a non-exportable key named ``cfg.key_name``; refuse a name that already has a key.

    The private key is generated in the vault (in its HSM for ``new.hsm``) and never leaves it. ``where`` names the
    key in errors (like a config path).
    """
    maker = _KeyMaker(registry, cfg, new, name=where)
    try:
        return await maker.create()
    finally:
        await maker.aclose()


async def check_new_key(
    registry: AzureKeyVaultRegistry, cfg: AzureKeyVaultKeyConfig, new: NewKey, *, where: str
) -> None:
    """Refuse before anything is made what ``create_key`` would refuse: a bad name, a software key on a Managed
    HSM, a name that already has a key (so that a run making two keys fails before the first)."""
    maker = _KeyMaker(registry, cfg, new, name=where)
    try:
        key_client, _, _ = await maker._key_client()
        try:
            await maker._refuse_existing(key_client)
        finally:
            await key_client.close()
    finally:
        await maker.aclose()


class _KeyMaker(_AzureKey):
    """Creates one key, with the key's error mapping and throttle, and **one attempt** per request: a create whose
    answer was lost may still have made the key, and a second create would make a second version."""

    def __init__(self, registry: AzureKeyVaultRegistry, cfg: AzureKeyVaultKeyConfig, new: NewKey, *, name: str) -> None:
        if not _KEY_NAME.fullmatch(cfg.key_name):
            raise ConfigError(f"{name}: {cfg.key_name!r} is not a Key Vault key name (1-127 letters, digits and '-')")
        if not new.hsm and is_managed_hsm(cfg.vault_url):
            raise ConfigError(f"{name}: a Managed HSM makes HSM keys only; drop the software protection")
        super().__init__(registry, cfg, name=name)
        self._purpose = new.purpose
        self._new = new
        self._settings = dataclasses.replace(registry.settings, max_attempts=1)

    async def create(self) -> CreatedKey:
        cfg, new = self._cfg, self._new
        key_client, _, _ = await self._key_client()
        try:
            await self._refuse_existing(key_client)
            ops = _CREATED_OPS[new.purpose]
            try:
                if new.purpose == "sign":
                    key = await self._call("create key", lambda: key_client.create_ec_key(
                        cfg.key_name, curve=new.curve, key_operations=ops, hardware_protected=new.hsm,
                        exportable=False), priority=Priority.HIGH)  # fmt: skip
                else:
                    key = await self._call("create key", lambda: key_client.create_rsa_key(
                        cfg.key_name, size=new.rsa_bits, key_operations=ops, hardware_protected=new.hsm,
                        exportable=False), priority=Priority.HIGH)  # fmt: skip
            except BackendUnavailableError as exc:
                raise BackendUnavailableError(
                    exc.message,
                    hint=f"the vault may have made the key anyway: look for key {cfg.key_name!r} in the vault "
                    "(az keyvault key list-versions) before trying again",
                ) from None
        finally:
            await key_client.close()
        return self._checked(key)

    async def _refuse_existing(self, key_client: KeyClient) -> None:
        """Creating under a name in use adds a version to that key: never do that to somebody's member key."""
        try:
            existing = await self._call(
                "get key", lambda: key_client.get_key(self._cfg.key_name), priority=Priority.HIGH
            )
        except KeyNotFoundError:
            return
        raise ConfigError(
            f"{self._where}: {self._cfg.vault_url} already has a key named {self._cfg.key_name!r} ({existing.id})",
            hint="choose another key name; signing-agent never adds a version to an existing key",
        )

    def _checked(self, key: KeyVaultKey) -> CreatedKey:
        """What the vault made is what was asked for (some tools silently got a software key for an HSM one)."""
        new = self._new
        _check_kid(key, self._cfg, self._where)
        public_key = _public_key_from_jwk(key)
        kty = _jwk_text(key.key, "kty")
        problems = []
        if kty != new.key_type:
            problems.append(f"key type {kty}, not {new.key_type}")
        if isinstance(public_key, ec.EllipticCurvePublicKey) and _jwk_text(key.key, "crv") != new.curve:
            problems.append(f"curve {_jwk_text(key.key, 'crv')}, not {new.curve}")
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size != new.rsa_bits:
            problems.append(f"{public_key.key_size} bits, not {new.rsa_bits}")
        if key.properties.exportable:
            problems.append("an exportable private key")
        if problems:
            raise IdentityError(
                f"{self._where}: the vault made key {key.id} with " + ", ".join(problems),
                hint="do not use it; delete it in the vault",
            )
        version = key.properties.version or ""
        return CreatedKey(
            config=dataclasses.replace(self._cfg, key_version=version),
            kid=str(key.id),
            key_type=kty,
            public_key=public_key,
        )

    def _auth_error(self, exc: ClientAuthenticationError, what: str) -> BackendError:
        error = super()._auth_error(exc, what)
        error.hint = (error.hint or "") + "; to create keys it needs keys/create too ('Key Vault Crypto Officer')"
        return error

    def _rejected(self, status: int, detail: str, what: str) -> BackendError:
        if what != "create key":
            return super()._rejected(status, detail, what)
        cfg = self._cfg
        message = f"Key Vault {cfg.vault_url} refused to create key {cfg.key_name!r} ({self._new.description}): "
        message += f"HTTP {status} {detail}"
        # A Standard vault refuses an HSM key with "Hardware key operation not allowed on standard vault", reported
        # as 403 Forbidden (Az PowerShell users see "Forbidden"): that is not a missing role, whatever the status.
        standard_tier = self._new.hsm and not is_managed_hsm(cfg.vault_url)
        if standard_tier and "standard vault" in detail.lower():
            hint = _STANDARD_TIER_HINT
        elif status == 403:
            hint = (
                f"the principal of credential {cfg.credential!r} needs keys/create and keys/get on this vault (RBAC "
                "role 'Key Vault Crypto Officer', or an access policy; on a Managed HSM the local role 'Managed HSM "
                "Crypto User'); also check the vault's firewall"
            )
        elif status == 409:
            hint = "a deleted key still holds the name (soft delete): recover or purge it, or choose another name"
        elif standard_tier:
            hint = _STANDARD_TIER_HINT
        else:
            hint = "check the key's parameters against what the vault offers"
        return BackendError(message, hint=hint)


_STANDARD_TIER_HINT = (
    "a Standard-tier vault makes no HSM keys: use a Premium vault or a Managed HSM, or ask for a software-protected "
    "key (--protection software) knowingly"
)
