"""Where the agent listens by default, where a client looks for it, and what a client asks for when told nothing:
the ``[client]`` section, the ``SIGNING_AGENT_*`` environment variables and the default socket.

For each setting the first of these wins: the command-line flag, the environment (``$SIGNING_AGENT_SOCK``,
``$SIGNING_AGENT_IDENTITY``, ``$SIGNING_AGENT_SERVICE``), the config's ``[client]`` section, then (the socket only)
the config's ``agent.socket``, then the default. The config is the one ``--config`` or ``$SIGNING_AGENT_CONFIG``
names, else ``$XDG_CONFIG_HOME/signing-agent/config.toml`` (``~/.config/...``) when it exists; a client reads only
its ``[client]`` section and ``agent.socket``. So a member with one agent types neither socket, identity nor
service.

The default socket is root's ``/run/signing-agent/agent.sock`` (systemd's ``RuntimeDirectory``), and another
user's ``$XDG_RUNTIME_DIR/signing-agent/agent.sock``, where ssh-agent and gpg-agent keep theirs. The daemon listens
there when ``agent.socket`` is not set (``config`` takes its default from here), so the two agree; a client that
finds no socket under ``$XDG_RUNTIME_DIR`` tries the system agent's.

A leaf: the standard library and ``errors`` only, paths as strings (``pathlib`` costs a client command 3 ms to
import). Client commands import it, and must start fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from signing_agent.errors import ConfigError
from signing_agent.record import Record

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from pathlib import Path

SOCKET_ENV = "SIGNING_AGENT_SOCK"
CONFIG_ENV = "SIGNING_AGENT_CONFIG"
IDENTITY_ENV = "SIGNING_AGENT_IDENTITY"
SERVICE_ENV = "SIGNING_AGENT_SERVICE"

SYSTEM_SOCKET = "/run/signing-agent/agent.sock"
"""root's default socket, and that of a daemon run by systemd (which sets no ``$XDG_RUNTIME_DIR`` for services)."""
DEFAULT_TIMEOUT = 120.0
"""Seconds a client waits for one answer of the agent, unless told otherwise."""


def default_socket_path(*, uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The socket the agent listens on when ``agent.socket`` is not set: root's under ``/run/signing-agent/``,
    another user's under ``$XDG_RUNTIME_DIR/signing-agent/`` (when that is set, absolute)."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if (os.geteuid() if uid is None else uid) == 0 or not os.path.isabs(runtime):
        return SYSTEM_SOCKET
    return os.path.join(runtime, "signing-agent", "agent.sock")


def default_socket() -> Path:
    """``default_socket_path()`` as the config's ``agent.socket`` default."""
    from pathlib import Path

    return Path(default_socket_path())


def user_config_file(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_CONFIG_HOME/signing-agent/config.toml`` (default ``~/.config/signing-agent/config.toml``)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "signing-agent", "config.toml")


def resolve_config_path(text: str, base_dir: str | os.PathLike[str]) -> str:
    """A path written in a config file: ``~`` expanded, a relative one from the config file's folder."""
    return os.path.join(base_dir, os.path.expanduser(text))  # an absolute one replaces base_dir


class ClientSection(Record):
    """The config's ``[client]`` section: what client commands use when not told."""

    identity: str | None = None
    """The identity to sign or act as (default: the agent's only one)."""
    service: str | None = None
    """The CCF service to talk to (default: the agent's only one, or ``default``)."""
    socket: str | None = None
    """The agent's socket, when clients reach it elsewhere than ``agent.socket`` (a container's mount, say)."""
    timeout: float | None = None
    """Seconds to wait for each answer of the agent (default: 120)."""


def parse_client_section(data: Mapping[str, object], base_dir: str | os.PathLike[str]) -> ClientSection:
    """Validate a ``[client]`` table (as ``tomllib`` read it): unknown keys and wrong types are errors that name the
    key, as everywhere in the config. ``config.parse_config`` checks it this way too."""
    unknown = sorted(set(data) - set(ClientSection._fields))
    if unknown:
        raise ConfigError(
            f"unknown configuration key: {', '.join('client.' + k for k in unknown)}",
            hint="[client] takes identity, service, socket and timeout",
        )

    def text(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"client.{key}: expected a non-empty string, got {type(value).__name__} {value!r}")
        return value

    timeout = data.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigError(f"client.timeout: expected a number of seconds greater than 0, got {timeout!r}")
    socket = text("socket")
    return ClientSection(
        identity=text("identity"),
        service=text("service"),
        socket=resolve_config_path(socket, base_dir) if socket is not None else None,
        timeout=float(timeout) if timeout is not None else None,
    )


class ClientDefaults(Record):
    """What a config file tells a client: its ``[client]`` section and the agent's socket."""

    path: str
    client: ClientSection
    agent_socket: str | None


def read_client_defaults(path: str | os.PathLike[str]) -> ClientDefaults:
    """Read ``[client]`` and ``agent.socket`` from a config file; the rest is the daemon's (``check-config``
    validates it)."""
    import tomllib  # only when a config is named: most client commands need none

    p = os.path.abspath(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: invalid configuration: {exc}") from None
    client, agent = data.get("client", {}), data.get("agent", {})
    if not isinstance(client, dict) or not isinstance(agent, dict):
        raise ConfigError(f"{p}: [client] and [agent] must be tables")
    socket = agent.get("socket")
    if socket is not None and (not isinstance(socket, str) or not socket):
        raise ConfigError(f"{p}: agent.socket: expected a non-empty string")
    return ClientDefaults(
        path=p,
        client=parse_client_section(client, os.path.dirname(p)),
        agent_socket=resolve_config_path(socket, os.path.dirname(p)) if socket else None,
    )


class ClientSettings(Record):
    """Where to reach the agent and what to ask it by default, every source applied."""

    socket: str
    timeout: float
    identity: str | None = None
    service: str | None = None
    config: str | None = None
    """The config file read for these, if any."""


def client_settings(
    *,
    socket: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    identity: str | None = None,
    service: str | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> ClientSettings:
    """Apply the flags given here, then the environment, the config and the defaults (see the module)."""
    env = os.environ if environ is None else environ
    config_path = os.fspath(config) if config else env.get(CONFIG_ENV) or None
    if config_path is None:
        candidate = user_config_file(env)
        config_path = candidate if os.path.isfile(candidate) else None
    defaults = read_client_defaults(config_path) if config_path is not None else None
    section = defaults.client if defaults is not None else ClientSection()
    chosen = os.fspath(socket) if socket else env.get(SOCKET_ENV) or None
    chosen = chosen or section.socket or (defaults.agent_socket if defaults is not None else None)
    if chosen is None:
        chosen = default_socket_path(uid=uid, environ=env)
        if not os.path.exists(chosen) and os.path.exists(SYSTEM_SOCKET):
            chosen = SYSTEM_SOCKET  # no agent of one's own: the system's
    return ClientSettings(
        socket=chosen,
        timeout=timeout if timeout is not None else (section.timeout or DEFAULT_TIMEOUT),
        identity=identity or env.get(IDENTITY_ENV) or section.identity,
        service=service or env.get(SERVICE_ENV) or section.service,
        config=defaults.path if defaults is not None else None,
    )
