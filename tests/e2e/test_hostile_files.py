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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signing_agent.audit import GENESIS, line_hash
from tests.support.agent import cli_env
from tests.support.fake_agent import FakeAgent, fake_agent

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


# -- content, proposal and ballot files ----------------------------------------------------------------------------

IDENTITIES = {"identities": [{"name": "m0", "member_id": "a1" * 32, "algorithm": "ES384", "backend": "pkcs11",
                              "key": "k"}]}  # fmt: skip
SERVICES = {"services": [{"name": "default", "url": "https://ccf:8000", "api_version": "2024-07-01"}]}


@pytest.fixture
def agent(workdir: Path) -> Iterator[FakeAgent]:
    routes = {"GET /v1/identities": (200, IDENTITIES), "GET /v1/services": (200, SERVICES)}
    with fake_agent(workdir / "agent.sock", routes) as running:
        yield running


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["sign", "--ccf-gov-msg-type", "proposal", "--content", "/dev/zero", "--out", "/dev/null"], "--content"),
        (["sign", "--ccf-gov-msg-type", "proposal", "--content", "-", "--out", "/dev/null"], "--content"),
        (["propose", "/dev/zero"], "FILE"),
        (["vote", "ab" * 32, "--ballot", "/dev/zero"], "--ballot"),
        (["member", "add", "--cert", "/dev/zero"], "--cert"),
        (
            ["sign", "--ccf-gov-msg-type", "proposal", "--signing-cert", "/dev/zero", "--out", "/dev/null"],
            "--signing-cert",
        ),
    ],
)
def test_an_endless_input_file_is_refused_at_the_cap(agent: FakeAgent, argv: list[str], what: str) -> None:
    """``/dev/zero`` (or a runaway pipe on stdin) was read whole: the CLI ran out of memory with a traceback."""
    with open("/dev/zero", "rb") as zero:
        done = run_cli(*argv, env={"SIGNING_AGENT_SOCK": str(agent.socket)}, stdin=zero)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{what}: " in done.stderr
    assert "is larger than 64 MiB" in done.stderr
    assert not [p for p in agent.paths() if p.startswith("POST")]  # nothing was sent to be signed


def test_a_ballot_that_is_not_utf8_is_a_clear_error(agent: FakeAgent, workdir: Path) -> None:
    ballot = workdir / "ballot.js"
    ballot.write_bytes(b"export function vote() { return true }\xff\n")
    done = run_cli("vote", "ab" * 32, "--ballot", str(ballot), env={"SIGNING_AGENT_SOCK": str(agent.socket)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--ballot: cannot read {ballot}: not UTF-8 text" in done.stderr
