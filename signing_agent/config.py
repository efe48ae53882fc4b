"""Load and validate the agent's TOML configuration into frozen dataclasses.

Security configuration must not guess: an unknown key is an error that names its dotted path, a wrong type is an
error that says what was expected, and relative paths resolve from the config file's folder. Secrets are never
inline: a PKCS#11 PIN comes from ``pin_file`` (mode 0600 or stricter) or ``pin_env``. ``config.example.toml`` is the
documented source of truth and a unit test loads it, so it cannot rot.

Each default is written once, on its dataclass field: the parser reads an absent key's default from there
(``_Table``) and never states one. Each rule about the configuration's shape is checked once, here; the code that
consumes a config trusts it, and checks only what it alone learns at run time (that a PIN file is the agent's own
and mode 0600, that a module path is in an allowed folder).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, assert_never, get_args

from signing_agent.client_config import ClientSection, default_socket, parse_client_section, resolve_config_path
from signing_agent.errors import ConfigError
from signing_agent.files import NotOursError, read_own_file
from signing_agent.names import AZURE_CREDENTIALS as AZURE_CREDENTIALS
from signing_agent.names import LOG_LEVELS as LOG_LEVELS
from signing_agent.names import MSG_TYPES as MSG_TYPES
from signing_agent.names import AzureCredential as AzureCredential
from signing_agent.names import LogLevel as LogLevel
from signing_agent.names import MsgTypeName as MsgTypeName
from signing_agent.names import is_ccf_id
from signing_agent.pkcs11_uri import PKCS11URI, parse_uri

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_CREATED_AT_SKEW = 300
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024

# The closed sets of names a value may take. Each Literal types its fields (and the code that reads them, so a typo
# is a mypy error), and its values, get_args(), are the choices the parser accepts: each name is written once. Those
# the command line offers too (message types, Azure credentials, log levels) live in signing_agent.names.
ApiVersion = Literal["2023-06-01-preview", "2024-07-01"]
"""The CCF governance API versions the agent speaks."""
SUPPORTED_API_VERSIONS: tuple[ApiVersion, ...] = get_args(ApiVersion)
DEFAULT_API_VERSION: ApiVersion = "2024-07-01"
OaepMode = Literal["token", "host"]
OAEP_MODES: tuple[OaepMode, ...] = get_args(OaepMode)
FileBackend = Literal["file"]
PKCS11Backend = Literal["pkcs11"]
AzureKeyVaultBackend = Literal["azure-keyvault"]
BackendKind = Literal[FileBackend, PKCS11Backend, AzureKeyVaultBackend]
"""The key stores, as ``backend = ...`` names them; each key config class has one as its ``backend``."""
BACKEND_KINDS: tuple[BackendKind, ...] = get_args(BackendKind)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

T = TypeVar("T")
C = TypeVar("C", bound=str)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileKeyConfig:
    """A PEM private key on disk. Development only: the daemon warns."""

    backend: FileBackend = "file"
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class PKCS11KeyConfig:
    """A key in a PKCS#11 token: which module, token and key, and where the PIN comes from.

    The configuration may name the key by fields, by an RFC 7512 ``uri``, or by both: ``parse_config`` merges the
    URI into these fields and checks every rule about them, once (see ``_pkcs11_key``). The backend trusts them, and
    checks only what the host can tell at run time: the module's real path, the PIN file's owner and mode.
    """

    backend: PKCS11Backend = "pkcs11"
    module: Path
    token_label: str | None = None
    token_serial: str | None = None
    token_manufacturer: str | None = None
    token_model: str | None = None
    slot_id: int | None = None
    """The uri's ``serial``, ``manufacturer``, ``model`` and ``slot-id``: each set one must match the token too."""
    key_label: str | None = None
    key_id: bytes | None = None
    """With ``key_label``, or instead of it: at least one of the two is set."""
    pin_file: Path | None = None
    pin_env: str | None = None
    """At most one of ``pin_file`` and ``pin_env`` is set (none: the token needs no login)."""
    init_params: str | None = None
    """Module-specific C_Initialize parameters (NSS softoken: ``configdir='sql:/path' ...``)."""
    oaep: OaepMode = "token"
    """For encryption keys: ``host`` opts in to raw RSA in the token and OAEP decoding on the host."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AzureKeyVaultKeyConfig:
    """A key in Azure Key Vault or Managed HSM."""

    backend: AzureKeyVaultBackend = "azure-keyvault"
    vault_url: str
    key_name: str
    key_version: str | None = None
    credential: AzureCredential = "default"
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

    The backend's ``ThrottleSettings`` and ``AzureKeyVaultSettings`` take their defaults from these.
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
    socket: Path = field(default_factory=default_socket)
    """Default: root's ``/run/signing-agent/agent.sock``, another user's under ``$XDG_RUNTIME_DIR``
    (``client_config.default_socket``)."""
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
    log_level: LogLevel = "info"
    certificate_expiry_warning_days: int = 30
    """Warn (start-up, ``check-config``, health, ``/v1/identities``) when a member certificate expires within this
    many days: its hash is the member id, so a renewal is a governance round. 0: only once it has expired."""
    crypto_workers: int | None = None
    """Processes that sign with file keys and verify every signature off the event loop (0: none, all inline).
    Default: one per core this process may use (CPU affinity, a cgroup CPU quota) beyond the one the event loop keeps
    busy, at most 4. Fixed for the process (a reload keeps it)."""


DEFAULT_AUDIT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_AUDIT_KEEP_ROTATED = 10
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
    msg_types: tuple[MsgTypeName, ...] | None = None
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
    api_version: ApiVersion = DEFAULT_API_VERSION
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
    this agent casts the canonical accepting ballot on such a proposal (``RecoveryMember.approve_identity``)."""
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
    client: ClientSection = field(default_factory=ClientSection)
    """What client commands use by default (``client_config``); the daemon itself does not read it."""


def one_of(value: str, choices: tuple[C, ...]) -> C | None:
    """``value`` as the member of ``choices`` it equals, typed as their ``Literal``; None when it is none of them."""
    for choice in choices:
        if choice == value:
            return choice
    return None


def msg_type_name(value: str) -> MsgTypeName:
    """A governance message type (such as a ``cose.governance.MsgType``) as the policy names it."""
    name = one_of(value, MSG_TYPES)
    if name is None:
        raise ValueError(f"{value!r} is not a governance message type")
    return name


def _schema_defaults(schema: type[DataclassInstance] | None) -> dict[str, object]:
    """The defaults of a dataclass's fields, by name: the one place a configuration default is written."""
    defaults: dict[str, object] = {}
    for f in dataclasses.fields(schema) if schema is not None else ():
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _url_problem(url: str) -> str | None:
    """What is wrong with an ``https://`` URL the agent sends requests to, or None.

    A user name or password in it would go, as HTTP Basic authentication, to whatever answers at that address (the
    agent also reads what an endpoint it does not trust claims to be) and into the agent's messages; a query or a
    fragment would swallow the paths the agent appends; a port must be one."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        return "must not hold a user name or password (they would be sent to any endpoint at that address)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not have a query (?) or a fragment (#): the agent appends its own paths"
    try:
        port = parts.port  # urllib checks the port when it is read
    except ValueError:
        port = 0
    if port == 0:
        return "the port must be a number from 1 to 65535"
    if not parts.hostname:
        return "names no host"
    return None


class _Table:
    """A TOML table being read into the dataclass ``schema``: typed getters, path resolution, and an unknown-key
    check at the end.

    A getter returns the key's value, checked against the type it returns, or, when the key is absent, the default
    of the schema's field of the same name: defaults are written once, on the dataclasses, and the parser never
    restates one. A key whose field has no default is required. ``get_opt_*`` getters return None for an absent key
    without a default; a default the parser computes (say, from another key) is written there as ``or ...``.
    """

    def __init__(
        self, data: Mapping[str, object], path: str, base_dir: Path, schema: type[DataclassInstance] | None = None
    ) -> None:
        self._data = dict(data)
        self._path = path
        self._base = base_dir
        self._schema = schema
        self._defaults = _schema_defaults(schema)
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def reading(self, schema: type[DataclassInstance]) -> _Table:
        """This table, read into ``schema`` (when the table's own keys decide which, as ``backend`` does)."""
        table = _Table(self._data, self._path, self._base, schema)
        table._seen = self._seen
        return table

    # --- the raw value, the default ---------------------------------------------------------------------------

    def _lookup(self, key: str, kinds: tuple[type[T], ...], what: str) -> T | None:
        """The key's value, of one of ``kinds``, or None when the table lacks the key (TOML has no null)."""
        self._seen.add(key)
        if key not in self._data:
            return None
        value = self._data[key]
        # bool is an int in Python; never accept one for the other.
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise ConfigError(f"{self._key(key)}: expected {what}, got {type(value).__name__} {value!r}")
        return value

    def _default(self, key: str, kind: type[T]) -> T:
        """The schema's default for an absent key; without one, the key is required."""
        value = self._opt_default(key, kind)
        if value is None:
            raise ConfigError(f"{self._key(key)}: required key is missing")
        return value

    def _opt_default(self, key: str, kind: type[T]) -> T | None:
        """The schema's default for an absent key, or None when it has none."""
        value = self._defaults.get(key)
        if value is not None and not isinstance(value, kind):  # pragma: no cover -- a getter unfit for its field
            schema = self._schema.__name__ if self._schema is not None else "?"
            raise TypeError(f"{schema}.{key}: the default {value!r} is not a {kind.__name__}")
        return value

    def _text(self, key: str) -> str | None:
        """A non-empty string, or None when absent (no default: the callers convert the text first)."""
        value = self._lookup(key, (str,), "a string")
        if value == "":
            raise ConfigError(f"{self._key(key)}: must not be empty")
        return value

    # --- scalars ----------------------------------------------------------------------------------------------

    def get_opt_str(self, key: str) -> str | None:
        value = self._text(key)
        return value if value is not None else self._opt_default(key, str)

    def get_str(self, key: str) -> str:
        value = self._text(key)
        return value if value is not None else self._default(key, str)

    def get_opt_https_url(self, key: str, *, why: str = "") -> str | None:
        """An ``https://`` URL of a host (and port), and maybe a path; ``why`` ends the error message for any other
        scheme. The message never quotes the value: it may hold a password."""
        value = self.get_opt_str(key)
        if value is None:
            return None
        if not value.startswith("https://"):
            raise ConfigError(f"{self._key(key)}: must be an https:// URL{why}")
        problem = _url_problem(value)
        if problem is not None:
            raise ConfigError(f"{self._key(key)}: {problem}")
        return value

    def get_https_url(self, key: str, *, why: str = "") -> str:
        value = self.get_opt_https_url(key, why=why)
        return value if value is not None else self._default(key, str)

    def get_choice(self, key: str, choices: tuple[C, ...]) -> C:
        """One of ``choices``: a ``Literal``'s values, so the result has that ``Literal`` type."""
        return self._choose(key, self.get_str(key), choices)

    def _choose(self, key: str, value: str, choices: tuple[C, ...]) -> C:
        choice = one_of(value, choices)
        if choice is None:
            raise ConfigError(f"{self._key(key)}: {value!r} is not one of {', '.join(choices)}")
        return choice

    def get_opt_int(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self._lookup(key, (int,), "an integer")
        if value is None:
            return self._opt_default(key, int)
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._key(key)}: must be at least {minimum}, got {value}")
        return value

    def get_int(self, key: str, *, minimum: int | None = None) -> int:
        value = self.get_opt_int(key, minimum=minimum)
        return value if value is not None else self._default(key, int)

    def get_number(self, key: str, *, minimum: float = 0.0) -> float:
        """A number greater than ``minimum``; an integer is taken as a float."""
        value = self._lookup(key, (int, float), "a number")
        if value is None:
            return self._default(key, float)
        if value <= minimum:
            raise ConfigError(f"{self._key(key)}: must be greater than {minimum}, got {value}")
        return float(value)

    def get_bool(self, key: str) -> bool:
        value = self._lookup(key, (bool,), "true or false")
        return value if value is not None else self._default(key, bool)

    def get_opt_path(self, key: str) -> Path | None:
        """A path; a relative one resolves from the config file's folder."""
        value = self._text(key)
        return self._resolve(value) if value is not None else self._opt_default(key, Path)

    def get_path(self, key: str) -> Path:
        value = self.get_opt_path(key)
        return value if value is not None else self._default(key, Path)

    def _resolve(self, text: str) -> Path:
        return Path(resolve_config_path(text, self._base))

    def get_raw_table(self, key: str) -> Mapping[str, object]:
        """A table as TOML has it (empty when absent), for a section another module validates."""
        return self._lookup(key, (dict,), "a table") or {}

    def get_opt_hex(self, key: str) -> bytes | None:
        """Bytes written as hex (``"01a2"``)."""
        value = self._text(key)
        if value is None:
            return self._opt_default(key, bytes)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise ConfigError(f'{self._key(key)}: expected hex, e.g. "01a2"') from None

    def get_mode(self, key: str) -> int:
        """File permission bits: an octal string (``"0660"``) or an integer."""
        value = self._lookup(key, (str, int), 'an octal string such as "0660"')
        if value is None:
            return self._default(key, int)
        if isinstance(value, int):
            return value
        if not (isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value)):
            raise ConfigError(f'{self._key(key)}: expected an octal string such as "0660"')
        return int(value, 8)

    # --- lists ------------------------------------------------------------------------------------------------

    def get_uint_tuple(self, key: str) -> tuple[int, ...]:
        """A list of non-negative integers."""
        value = self._lookup(key, (list,), "a list of integers")
        if value is None:
            return self._default(key, tuple)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of non-negative integers")
        return tuple(value)

    def _texts(self, key: str) -> tuple[str, ...] | None:
        """A list of non-empty strings, or None when absent."""
        value = self._lookup(key, (list,), "a list of strings")
        if value is not None and not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of non-empty strings")
        return tuple(value) if value is not None else None

    def get_opt_str_tuple(self, key: str) -> tuple[str, ...] | None:
        value = self._texts(key)
        return value if value is not None else self._opt_default(key, tuple)

    def get_str_tuple(self, key: str) -> tuple[str, ...]:
        value = self._texts(key)
        return value if value is not None else self._default(key, tuple)

    def get_opt_choice_tuple(self, key: str, choices: tuple[C, ...]) -> tuple[C, ...] | None:
        """A list of ``choices`` (a ``Literal``'s values)."""
        value = self._texts(key)
        if value is None:
            return self._opt_default(key, tuple)
        return tuple(self._choose(key, v, choices) for v in value)

    def get_path_tuple(self, key: str) -> tuple[Path, ...]:
        """A list of paths; relative ones resolve from the config file's folder."""
        value = self._texts(key)
        return tuple(self._resolve(v) for v in value) if value is not None else self._default(key, tuple)

    # --- tables -----------------------------------------------------------------------------------------------

    def get_opt_table(self, key: str, schema: type[DataclassInstance] | None = None) -> _Table | None:
        value = self._lookup(key, (dict,), "a table")
        if value is None:
            return None
        return _Table(value, self._key(key), self._base, schema)

    def get_table(self, key: str, schema: type[DataclassInstance] | None = None) -> _Table:
        """A required table."""
        table = self.get_opt_table(key, schema)
        if table is None:
            raise ConfigError(f"{self._key(key)}: required key is missing")
        return table

    def get_section(self, key: str, schema: type[DataclassInstance]) -> _Table:
        """A table that may be left out: an absent one reads as empty, so every key takes its default."""
        table = self.get_opt_table(key, schema)
        return table if table is not None else _Table({}, self._key(key), self._base, schema)

    def get_tables(self, key: str, schema: type[DataclassInstance]) -> dict[str, _Table]:
        """A table of named tables (``[identities.NAME]``); none when absent."""
        value = self._lookup(key, (dict,), "a table of tables")
        out: dict[str, _Table] = {}
        for name, sub in (value or {}).items():
            if not _NAME_RE.match(name):
                raise ConfigError(f"{self._key(key)}.{name}: names use letters, digits, '_', '.', '-' (max 64)")
            if not isinstance(sub, dict):
                raise ConfigError(f"{self._key(key)}.{name}: expected a table")
            out[name] = _Table(sub, f"{self._key(key)}.{name}", self._base, schema)
        return out

    def get_table_list(self, key: str, schema: type[DataclassInstance]) -> list[_Table]:
        """An array of tables (``[[policy.rules]]``); none when absent."""
        value = self._lookup(key, (list,), f"an array of tables ([[{self._key(key)}]])")
        out: list[_Table] = []
        for i, sub in enumerate(value or ()):
            if not isinstance(sub, dict):
                raise ConfigError(f"{self._key(key)}[{i}]: expected a table")
            out.append(_Table(sub, f"{self._key(key)}[{i}]", self._base, schema))
        return out

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            names = ", ".join(self._key(k) for k in unknown)
            raise ConfigError(
                f"unknown configuration key: {names}", hint="check the spelling against config.example.toml"
            )


def _agent(root: _Table) -> AgentSection:
    t = root.get_section("agent", AgentSection)
    agent = AgentSection(
        socket=t.get_path("socket"),
        socket_mode=_socket_mode(t),
        socket_group=t.get_opt_str("socket_group"),
        max_request_bytes=t.get_int("max_request_bytes", minimum=1024),
        allowed_uids=t.get_uint_tuple("allowed_uids"),
        allowed_gids=t.get_uint_tuple("allowed_gids"),
        request_timeout=t.get_number("request_timeout"),
        header_timeout=t.get_number("header_timeout"),
        body_timeout=t.get_number("body_timeout"),
        max_created_at_skew=t.get_int("max_created_at_skew", minimum=0),
        max_connections=t.get_int("max_connections", minimum=2),
        max_connections_per_uid=t.get_int("max_connections_per_uid", minimum=1),
        denial_rate_limit=t.get_int("denial_rate_limit", minimum=1),
        denial_rate_window=t.get_number("denial_rate_window"),
        log_level=t.get_choice("log_level", LOG_LEVELS),
        certificate_expiry_warning_days=t.get_int("certificate_expiry_warning_days", minimum=0),
        crypto_workers=t.get_opt_int("crypto_workers", minimum=0),
    )
    t.finish()
    if agent.crypto_workers is not None and agent.crypto_workers > 64:
        raise ConfigError(f"agent.crypto_workers: at most 64, got {agent.crypto_workers}")
    if agent.max_connections < 2 * agent.max_connections_per_uid:
        raise ConfigError(
            f"agent.max_connections: must be at least twice agent.max_connections_per_uid "
            f"({agent.max_connections_per_uid}), got {agent.max_connections}",
            hint="max_connections_per_uid of them are kept for root and the agent's own uid",
        )
    return agent


def _socket_mode(t: _Table) -> int:
    mode = t.get_mode("socket_mode")
    if mode & 0o7007 or not mode & 0o600 == 0o600:
        raise ConfigError(
            f"{t._key('socket_mode')}: {oct(mode)} is not allowed: the owner needs rw and 'other' gets nothing"
        )
    return mode


def _key_config(t: _Table) -> KeyConfig:
    backend = t.get_choice("backend", BACKEND_KINDS)
    result: KeyConfig
    match backend:
        case "file":
            result = _file_key(t.reading(FileKeyConfig))
        case "pkcs11":
            result = _pkcs11_key(t.reading(PKCS11KeyConfig))
        case "azure-keyvault":
            result = _azure_key(t.reading(AzureKeyVaultKeyConfig))
        case _:  # pragma: no cover -- exhaustive
            assert_never(backend)
    t.finish()
    return result


def _file_key(t: _Table) -> FileKeyConfig:
    return FileKeyConfig(path=t.get_path("path"))


def _pkcs11_key(t: _Table) -> PKCS11KeyConfig:
    """Merge the optional ``uri`` into the key fields and check the selection.

    A field *complements* the URI (``module`` / ``module-path``, ``token_label`` / ``token``, ``key_label`` /
    ``object``, ``key_id`` / ``id``, ``pin_file`` / ``pin-source``): a value given in both places must agree, or it
    is an error (no silent precedence in security configuration). The URI's ``type``, if any, is ``private``.
    ``init_params`` and ``oaep`` exist only as fields.
    """
    if t.has("pin"):
        raise ConfigError(f"{t._key('pin')}: a PIN is never written inline; use pin_file or pin_env")
    uri = _pkcs11_uri(t)
    module = _agree(t, "module", t.get_opt_path("module"), "module-path", uri.module_path)
    if module is None:
        raise ConfigError(f"{t._key('module')}: required (or module-path in the uri)")
    key_label = _agree(t, "key_label", t.get_opt_str("key_label"), "object", uri.object)
    key_id = _agree(t, "key_id", t.get_opt_hex("key_id"), "id", uri.id)
    if key_label is None and key_id is None:
        raise ConfigError(f"{t._key('key_label')}: name the key by key_label, key_id, or object=/id= in the uri")
    pin_env = t.get_opt_str("pin_env")
    if uri.pin_file is not None and pin_env is not None:
        raise ConfigError(f"{t._key('pin_env')}: the uri has a pin-source too; give one PIN source")
    pin_file = _agree(t, "pin_file", t.get_opt_path("pin_file"), "pin-source", uri.pin_file)
    if pin_file is not None and pin_env is not None:
        raise ConfigError(f"{t._key('pin_file')}: give pin_file or pin_env, not both")
    return PKCS11KeyConfig(
        module=module,
        token_label=_agree(t, "token_label", t.get_opt_str("token_label"), "token", uri.token),
        token_serial=uri.serial,
        token_manufacturer=uri.manufacturer,
        token_model=uri.model,
        slot_id=uri.slot_id,
        key_label=key_label,
        key_id=key_id,
        pin_file=pin_file,
        pin_env=pin_env,
        init_params=t.get_opt_str("init_params"),
        oaep=t.get_choice("oaep", OAEP_MODES),
    )


def _pkcs11_uri(t: _Table) -> PKCS11URI:
    """The key's RFC 7512 ``uri``, parsed (an empty one when there is none)."""
    text = t.get_opt_str("uri")
    if text is None:
        return PKCS11URI()
    try:
        uri = parse_uri(text)
    except ConfigError as exc:
        raise ConfigError(f"{t._key('uri')}: {exc.message}", hint=exc.hint) from None
    if uri.type not in (None, "private"):
        raise ConfigError(f"{t._key('uri')}: type={uri.type} cannot sign or decrypt; use type=private")
    if uri.module_name is not None and uri.module_path is None and not t.has("module"):
        raise ConfigError(f"{t._key('uri')}: module-name is not supported; give module-path or module")
    return uri


def _agree(t: _Table, key: str, value: T | None, uri_attribute: str, uri_value: T | None) -> T | None:
    """A key field and the URI attribute that says the same thing: either may be given; both must then agree."""
    if value is not None and uri_value is not None and value != uri_value:
        raise ConfigError(
            f"{t._key(key)}: disagrees with the uri's {uri_attribute}",
            hint=f"give {key} in one place only, or make both say the same",
        )
    return value if value is not None else uri_value


def _azure_key(t: _Table) -> AzureKeyVaultKeyConfig:
    result = AzureKeyVaultKeyConfig(
        vault_url=t.get_https_url("vault_url").rstrip("/"),
        key_name=t.get_str("key_name"),
        key_version=t.get_opt_str("key_version"),
        credential=t.get_choice("credential", AZURE_CREDENTIALS),
        client_id=t.get_opt_str("client_id"),
        tenant_id=t.get_opt_str("tenant_id"),
        client_secret_env=t.get_opt_str("client_secret_env"),
        client_certificate=t.get_opt_path("client_certificate"),
        ca_bundle=t.get_opt_path("ca_bundle"),
        api_version=t.get_opt_str("api_version"),
    )
    if t.has("client_secret"):
        raise ConfigError(f"{t._key('client_secret')}: secrets are never inline; use client_secret_env")
    return result


def _identity(name: str, t: _Table) -> IdentityConfig:
    enc = t.get_opt_table("encryption_key")
    identity = IdentityConfig(
        name=name,
        certificate=t.get_path("certificate"),
        signing_key=_key_config(t.get_table("signing_key")),
        encryption_key=_key_config(enc) if enc is not None else None,
    )
    t.finish()
    return identity


def _service(name: str, t: _Table) -> ServiceConfig:
    svc = ServiceConfig(
        name=name,
        url=t.get_https_url("url", why=" (CCF only speaks TLS)").rstrip("/"),
        service_certificate=t.get_opt_path("service_certificate"),
        identity_url=t.get_opt_https_url("identity_url"),
        identity_ca_bundle=t.get_opt_path("identity_ca_bundle"),
        api_version=t.get_choice("api_version", SUPPORTED_API_VERSIONS),
        connect_timeout=t.get_number("connect_timeout"),
        request_timeout=t.get_number("request_timeout"),
        read_timeout=t.get_number("read_timeout"),
        total_timeout=t.get_number("total_timeout"),
        max_response_bytes=t.get_int("max_response_bytes", minimum=4096),
        max_attempts=t.get_int("max_attempts", minimum=1),
        backoff_initial=t.get_number("backoff_initial"),
        backoff_max=t.get_number("backoff_max"),
        accepted_service_certificates=t.get_path_tuple("accepted_service_certificates"),
        accept_transition_to=t.get_bool("accept_transition_to"),
        recovery_identities=t.get_str_tuple("recovery_identities"),
    )
    if svc.service_certificate is None and svc.identity_url is None:
        raise ConfigError(
            f"{t._key('service_certificate')}: required (or identity_url for Azure Managed CCF): "
            "the agent only talks to a service whose certificate it pins"
        )
    t.finish()
    return svc


def _audit(root: _Table, socket: Path) -> AuditConfig:
    t = root.get_section("audit", AuditConfig)
    audit = AuditConfig(
        path=t.get_opt_path("path") or socket.parent / "audit.jsonl",
        max_bytes=t.get_int("max_bytes", minimum=4096),
        keep_rotated=t.get_int("keep_rotated", minimum=0),
    )
    t.finish()
    return audit


def _policy_rule(t: _Table, index: int, known_services: Mapping[str, ServiceConfig]) -> PolicyRuleConfig:
    services = t.get_opt_str_tuple("services")
    rule = PolicyRuleConfig(
        name=t.get_opt_str("name") or f"rule{index}",
        uids=t.get_uint_tuple("uids"),
        gids=t.get_uint_tuple("gids"),
        executables=t.get_opt_str_tuple("executables"),
        identities=t.get_opt_str_tuple("identities"),
        msg_types=t.get_opt_choice_tuple("msg_types", MSG_TYPES),
        actions_allow=t.get_opt_str_tuple("actions_allow"),
        actions_deny=t.get_str_tuple("actions_deny"),
        ballots=t.get_opt_str_tuple("ballots"),
        services=services,
        # A rule limited to some services forwards only: a raw signature could be sent anywhere.
        raw_sign=t.get_bool("raw_sign") if t.has("raw_sign") else services is None,
        rate_limit=t.get_opt_int("rate_limit", minimum=1),
        rate_window=t.get_number("rate_window"),
    )
    t.finish()
    if not rule.uids and not rule.gids:
        raise ConfigError(f"{t._key('uids')}: a rule must name the callers it is for (uids and/or gids)")
    for exe in rule.executables or ():
        if not exe.startswith("/"):
            raise ConfigError(f"{t._key('executables')}: {exe!r} is not an absolute path")
    for ballot in rule.ballots or ():
        if ballot not in BALLOT_ALIASES and not is_ccf_id(ballot):
            raise ConfigError(
                f"{t._key('ballots')}: {ballot!r} is neither 'accept', 'reject' nor a lowercase hex SHA-256"
            )
    for svc in rule.services or ():
        if svc not in known_services:
            raise ConfigError(f"{t._key('services')}: no service named {svc!r} is configured")
    return rule


def _policy(root: _Table, known_services: Mapping[str, ServiceConfig]) -> PolicyConfig:
    t = root.get_section("policy", PolicyConfig)
    rules = [
        _policy_rule(rule, i, known_services) for i, rule in enumerate(t.get_table_list("rules", PolicyRuleConfig))
    ]
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{t._key('rules')}: duplicate rule name(s): {', '.join(duplicates)}")
    policy = PolicyConfig(rules=tuple(rules), default_rule=t.get_bool("default_rule"))
    t.finish()
    return policy


# Upper bounds catch unit slips (milliseconds written as seconds) and retry budgets that would hide an outage.
_KEYVAULT_MAX_CONCURRENCY = 256
_KEYVAULT_MAX_ATTEMPTS = 10
_KEYVAULT_MAX_TOTAL_TIMEOUT = 300.0


def _keyvault(root: _Table) -> KeyVaultConfig:
    t = root.get_section("keyvault", KeyVaultConfig)
    cfg = KeyVaultConfig(
        max_concurrency=t.get_int("max_concurrency", minimum=1),
        rate_per_second=t.get_number("rate_per_second"),
        burst=t.get_int("burst", minimum=1),
        max_attempts=t.get_int("max_attempts", minimum=1),
        total_timeout=t.get_number("total_timeout"),
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
    t = root.get_section("recovery", RecoveryConfig)
    cfg = RecoveryConfig(
        enabled=t.get_bool("enabled"),
        poll_interval=t.get_number("poll_interval"),
        max_backoff=t.get_number("max_backoff"),
        state_dir=t.get_opt_path("state_dir") or audit.path.parent,
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


def _client(
    root: _Table, identities: Mapping[str, IdentityConfig], services: Mapping[str, ServiceConfig]
) -> ClientSection:
    """``[client]``, as clients read it (``client_config``), and naming what this config has."""
    client = parse_client_section(root.get_raw_table("client"), root._base)
    if client.identity is not None and client.identity not in identities:
        raise ConfigError(f"client.identity: no identity named {client.identity!r} is configured")
    if client.service is not None and client.service not in services:
        raise ConfigError(f"client.service: no service named {client.service!r} is configured")
    return client


def parse_config(data: Mapping[str, object], *, path: Path | None = None) -> AgentConfig:
    """Validate an already-parsed TOML document. ``path`` anchors relative paths (default: the cwd)."""
    base = path.parent if path is not None else Path.cwd()
    root = _Table(data, "", base, AgentConfig)
    agent = _agent(root)
    identities = {name: _identity(name, t) for name, t in root.get_tables("identities", IdentityConfig).items()}
    services = {name: _service(name, t) for name, t in root.get_tables("services", ServiceConfig).items()}
    audit = _audit(root, agent.socket)
    policy = _policy(root, services)
    keyvault = _keyvault(root)
    recovery = _recovery(root, audit, services, identities)
    client = _client(root, identities, services)
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
        client=client,
    )


def read_trusted_file(path: Path, where: str, decides: str) -> bytes:
    """A file the agent takes its trust from, read if it is the agent's own (``files.read_own_file``), else a
    ``ConfigError`` that names ``where`` (the setting, or nothing for the configuration itself) and the file.

    ``decides``: what whoever may write it decides, for the hint. Another user who may write the configuration grants
    itself every key; one who may write a pinned service certificate re-pins the service, recovery shares included.
    """
    prefix = f"{where}: " if where else ""
    try:
        return read_own_file(path)
    except NotOursError as exc:
        st, why = exc.st, "not a file of the agent's own"
        if exc.problem == "special":
            raise ConfigError(f"{prefix}{path}: not a regular file") from None
        if st is not None and exc.problem == "owner":
            why = f"owned by uid {st.st_uid}, not by the agent's user (uid {os.geteuid()}) or root"
        elif st is not None:
            why = f"mode {st.st_mode & 0o7777:04o} lets group or others write it"
        raise ConfigError(
            f"{prefix}{path}: {why}",
            hint=f"chmod go-w {path} (and chown it to the agent's user or root): whoever may "
            f"write it decides {decides}",
        ) from None
    except OSError as exc:
        what = f"{where}: cannot read {path}" if where else f"{path}: cannot read the configuration"
        raise ConfigError(f"{what}: {exc.strerror}") from exc


def read_trusted_pem(path: Path, where: str, decides: str) -> str:
    """A CA bundle the agent trusts for TLS (``identity_ca_bundle``, a key vault's ``ca_bundle``), read as
    ``read_trusted_file`` does, as ``cadata`` text; a ``ConfigError`` when it holds no PEM certificate. Empty
    ``cadata`` is no error of ``ssl``'s own: ``create_default_context`` takes it for the system roots, and
    ``load_verify_locations`` raises a bare ``ValueError``."""
    pem = read_trusted_file(path, where, decides).decode("ascii", "ignore")  # non-ASCII only in comments
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"{where}: {path} holds no PEM certificate")
    return pem


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a TOML config file, which must be the agent's own (``read_trusted_file``)."""
    p = Path(path).absolute()
    raw = read_trusted_file(p, "", "who may sign what")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: the configuration is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return parse_config(data, path=p)
