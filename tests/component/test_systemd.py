"""sd_notify and socket activation against real sockets (in this process; the daemon's use is in e2e)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signing_agent.errors import ConfigError
from signing_agent.systemd import Notifier, inherited_socket, listen_fds


def _receiver(workdir: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(workdir / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    return sock, path


def test_notify_sends_datagrams_to_a_path(workdir: Path) -> None:
    receiver, path = _receiver(workdir)
    with receiver:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready("serving: 2 identities")
        fields = receiver.recv(4096).decode().split("\n")
        assert fields[:2] == ["READY=1", "STATUS=serving: 2 identities"]
        assert f"MAINPID={os.getpid()}" in fields
        assert notifier.stopping()
        assert receiver.recv(4096).startswith(b"STOPPING=1\n")
        assert notifier.reloading()
        assert receiver.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")


def test_notify_supports_the_abstract_namespace() -> None:
    name = f"signing-agent-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert receiver.recv(64) == b"WATCHDOG=1"


def test_without_notify_socket_nothing_is_sent_and_nothing_fails(workdir: Path) -> None:
    assert not Notifier({}).ready("x")
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    # A listed but absent socket is logged, never raised: the agent must not die because systemd went away.
    assert not Notifier({"NOTIFY_SOCKET": str(workdir / "gone.sock")}).ready("x")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "4000000"}, 2.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "nonsense"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval == expected


def test_listen_fds_only_for_this_pid_and_the_variables_are_consumed() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_fds(env) == []
    assert env == {}
    assert listen_fds({}) == []


# Socket activation hands over fd 3, which in a pytest-xdist worker is the worker's own channel to the controller:
# replacing it here, even for a moment, can cut the worker off. The adoption runs in a child process, given the
# socket at fd 3 as systemd gives it; what it adopted (or refused) comes back as JSON.
ADOPT = """
import json, os, sys
from signing_agent.systemd import inherited_socket
given = int(sys.argv[1])
if given != 3:
    os.dup2(given, 3)
    os.close(given)
try:
    sock = inherited_socket({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    assert sock is not None
    print(json.dumps({"fileno": sock.fileno(), "name": sock.getsockname(), "inheritable": os.get_inheritable(3)}))
"""


def adopt_at_fd3(sock: socket.socket) -> dict[str, Any]:
    """What ``inherited_socket`` makes of ``sock`` at fd 3 (LISTEN_FDS=1 for the child's own pid)."""
    result = subprocess.run(
        [sys.executable, "-c", ADOPT, str(sock.fileno())],
        pass_fds=(sock.fileno(),),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    adopted: dict[str, Any] = json.loads(result.stdout)
    return adopted


def test_an_inherited_listening_unix_socket_is_adopted(workdir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(workdir / "a.sock"))
        listener.listen(1)
        adopted = adopt_at_fd3(listener)
    assert adopted == {"fileno": 3, "name": str(workdir / "a.sock"), "inheritable": False}


def test_an_inherited_socket_of_the_wrong_kind_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        refused = adopt_at_fd3(tcp)
    assert refused["error"] == ConfigError.__name__
    assert "AF_UNIX/SOCK_STREAM" in refused["message"]


def test_several_inherited_sockets_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        inherited_socket({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"})
