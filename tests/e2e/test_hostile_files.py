"""Hostile files the CLI reads, through the real command (``python -m signing_agent``): an audit log crafted by an
attacker for ``audit verify``, and content, proposal and ballot files that are devices, FIFOs or huge. Each must end
in a clear one-line answer within bounded memory (the command runs with 1 GiB of address space), never a
traceback or a hang."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signing_agent.audit import GENESIS, line_hash
from tests.support.agent import cli_env

pytestmark = pytest.mark.e2e


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=limit_memory,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
    )


def chain(*records: dict[str, Any]) -> bytes:
    """Audit lines with a valid hash chain from the genesis."""
    out, prev = b"", GENESIS
    for seq, record in enumerate(records):
        line = json.dumps({"seq": seq, "prev": prev, **record}, sort_keys=True).encode()
        out += line + b"\n"
        prev = line_hash(line)
    return out


def deep(depth: int = 200_000) -> bytes:
    return b"[" * depth + b"]" * depth


# -- audit verify --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "later"])
def test_audit_verify_reports_a_deeply_nested_line_as_no_record(workdir: Path, where: str) -> None:
    log = workdir / "audit.jsonl"
    log.write_bytes(deep() + b"\n" if where == "first" else chain({"event": "started"}) + deep() + b"\n")
    done = run_cli("audit", "verify", str(log))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{log}:{1 if where == 'first' else 2}: not a JSON record" in done.stdout


@pytest.mark.parametrize("device", ["/dev/zero", "fifo", "folder"])
def test_audit_verify_refuses_what_is_no_regular_file_at_once(workdir: Path, device: str) -> None:
    """``/dev/zero`` never ends and a FIFO nobody writes never starts: both were read without end or waited on."""
    good = workdir / "audit.jsonl"
    good.write_bytes(chain({"event": "started"}))
    path = workdir / device
    if device == "fifo":
        os.mkfifo(path)
    elif device == "folder":
        path.mkdir()
    else:
        path = Path(device)
    done = run_cli("audit", "verify", str(good), str(path))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{path}: not a regular file" in done.stdout


def test_audit_verify_reads_a_huge_line_no_further_than_the_cap(workdir: Path) -> None:
    log = workdir / "audit.jsonl"
    with log.open("wb") as f:
        f.write(chain({"event": "started"}))
        f.truncate(len(chain({"event": "started"})) + (1 << 31))  # a sparse 2 GiB line, twice the memory it may use
    done = run_cli("audit", "verify", str(log))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{log}:2: a line of more than" in done.stdout


def test_audit_verify_prints_a_records_text_escaped(workdir: Path) -> None:
    log = workdir / "audit.jsonl"
    log.write_bytes(chain({"event": "started"}, {"event": "discontinuity", "reason": "x\x1b]0;owned\x07\rok: 9"}))
    done = run_cli("audit", "verify", str(log))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "\\x1b]0;owned\\x07\\rok: 9" in done.stdout
