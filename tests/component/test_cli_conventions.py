"""The CLI's conventions through the real command (``python -m signing_agent``) against a scripted agent on a real
Unix socket: what it imports, asks and prints, and how it waits. The real agent's side is in tests/e2e."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import cli_env
from tests.support.fake_agent import FakeAgent, Seen, fake_agent

M0, M1 = "a1" * 32, "b2" * 32
P1, P2, P3 = "ab12" + "0" * 60, "ab12" + "1" * 60, "cd34" + "0" * 60
IDENTITIES = {
    "identities": [
        {"name": "m0", "member_id": M0, "algorithm": "ES384", "backend": "pkcs11", "key": "token members/m0"},
        {"name": "m1", "member_id": M1, "algorithm": "ES256", "backend": "file", "key": "/k.pem", "warnings": ["w"]},
    ]
}
SERVICES = {"services": [{"name": "default", "url": "https://ccf:8000", "api_version": "2024-07-01"}]}
PROPOSALS = {
    "value": [
        {"proposalId": p, "proposalState": "Open", "ballotCount": 0, "proposerId": M0, "actions": [{"name": a}]}
        for p, a in ((P1, "set_member"), (P2, "set_constitution"), (P3, "transition_node_to_trusted"))
    ]
}


@pytest.fixture
def agent(workdir: Path) -> Iterator[FakeAgent]:
    routes = {
        "GET /v1/identities": (200, IDENTITIES),
        "GET /v1/services": (200, SERVICES),
        "POST /v1/sign": (200, b"\xd2\x84cose"),
    }
    with fake_agent(workdir / "agent.sock", routes) as running:
        yield running


def run(
    agent: FakeAgent | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    extra = {"SIGNING_AGENT_SOCK": str(agent.socket)} if agent is not None else {}
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        env=cli_env({**extra, **(env or {})}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


# -- fast: what a client command imports ---------------------------------------------------------------------------

HEAVY = {
    "signing_agent.config", "signing_agent.policy", "signing_agent.cose", "signing_agent.daemon", "signing_agent.api",
    "asyncio", "aiohttp", "cryptography", "cbor2", "http.client", "ssl", "email", "dataclasses", "typing", "logging",
    "shutil",
}  # fmt: skip

PROBE = """\
import json, sys
before = set(sys.modules)
import signing_agent.cli
try:
    signing_agent.cli.main(json.loads(sys.argv[1]))
except SystemExit:
    pass
sys.stdout.flush()
print(json.dumps(sorted(set(sys.modules) - before)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["--help"],
        ["version"],
        ["identities"],
        ["sign", "--identity", "m0", "--ccf-gov-msg-type", "state_digest", "--out", "/dev/null"],
        ["status", "--json"],
        ["health"],
    ],
)
def test_client_commands_import_none_of_the_daemons_modules(agent: FakeAgent, argv: list[str]) -> None:
    env = {k: v for k, v in cli_env({"SIGNING_AGENT_SOCK": str(agent.socket)}).items() if "COVERAGE" not in k}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    imported = set(json.loads(result.stderr.splitlines()[-1]))
    assert "signing_agent.cli" in imported
    assert not {m for m in imported if m in HEAVY or m.split(".")[0] in HEAVY}, sorted(imported)


# -- --version, --json ---------------------------------------------------------------------------------------------


def test_version_and_version_json(agent: FakeAgent) -> None:
    from signing_agent import __version__

    assert run(None, "--version").stdout == f"signing-agent {__version__}\n"
    assert run(None, "version").stdout == f"signing-agent {__version__}\n"
    info = json.loads(run(None, "version", "--json").stdout)
    assert info["version"] == __version__
    assert info["python"].startswith("3.")


def test_help_documents_the_environment_and_version() -> None:
    shown = run(None, "--help").stdout
    for variable in ("SIGNING_AGENT_SOCK", "SIGNING_AGENT_IDENTITY", "SIGNING_AGENT_SERVICE", "SIGNING_AGENT_CONFIG"):
        assert f"\n  {variable}" in shown
    assert "--version" in shown
    assert "XDG_RUNTIME_DIR" in shown


def test_an_unknown_command_is_a_usage_error_that_lists_them_all() -> None:
    result = run(None, "sgin")
    assert result.returncode == 2
    assert "invalid choice: 'sgin'" in result.stderr
    for command in ("sign", "propose", "reload", "init", "completion", "keys", "sandbox"):
        assert f"'{command}'" in result.stderr


# -- defaults: environment and [client] ----------------------------------------------------------------------------


def signed_as(agent: FakeAgent) -> str:
    body = next(s.body for s in reversed(agent.seen) if s.path == "/v1/sign")
    return str(body["identity"])


def test_identity_and_service_from_the_environment_then_the_client_section(agent: FakeAgent, workdir: Path) -> None:
    out = ["--ccf-gov-msg-type", "state_digest", "--out", "/dev/null"]
    assert run(agent, "sign", *out, env={"SIGNING_AGENT_IDENTITY": "m1"}).returncode == 0
    assert signed_as(agent) == "m1"
    config = workdir / "client.toml"
    config.write_text(f'[agent]\nsocket = "{agent.socket}"\n[client]\nidentity = "m0"\nservice = "prod"\n')
    # no socket given at all: the config's; its [client] identity and service
    assert run(None, "sign", *out, env={"SIGNING_AGENT_CONFIG": str(config)}).returncode == 0
    assert signed_as(agent) == "m0"
    assert "GET /v1/identities" not in agent.paths()  # named: nothing to look up
    agent.routes["GET /v1/services/prod/status"] = (200, {"status": "Open", "identities": []})
    assert run(None, "status", "--config", str(config)).returncode == 0
    assert agent.paths()[-1] == "GET /v1/services/prod/status"
    # the environment beats [client], a flag beats both
    env = {"SIGNING_AGENT_CONFIG": str(config), "SIGNING_AGENT_IDENTITY": "m1"}
    assert run(None, "sign", *out, env=env).returncode == 0
    assert signed_as(agent) == "m1"
    assert run(None, "sign", "--identity", "m0", *out, env=env).returncode == 0
    assert signed_as(agent) == "m0"
    # the user's own config file, found without being named
    home = workdir / "xdg"
    (home / "signing-agent").mkdir(parents=True)
    (home / "signing-agent" / "config.toml").write_text(
        f'[agent]\nsocket = "{agent.socket}"\n[client]\nidentity = "m1"\n'
    )
    assert run(None, "sign", *out, env={"XDG_CONFIG_HOME": str(home)}).returncode == 0
    assert signed_as(agent) == "m1"


def test_an_identity_may_be_named_by_a_member_id_prefix(agent: FakeAgent) -> None:
    assert run(agent, "sign", "--identity", "B2B2", "--ccf-gov-msg-type", "ack", "--out", "/dev/null").returncode == 0
    assert signed_as(agent) == "m1"


def test_a_signing_cert_beats_the_environments_identity(agent: FakeAgent, workdir: Path) -> None:
    from tests.support.pki import make_member

    member = make_member("m9")
    _, cert = member.write(workdir)
    agent.routes["GET /v1/identities"] = (
        200,
        {"identities": [*IDENTITIES["identities"], {"name": "m9", "member_id": member.member_id}]},
    )
    args = ("sign", "--signing-cert", str(cert), "--ccf-gov-msg-type", "ack", "--out", "/dev/null")
    assert run(agent, *args, env={"SIGNING_AGENT_IDENTITY": "m0"}).returncode == 0
    assert signed_as(agent) == "m9"


# -- sign refuses a terminal; feedback on long waits ---------------------------------------------------------------


def in_a_terminal(agent: FakeAgent, *args: str, stream: str) -> tuple[int, str, str]:
    """Run the CLI with ``stream`` (stdout or stderr) on a pseudo-terminal; the exit code, what the terminal got,
    and the other stream."""
    controller, terminal = pty.openpty()
    try:
        to_terminal = stream == "stdout"
        proc = subprocess.Popen(
            [sys.executable, "-m", "signing_agent", *args],
            env=cli_env({"SIGNING_AGENT_SOCK": str(agent.socket)}),
            text=True,
            stdout=terminal if to_terminal else subprocess.PIPE,
            stderr=subprocess.PIPE if to_terminal else terminal,
        )
        os.close(terminal)
        terminal = -1
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal was closed: the process is done with it
                break
            if not chunk:
                break
            seen += chunk
        piped = proc.stdout or proc.stderr
        assert piped is not None
        with piped:
            other = piped.read()
        return proc.wait(30), seen.decode(errors="replace"), other
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


def test_sign_refuses_to_write_binary_cose_to_a_terminal(agent: FakeAgent) -> None:
    code, terminal, stderr = in_a_terminal(
        agent, "sign", "--identity", "m0", "--ccf-gov-msg-type", "state_digest", stream="stdout"
    )
    assert code == 2, stderr
    assert "refusing to write a binary COSE_Sign1 to a terminal" in stderr
    assert "use --out FILE, or pipe it" in stderr
    assert "\xd2" not in terminal
    assert "POST /v1/sign" not in agent.paths()  # nothing was signed for nobody
    # a pipe, or JSON, are fine
    piped = subprocess.run(
        [sys.executable, "-m", "signing_agent", "sign", "--identity", "m0", "--ccf-gov-msg-type", "ack"],
        env=cli_env({"SIGNING_AGENT_SOCK": str(agent.socket)}), capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert piped.stdout == b"\xd2\x84cose"
    signed = json.loads(run(agent, "sign", "--identity", "m1", "--ccf-gov-msg-type", "ack", "--json").stdout)
    assert (signed["cose_base64"], signed["identity"]) == ("0oRjb3Nl", "m1")


def test_a_slow_answer_says_what_it_waits_for_on_a_terminal_only(agent: FakeAgent) -> None:
    agent.delays["POST /v1/sign"] = 1.6
    args = ("sign", "--identity", "m0", "--ccf-gov-msg-type", "state_digest", "--out", "/dev/null")
    code, terminal, _ = in_a_terminal(agent, *args, stream="stderr")
    assert code == 0
    assert "signing-agent: waiting for the agent to sign a state_digest as m0 (its key store)..." in terminal
    piped = run(agent, *args)
    assert piped.returncode == 0
    assert "waiting" not in piped.stderr


def test_commands_that_talk_to_ccf_take_a_timeout(agent: FakeAgent) -> None:
    agent.routes["GET /v1/services/default/status"] = (200, {"status": "Open", "identities": []})
    agent.delays["GET /v1/services/default/status"] = 3.0
    started = time.monotonic()
    result = run(agent, "status", "--service", "default", "--timeout", "0.5")
    assert result.returncode == 6, result.stderr
    assert "did not answer within 0.5 s" in result.stderr
    assert time.monotonic() - started < 3.0


# -- tables, full ids, prefixes, actions, ISO times ----------------------------------------------------------------


def test_identities_are_a_table_with_headers_and_full_member_ids(agent: FakeAgent) -> None:
    lines = run(agent, "identities").stdout.splitlines()
    assert lines[0].split() == ["NAME", "MEMBER", "ID", "ALGORITHM", "BACKEND", "KEY"]
    assert lines[1].split()[:2] == ["m0", M0]
    assert "warning: m1: w" in lines
    assert [i["member_id"] for i in json.loads(run(agent, "identities", "--json").stdout)] == [M0, M1]


def test_proposals_show_their_actions_and_full_ids(agent: FakeAgent) -> None:
    agent.routes["GET /v1/services/default/proposals?actions=true"] = (200, PROPOSALS)
    lines = run(agent, "proposals").stdout.splitlines()
    assert lines[0].split() == ["PROPOSAL", "ID", "STATE", "BALLOTS", "PROPOSER", "ACTIONS"]
    assert lines[1].split() == [P1, "Open", "0", M0, "set_member"]
    assert lines[3].split()[-1] == "transition_node_to_trusted"
    assert json.loads(run(agent, "proposals", "--json").stdout)["value"][0]["actions"] == [{"name": "set_member"}]


def test_a_proposal_id_prefix_names_the_one_proposal_it_begins(agent: FakeAgent) -> None:
    agent.routes["GET /v1/services/default/proposals"] = (200, PROPOSALS)
    agent.routes[f"POST /v1/services/default/proposals/{P3}/ballots"] = (
        200,
        {"proposalId": P3, "proposalState": "Accepted", "ballotCount": 1},
    )
    voted = run(agent, "vote", "CD34", "--accept", "--identity", "m0")
    assert voted.returncode == 0, voted.stderr
    assert f"proposal {P3} is Accepted (1 ballot)" in voted.stdout
    ambiguous = run(agent, "vote", "ab12", "--accept", "--identity", "m0")
    assert ambiguous.returncode == 2
    assert "proposal id prefix 'ab12' is ambiguous" in ambiguous.stderr
    assert P1 in ambiguous.stderr
    assert P2 in ambiguous.stderr
    assert run(agent, "withdraw", "ef01", "--identity", "m0").returncode == 2


def test_status_suggests_activating_an_accepted_member(agent: FakeAgent) -> None:
    members = [{"name": "m0", "memberId": M0, "status": "Active"}, {"name": "m1", "memberId": M1, "status": "Accepted"}]
    body = {"status": "Open", "url": "https://ccf:8000", "recoveryCount": 0, "identities": members}
    agent.routes["GET /v1/services/default/status"] = (200, body)
    lines = run(agent, "status").stdout.splitlines()
    assert lines[0] == "service default (https://ccf:8000): Open, recovery count 0"
    assert lines[1].split() == ["IDENTITY", "MEMBER", "ID", "STATUS"]
    assert lines[3].split() == ["m1", M1, "Accepted"]
    assert "m1 is Accepted, not yet Active: run 'signing-agent activate --identity m1'" in lines[-1]


def test_times_are_shown_in_iso_8601_utc(agent: FakeAgent) -> None:
    watcher = {
        "service": "default",
        "identity": "m0",
        "state": "submitted",
        "service_status": "WaitingForRecoveryShares",
        "last_error": None,
        "last_checked_at": 1767225600.25,
        "last_submission": {"recoveryCount": 2, "submittedAt": 1767225500},
    }
    agent.routes["GET /v1/recovery"] = (200, {"enabled": True, "watchers": [watcher]})
    lines = run(agent, "recovery", "status").stdout.splitlines()
    assert lines[0].split()[:4] == ["SERVICE", "IDENTITY", "STATE", "SERVICE"]
    assert "2026-01-01T00:00:00Z" in lines[1]
    assert "recovery 2 at 2025-12-31T23:58:20Z" in lines[1]
    health = {
        "status": "degraded",
        "version": "0.1.0",
        "generation": 2,
        "audit": {"status": "unavailable", "error": "No space left on device"},
        "identities": [{"name": "m0", "status": "ok", "checked_at": 1767225600}],
        "services": [{"name": "default", "status": "ok", "checked_at": 1767225600, "members": {"m0": "Accepted"}}],
        "pkcs11_tokens": [{"token_label": "t", "status": "unavailable", "unavailable_since": 1767225000, "error": "x"}],
        "last_reload": {"reloaded": False, "generation": 2, "at": 1767225601, "error": "identities.m1: no such key"},
    }
    agent.routes["GET /v1/health"] = (200, health)
    shown = run(agent, "health")
    assert shown.returncode == 1
    lines = shown.stdout.splitlines()
    assert lines[0] == "degraded (signing-agent 0.1.0, configuration generation 2)"
    assert lines[1] == (
        "last reload: 2026-01-01T00:00:01Z, REFUSED (generation 2 still serves): identities.m1: no such key"
    )
    assert lines[2].split() == ["CHECK", "STATUS", "CHECKED", "DETAILS"]
    assert "2026-01-01T00:00:00Z" in lines[4]
    assert "since 2025-12-31T23:50:00Z" in shown.stdout
    assert "  audit log: No space left on device" in lines
    assert "m0 is Accepted at default: run 'signing-agent activate --identity m0'" in lines
    assert "1767225600" not in shown.stdout


# -- --wait, reload ------------------------------------------------------------------------------------------------


def test_propose_wait_waits_until_the_proposal_is_decided(agent: FakeAgent, workdir: Path) -> None:
    created = {"proposalId": P1, "proposalState": "Open", "ballotCount": 0}
    agent.routes["POST /v1/services/default/proposals"] = (200, created)
    polls: list[int] = []

    def listed(seen: Seen) -> tuple[int, Any]:
        polls.append(1)
        return 200, {"value": [{**created, "proposalState": "Open" if len(polls) < 3 else "Accepted"}]}

    agent.routes["GET /v1/services/default/proposals"] = listed
    proposal = workdir / "p.json"
    proposal.write_text('{"actions": []}')
    result = run(agent, "propose", str(proposal), "--identity", "m0", "--wait")
    assert result.returncode == 0, result.stderr
    assert f"proposal {P1} is Accepted" in result.stdout
    assert len(polls) == 3
    polls.clear()
    agent.routes["GET /v1/services/default/proposals"] = (200, {"value": [created]})
    result = run(agent, "propose", str(proposal), "--identity", "m0", "--wait", "--timeout", "1")
    assert result.returncode == 6
    assert f"proposal {P1} is still Open after 1 s" in result.stderr


def test_reload_prints_the_new_generation_or_why_the_configuration_was_refused(agent: FakeAgent) -> None:
    agent.routes["POST /v1/reload"] = (200, {"reloaded": True, "generation": 4, "at": 1.0, "error": None})
    result = run(agent, "reload")
    assert (result.returncode, result.stdout) == (0, "configuration reloaded: generation 4 serves\n")
    assert json.loads(run(agent, "reload", "--json").stdout)["generation"] == 4
    refused = {"reloaded": False, "generation": 4, "at": 2.0, "error": "agent.sokcet: unknown configuration key"}
    agent.routes["POST /v1/reload"] = (200, refused)
    result = run(agent, "reload")
    assert result.returncode == 2
    assert "generation 4 still serves: agent.sokcet: unknown configuration key" in result.stderr


def test_health_wait_waits_for_an_agent_to_answer(workdir: Path) -> None:
    sock = workdir / "late.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "signing_agent", "health", "--live", "--wait", "--timeout", "20"],
        env=cli_env({"SIGNING_AGENT_SOCK": str(sock)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    health = {"status": "ok", "version": "0.1.0", "generation": 1, "audit": {"status": "ok"}}
    with fake_agent(sock, {"GET /v1/health": (200, health)}):
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("ok (signing-agent 0.1.0")
    result = run(None, "health", "--wait", "--timeout", "0.5", env={"SIGNING_AGENT_SOCK": str(sock)})
    assert result.returncode == 6
    assert "no agent is listening" in result.stderr
