"""Governance end to end: the daemon as a subprocess, driven over its socket, against the sandbox subprocess.

Covers the member's whole round (propose, vote, activate, withdraw, review), CCF errors relayed unchanged, and the
fault cases: no duplicate and no lost proposals, retries of identical bytes, and pinned TLS that refuses a wrong
service certificate before any request is sent.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signing_agent.client import AgentClient, AgentRequestError
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, private_dir, write_toml
from tests.support.pki import Member, make_member
from tests.support.sandbox_proc import SandboxProcess, sandbox

pytestmark = pytest.mark.e2e

ACCEPT = "export function vote (proposal, proposerId) { return true }"
REJECT = "export function vote (proposal, proposerId) { return false }"
TRUST_NODE = {
    "actions": [{"name": "transition_node_to_trusted", "args": {"node_id": "ab" * 32, "valid_from": "20240101000000Z"}}]
}


@dataclass
class World:
    sandbox: SandboxProcess
    agent: DaemonProcess
    members: dict[str, Member]
    folder: Path

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.agent.socket, timeout=60)

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "signing_agent", *args],
            input=stdin.decode() if stdin else None,
            capture_output=True,
            text=True,
            env=cli_env({"SIGNING_AGENT_SOCK": str(self.agent.socket)}),
            timeout=60,
            check=False,
        )

    def propose(self, identity: str, proposal: dict[str, Any] = TRUST_NODE) -> dict[str, Any]:
        body = {"identity": identity, "proposal": proposal}
        result: dict[str, Any] = self.client.call("POST", "/v1/services/default/proposals", body).json()
        return result


def agent_tables(folder: Path, members: dict[str, Member], service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {"agent": {"socket": folder / "run" / "agent.sock"}}
    for name, member in members.items():
        key, cert = member.write(folder / "keys")
        tables.update(file_identity(name, cert, key))
    tables["services.default"] = service
    return tables


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1"), "m2": make_member("m2")}


@contextlib.contextmanager
def make_world(folder: Path, members: dict[str, Member]) -> Iterator[World]:
    certs = [members[n].write(folder / "keys")[1] for n in ("m0", "m1")]  # m2 is not a member yet
    with sandbox(folder / "sandbox", certs) as sb:
        service = {
            "url": sb.url,
            "service_certificate": sb.service_cert,
            "request_timeout": 5.0,
            "max_attempts": 4,
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
        }
        config = write_toml(folder / "agent.toml", agent_tables(folder, members, service))
        with daemon(config) as agent:
            yield World(sb, agent, members, folder)


@pytest.fixture
def world(workdir: Path, members: dict[str, Member]) -> Iterator[World]:
    """A world of the test's own: for tests that change the membership, count every proposal or audit record, or
    stop the agent."""
    with make_world(workdir, members) as w:
        yield w


@pytest.fixture(scope="module")
def shared_world(members: dict[str, Member]) -> Iterator[World]:
    with private_dir() as folder, make_world(folder, members) as w:
        yield w


@pytest.fixture
def common(shared_world: World) -> World:
    """The module's shared world, for tests that look only at their own proposals and at the requests they make:
    no fault rule and no request record from an earlier test is left."""
    shared_world.sandbox.clear_faults()
    shared_world.sandbox.clear_requests()
    return shared_world


def test_a_governance_round_through_the_cli(world: World) -> None:
    m2 = world.members["m2"]
    proposal = {"actions": [{"name": "set_member", "args": {"cert": m2.cert_pem.decode()}}]}
    (world.folder / "add_m2.json").write_text(json.dumps(proposal))

    result = world.cli("propose", str(world.folder / "add_m2.json"), "--identity", "m0", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    pid = created["proposalId"]
    assert created["proposalState"] == "Open"
    assert created["proposerId"] == world.members["m0"].member_id

    shown = world.cli("proposals", pid)
    assert shown.returncode == 0, shown.stderr
    assert "set_member" in shown.stdout

    first = world.cli("vote", pid, "--accept", "--identity", "m0")
    assert first.returncode == 0, first.stderr
    assert "is Open (1 ballot)" in first.stdout
    second = world.cli("vote", pid, "--accept", "--identity", "m1")
    assert second.returncode == 0, second.stderr
    assert "is Accepted" in second.stdout

    status = json.loads(world.cli("status", "--json").stdout)
    assert {i["name"]: i["status"] for i in status["identities"]} == {"m0": "Active", "m1": "Active", "m2": "Accepted"}
    assert status["status"] == "Open"

    activated = world.cli("activate", "--identity", "m2")
    assert activated.returncode == 0, activated.stderr
    assert "is Active" in activated.stdout
    member = world.sandbox.gov_get(f"/gov/service/members/{m2.member_id}")
    assert member["status"] == "Active"

    # The new member can now propose, and withdraw its own proposal.
    mine = world.propose("m2")
    withdrawn = world.cli("withdraw", mine["proposalId"], "--identity", "m2")
    assert withdrawn.returncode == 0, withdrawn.stderr
    assert "is Withdrawn" in withdrawn.stdout


def test_activate_returns_the_member_status_and_digest(world: World) -> None:
    m2 = world.members["m2"]
    world.sandbox.add_member(m2.cert_pem, status="Accepted")
    resp = world.client.call("POST", "/v1/services/default/members/m2/activate")
    body = resp.json()
    assert body["memberId"] == m2.member_id
    assert body["status"] == "Active"
    assert len(body["stateDigest"]) == 64
    assert resp.headers["x-ms-ccf-transaction-id"]


def test_a_ballot_for_a_proposal_that_is_not_open_is_refused_before_signing(common: World) -> None:
    world = common
    pid = world.propose("m0")["proposalId"]
    world.client.call("POST", f"/v1/services/default/proposals/{pid}/withdraw", {"identity": "m0"})
    world.sandbox.clear_requests()
    with pytest.raises(AgentRequestError) as info:
        world.client.call("POST", f"/v1/services/default/proposals/{pid}/ballots", {"identity": "m1", "ballot": ACCEPT})
    assert info.value.status == 409
    assert info.value.code == "Conflict"
    assert "Withdrawn" in info.value.message
    assert not world.sandbox.requests(":submit")


def test_ccf_errors_are_relayed_unchanged(common: World) -> None:
    world = common
    resp = world.client.request(
        "POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": {"actions": [{"name": "nope"}]}}
    )
    assert resp.status == 400
    assert resp.headers["x-relayed-from"] == "ccf"
    assert resp.json()["error"]["code"] == "ProposalFailedToValidate"
    missing = "f" * 64
    resp = world.client.request(
        "POST", f"/v1/services/default/proposals/{missing}/ballots", {"identity": "m0", "ballot": ACCEPT}
    )
    assert (resp.status, resp.json()["error"]["code"]) == (404, "ProposalNotFound")
    # m2 is not a member: CCF's 401 comes back as CCF wrote it.
    resp = world.client.request("POST", "/v1/services/default/proposals", {"identity": "m2", "proposal": TRUST_NODE})
    assert resp.status == 401
    assert resp.json()["error"]["details"][0]["message"] == "Signer is not a known member"


def test_a_lost_response_does_not_make_two_proposals(world: World) -> None:
    """The sandbox creates the proposal and drops the connection; the resend gets ProposalReplay."""
    world.sandbox.fault("drop_after", r"proposals:create", count=1)
    world.sandbox.clear_requests()
    created = world.propose("m0")
    posts = world.sandbox.requests("proposals:create")
    assert [r["fault"] for r in posts] == ["drop_after", None]
    assert posts[1]["status"] == 400  # ProposalReplay, turned into success
    open_ids = [p["proposalId"] for p in world.sandbox.proposals()]
    assert open_ids == [created["proposalId"]]
    assert created["proposalState"] == "Open"


def test_a_reset_connection_is_retried_with_the_same_bytes(world: World) -> None:
    world.sandbox.fault("reset", r"proposals:create", count=2)
    world.sandbox.clear_requests()
    created = world.propose("m0")
    assert [r["fault"] for r in world.sandbox.requests("proposals:create")] == ["reset", "reset", None]
    assert [p["proposalId"] for p in world.sandbox.proposals()] == [created["proposalId"]]


def test_503_with_retry_after_is_honoured(common: World) -> None:
    world = common
    world.sandbox.fault("status", r"proposals:create", status=503, retry_after="1", count=1)
    started = time.monotonic()
    created = world.propose("m0")
    assert time.monotonic() - started >= 0.9
    assert created["proposalState"] == "Open"


def test_a_lost_ballot_response_is_resent_and_idempotent(common: World) -> None:
    world = common
    pid = world.propose("m0")["proposalId"]
    world.sandbox.fault("drop_after", r"/ballots/", count=1)
    body = world.client.call(
        "POST", f"/v1/services/default/proposals/{pid}/ballots", {"identity": "m0", "ballot": REJECT}
    ).json()
    assert body["ballotCount"] == 1
    assert [(r["fault"], r["status"]) for r in world.sandbox.requests(":submit")] == [("drop_after", 200), (None, 200)]


def test_unreachable_service_is_a_502_that_names_the_cause(common: World) -> None:
    world = common
    world.sandbox.fault("reset", r"/gov/service/info", count=100)
    resp = world.client.request("GET", "/v1/services/default/status")
    assert resp.status == 502
    error = resp.json()["error"]
    assert error["code"] == "CCFUnavailable"
    assert "after 4 attempts" in error["message"]


def test_unknown_service_is_refused_before_signing(common: World) -> None:
    world = common
    resp = world.client.request("POST", "/v1/services/prod/proposals", {"identity": "m0", "proposal": TRUST_NODE})
    assert (resp.status, resp.json()["error"]["code"]) == (404, "UnknownService")


def test_sigterm_waits_for_an_in_flight_forward(world: World) -> None:
    world.sandbox.fault("delay", r"proposals:create", delay=1.0, count=1)
    result: dict[str, Any] = {}

    def submit() -> None:
        result["resp"] = world.client.request(
            "POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": TRUST_NODE}
        )

    thread = threading.Thread(target=submit)
    thread.start()
    time.sleep(0.4)
    world.agent.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert result["resp"].status == 200
    assert world.agent.proc.wait(15) == 0


def test_pinned_tls_refuses_a_wrong_service_certificate_before_any_request(
    workdir: Path, members: dict[str, Member]
) -> None:
    with (
        sandbox(workdir / "real", [members["m0"].write(workdir / "k")[1]]) as real,
        sandbox(workdir / "other") as other,
    ):
        service = {"url": real.url, "service_certificate": other.service_cert, "max_attempts": 3}
        config = write_toml(workdir / "agent.toml", agent_tables(workdir, {"m0": members["m0"]}, service))
        with daemon(config) as agent:
            client = AgentClient(agent.socket)
            resp = client.request("POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": TRUST_NODE})
            assert resp.status == 502
            error = resp.json()["error"]
            assert error["code"] == "CCFTrustError"
            assert "nothing was sent" in error["message"]
        assert real.requests() == []


def test_forwarded_and_failed_submissions_are_audited_with_ccf_status_and_transaction(world: World) -> None:
    from signing_agent.audit import verify_audit

    created = world.propose("m0")
    resp = world.client.request("POST", "/v1/services/default/proposals", {"identity": "m2", "proposal": TRUST_NODE})
    assert resp.status == 401  # m2 is not a member: CCF refuses, and that is audited too
    audit_path = world.folder / "run" / "audit.jsonl"
    report = verify_audit([audit_path])
    assert report.ok, report.first_break
    records = [json.loads(line) for line in audit_path.read_bytes().splitlines()]
    forwarded = [r for r in records if r["event"] == "forwarded"]
    assert [(r["identity"], r["ccf_status"]) for r in forwarded] == [("m0", 200), ("m2", 401)]
    assert forwarded[0]["transaction_id"]
    assert forwarded[0]["service"] == "default"
    signed = {r["request_id"]: r for r in records if r["event"] == "signed"}
    assert signed[forwarded[0]["request_id"]]["cose_sha256"] == forwarded[0]["cose_sha256"]
    assert created["proposalId"]
