"""The listening socket: mode, folder checks, stale sockets replaced, live ones never stolen."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from signing_agent.daemon import bind_unix_socket
from signing_agent.errors import ConfigError


def test_socket_is_0600_and_its_new_folder_0700(workdir: Path) -> None:
    path = workdir / "new" / "agent.sock"
    sock = bind_unix_socket(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        sock.close()


def test_umask_is_restored(workdir: Path) -> None:
    before = os.umask(0o022)
    try:
        bind_unix_socket(workdir / "a.sock").close()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_configured_mode_and_group(workdir: Path) -> None:
    path = workdir / "agent.sock"
    sock = bind_unix_socket(path, 0o660, "root")
    try:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == 0
    finally:
        sock.close()
    with pytest.raises(ConfigError, match="no group named"):
        bind_unix_socket(workdir / "b.sock", 0o660, "no-such-group-xyz")
    assert not (workdir / "b.sock").exists()


def test_world_writable_folder_is_refused(workdir: Path) -> None:
    public = workdir / "public"
    public.mkdir()
    public.chmod(0o1777)
    with pytest.raises(ConfigError, match="world-writable"):
        bind_unix_socket(public / "agent.sock")


def test_stale_socket_is_replaced(workdir: Path) -> None:
    path = workdir / "agent.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # a crashed agent leaves its socket file behind
    assert path.exists()
    bind_unix_socket(path).close()


def test_live_socket_is_never_stolen(workdir: Path) -> None:
    path = workdir / "agent.sock"
    live = bind_unix_socket(path)
    try:
        with pytest.raises(ConfigError, match="already listening"):
            bind_unix_socket(path)
        assert path.exists()
    finally:
        live.close()


def test_a_regular_file_is_not_replaced(workdir: Path) -> None:
    path = workdir / "agent.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_unix_socket(path)
    assert path.read_text() == "precious"
