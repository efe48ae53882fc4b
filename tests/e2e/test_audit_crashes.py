"""The audit log under crashes and races, through the real daemon: ``kill -9`` in the middle of a rotation, and
``audit verify`` run on the live log while the agent rotates and prunes it under load.

A rotation gives the live file its rotated name (a hard link), then renames a new file over the live name. A daemon
killed between the two leaves one file under two names; the agent drops the second name when it next starts, but an
operator who verifies the log as the crash left it (before a restart, or to decide whether to restart) must not be
told that the chain is broken. Nor must a verification of the live log, run from cron while the agent works: the
agent prunes the oldest rotated files and rotates the live one while ``audit verify`` reads what a shell glob named.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from signing_agent.audit import chain_order, verify_audit
from tests.e2e.test_audit_log import agent_config, cli, records, sign
from tests.e2e.test_crypto_workers import SigningLoad
from tests.support.agent import daemon
from tests.support.pki import Member, make_member

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def audit_files(folder: Path) -> list[Path]:
    """What ``audit verify audit.jsonl*`` is given: the live file and every rotated one (not the hidden lock)."""
    return sorted(folder.glob("audit.jsonl*"))


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def kill_in_a_rotation(pid: int, live: Path, timeout: float = 180.0) -> None:
    """SIGKILL the daemon while the live file has its rotated name too (between the two steps of a rotation).

    Each time the live file is seen with two names, the daemon is stopped (SIGSTOP, every thread at once) and looked
    at again: still two names, it is killed there; the rotation finished meanwhile, it goes on and the test waits
    for the next one. The log rotates every few requests, so this takes a few tries at most."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            links = os.stat(live).st_nlink
        except FileNotFoundError:
            continue
        if links < 2:
            continue
        os.kill(pid, signal.SIGSTOP)
        while process_state(pid) != "T":
            time.sleep(0.001)
        if os.stat(live).st_nlink >= 2:
            os.kill(pid, signal.SIGKILL)
            return
        os.kill(pid, signal.SIGCONT)
    raise AssertionError("the daemon was never caught in the middle of a rotation")


def test_a_kill_in_the_middle_of_a_rotation_leaves_a_log_that_verifies(workdir: Path, member: Member) -> None:
    folder = workdir / "audit"
    live = folder / "audit.jsonl"
    config = agent_config(workdir, member, folder, max_bytes=4096, keep_rotated=1000)
    with daemon(config) as proc, SigningLoad(proc.socket, ["m0"]) as load:
        load.wait_for(20)
        kill_in_a_rotation(proc.proc.pid, live)
        assert proc.proc.wait(60) == -signal.SIGKILL
        answers = load.stop()
    left = audit_files(folder)
    (twin,) = [f for f in left if f != live and f.stat().st_ino == live.stat().st_ino]

    # The log as the crash left it verifies: the second name is read once, and the note says why.
    result = cli("audit", "verify", *map(str, left))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{twin}: the same file as {live}" in result.stdout or f"{live}: the same file as {twin}" in result.stdout
    # Every signature the agent answered is in it.
    signed = {r["cose_sha256"] for f in left for r in records(f) if r["event"] == "signed"}
    answered = [hashlib.sha256(a.body).hexdigest() for _, a in answers if a.status == 200]
    assert answered
    assert set(answered) <= signed

    # A restart drops the second name and continues the chain.
    with daemon(config) as proc:
        assert sign(proc.socket).status == 200
        assert "a second name left by an unfinished rotation" in proc.stderr
    assert live.stat().st_nlink == 1  # (a later rotation in the same second may take the name again: that is fine)
    report = verify_audit(chain_order(audit_files(folder)))
    assert report.ok, report.first_break
    assert not report.notes


def test_audit_verify_of_a_live_log_that_rotates_and_prunes_under_load(workdir: Path, member: Member) -> None:
    """``audit verify audit.jsonl*`` in a loop while 8 clients sign and the log rotates every few requests, keeping
    2 rotated files: between the glob and the reading, the oldest named file is pruned and the live one rotates.
    Each run passes (they all failed: ``cannot read`` a pruned file, or a ``prev`` that did not match)."""
    folder = workdir / "audit"
    config = agent_config(workdir, member, folder, max_bytes=4096, keep_rotated=2)
    runs: list[str] = []
    with daemon(config) as proc, SigningLoad(proc.socket, ["m0"]) as load:
        load.wait_for(20)
        for _ in range(20):
            result = cli("audit", "verify", *map(str, audit_files(folder)))
            assert result.returncode == 0, result.stdout + result.stderr
            runs.append(result.stdout)
        load.stop()
    raced = [out for out in runs if "gone before it was read" in out or "rotated while it was verified" in out]
    assert raced, "no run overlapped a rotation"
