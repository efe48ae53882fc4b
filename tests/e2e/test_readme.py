"""The README's Quick start, run as written by bash in an empty folder, and its client library example against the
agent that Quick start leaves running: a fresh machine needs nothing the README does not make."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from signing_agent.audit import verify_audit
from tests.support.agent import cli_env
from tests.support.prereq import require_executable, require_file

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

README = Path(__file__).resolve().parents[2] / "README.md"


def block(after: str, language: str) -> str:
    """The first ``language`` code block after the heading (or text) ``after``."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M).search(text, start)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


def test_the_quick_start_and_the_client_library_example_run_as_written(workdir: Path) -> None:
    for tool in ("bash", "softhsm2-util", "curl", "python3"):
        require_executable(tool)
    require_file("/usr/lib/softhsm/libsofthsm2.so", "SoftHSM2's PKCS#11 module")
    quick_start = block("## Quick start with a SoftHSM2 token", "sh")
    example = block("### The client library", "python")
    (workdir / "client_example.py").write_text(example)
    script = "\n".join(
        [
            "set -euo pipefail",
            # Stop what the Quick start leaves running (the README says: kill %1 %2).
            "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
            quick_start,
            f"{sys.executable} {workdir / 'client_example.py'} > {workdir / 'client_example.out'}",
        ]
    )
    env = cli_env(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            # Not root's /run/signing-agent/ (the default for root): a test must not take the machine's agent socket.
            "SIGNING_AGENT_SOCK": str(workdir / "run" / "agent.sock"),
        }
    )
    result = subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    folder = workdir / "signing-agent-quickstart"
    logs = "".join(
        f"\n--- {name}\n{(folder / name).read_text()}"
        for name in ("agent.log", "sandbox.log")
        if (folder / name).exists()
    )
    assert result.returncode == 0, result.stdout + result.stderr + logs

    for made in ("softhsm2.conf", "token.pin", "member0_cert.pem", "service_cert.pem", "agent.toml", "proposal.json"):
        assert (folder / made).is_file(), made
    assert "[policy" not in (folder / "agent.toml").read_text()
    out = result.stdout
    assert '"proposalState":"Open"' in out.replace(" ", "")  # curl: CCF took ccf_cose_sign1's replacement
    assert "set_recovery_threshold" in out  # proposals lists the actions
    proposed = json.loads((folder / "proposed.json").read_text())
    assert f"ballot submitted by member0: proposal {proposed['proposalId']} is Accepted" in out
    assert "member0" in out.split("IDENTITY")[-1]  # status: a table of identities
    assert verify_audit([folder / "audit.jsonl"]).ok

    printed = (workdir / "client_example.out").read_text().splitlines()
    assert re.fullmatch(r"[0-9a-f]{64} Open", printed[0]), printed
    assert printed[1:] == ["Accepted"]
