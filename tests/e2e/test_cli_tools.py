"""The CLI's audit and explain tools against a real daemon and its real audit log."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from signing_agent.client import AgentClient
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, write_toml
from tests.support.pki import make_member

pytestmark = pytest.mark.e2e

PROPOSAL = b'{"actions":[{"name":"set_constitution","args":{"constitution":"x"}}]}'


def cli(*args: str, sock: Path | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = cli_env({"SIGNING_AGENT_SOCK": str(sock)} if sock else None)
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args], input=stdin, capture_output=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.fixture
def agent(workdir: Path) -> Iterator[DaemonProcess]:
    key, cert = make_member("m0").write(workdir)
    tables = {
        "agent": {"socket": workdir / "run" / "agent.sock"},
        "audit": {"path": workdir / "audit" / "audit.jsonl", "max_bytes": 4096},
        **file_identity("m0", cert, key),
    }
    config = write_toml(workdir / "agent.toml", tables)
    config.write_text(
        config.read_text()
        + '\n[[policy.rules]]\nname = "no-constitution"\nuids = [0]\nactions_deny = ["set_constitution"]\n'
    )
    with daemon(config) as proc:
        yield proc


def test_explain_shows_the_decision_and_signs_nothing(agent: DaemonProcess, workdir: Path) -> None:
    result = cli("sign", "--explain", "--ccf-gov-msg-type", "proposal", "--content", "-", stdin=PROPOSAL,
                 sock=agent.socket)  # fmt: skip
    assert result.returncode == 1, result.stderr  # the rule denies it
    explanation = json.loads(result.stdout)
    assert explanation["decision"]["allowed"] is False
    assert explanation["decision"]["rule"] == "no-constitution"
    assert explanation["protected_headers"]["ccf.gov.msg.type"] == "proposal"
    assert explanation["proposal_actions"] == ["set_constitution"]
    result = cli("sign", "--explain", "--ccf-gov-msg-type", "state_digest", sock=agent.socket)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["decision"]["allowed"] is True
    events = [json.loads(line)["event"] for line in (workdir / "audit" / "audit.jsonl").read_text().splitlines()]
    assert "signed" not in events


def test_audit_verify_follows_rotation_and_catches_tampering(agent: DaemonProcess, workdir: Path) -> None:
    assert cli("sign", "--ccf-gov-msg-type", "state_digest", "--out", "/dev/null", sock=agent.socket).returncode == 0
    client = AgentClient(agent.socket)
    for _ in range(29):  # enough records to rotate the 4 KiB log several times (the same request, without a process)
        assert client.request("POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"}).status == 200
    files = sorted((workdir / "audit").glob("audit.jsonl*"))
    assert len(files) >= 3
    files.reverse()  # the current file first: verify puts them back in chain order
    result = cli("audit", "verify", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"ok:" in result.stdout

    current = workdir / "audit" / "audit.jsonl"
    lines = current.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["identity"] = "someone-else"
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    current.write_bytes(b"".join(lines))
    result = cli("audit", "verify", "--json", *map(str, files))
    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False
