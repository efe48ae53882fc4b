"""A ballot is judged by the proposal it accepts, through every route that reaches signing one.

The daemon runs as a subprocess against the CCF sandbox; the attacker is a process of another uid (65534) on the
real socket, so the policy sees the kernel's SO_PEERCRED. Its rule allows only ``transition_node_to_trusted`` and
the canonical accept/reject ballots: it may vote on a proposal to trust a node, never on one that replaces the
constitution, and a ballot through ``/v1/sign`` (whose proposal the agent cannot see) is refused. The CLI runs
under the same rule as root with another primary gid (the rule names that gid): the test's interpreter may not be
one that uid 65534 can execute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signing_agent.audit import verify_audit
from signing_agent.client import AgentClient
from signing_agent.policy import ACCEPT_BALLOT, REJECT_BALLOT
from tests.component.test_policy_api import NOBODY, as_nobody
from tests.e2e.test_governance import TRUST_NODE, agent_tables
from tests.support.agent import DaemonProcess, cli_env, daemon, write_toml
from tests.support.pki import Member, make_member
from tests.support.prereq import missing
from tests.support.sandbox_proc import SandboxProcess, sandbox

pytestmark = pytest.mark.e2e

CLI_GID = 4242
SET_CONSTITUTION = {"actions": [{"name": "set_constitution", "args": {"constitution": "export function x() {}"}}]}
NODE_VOTER = {
    "name": "node-voter",
    "uids": [NOBODY],
    "gids": [CLI_GID],
    "identities": ["m1"],
    "msg_types": ["ballot"],
    "actions_allow": ["transition_node_to_trusted"],
    "ballots": ["accept", "reject"],
}


@dataclass
class World:
    sandbox: SandboxProcess
    agent: DaemonProcess
    audit: Path
    trust: str
    """An Open proposal to trust a node (the rule's one action)."""
    constitution: str
    """An Open proposal to replace the constitution."""

    def ballots_route(self, proposal_id: str) -> str:
        return f"/v1/services/default/proposals/{proposal_id}/ballots"

    def records(self) -> list[dict[str, Any]]:
        report = verify_audit([self.audit])
        assert report.ok, report.first_break
        return [json.loads(line) for line in self.audit.read_bytes().splitlines()]

    def ballot_count(self, proposal_id: str) -> int:
        count: int = self.sandbox.gov_get(f"/gov/members/proposals/{proposal_id}")["ballotCount"]
        return count

    def cli_as_voter(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        """The CLI in a process whose primary gid is CLI_GID, so the node-voter rule decides for it."""
        if os.getuid() != 0:
            missing("switching to another gid needs root")
        result = subprocess.run(
            [sys.executable, "-m", "signing_agent", *args],
            group=CLI_GID,
            extra_groups=[],
            input=stdin,
            capture_output=True,
            text=True,
            env=cli_env({"SIGNING_AGENT_SOCK": str(self.agent.socket)}),
            timeout=60,
            check=False,
        )
        return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1")}


@pytest.fixture
def world(workdir: Path, members: dict[str, Member]) -> Iterator[World]:
    certs = [member.write(workdir / "keys")[1] for member in members.values()]
    with sandbox(workdir / "sandbox", certs) as sb:
        service = {"url": sb.url, "service_certificate": sb.service_cert, "request_timeout": 10.0, "max_attempts": 2}
        tables: dict[str, Any] = agent_tables(workdir, members, service)
        # The other uid reaches the socket through group 0: a 0660 socket in folders it may traverse.
        tables["agent"]["socket_mode"] = "0660"
        tables["policy.rules"] = [NODE_VOTER]
        workdir.chmod(0o750)
        (workdir / "run").mkdir(mode=0o750)
        with daemon(write_toml(workdir / "agent.toml", tables)) as agent:
            # The agent's own uid (the default rule) proposes both; only m0 votes on neither, so both stay Open.
            client = AgentClient(agent.socket, timeout=60)
            trust, constitution = (
                client.call("POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": p}).json()[
                    "proposalId"
                ]
                for p in (TRUST_NODE, SET_CONSTITUTION)
            )
            sb.clear_requests()
            yield World(sb, agent, workdir / "run" / "audit.jsonl", trust, constitution)


def test_a_ballot_is_refused_when_its_proposal_has_an_action_the_rule_does_not_allow(world: World) -> None:
    accept = {"identity": "m1", "ballot": ACCEPT_BALLOT}
    results = as_nobody(
        world.agent.socket,
        [
            ("POST", world.ballots_route(world.trust), accept),  # 0: the rule's action: voted
            ("POST", world.ballots_route(world.constitution), accept),  # 1: the attack
            ("POST", world.ballots_route(world.constitution), {"identity": "m1", "ballot": REJECT_BALLOT}),  # 2
        ],
    )
    assert [status for status, _ in results] == [200, 403, 403], results
    assert results[0][1]["ballotCount"] == 1  # CCF's answer, relayed
    for _, body in results[1:]:
        assert body["error"]["code"] == "PolicyDenied"
        assert body["error"]["message"] == (
            "policy: denied by rule 'node-voter': "
            f"the ballot's proposal {world.constitution} has action(s) not allowed: set_constitution"
        )

    # Nothing was signed for the constitution, so nothing reached the service: it records no ballot.
    assert world.sandbox.requests(f"{world.constitution}/ballots") == []
    assert world.ballot_count(world.constitution) == 0
    assert world.ballot_count(world.trust) == 1

    records = [r for r in world.records() if r.get("msg_type") == "ballot"]
    on_constitution = [r for r in records if r["proposal_id"] == world.constitution]
    assert [r["event"] for r in on_constitution] == ["received", "denied", "received", "denied"]
    assert all(r["proposal_actions"] == ["set_constitution"] for r in on_constitution)
    assert all(r["peer"]["uid"] == NOBODY for r in on_constitution)
    denied = [r for r in on_constitution if r["event"] == "denied"]
    assert all(r["rule"] == "node-voter" and "set_constitution" in r["reason"] for r in denied)
    on_trust = {r["event"]: r for r in records if r["proposal_id"] == world.trust}
    assert set(on_trust) == {"received", "signed", "forwarded"}
    assert on_trust["signed"]["proposal_actions"] == ["transition_node_to_trusted"]


def test_a_ballot_through_v1_sign_is_refused_and_explain_judges_the_proposal(world: World) -> None:
    ballot = {"identity": "m1", "msg_type": "ballot", "payload": {"ballot": ACCEPT_BALLOT}}
    results = as_nobody(
        world.agent.socket,
        [
            ("POST", "/v1/sign", {**ballot, "proposal_id": world.trust}),  # 0: even for the rule's own action
            ("POST", "/v1/explain", {**ballot, "proposal_id": world.constitution, "service": "default"}),  # 1
            ("POST", "/v1/explain", {**ballot, "proposal_id": world.trust, "service": "default"}),  # 2
            ("POST", "/v1/explain", {**ballot, "proposal_id": world.trust}),  # 3: as /v1/sign would
        ],
    )
    assert [status for status, _ in results] == [403, 200, 200, 200], results
    raw = results[0][1]["error"]
    assert raw["code"] == "PolicyDenied"
    assert "node-voter" in raw["message"]
    assert "a ballot signed through POST /v1/sign cannot be checked" in raw["message"]
    assert "POST /v1/services/{svc}/proposals/{id}/ballots" in raw["message"]

    constitution, trust, unseen = (body for _, body in results[1:])
    assert constitution["proposal_actions"] == ["set_constitution"]
    assert constitution["decision"] == {
        "allowed": False,
        "rule": "node-voter",
        "reason": f"the ballot's proposal {world.constitution} has action(s) not allowed: set_constitution",
    }
    assert constitution["ballot_sha256"] is not None
    assert trust["proposal_actions"] == ["transition_node_to_trusted"]
    assert trust["decision"]["allowed"] is True
    assert unseen["proposal_actions"] is None
    assert unseen["decision"]["allowed"] is False
    assert unseen["decision"]["reason"] == raw["message"].split(": ", 2)[2]

    assert world.sandbox.requests("/ballots/") == []
    raw_records = [r for r in world.records() if r.get("proposal_id") == world.trust]
    assert [r["event"] for r in raw_records] == ["received", "denied"]
    # The audit log leaves out what is unknown: no proposal actions, no service.
    assert "proposal_actions" not in raw_records[1]
    assert "service" not in raw_records[1]


def test_the_cli_vote_and_sign_under_the_same_rule(world: World) -> None:
    """``vote``, ``sign`` and ``sign --explain`` reach the same routes, and the same judgement."""
    rc, out, err = world.cli_as_voter("vote", world.constitution, "--accept", "--identity", "m1")
    assert rc != 0
    assert "PolicyDenied" in err
    assert "set_constitution" in err
    assert world.ballot_count(world.constitution) == 0

    sign = ("sign", "--ccf-gov-msg-type", "ballot", "--identity", "m1", "--content", "-")
    stdin = json.dumps({"ballot": ACCEPT_BALLOT})
    rc, out, err = world.cli_as_voter(*sign, "--ccf-gov-msg-proposal_id", world.trust, stdin=stdin)
    assert rc != 0
    assert out == ""
    assert "signing-agent vote" in err

    rc, out, err = world.cli_as_voter(
        *sign, "--ccf-gov-msg-proposal_id", world.constitution, "--explain", "--service", "default", stdin=stdin
    )
    assert rc != 0, err
    explained = json.loads(out)
    assert explained["proposal_actions"] == ["set_constitution"]
    assert explained["decision"]["allowed"] is False

    rc, out, err = world.cli_as_voter("vote", world.trust, "--reject", "--identity", "m1")
    assert rc == 0, err
    assert world.ballot_count(world.trust) == 1
    assert [r["event"] for r in world.records() if r.get("event") == "signed"] == ["signed"] * 3  # 2 proposals


def test_a_ballot_whose_proposal_actions_cannot_be_read_is_refused_when_the_rule_constrains_actions(
    world: World,
) -> None:
    world.sandbox.fault("status", rf"/{world.trust}/actions$", status=500, count=100)
    [(status, body)] = as_nobody(
        world.agent.socket, [("POST", world.ballots_route(world.trust), {"identity": "m1", "ballot": ACCEPT_BALLOT})]
    )
    assert status == 403, body
    assert body["error"]["message"] == (
        "policy: denied by rule 'node-voter': this rule constrains proposal actions, and the actions of proposal "
        f"{world.trust} are unknown (service 'default' answered 500 InternalError when asked for them)"
    )
    assert world.sandbox.requests(":submit") == []
    assert world.ballot_count(world.trust) == 0

    # A rule that does not constrain actions (here the default rule, for the agent's own uid) still votes.
    client = AgentClient(world.agent.socket, timeout=60)
    voted = client.call("POST", world.ballots_route(world.trust), {"identity": "m0", "ballot": ACCEPT_BALLOT}).json()
    assert voted["ballotCount"] == 1
    signed = [r for r in world.records() if r["event"] == "signed" and r["msg_type"] == "ballot"]
    assert [(r["identity"], r.get("proposal_actions")) for r in signed] == [("m0", None)]
