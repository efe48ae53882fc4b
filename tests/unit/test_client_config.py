"""Where a client finds its agent and its defaults: flags, then the environment, then [client], then the default."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from signing_agent import client_config
from signing_agent.client_config import (
    SYSTEM_SOCKET,
    ClientSection,
    client_settings,
    default_socket_path,
    parse_client_section,
    read_client_defaults,
    user_config_file,
)
from signing_agent.config import parse_config
from signing_agent.errors import ConfigError


def test_root_listens_under_run_and_another_user_under_xdg_runtime_dir() -> None:
    xdg = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(uid=0, environ=xdg) == "/run/signing-agent/agent.sock"
    assert default_socket_path(uid=1000, environ=xdg) == "/run/user/1000/signing-agent/agent.sock"
    # as ssh-agent does without it: no (absolute) runtime dir, the system's
    assert default_socket_path(uid=1000, environ={}) == SYSTEM_SOCKET
    assert default_socket_path(uid=1000, environ={"XDG_RUNTIME_DIR": "relative"}) == SYSTEM_SOCKET


def test_the_daemon_listens_where_clients_look(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(client_config, "SYSTEM_SOCKET", str(tmp_path / "no-system-agent.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    config = parse_config({"identities": {}}, path=tmp_path / "agent.toml")
    assert config.agent.socket == tmp_path / "signing-agent" / "agent.sock"
    assert client_settings(environ={"XDG_RUNTIME_DIR": str(tmp_path)}).socket == str(config.agent.socket)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert parse_config({}, path=tmp_path / "agent.toml").agent.socket == tmp_path / "no-system-agent.sock"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_then_environment_then_client_section_then_agent_socket(tmp_path: Path) -> None:
    config = write(
        tmp_path / "agent.toml",
        '[agent]\nsocket = "run/agent.sock"\n[client]\nidentity = "m1"\nservice = "prod"\ntimeout = 5\n',
    )
    # the config alone
    settings = client_settings(config=config, environ={})
    assert settings.socket == str(tmp_path / "run" / "agent.sock")  # agent.socket, from the config's folder
    assert (settings.identity, settings.service, settings.timeout) == ("m1", "prod", 5.0)
    assert settings.config == str(config)
    # the environment beats the config
    env = {"SIGNING_AGENT_SOCK": "/e.sock", "SIGNING_AGENT_IDENTITY": "m2", "SIGNING_AGENT_SERVICE": "test"}
    settings = client_settings(config=config, environ=env)
    assert (settings.socket, settings.identity, settings.service) == ("/e.sock", "m2", "test")
    # flags beat both
    settings = client_settings(socket="/f.sock", config=config, identity="m3", service="dev", timeout=1.5, environ=env)
    assert (settings.socket, settings.identity, settings.service, settings.timeout) == ("/f.sock", "m3", "dev", 1.5)
    # [client] socket beats agent.socket: clients may reach the agent elsewhere (a container's mount)
    write(config, '[agent]\nsocket = "/in/agent.sock"\n[client]\nsocket = "~/mounted.sock"\n')
    assert client_settings(config=config, environ={}).socket == str(Path.home() / "mounted.sock")


def test_the_config_comes_from_the_environment_or_the_users_own_file(tmp_path: Path) -> None:
    named = write(tmp_path / "named.toml", '[client]\nidentity = "from-env"\n')
    assert client_settings(environ={"SIGNING_AGENT_CONFIG": str(named)}).identity == "from-env"
    home = tmp_path / "xdg"
    env = {"XDG_CONFIG_HOME": str(home)}
    assert user_config_file(env) == str(home / "signing-agent" / "config.toml")
    assert client_settings(environ=env).config is None  # none there: nothing read
    (home / "signing-agent").mkdir(parents=True)
    write(home / "signing-agent" / "config.toml", '[client]\nservice = "mine"\n')
    assert client_settings(environ=env).service == "mine"
    assert user_config_file({"HOME": "/home/m"}) == "/home/m/.config/signing-agent/config.toml"


def test_no_socket_of_ones_own_falls_back_to_the_systems(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    system = tmp_path / "system.sock"
    monkeypatch.setattr(client_config, "SYSTEM_SOCKET", str(system))
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "runtime")}
    assert client_settings(environ=env, uid=1000).socket == str(tmp_path / "runtime" / "signing-agent" / "agent.sock")
    system.touch()  # a system agent is there, and none of one's own
    assert client_settings(environ=env, uid=1000).socket == str(system)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"idenity": "m0"}, "unknown configuration key: client.idenity"),
        ({"identity": 1}, "client.identity: expected a non-empty string"),
        ({"service": ""}, "client.service: expected a non-empty string"),
        ({"timeout": 0}, "client.timeout: expected a number of seconds greater than 0"),
        ({"timeout": True}, "client.timeout: "),
    ],
)
def test_a_bad_client_section_is_an_error_that_names_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_client_section(section, "/etc")


def test_the_daemons_config_takes_client_and_checks_what_it_names(tmp_path: Path) -> None:
    data = tomllib.loads('[client]\nidentity = "m0"\n[identities]\n')
    with pytest.raises(ConfigError, match=r"client\.identity: no identity named 'm0'"):
        parse_config(data, path=tmp_path / "agent.toml")
    data = tomllib.loads('[client]\nservice = "prod"\n')
    with pytest.raises(ConfigError, match=r"client\.service: no service named 'prod'"):
        parse_config(data, path=tmp_path / "agent.toml")
    config = parse_config(tomllib.loads('[client]\ntimeout = 30\nsocket = "s.sock"\n'), path=tmp_path / "a.toml")
    assert config.client == ClientSection(timeout=30.0, socket=str(tmp_path / "s.sock"))


def test_an_unreadable_or_invalid_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        read_client_defaults(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid configuration"):
        read_client_defaults(write(tmp_path / "bad.toml", "[client\n"))
    with pytest.raises(ConfigError, match=r"agent\.socket: expected a non-empty string"):
        read_client_defaults(write(tmp_path / "bad.toml", "[agent]\nsocket = 3\n"))
