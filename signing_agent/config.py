"""Load and validate the agent's TOML configuration into frozen dataclasses.

Security configuration must not guess: an unknown key is an error that names its dotted path, a wrong type is an
error that says what was expected, and relative paths resolve from the config file's folder. Secrets are never
inline: a PKCS#11 PIN comes from ``pin_file`` (mode 0600 or stricter) or ``pin_env``. ``config.example.toml`` is the
documented source of truth and a unit test loads it, so it cannot rot.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from signing_agent.errors import ConfigError

DEFAULT_SOCKET = Path("/run/signing-agent/agent.sock")
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_CREATED_AT_SKEW = 300
DEFAULT_API_VERSION = "2024-07-01"
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
SUPPORTED_API_VERSIONS = ("2023-06-01-preview", "2024-07-01")
AZURE_CREDENTIALS = (
    "default",
    "managed-identity",
    "workload-identity",
    "client-secret",
    "client-certificate",
    "azure-cli",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileKeyConfig:
    """A PEM private key on disk. Development only: the daemon warns."""

    backend: Literal["file"] = "file"
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class PKCS11KeyConfig:
    """A key in a PKCS#11 token, named by token label plus key label or id, or by an RFC 7512 URI."""

    backend: Literal["pkcs11"] = "pkcs11"
    module: Path | None = None
    token_label: str | None = None
    key_label: str | None = None
    key_id: bytes | None = None
    uri: str | None = None
    pin_file: Path | None = None
    pin_env: str | None = None
    init_params: str | None = None
    """Module-specific C_Initialize parameters (NSS softoken: ``configdir='sql:/path' ...``)."""
    oaep: Literal["token", "host"] = "token"
    """For encryption keys: ``host`` opts in to raw RSA in the token and OAEP decoding on the host."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AzureKeyVaultKeyConfig:
    """A key in Azure Key Vault or Managed HSM."""

    backend: Literal["azure-keyvault"] = "azure-keyvault"
    vault_url: str
    key_name: str
    key_version: str | None = None
    credential: str = "default"
    client_id: str | None = None
    tenant_id: str | None = None
    client_secret_env: str | None = None
    client_certificate: Path | None = None
    ca_bundle: Path | None = None
    api_version: str | None = None


KeyConfig = FileKeyConfig | PKCS11KeyConfig | AzureKeyVaultKeyConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyVaultConfig:
    """``[keyvault]``: the throttle and retry budget of Azure Key Vault operations, per vault host.

    The defaults equal ``ThrottleSettings`` and ``AzureKeyVaultSettings`` (a unit test keeps them in step): this
    module cannot import those, because the backends depend on config and not the other way round.
    """

    max_concurrency: int = 16
    """Requests in flight at once to one vault host."""
    rate_per_second: float = 150.0
    """Sustained operations per second to one vault host (Key Vault's quota is per vault and per 10 s)."""
    burst: int = 150
    """Operations that may go at once after a quiet period."""
    max_attempts: int = 5
    """Attempts per operation, the first included."""
    total_timeout: float = 30.0
    """Seconds for one operation: queueing in the throttle, every attempt and every wait between attempts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityConfig:
    name: str
    certificate: Path
    signing_key: KeyConfig
    encryption_key: KeyConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSection:
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = 0o600
    socket_group: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allowed_uids: tuple[int, ...] = ()
    """Extra peer uids allowed besides the daemon's own uid and root."""
    allowed_gids: tuple[int, ...] = ()
    """Peers whose primary gid is listed are allowed too."""
    request_timeout: float = 60.0
    header_timeout: float = 10.0
    """A connection must deliver its complete request line and headers within this (slowloris guard)."""
    body_timeout: float = 30.0
    """A request body must arrive completely within this."""
    max_created_at_skew: int = DEFAULT_MAX_CREATED_AT_SKEW
    """Seconds a caller's ``created_at`` may differ from the agent's clock, either way (0: only the current second)."""
    max_connections: int = 512
    """Open connections in all; the last ``max_connections_per_uid`` of them are kept for root and the agent's uid."""
    max_connections_per_uid: int = 64
    """Open connections per peer uid (root and the agent's own uid are bounded by ``max_connections`` only)."""
    denial_rate_limit: int = 30
    """Denied or malformed requests a peer uid may make per ``denial_rate_window`` before it gets 429s."""
    denial_rate_window: float = 60.0
    log_level: str = "info"


DEFAULT_AUDIT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_AUDIT_KEEP_ROTATED = 10
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
BALLOT_ALIASES = ("accept", "reject")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditConfig:
    """The hash-chained audit log. ``path`` defaults to ``audit.jsonl`` in the socket's folder."""

    path: Path
    max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    """Rotate the file before it grows past this; the chain continues into the new file."""
    keep_rotated: int = DEFAULT_AUDIT_KEEP_ROTATED
    """Rotated files kept; older ones are deleted after a ``pruned`` record names them (0: keep none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRuleConfig:
    """One ``[[policy.rules]]`` entry. A list left out means "any"; an empty list means "none"."""

    name: str
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    executables: tuple[str, ...] | None = None
    identities: tuple[str, ...] | None = None
    msg_types: tuple[str, ...] | None = None
    actions_allow: tuple[str, ...] | None = None
    actions_deny: tuple[str, ...] = ()
    ballots: tuple[str, ...] | None = None
    """Allowed ballot scripts: lowercase hex SHA-256 of the JavaScript, or the aliases ``accept`` / ``reject``."""
    services: tuple[str, ...] | None = None
    raw_sign: bool = True
    """Whether ``POST /v1/sign`` (signature returned to the caller, not forwarded) is allowed."""
    rate_limit: int | None = None
    rate_window: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    rules: tuple[PolicyRuleConfig, ...] = ()
    default_rule: bool = True
    """Keep the built-in last rule: root, the daemon's uid, agent.allowed_uids/gids may do everything."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """A CCF service the agent forwards governance to, with TLS pinned to its service certificate."""

    name: str
    url: str
    service_certificate: Path | None = None
    identity_url: str | None = None
    identity_ca_bundle: Path | None = None
    """Trust for the identity endpoint instead of the system CAs (private endpoints, tests)."""
    api_version: str = DEFAULT_API_VERSION
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    """Seconds for one attempt: connecting, sending, and the whole answer, body included."""
    read_timeout: float = 10.0
    """Seconds the service may stay silent (no byte of its answer) before the attempt is abandoned."""
    total_timeout: float = 45.0
    """Seconds for one request: every attempt and every wait between them. Under ``agent.request_timeout`` by
    default, so a caller learns that the service timed out, not only that its request did."""
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    """The largest answer body read from the service; a larger one is abandoned unread (a 502)."""
    max_attempts: int = 5
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    accepted_service_certificates: tuple[Path, ...] = ()
    """Further service identities trusted for this service (forwarding and recovery): e.g. the identity the
    service will have after a planned disaster recovery, distributed out of band."""
    accept_transition_to: bool = False
    """Trust a new service identity provisionally (reads and ballots) when an Open or Accepted
    ``transition_service_to_open`` proposal names a trusted identity as ``previous_service_identity`` and the
    presented one as ``next_service_identity``; approve it for recovery shares when a member gives its fingerprint and
    this agent casts the canonical accepting ballot on such a proposal (``RecoveryService.approve_identity``)."""
    recovery_identities: tuple[str, ...] = ()
    """Identities (each with an ``encryption_key``) whose recovery share the watcher submits unattended."""


DEFAULT_RECOVERY_POLL_INTERVAL = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryConfig:
    """``[recovery]``: the unattended recovery-share watchers."""

    enabled: bool = False
    poll_interval: float = DEFAULT_RECOVERY_POLL_INTERVAL
    """Seconds between status polls of a healthy service (jittered +-20%)."""
    max_backoff: float = 60.0
    """After failures the interval doubles, jittered, up to this."""
    state_dir: Path
    """Where submitted recoveries and adopted service identities are remembered (never a share).
    Default: the audit log's folder."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    path: Path | None
    agent: AgentSection
    identities: Mapping[str, IdentityConfig]
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    audit: AuditConfig
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    keyvault: KeyVaultConfig = field(default_factory=KeyVaultConfig)
    recovery: RecoveryConfig


_MISSING: Any = object()


class _Table:
    """A TOML table being read: typed getters, path resolution, and an unknown-key check at the end."""

    def __init__(self, data: Mapping[str, Any], path: str, base_dir: Path) -> None:
        self._data = dict(data)
        self._path = path
        self._base = base_dir
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, types: tuple[type, ...], what: str, default: Any) -> Any:
        self._seen.add(key)
        if key not in self._data:
            if default is _MISSING:
                raise ConfigError(f"{self._key(key)}: required key is missing")
            return default
        value = self._data[key]
        # bool is an int in Python; never accept one for the other.
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            raise ConfigError(f"{self._key(key)}: expected {what}, got {type(value).__name__} {value!r}")
        return value

    def get_str(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, (str,), "a string", default)
        if isinstance(value, str) and not value:
            raise ConfigError(f"{self._key(key)}: must not be empty")
        return value

    def get_choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.get_str(key, default)
        if value is not None and value not in choices:
            raise ConfigError(f"{self._key(key)}: {value!r} is not one of {', '.join(choices)}")
        return value

    def get_int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self._get(key, (int,), "an integer", default)
        if minimum is not None and isinstance(value, int) and value < minimum:
            raise ConfigError(f"{self._key(key)}: must be at least {minimum}, got {value}")
        return value

    def get_number(self, key: str, default: Any = _MISSING, *, minimum: float = 0.0) -> Any:
        value = self._get(key, (int, float), "a number", default)
        if isinstance(value, int | float) and value <= minimum:
            raise ConfigError(f"{self._key(key)}: must be greater than {minimum}, got {value}")
        return float(value) if value is not None else None

    def get_int_list(self, key: str) -> tuple[int, ...]:
        value = self._get(key, (list,), "a list of integers", [])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of non-negative integers")
        return tuple(value)

    def get_bool(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, (bool,), "true or false", default)

    def get_str_list(self, key: str) -> tuple[str, ...] | None:
        """A list of non-empty strings, or None when the key is absent."""
        value = self._get(key, (list,), "a list of strings", None)
        if value is None:
            return None
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of non-empty strings")
        return tuple(value)

    def get_path_list(self, key: str) -> list[Path]:
        """A list of paths (relative ones resolve from the config file's folder); empty when absent."""
        values = self.get_str_list(key) or ()
        paths = [Path(os.path.expanduser(v)) for v in values]
        return [p if p.is_absolute() else (self._base / p) for p in paths]

    def get_path(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get_str(key, default)
        if value is None or isinstance(value, Path):
            return value
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self._base / p)

    def get_table(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, (dict,), "a table", default)
        if value is None:
            return None
        return _Table(value, self._key(key), self._base)

    def get_tables(self, key: str) -> dict[str, _Table]:
        value = self._get(key, (dict,), "a table of tables", {})
        out: dict[str, _Table] = {}
        for name, sub in value.items():
            if not _NAME_RE.match(name):
                raise ConfigError(f"{self._key(key)}.{name}: names use letters, digits, '_', '.', '-' (max 64)")
            if not isinstance(sub, dict):
                raise ConfigError(f"{self._key(key)}.{name}: expected a table")
            out[name] = _Table(sub, f"{self._key(key)}.{name}", self._base)
        return out

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            names = ", ".join(self._key(k) for k in unknown)
            raise ConfigError(
                f"unknown configuration key: {names}", hint="check the spelling against config.example.toml"
            )


def _socket_mode(t: _Table) -> int:
    t._seen.add("socket_mode")
    raw = t._data.get("socket_mode", "0600")
    if isinstance(raw, str) and re.fullmatch(r"0?[0-7]{3}", raw):
        mode = int(raw, 8)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        mode = raw
    else:
        raise ConfigError(f'{t._key("socket_mode")}: expected an octal string such as "0660"')
    if mode & 0o7007 or not mode & 0o600 == 0o600:
        raise ConfigError(
            f"{t._key('socket_mode')}: {oct(mode)} is not allowed: the owner needs rw and 'other' gets nothing"
        )
    return mode


def _key_config(t: _Table) -> KeyConfig:
    backend = t.get_choice("backend", ("file", "pkcs11", "azure-keyvault"))
    result: KeyConfig
    match backend:
        case "file":
            result = FileKeyConfig(path=t.get_path("path"))
        case "pkcs11":
            key_id = t.get_str("key_id", None)
            try:
                key_id_bytes = bytes.fromhex(key_id) if key_id is not None else None
            except ValueError:
                raise ConfigError(f'{t._key("key_id")}: expected hex, e.g. "01a2"') from None
            result = PKCS11KeyConfig(
                module=t.get_path("module", None),
                token_label=t.get_str("token_label", None),
                key_label=t.get_str("key_label", None),
                key_id=key_id_bytes,
                uri=t.get_str("uri", None),
                pin_file=t.get_path("pin_file", None),
                pin_env=t.get_str("pin_env", None),
                init_params=t.get_str("init_params", None),
                oaep=t.get_choice("oaep", ("token", "host"), "token"),
            )
            if t.has("pin"):
                raise ConfigError(f"{t._key('pin')}: a PIN is never written inline; use pin_file or pin_env")
            if result.uri is None:
                if result.module is None:
                    raise ConfigError(f"{t._key('module')}: required unless a pkcs11: uri names the module")
                if result.key_label is None and result.key_id is None:
                    raise ConfigError(f"{t._key('key_label')}: name the key by key_label, key_id or uri")
            elif not result.uri.startswith("pkcs11:"):
                raise ConfigError(f"{t._key('uri')}: must be an RFC 7512 'pkcs11:' URI")
            if result.pin_file is not None and result.pin_env is not None:
                raise ConfigError(f"{t._key('pin_file')}: give pin_file or pin_env, not both")
        case "azure-keyvault":
            vault_url = t.get_str("vault_url")
            if not vault_url.startswith("https://"):
                raise ConfigError(f"{t._key('vault_url')}: must be an https:// URL")
            result = AzureKeyVaultKeyConfig(
                vault_url=vault_url.rstrip("/"),
                key_name=t.get_str("key_name"),
                key_version=t.get_str("key_version", None),
                credential=t.get_choice("credential", AZURE_CREDENTIALS, "default"),
                client_id=t.get_str("client_id", None),
                tenant_id=t.get_str("tenant_id", None),
                client_secret_env=t.get_str("client_secret_env", None),
                client_certificate=t.get_path("client_certificate", None),
                ca_bundle=t.get_path("ca_bundle", None),
                api_version=t.get_str("api_version", None),
            )
            if t.has("client_secret"):
                raise ConfigError(f"{t._key('client_secret')}: secrets are never inline; use client_secret_env")
        case _:  # pragma: no cover -- choice() already refused anything else
            raise ConfigError(f"{t._key('backend')}: unknown backend {backend!r}")
    t.finish()
    return result


def _service(name: str, t: _Table) -> ServiceConfig:
    url = t.get_str("url")
    if not url.startswith("https://"):
        raise ConfigError(f"{t._key('url')}: must be an https:// URL (CCF only speaks TLS)")
    svc = ServiceConfig(
        name=name,
        url=url.rstrip("/"),
        service_certificate=t.get_path("service_certificate", None),
        identity_url=t.get_str("identity_url", None),
        identity_ca_bundle=t.get_path("identity_ca_bundle", None),
        api_version=t.get_choice("api_version", SUPPORTED_API_VERSIONS, DEFAULT_API_VERSION),
        connect_timeout=t.get_number("connect_timeout", 5.0),
        request_timeout=t.get_number("request_timeout", 30.0),
        read_timeout=t.get_number("read_timeout", 10.0),
        total_timeout=t.get_number("total_timeout", 45.0),
        max_response_bytes=t.get_int("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES, minimum=4096),
        max_attempts=t.get_int("max_attempts", 5, minimum=1),
        backoff_initial=t.get_number("backoff_initial", 0.2),
        backoff_max=t.get_number("backoff_max", 5.0),
        accepted_service_certificates=tuple(t.get_path_list("accepted_service_certificates")),
        accept_transition_to=t.get_bool("accept_transition_to", False),
        recovery_identities=t.get_str_list("recovery_identities") or (),
    )
    if svc.service_certificate is None and svc.identity_url is None:
        raise ConfigError(
            f"{t._key('service_certificate')}: required (or identity_url for Azure Managed CCF): "
            "the agent only talks to a service whose certificate it pins"
        )
    if svc.identity_url is not None and not svc.identity_url.startswith("https://"):
        raise ConfigError(f"{t._key('identity_url')}: must be an https:// URL")
    t.finish()
    return svc


def _audit(root: _Table, socket: Path) -> AuditConfig:
    t = root.get_table("audit", None) or _Table({}, "audit", root._base)
    audit = AuditConfig(
        path=t.get_path("path", socket.parent / "audit.jsonl"),
        max_bytes=t.get_int("max_bytes", DEFAULT_AUDIT_MAX_BYTES, minimum=4096),
        keep_rotated=t.get_int("keep_rotated", DEFAULT_AUDIT_KEEP_ROTATED, minimum=0),
    )
    t.finish()
    return audit


def _policy_rule(t: _Table, index: int, known_services: Mapping[str, Any]) -> PolicyRuleConfig:
    name = t.get_str("name", f"rule{index}")
    services = t.get_str_list("services")
    rule = PolicyRuleConfig(
        name=name,
        uids=t.get_int_list("uids"),
        gids=t.get_int_list("gids"),
        executables=t.get_str_list("executables"),
        identities=t.get_str_list("identities"),
        msg_types=t.get_str_list("msg_types"),
        actions_allow=t.get_str_list("actions_allow"),
        actions_deny=t.get_str_list("actions_deny") or (),
        ballots=t.get_str_list("ballots"),
        services=services,
        # A rule limited to some services forwards only: a raw signature could be sent anywhere.
        raw_sign=t.get_bool("raw_sign", services is None),
        rate_limit=t.get_int("rate_limit", None, minimum=1),
        rate_window=t.get_number("rate_window", 60.0),
    )
    t.finish()
    if not rule.uids and not rule.gids:
        raise ConfigError(f"{t._key('uids')}: a rule must name the callers it is for (uids and/or gids)")
    for exe in rule.executables or ():
        if not exe.startswith("/"):
            raise ConfigError(f"{t._key('executables')}: {exe!r} is not an absolute path")
    for ballot in rule.ballots or ():
        if ballot not in BALLOT_ALIASES and not _HEX64_RE.match(ballot):
            raise ConfigError(
                f"{t._key('ballots')}: {ballot!r} is neither 'accept', 'reject' nor a lowercase hex SHA-256"
            )
    valid_types = ("proposal", "ballot", "withdrawal", "state_digest", "ack", "recovery_share")
    for msg_type in rule.msg_types or ():
        if msg_type not in valid_types:
            raise ConfigError(f"{t._key('msg_types')}: {msg_type!r} is not one of {', '.join(valid_types)}")
    for svc in rule.services or ():
        if svc not in known_services:
            raise ConfigError(f"{t._key('services')}: no service named {svc!r} is configured")
    return rule


def _policy(root: _Table, known_services: Mapping[str, Any]) -> PolicyConfig:
    t = root.get_table("policy", None)
    if t is None:
        return PolicyConfig()
    raw_rules = t._get("rules", (list,), "an array of tables ([[policy.rules]])", [])
    rules: list[PolicyRuleConfig] = []
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            raise ConfigError(f"{t._key('rules')}[{i}]: expected a table")
        rules.append(_policy_rule(_Table(raw, f"{t._key('rules')}[{i}]", root._base), i, known_services))
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{t._key('rules')}: duplicate rule name(s): {', '.join(duplicates)}")
    policy = PolicyConfig(rules=tuple(rules), default_rule=t.get_bool("default_rule", True))
    t.finish()
    return policy


# Upper bounds catch unit slips (milliseconds written as seconds) and retry budgets that would hide an outage.
_KEYVAULT_MAX_CONCURRENCY = 256
_KEYVAULT_MAX_ATTEMPTS = 10
_KEYVAULT_MAX_TOTAL_TIMEOUT = 300.0


def _keyvault(root: _Table) -> KeyVaultConfig:
    defaults = KeyVaultConfig()
    t = root.get_table("keyvault", None)
    if t is None:
        return defaults
    cfg = KeyVaultConfig(
        max_concurrency=t.get_int("max_concurrency", defaults.max_concurrency, minimum=1),
        rate_per_second=t.get_number("rate_per_second", defaults.rate_per_second),
        burst=t.get_int("burst", defaults.burst, minimum=1),
        max_attempts=t.get_int("max_attempts", defaults.max_attempts, minimum=1),
        total_timeout=t.get_number("total_timeout", defaults.total_timeout),
    )
    t.finish()
    if cfg.max_concurrency > _KEYVAULT_MAX_CONCURRENCY:
        raise ConfigError(
            f"{t._key('max_concurrency')}: must be at most {_KEYVAULT_MAX_CONCURRENCY}, got {cfg.max_concurrency}"
        )
    if cfg.max_attempts > _KEYVAULT_MAX_ATTEMPTS:
        raise ConfigError(f"{t._key('max_attempts')}: must be at most {_KEYVAULT_MAX_ATTEMPTS}, got {cfg.max_attempts}")
    if cfg.total_timeout > _KEYVAULT_MAX_TOTAL_TIMEOUT:
        raise ConfigError(
            f"{t._key('total_timeout')}: must be at most {_KEYVAULT_MAX_TOTAL_TIMEOUT:g} s, got {cfg.total_timeout:g}"
        )
    return cfg


def _recovery(
    root: _Table,
    audit: AuditConfig,
    services: Mapping[str, ServiceConfig],
    identities: Mapping[str, IdentityConfig],
) -> RecoveryConfig:
    t = root.get_table("recovery", None)
    cfg = RecoveryConfig(state_dir=audit.path.parent)
    if t is not None:
        cfg = RecoveryConfig(
            enabled=t.get_bool("enabled", False),
            poll_interval=t.get_number("poll_interval", DEFAULT_RECOVERY_POLL_INTERVAL),
            max_backoff=t.get_number("max_backoff", 60.0),
            state_dir=t.get_path("state_dir", audit.path.parent),
        )
        t.finish()
        if cfg.max_backoff < cfg.poll_interval:
            raise ConfigError(f"{t._key('max_backoff')}: must be at least poll_interval ({cfg.poll_interval:g})")
    for svc in services.values():
        for ident in svc.recovery_identities:
            where = f"services.{svc.name}.recovery_identities"
            if ident not in identities:
                raise ConfigError(f"{where}: no identity named {ident!r} is configured")
            if identities[ident].encryption_key is None:
                raise ConfigError(
                    f"{where}: identity {ident!r} has no encryption_key, so it cannot decrypt a recovery share",
                    hint=f"add [identities.{ident}.encryption_key]",
                )
    return cfg


def parse_config(data: Mapping[str, Any], *, path: Path | None = None) -> AgentConfig:
    """Validate an already-parsed TOML document. ``path`` anchors relative paths (default: the cwd)."""
    base = path.parent if path is not None else Path.cwd()
    root = _Table(data, "", base)

    agent_t = root.get_table("agent", None) or _Table({}, "agent", base)
    agent = AgentSection(
        socket=agent_t.get_path("socket", DEFAULT_SOCKET),
        socket_mode=_socket_mode(agent_t),
        socket_group=agent_t.get_str("socket_group", None),
        max_request_bytes=agent_t.get_int("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES, minimum=1024),
        allowed_uids=agent_t.get_int_list("allowed_uids"),
        allowed_gids=agent_t.get_int_list("allowed_gids"),
        request_timeout=agent_t.get_number("request_timeout", 60.0),
        header_timeout=agent_t.get_number("header_timeout", 10.0),
        body_timeout=agent_t.get_number("body_timeout", 30.0),
        max_created_at_skew=agent_t.get_int("max_created_at_skew", DEFAULT_MAX_CREATED_AT_SKEW, minimum=0),
        max_connections=agent_t.get_int("max_connections", 512, minimum=2),
        max_connections_per_uid=agent_t.get_int("max_connections_per_uid", 64, minimum=1),
        denial_rate_limit=agent_t.get_int("denial_rate_limit", 30, minimum=1),
        denial_rate_window=agent_t.get_number("denial_rate_window", 60.0),
        log_level=agent_t.get_choice("log_level", ("debug", "info", "warning", "error"), "info"),
    )
    agent_t.finish()
    if agent.max_connections < 2 * agent.max_connections_per_uid:
        raise ConfigError(
            f"agent.max_connections: must be at least twice agent.max_connections_per_uid "
            f"({agent.max_connections_per_uid}), got {agent.max_connections}",
            hint="max_connections_per_uid of them are kept for root and the agent's own uid",
        )

    identities: dict[str, IdentityConfig] = {}
    for name, t in root.get_tables("identities").items():
        enc = t.get_table("encryption_key", None)
        identities[name] = IdentityConfig(
            name=name,
            certificate=t.get_path("certificate"),
            signing_key=_key_config(t.get_table("signing_key")),
            encryption_key=_key_config(enc) if enc is not None else None,
        )
        t.finish()

    services = {name: _service(name, t) for name, t in root.get_tables("services").items()}
    audit = _audit(root, agent.socket)
    policy = _policy(root, services)
    keyvault = _keyvault(root)
    recovery = _recovery(root, audit, services, identities)
    for i, rule in enumerate(policy.rules):
        for ident in rule.identities or ():
            if ident not in identities:
                raise ConfigError(f"policy.rules[{i}].identities: no identity named {ident!r} is configured")
    root.finish()
    return AgentConfig(
        path=path,
        agent=agent,
        identities=identities,
        services=services,
        audit=audit,
        policy=policy,
        keyvault=keyvault,
        recovery=recovery,
    )


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a TOML config file."""
    p = Path(path).absolute()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: the configuration is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return parse_config(data, path=p)
