"""The audit log under attack and under stress, through the real daemon and its socket: bounded denials, bounded
rotation, a second ``serve``, planted and symlinked files, a full or vanished disk, a file emptied behind the agent's
back, and ``audit verify`` on a log whose head was cut."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from signing_agent.audit import actions_digest, chain_order, verify_audit
from signing_agent.client import AgentClient, Response
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, write_toml
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def agent_config(workdir: Path, member: Member, audit_folder: Path, *, rules: str = "", **audit: Any) -> Path:
    key, cert = member.write(workdir / "keys")
    tables: dict[str, Any] = {
        "agent": {"socket": workdir / "run" / "agent.sock"},
        "audit": {"path": audit_folder / "audit.jsonl", **audit},
        **file_identity("m0", cert, key),
    }
    config = write_toml(workdir / "agent.toml", tables)
    if rules:
        config.write_text(config.read_text() + rules)
    return config


def sign(sock: Path, msg_type: str = "state_digest", payload: bytes = b"") -> Response:
    body = {"identity": "m0", "msg_type": msg_type, "payload_base64": base64.b64encode(payload).decode()}
    return AgentClient(sock, timeout=60).request("POST", "/v1/sign", body)


def health(sock: Path) -> dict[str, Any]:
    report: dict[str, Any] = dict(AgentClient(sock, timeout=30).health().raw)
    return report


def cli(*args: str, sock: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        capture_output=True,
        text=True,
        env=cli_env({"SIGNING_AGENT_SOCK": str(sock)} if sock else None),
        timeout=60,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sighup(proc: DaemonProcess, line: str) -> None:
    """SIGHUP and wait for ``line`` to appear once more in the daemon's log."""
    before = proc.stderr.count(line)
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.stderr.count(line) > before, f"{line!r} in the daemon's log")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# -- item 7: denials cost the caller, not the disk -------------------------------------------------------------------


def test_denied_megabyte_proposals_leave_kilobytes_in_the_audit_log(workdir: Path, member: Member) -> None:
    """5 denied proposals of 2.5 MB of action names each: the log grows by kilobytes (it was 16.5 MB), and each
    record still carries the count and digest of the whole list, to match the proposal with."""
    rules = '\n[[policy.rules]]\nname = "trust-only"\nuids = [0]\nactions_allow = ["transition_node_to_trusted"]\n'
    config = agent_config(workdir, member, workdir / "audit", rules=rules)
    names = [f"{i:04d}_" + "x" * 2500 for i in range(1000)]
    proposal = json.dumps({"actions": [{"name": n, "args": {}} for n in names]}).encode()
    assert len(proposal) > 2_500_000
    log = workdir / "audit" / "audit.jsonl"
    with daemon(config) as proc:
        before = log.stat().st_size
        for _ in range(5):
            resp = sign(proc.socket, "proposal", proposal)
            assert resp.status == 403, resp.body[:300]
        grown = log.stat().st_size - before
    assert grown < 100_000, f"5 denials added {grown} bytes to the audit log"
    denied = [r for r in records(log) if r["event"] == "denied"]
    assert denied
    assert denied[0]["proposal_actions_count"] == 1000
    assert denied[0]["proposal_actions_sha256"] == actions_digest(names)
    assert len(denied[0]["proposal_actions"]) == 32
    assert len(denied[0]["reason"]) < 1000
    assert verify_audit([log]).ok


# -- item 7: rotation keeps a bounded number of files ---------------------------------------------------------------


def test_rotation_keeps_keep_rotated_files_and_the_kept_chain_verifies(workdir: Path, member: Member) -> None:
    config = agent_config(workdir, member, workdir / "audit", max_bytes=4096, keep_rotated=2)
    with daemon(config) as proc:
        for _ in range(40):  # about 8 rotations of a 4 KiB log
            assert sign(proc.socket).status == 200
    folder = workdir / "audit"
    files = chain_order([*folder.glob("audit.jsonl.*"), folder / "audit.jsonl"])
    assert len(files) == 3, [f.name for f in files]  # two rotated files and the live one
    result = cli("audit", "verify", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the kept chain begins here" in result.stdout
    assert "audit.keep_rotated" in result.stdout


# -- item 12: a second serve touches nothing ------------------------------------------------------------------------


def test_a_second_serve_on_the_same_audit_log_exits_and_writes_nothing(workdir: Path, member: Member) -> None:
    config = agent_config(workdir, member, workdir / "audit")
    log = workdir / "audit" / "audit.jsonl"
    with daemon(config) as first:
        before = log.read_bytes()
        # The same config by mistake, and one with its own socket (nothing else would have stopped it).
        other = workdir / "other.toml"
        other.write_text(config.read_text().replace(str(workdir / "run"), str(workdir / "run2")))
        for attempt, path in enumerate((config, other, config)):
            if attempt == 2:  # the lock is held for the process lifetime, across reloads
                sighup(first, "configuration reloaded")
                before = log.read_bytes()
            second = cli("serve", "--config", str(path))
            assert second.returncode != 0
            assert f"pid {first.proc.pid} holds the lock {workdir / 'audit' / '.audit.jsonl.lock'}" in second.stderr
            assert "in use by another signing-agent" in second.stderr
            assert log.read_bytes() == before
        assert not (workdir / "run2" / "agent.sock").exists()
        assert sign(first.socket).status == 200
    assert verify_audit([log]).ok


# -- item 6: the audit log and its folder are really the agent's ----------------------------------------------------


def test_a_symlinked_audit_log_is_refused_at_start_up_and_its_target_untouched(workdir: Path, member: Member) -> None:
    folder = workdir / "audit"
    folder.mkdir(mode=0o700)
    target = workdir / "victim"  # empty: an agent that follows the link appends its records to it
    target.write_bytes(b"")
    target.chmod(0o644)
    (folder / "audit.jsonl").symlink_to(target)
    config = agent_config(workdir, member, folder)
    with pytest.raises(RuntimeError, match=r"audit.jsonl is a symlink; refusing to follow it"), daemon(config):
        pass
    assert target.read_bytes() == b""
    assert target.stat().st_mode & 0o777 == 0o644
    assert not (workdir / "run" / "agent.sock").exists()


def test_an_audit_log_planted_by_another_user_is_refused(workdir: Path, member: Member) -> None:
    if os.geteuid() != 0:
        missing("planting a file owned by another uid needs root")
    folder = workdir / "audit"
    folder.mkdir(mode=0o700)
    planted = folder / "audit.jsonl"
    planted.write_bytes(b"")
    planted.chmod(0o644)
    os.chown(planted, 65534, 65534)
    config = agent_config(workdir, member, folder)
    with pytest.raises(RuntimeError, match=r"owned by uid 65534, not by the agent's user"), daemon(config):
        pass
    assert planted.read_bytes() == b""
    assert planted.stat().st_mode & 0o777 == 0o644  # no fchmod on a file that is not ours
    folder.chmod(0o770)
    planted.unlink()
    with pytest.raises(RuntimeError, match=r"group- or world-writable"), daemon(config):
        pass


# -- item 9: health tells the truth; SIGHUP reopens in every failing state ------------------------------------------


@pytest.fixture
def tiny_fs(workdir: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs with 32 inodes, private to the test."""
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root")
    folder = workdir / "tiny"
    folder.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,nr_inodes=32,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_space(folder: Path) -> None:
    with contextlib.suppress(OSError), (folder / "filler").open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)


def fill_inodes(folder: Path) -> None:
    for i in range(1000):
        try:
            (folder / f"inode-{i}").touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return
    raise AssertionError("the tmpfs has more inodes than expected")


def unfill(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name == "filler" or path.name.startswith("inode-"):
            path.unlink()


def audit_check(sock: Path) -> dict[str, Any]:
    report = health(sock)
    return {"health": report["status"], **report["audit"]}


def test_a_full_disk_makes_health_degraded_and_signing_fail_closed_until_sighup(
    workdir: Path, member: Member, tiny_fs: Path
) -> None:
    log = tiny_fs / "audit.jsonl"
    config = agent_config(workdir, member, tiny_fs)
    with daemon(config) as proc:
        assert audit_check(proc.socket)["health"] == "ok"
        fill_space(tiny_fs)
        check = audit_check(proc.socket)
        assert (check["health"], check["status"]) == ("degraded", "unavailable"), check
        assert str(log) in check["error"]
        # Appends may still fit in the file's last page; within a few requests one does not.
        answers = []
        for _ in range(30):
            answers.append(sign(proc.socket))
            if answers[-1].status != 200:
                break
        assert answers[-1].status == 503, [a.status for a in answers]
        assert answers[-1].json()["error"]["code"] == "AuditUnavailable"
        check = audit_check(proc.socket)
        assert (check["health"], check["status"]) == ("degraded", "unavailable")
        assert "No space left on device" in check["error"] or "short write" in check["error"], check
        result = cli("health", sock=proc.socket)
        assert result.returncode == 1
        assert "audit log: " in result.stdout
        unfill(tiny_fs)
        sighup(proc, "reopened")
        wait_for(lambda: audit_check(proc.socket)["health"] == "ok", "health to recover")
        assert sign(proc.socket).status == 200
    report = verify_audit([log])
    assert report.ok, report.first_break
    assert not report.notes  # the same file, continued: nothing was lost


def test_a_failing_rotation_keeps_the_log_whole_and_is_reported(workdir: Path, member: Member, tiny_fs: Path) -> None:
    """No inode left for the new file: rotation fails, the live file stays complete at its path, health says so."""
    log = tiny_fs / "audit.jsonl"
    config = agent_config(workdir, member, tiny_fs, max_bytes=4096)
    with daemon(config) as proc:
        fill_inodes(tiny_fs)
        statuses = [sign(proc.socket).status for _ in range(12)]  # 4 KiB holds fewer than 12 requests' records
        assert 503 in statuses, statuses
        check = audit_check(proc.socket)
        assert (check["health"], check["status"]) == ("degraded", "unavailable")
        assert "cannot rotate the audit log" in check["error"], check
        assert verify_audit([log]).ok
        unfill(tiny_fs)
        sighup(proc, "reopened")
        wait_for(lambda: audit_check(proc.socket)["health"] == "ok", "health to recover")
        assert sign(proc.socket).status == 200
    files = chain_order([*tiny_fs.glob("audit.jsonl.*"), log])
    assert len(files) >= 2
    assert verify_audit(files).ok


def test_a_removed_audit_folder_stops_signing_and_sighup_starts_a_new_file(workdir: Path, member: Member) -> None:
    folder = workdir / "audit"
    config = agent_config(workdir, member, folder)
    with daemon(config) as proc:
        assert sign(proc.socket).status == 200
        last = records(folder / "audit.jsonl")[-1]
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        check = audit_check(proc.socket)
        assert (check["health"], check["status"]) == ("degraded", "unavailable")
        assert "removed" in check["error"]
        assert str(folder / "audit.jsonl") in check["error"]
        resp = sign(proc.socket)
        assert resp.status == 503
        assert resp.json()["error"]["code"] == "AuditUnavailable"
        sighup(proc, "started a new file")
        assert audit_check(proc.socket)["health"] == "ok"
        assert sign(proc.socket).status == 200
    head = records(folder / "audit.jsonl")[0]
    assert head["event"] == "discontinuity"
    assert head["prev"] != "0" * 64
    assert head["seq"] == last["seq"] + 1
    report = verify_audit([folder / "audit.jsonl"])
    assert report.ok, report.first_break
    assert "DISCONTINUITY" in report.notes[0]


# -- item 10: a cut head, in the file or while the agent runs -------------------------------------------------------


def test_an_audit_log_emptied_while_the_agent_runs_is_an_audit_failure(workdir: Path, member: Member) -> None:
    folder = workdir / "audit"
    log = folder / "audit.jsonl"
    config = agent_config(workdir, member, folder)
    with daemon(config) as proc:
        for _ in range(3):
            assert sign(proc.socket).status == 200
        os.truncate(log, 0)
        resp = sign(proc.socket)
        assert resp.status == 503, resp.body
        assert resp.json()["error"]["code"] == "AuditUnavailable"
        assert log.read_bytes() == b""  # nothing continued the chain in the emptied file
        assert "the live file was cut to 0 bytes" in proc.stderr
        check = audit_check(proc.socket)
        assert (check["health"], check["status"]) == ("degraded", "unavailable")
        assert "cut to 0 bytes" in check["error"]
        sighup(proc, "started a new file")
        assert sign(proc.socket).status == 200
    (found,) = folder.glob("audit.found-*.jsonl")
    assert found.read_bytes() == b""
    assert records(log)[0]["event"] == "discontinuity"
    assert records(log)[0]["found_file"] == found.name
    result = cli("audit", "verify", str(log))
    assert result.returncode == 0, result.stdout
    assert "DISCONTINUITY" in result.stdout


def test_audit_verify_fails_a_log_whose_first_lines_were_deleted(workdir: Path, member: Member) -> None:
    log = workdir / "audit" / "audit.jsonl"
    with daemon(agent_config(workdir, member, workdir / "audit")) as proc:
        for _ in range(3):
            assert sign(proc.socket).status == 200
    assert cli("audit", "verify", str(log)).returncode == 0
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[2:]))
    result = cli("audit", "verify", str(log))
    assert result.returncode == 1
    assert "its first lines were cut" in result.stdout
