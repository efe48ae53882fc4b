"""Every documented exit code through the real CLI (``python -m signing_agent``), against a real daemon and sandbox.

The table is ``signing_agent.cli_exit`` (and ``signing-agent --help``): 0 success, 1 other, 2 usage or configuration,
3 agent unreachable, 4 refused by policy, 5 refused by CCF, 6 timeout. The key store's timeout runs in
tests/e2e/test_keyvault_e2e.py, against the slow Key Vault double.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, short_dir, write_toml
from tests.support.pki import Member, make_member
from tests.support.sandbox_proc import SandboxProcess, sandbox

pytestmark = pytest.mark.e2e

REQUEST_TIMEOUT = 2.0
"""The agent's agent.request_timeout here: short, so a slow CCF outlives it quickly."""
TRUST_NODE = {
    "actions": [{"name": "transition_node_to_trusted", "args": {"node_id": "ab" * 32, "valid_from": "20240101000000Z"}}]
}
CONSTITUTION = {"actions": [{"name": "set_constitution", "args": {"constitution": "x"}}]}


@dataclass
class World:
    folder: Path
    sandbox: SandboxProcess
    agent: DaemonProcess

    def cli(self, *args: str, stdin: bytes | None = None, sock: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "signing_agent", *args],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            env=cli_env({"SIGNING_AGENT_SOCK": str(sock or self.agent.socket)}),
            timeout=60,
            check=False,
        )

    def proposal_file(self, name: str, proposal: dict[str, Any]) -> str:
        path = self.folder / f"{name}.json"
        path.write_text(json.dumps(proposal))
        return str(path)


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "outsider": make_member("outsider")}


@pytest.fixture(scope="module")
def world(members: dict[str, Member]) -> Iterator[World]:
    folder = short_dir("sa-exit-")
    try:
        paths = {name: m.write(folder / "keys") for name, m in members.items()}
        with sandbox(folder / "sandbox", [paths["m0"][1]]) as sb:  # "outsider" is no member of the service
            tables: dict[str, dict[str, Any]] = {
                "agent": {"socket": folder / "run" / "agent.sock", "request_timeout": REQUEST_TIMEOUT},
                "services.default": {"url": sb.url, "service_certificate": sb.service_cert, "max_attempts": 2},
            }
            for name, (key, cert) in paths.items():
                tables.update(file_identity(name, cert, key))
            config = write_toml(folder / "agent.toml", tables)
            # This caller may sign anything but a constitution; the built-in last rule is not reached for it.
            config.write_text(
                config.read_text() + f'\n[[policy.rules]]\nname = "no-constitution"\nuids = [{os.getuid()}]\n'
                'actions_deny = ["set_constitution"]\n'
            )
            with daemon(config) as agent:
                yield World(folder, sb, agent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_success_is_0(world: World) -> None:
    result = world.cli("propose", "--identity", "m0", world.proposal_file("trust", TRUST_NODE))
    assert result.returncode == 0, result.stderr
    assert "Open" in result.stdout


def test_usage_and_configuration_errors_are_2(world: World) -> None:
    # argparse's own usage errors
    assert world.cli("sign", "--no-such-flag").returncode == 2  # the numbers are the contract, not Exit's names
    # a request the agent refuses as naming an unknown identity (404 UnknownIdentity)
    result = world.cli("sign", "--identity", "ghost", "--ccf-gov-msg-type", "state_digest", "--out", "/dev/null")
    assert result.returncode == 2, result.stderr
    assert "signing-agent: UnknownIdentity (404)" in result.stderr
    # ...or as malformed (400 InvalidRequest): a ballot needs a proposal id
    result = world.cli("sign", "--identity", "m0", "--ccf-gov-msg-type", "ballot")
    assert result.returncode == 2, result.stderr
    assert "needs proposal_id" in result.stderr
    # an invalid configuration, for the daemon and for the key tooling alike (keys used to exit 1)
    bad = write_toml(world.folder / "typo.toml", {"agent": {"socket": world.folder / "x.sock", "typo": 1}})
    result = world.cli("serve", "--config", str(bad), "--foreground")
    assert result.returncode == 2, result.stderr
    assert "agent.typo" in result.stderr
    result = world.cli("keys", "list", "--module", str(world.folder / "nothing.so"), "--pin-env", "SA_EXIT_PIN")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("signing-agent: ConfigError: ")
    assert "Traceback" not in result.stderr


def test_an_unreachable_agent_is_3(world: World) -> None:
    result = world.cli("identities", sock=world.folder / "nobody-here.sock")
    assert result.returncode == 3
    assert "no agent is listening" in result.stderr
    # a socket file nobody listens on: connection refused
    stale = world.folder / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    result = world.cli("health", sock=stale)
    assert result.returncode == 3, result.stderr
    assert "Connection refused" in result.stderr


def test_a_policy_refusal_is_4(world: World) -> None:
    result = world.cli("propose", "--identity", "m0", world.proposal_file("constitution", CONSTITUTION))
    assert result.returncode == 4, result.stderr
    assert "signing-agent: PolicyDenied (403)" in result.stderr
    assert "no-constitution" in result.stderr
    # Asked, not refused: --explain answers "no" with 1, as health does when degraded.
    result = world.cli("sign", "--explain", "--identity", "m0", "--ccf-gov-msg-type", "proposal", "--content", "-",
                       stdin=json.dumps(CONSTITUTION).encode())  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["decision"]["allowed"] is False


def test_a_refusal_of_ccf_is_5(world: World) -> None:
    result = world.cli("propose", "--identity", "outsider", world.proposal_file("trust", TRUST_NODE))
    assert result.returncode == 5, result.stderr
    assert "signing-agent: CCF: " in result.stderr
    assert "(401)" in result.stderr
    result = world.cli("vote", "f" * 64, "--identity", "m0", "--accept")
    assert result.returncode == 5, result.stderr
    assert "ProposalNotFound (404)" in result.stderr


def test_a_slow_ccf_is_a_timeout_6_that_names_it(world: World) -> None:
    world.sandbox.fault("delay", r"proposals:create$", method="POST", delay=2 * REQUEST_TIMEOUT, count=1)
    result = world.cli("propose", "--identity", "m0", world.proposal_file("slow", TRUST_NODE))
    assert result.returncode == 6, result.stderr
    assert "signing-agent: AgentTimeout (504)" in result.stderr
    assert f"longer than agent.request_timeout ({REQUEST_TIMEOUT:g} s)" in result.stderr
    assert "waiting for CCF service 'default': POST /gov/members/proposals:create" in result.stderr
    assert "key store" not in result.stderr


def test_an_agent_that_does_not_answer_within_the_clients_timeout_is_6(world: World) -> None:
    silent = world.folder / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(silent))
        server.listen()
        held: list[socket.socket] = []
        accepter = threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True)
        accepter.start()
        result = world.cli("health", "--timeout", "0.5", sock=silent)
        accepter.join(5)
        for conn in held:
            conn.close()
    assert result.returncode == 6, result.stderr
    assert "did not answer within 0.5 s" in result.stderr


def test_help_documents_the_exit_codes(world: World) -> None:
    result = world.cli("--help")
    assert result.returncode == 0
    assert "exit codes (the same for every command):" in result.stdout
    for code in (0, 1, 2, 3, 4, 5, 6, 130):
        assert f"\n  {code:<4} " in result.stdout
