"""Attacks on the security model's promises that went around the guards, against the real daemon and socket.

Each test is an attack a hostile local user (another uid, in a subprocess) or a hostile service could make; it
failed on the code before its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signing_agent.client import AgentClient
from tests.support.agent import DaemonProcess, daemon, file_identity, write_toml
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

pytestmark = pytest.mark.e2e

NOBODY = 65534


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def system_python() -> str:
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        missing("a system python3 that another uid can run")
    return python


def as_uid(uid: int, code: str, *args: str) -> str:
    """Run ``code`` (a Python program) as ``uid`` (gid root, to reach a 0660 socket); its stdout."""
    if os.getuid() != 0:
        missing("switching to another uid needs root")
    result = subprocess.run(
        [system_python(), "-I", "-c", code, *args],
        user=uid,
        group=0,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@contextlib.contextmanager
def shared_agent(workdir: Path, member: Member, **agent: Any) -> Iterator[DaemonProcess]:
    """The daemon on a 0660 socket that nobody (gid root) can reach; no rule admits nobody."""
    if os.getuid() != 0:
        missing("switching to another uid needs root")
    workdir.chmod(0o750)
    run = workdir / "run"
    run.mkdir(mode=0o750)
    key, cert = member.write(workdir / "keys")
    cfg = write_toml(
        workdir / "agent.toml",
        {
            "agent": {"socket": run / "a.sock", "socket_mode": "0660", **agent},
            "audit": {"path": workdir / "audit" / "audit.jsonl"},
            **file_identity("m0", cert, key),
        },
    )
    with daemon(cfg) as proc:
        yield proc


# --- Denials cost the caller, not the disk: malformed HTTP never reaches the denial budget -------------------------

# Sends argv[2] requests whose head aiohttp itself refuses (before any middleware, so before the denial budget), each
# on a new connection, and reads the 400.
MALFORMED_HTTP = r"""
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: -" + b"9" * 150 + b"\r\n\r\n"
answered = 0
for _ in range(n):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(head)
        answered += s.recv(4096).startswith(b"HTTP/1.0 400")
print(answered)
"""


def test_malformed_http_from_an_unadmitted_peer_cannot_flood_the_log(workdir: Path, member: Member) -> None:
    """No rule admits nobody, yet each request head aiohttp refuses was one log line (about 250 bytes): 2,000 of
    them wrote half a megabyte of log in well under a second, never charged to nobody's denial budget."""
    with shared_agent(workdir, member) as proc:
        before = len(proc.stderr)
        answered = as_uid(NOBODY, MALFORMED_HTTP, str(proc.socket), "2000")
        assert int(answered) == 2000  # each got its 400: the agent still answers them
        assert AgentClient(proc.socket, timeout=30).health()["status"] == "ok"
        grown = proc.stderr[before:]
    lines = grown.count("malformed request from a client")
    assert 1 <= lines <= 3, f"{lines} log lines ({len(grown)} bytes) for one peer's malformed requests"
    assert "Traceback" not in grown


# --- Denials cost the caller, not the disk: an error message quoting the caller's value whole ----------------------


def test_an_error_quoting_a_huge_value_is_not_logged_whole(workdir: Path, member: Member) -> None:
    """An admitted peer's malformed request is charged to its budget (30 a minute), but each could carry up to
    agent.max_request_bytes (8 MiB) into one log line: a msg_type, an identity name or a list of unknown fields is
    quoted in full in the error, and the error was logged. 30 a minute of those is 4 MiB of log a second."""
    big = "x" * (1024 * 1024)
    bodies: list[dict[str, Any]] = [
        {"identity": "m0", "msg_type": big},
        {"identity": big, "msg_type": "ack", "payload": {"stateDigest": "00"}},
        {"identity": "m0", "msg_type": "ack", **{f"k{i:06d}{'y' * 20}": 1 for i in range(40_000)}},
    ]
    with shared_agent(workdir, member) as proc:
        client = AgentClient(proc.socket, timeout=60)
        before = len(proc.stderr)
        for body in bodies:
            for route in ("/v1/sign", "/v1/explain"):
                resp = client.request("POST", route, body)
                assert resp.status in (400, 404), resp.body[:300]
        grown = proc.stderr[before:]
    assert grown.count("failed: ") == 6, grown[-2000:]
    assert len(grown) < 64 * 1024, f"{len(grown)} bytes of log for 6 malformed requests"
    for line in grown.splitlines():
        assert len(line) < 4096, line[:300]
        json.loads(line)  # still one JSON line each
