"""The socket's folder must be the agent's own: checked by the real daemon at start-up, before it listens.

Whoever can write to the folder (or re-point a symlink) can swap the socket for their own and receive the requests
(and the governance the callers meant to sign). Each unsafe folder stops ``serve`` with a message naming the problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import daemon, file_identity, write_toml
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

pytestmark = pytest.mark.e2e

NOBODY = 65534


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def config(workdir: Path, member: Member, sock: Path, **agent: Any) -> Path:
    key, cert = member.write(workdir / "keys")
    return write_toml(
        workdir / "agent.toml",
        {
            "agent": {"socket": sock, **agent},
            "audit": {"path": workdir / "audit" / "audit.jsonl"},  # not in the folder under test
            **file_identity("m0", cert, key),
        },
    )


def owned_by_nobody(folder: Path) -> None:
    if os.getuid() != 0:
        missing("giving a folder to another uid needs root")
    os.chown(folder, NOBODY, -1)


def symlinked(folder: Path) -> None:
    real = folder.with_name("real")
    real.mkdir(mode=0o700)
    folder.rmdir()
    folder.symlink_to(real)


@pytest.mark.parametrize(
    ("spoil", "agent", "message"),
    [
        (owned_by_nobody, {}, "is owned by uid 65534, not by the agent"),
        (lambda f: f.chmod(0o770), {}, "is group-writable (mode 0770)"),
        # socket_group needs group search on the folder, never group write.
        (lambda f: f.chmod(0o770), {"socket_mode": "0660", "socket_group": "root"}, "is group-writable"),
        (lambda f: f.chmod(0o757), {}, "is world-writable"),
        (lambda f: f.chmod(0o1777), {}, "is world-writable"),
        (symlinked, {}, "is a symlink"),
        (lambda f: (f / "agent.sock").symlink_to(f.with_name("elsewhere.sock")), {}, "agent.sock is a symlink"),
    ],
)
def test_an_unsafe_socket_folder_stops_the_daemon_at_start_up(
    workdir: Path, member: Member, spoil: Callable[[Path], object], agent: dict[str, Any], message: str
) -> None:
    folder = workdir / "run"
    folder.mkdir(mode=0o700)
    spoil(folder)
    with (
        pytest.raises(RuntimeError, match="did not start") as info,
        daemon(config(workdir, member, folder / "agent.sock", **agent)),
    ):
        pass
    stderr = str(info.value)
    assert message in stderr, stderr
    assert "agent.socket" in stderr
    assert "Traceback" not in stderr
    assert not (folder / "agent.sock").exists() or (folder / "agent.sock").is_symlink()


def test_a_group_socket_in_a_folder_with_group_search_starts(workdir: Path, member: Member) -> None:
    folder = workdir / "run"
    folder.mkdir(mode=0o750)
    cfg = config(workdir, member, folder / "agent.sock", socket_mode="0660", socket_group="root")
    with daemon(cfg) as proc:
        assert proc.socket.is_socket()
        assert oct(proc.socket.stat().st_mode & 0o777) == "0o660"


def test_a_socket_folder_the_agent_creates_in_a_shared_volume_starts(workdir: Path, member: Member) -> None:
    """The Kubernetes sidecar's shape: an emptyDir's root is world-writable (0777), so the socket goes in a folder the
    agent creates inside it, which is the agent's own (0700)."""
    volume = workdir / "volume"
    volume.mkdir()
    volume.chmod(0o777)
    sock = volume / "sock" / "agent.sock"
    with daemon(config(workdir, member, sock)) as proc:
        assert proc.socket == sock
        assert sock.is_socket()
        assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
