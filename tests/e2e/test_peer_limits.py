"""One local peer cannot starve the others: connection caps per uid and in total, against the real daemon.

The attacker is a real process running as another uid (nobody), so the agent sees its SO_PEERCRED; it opens more
connections than the agent has file descriptors for (the usual soft limit of 1,024) and holds them idle.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signing_agent.client import AgentClient, AgentUnreachableError
from tests.support.agent import DaemonProcess, daemon, file_identity, write_toml
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

pytestmark = pytest.mark.e2e

NOBODY = 65534
# Opens argv[2] connections to argv[1] and reports, after a moment, how many the agent closed at once (and what it
# said); then holds the rest idle until stdin closes.
ATTACKER = r"""
import json, socket, sys, time
path, n, patience = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns, failed = [], 0
deadline = time.monotonic() + patience
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    while True:
        try:
            s.connect(path)
            conns.append(s)
            break
        except BlockingIOError:  # the listen backlog is full: the agent is not accepting; keep pushing
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
        except OSError:
            pass
        failed += 1
        s.close()
        break

def report():
    time.sleep(1.0)
    closed, said = 0, ""
    for s in conns:
        s.setblocking(False)
        try:
            data = s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        closed += 1
        said = said or data.decode(errors="replace")
    print(json.dumps({"connected": len(conns), "failed": failed, "closed": closed, "said": said}), flush=True)

report()
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def system_python() -> str:
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        missing("a system python3 that another uid can run")
    return python


@contextlib.contextmanager
def agent_with_limits(
    workdir: Path, member: Member, open_files: tuple[int, int], **agent: Any
) -> Iterator[DaemonProcess]:
    """The daemon on a 0660 socket that nobody (gid root) can reach, with this RLIMIT_NOFILE."""
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
    with daemon(cfg, open_files=open_files) as proc:
        yield proc


@contextlib.contextmanager
def attacker(sock: Path, connections: int, uid: int = NOBODY, patience: float = 15.0) -> Iterator[dict[str, Any]]:
    """A process of ``uid`` holding ``connections`` idle connections while the block runs; yields its report.

    ``patience``: how long it keeps retrying connections the agent's full backlog turns away."""
    proc = subprocess.Popen(
        [system_python(), "-I", "-c", ATTACKER, str(sock), str(connections), str(patience)],
        user=uid,
        group=0,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        yield json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(30)
        proc.stdout.close()


def seconds_until_answered(sock: Path, limit: float = 30.0) -> float:
    """How long root waits for a health answer, retrying while the agent cannot even accept it."""
    started = time.monotonic()
    while True:
        try:
            assert AgentClient(sock, timeout=limit).health()["status"] == "ok"
            return time.monotonic() - started
        except AgentUnreachableError:
            if time.monotonic() - started > limit:
                raise
            time.sleep(0.05)


def test_idle_connections_from_one_uid_cannot_starve_root(workdir: Path, member: Member) -> None:
    """1,100 idle connections from nobody against the usual soft limit of 1,024 descriptors."""
    with agent_with_limits(workdir, member, (1024, 4096)) as proc, attacker(proc.socket, 1100) as report:
        waited = seconds_until_answered(proc.socket)
        assert waited < 2.0, f"root waited {waited:.1f} s behind nobody's idle connections"
        # nobody holds its 64 (agent.max_connections_per_uid); every other one was closed at once, with a reason.
        assert report["connected"] + report["failed"] == 1100
        assert report["connected"] - report["closed"] == 64, report
        assert "TooManyConnections" in report["said"]
        assert "peer uid 65534 has 64 connections open" in report["said"]
        stderr = proc.stderr
    assert "Traceback" not in stderr
    refusals = stderr.count("refused a connection")
    assert 1 <= refusals <= 2, refusals  # once per minute and uid, not once per connection


def test_other_uids_cannot_take_the_share_kept_for_root(workdir: Path, member: Member) -> None:
    """Two attacker uids together try to fill agent.max_connections; the last per-uid share stays root's."""
    limits = {"max_connections": 40, "max_connections_per_uid": 20}
    with (
        agent_with_limits(workdir, member, (1024, 4096), **limits) as proc,
        attacker(proc.socket, 30, NOBODY) as first,
        attacker(proc.socket, 30, NOBODY - 1) as second,
    ):
        held = (first["connected"] - first["closed"]) + (second["connected"] - second["closed"])
        assert held == 20, (first, second)  # 40 in all, minus the 20 kept for root and the agent's uid
        assert "kept for root" in second["said"] + first["said"]
        assert seconds_until_answered(proc.socket) < 2.0


def test_running_out_of_descriptors_is_one_log_line_not_a_traceback_flood(workdir: Path, member: Member) -> None:
    """A file limit below agent.max_connections (misconfigured): accept() fails with EMFILE. The agent says so at
    start-up and once a minute after, instead of a traceback per attempt, and serves again once the peer leaves."""
    limits = {"max_connections": 1000, "max_connections_per_uid": 500, "header_timeout": 30.0}
    with agent_with_limits(workdir, member, (128, 128), **limits) as proc:
        with attacker(proc.socket, 300, patience=2.0) as report:
            assert report["closed"] == 0, report  # under its caps: the agent itself closes none of them
            time.sleep(2.0)  # asyncio retries accept() every second
        assert seconds_until_answered(proc.socket) < 10.0
        stderr = proc.stderr
    assert "open-file limit (128) is below agent.max_connections (1000)" in stderr
    assert "Traceback" not in stderr
    assert 1 <= stderr.count("cannot accept connections: Too many open files") <= 2, stderr[-3000:]
