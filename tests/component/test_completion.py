"""``signing-agent completion bash|zsh|fish``: each script, run by its real shell, completes commands, subcommands,
options and choices from the CLI's own parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from signing_agent.cli import build_parser
from signing_agent.cli_completion import completion_script, walk
from tests.support.agent import cli_env
from tests.support.prereq import require_executable


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("completion")
    out = {}
    for shell in ("bash", "zsh", "fish"):
        result = subprocess.run(
            [sys.executable, "-m", "signing_agent", "completion", shell],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        out[shell] = folder / f"signing-agent.{shell}"
        out[shell].write_text(result.stdout)
    return out


def test_the_table_follows_the_parser() -> None:
    commands = {c.path: c for c in walk(build_parser())}
    assert {"sign", "keys generate", "recovery approve-identity", "audit verify", "completion"} <= set(commands)
    assert commands["sign"].choices["--ccf-gov-msg-type"][:2] == ["proposal", "ballot"]
    assert "--signing-key" not in commands["sign"].options  # hidden flags stay hidden
    assert "--content" in commands["sign"].takes_value
    assert commands["completion"].choices[""] == ["bash", "zsh", "fish"]
    with pytest.raises(ValueError, match="tcsh"):
        completion_script("tcsh", build_parser())


def bash_complete(script: Path, line: str) -> list[str]:
    """What bash offers after ``line`` (words split on spaces; a trailing space starts a new word)."""
    words = line.split(" ")
    program = f"""
source {script}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
_signing_agent
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.split()


def test_bash(scripts: dict[str, Path]) -> None:
    script = scripts["bash"]
    assert "complete -o default -F _signing_agent signing-agent" in script.read_text()
    assert bash_complete(script, "signing-agent si") == ["sign"]
    assert {"propose", "proposals", "recovery", "reload"} <= set(bash_complete(script, "signing-agent "))
    assert {"submit-share", "approve-identity", "status"} <= set(bash_complete(script, "signing-agent recovery "))
    assert bash_complete(script, "signing-agent sign --ccf-gov-msg-type b") == ["ballot"]
    assert "--ccf-gov-msg-proposal_id" in bash_complete(script, "signing-agent sign --ccf")
    assert bash_complete(script, "signing-agent sign --content ") == []  # a value: bash's files
    assert bash_complete(script, "signing-agent -v keys generate --curve P-3") == ["P-384"]
    assert bash_complete(script, "signing-agent completion ")[:3] == ["bash", "zsh", "fish"]


def test_zsh(scripts: dict[str, Path]) -> None:
    zsh = require_executable("zsh")
    script = scripts["zsh"]
    assert script.read_text().startswith("#compdef signing-agent\n")
    assert subprocess.run([zsh, "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    # Drive the completion function as zsh's completion system would: compadd prints what it is offered.
    program = f"""
compdef() {{ :; }}
compadd() {{ print -l -- "${{@[2,-1]}}"; }}
_files() {{ print FILES; }}
source {script}
words=(signing-agent recovery submit-share --identity); CURRENT=4; _signing-agent; print SEP
words=(signing-agent sign --ccf-gov-msg-type ''); CURRENT=4; _signing-agent; print SEP
words=(signing-agent sign --content ''); CURRENT=4; _signing-agent
"""
    result = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, timeout=30, check=True)
    options, choices, value = result.stdout.split("SEP\n")
    assert "--identity" in options.split()
    assert "--wait" in options.split()
    assert choices.split() == ["proposal", "ballot", "withdrawal", "state_digest", "ack", "recovery_share"]
    assert value.split() == ["FILES"]


def test_fish(scripts: dict[str, Path]) -> None:
    fish = require_executable("fish")
    script = scripts["fish"]
    assert subprocess.run([fish, "--no-execute", str(script)], capture_output=True, timeout=30).returncode == 0

    def complete(line: str) -> list[str]:
        program = f"source {script}; complete --do-complete '{line}'"
        result = subprocess.run([fish, "--no-config", "-c", program], capture_output=True, text=True, timeout=30)
        return [entry.split("\t")[0] for entry in result.stdout.splitlines()]

    assert "sign" in complete("signing-agent si")
    assert "reload" in complete("signing-agent re")
    assert set(complete("signing-agent recovery ")) >= {"submit-share", "approve-identity", "status"}
    assert "status" not in complete("signing-agent recovery status ")  # the path is complete: its options next
    assert complete("signing-agent sign --ccf-gov-msg-type b") == ["ballot"]
    assert "--timeout" in complete("signing-agent status --")
