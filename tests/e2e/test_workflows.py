"""The consortium's workflows end to end: each command through the real CLI and daemon against the sandbox.

``members``, ``nodes``, ``member add|remove``, ``node trust|retire``, ``service open|identity``, ``recovery
accept|refresh-shares`` and ``proposals --pending``, with ``--dry-run`` (nothing signed or sent) and ``--wait`` (exit
0 only when Accepted). Every refusal the issue lists is driven too, by the commands and by hand-written proposals
(``propose FILE`` and ``POST /v1/services/{svc}/proposals``): each is a 4xx naming the field, and the sandbox's
request log shows that nothing was sent, the audit log that nothing was signed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.client import AgentClient, AgentRequestError
from signing_agent.sandbox.identity import ServiceIdentity
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, short_dir, write_toml
from tests.support.pki import Member, make_member, make_rsa_key, pem_public
from tests.support.sandbox_client import NO, YES
from tests.support.sandbox_proc import SandboxProcess, sandbox

pytestmark = pytest.mark.e2e

HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class World:
    folder: Path
    sandbox: SandboxProcess
    agent: DaemonProcess
    members: dict[str, Member]

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.agent.socket, timeout=60)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "signing_agent", *args],
            capture_output=True,
            text=True,
            env=cli_env({"SIGNING_AGENT_SOCK": str(self.agent.socket), **(env or {})}),
            timeout=60,
            check=False,
        )

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def proposal(self, *args: str) -> str:
        """Run a proposal command; the proposal id it prints on its first line."""
        out = self.ok(*args)
        pid = out.splitlines()[0]
        assert HEX64.fullmatch(pid), out
        return pid

    def vote(self, identity: str, pid: str, ballot: str = YES) -> dict[str, Any]:
        body = {"identity": identity, "ballot": ballot}
        result: dict[str, Any] = self.client.call("POST", f"/v1/services/default/proposals/{pid}/ballots", body).json()
        return result

    def file(self, name: str, text: str | bytes) -> str:
        path = self.folder / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return str(path)

    def created(self) -> list[dict[str, Any]]:
        """The proposals the sandbox was sent (its request log)."""
        return [r for r in self.sandbox.requests("proposals:create") if r["method"] == "POST"]

    def signed(self) -> int:
        """How many messages the agent signed (its audit log)."""
        lines = (self.folder / "audit" / "audit.jsonl").read_text().splitlines()
        return sum(1 for line in lines if json.loads(line)["event"] == "signed")


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {name: make_member(name) for name in ("m0", "m1", "m2")}


@contextlib.contextmanager
def make_world(
    members: dict[str, Member],
    *,
    sandbox_args: tuple[str, ...] = (),
    accepted: bytes | None = None,
    rules: list[dict[str, Any]] | None = None,
) -> Iterator[World]:
    """m0 and m1 are Active recovery members of the sandbox; m2 is an identity of the agent but no member yet.
    ``accepted``: a service identity the configuration also trusts (the one the service will recover with)."""
    folder = short_dir("sa-wf-")
    try:
        paths = {name: m.write(folder / "keys") for name, m in members.items()}
        with sandbox(folder / "sandbox", args=sandbox_args) as sb:
            for name in ("m0", "m1"):
                enc = pem_public(make_rsa_key().public_key())
                sb.add_member(members[name].cert_pem, encryption_pub_key=enc.decode())
            service: dict[str, Any] = {"url": sb.url, "service_certificate": sb.service_cert, "max_attempts": 2}
            if accepted is not None:
                (folder / "accepted_cert.pem").write_bytes(accepted)
                service["accepted_service_certificates"] = [folder / "accepted_cert.pem"]
            tables: dict[str, Any] = {
                # Many refusals on purpose: more than the default budget of denied requests a minute.
                "agent": {"socket": folder / "run" / "agent.sock", "denial_rate_limit": 10_000},
                "audit": {"path": folder / "audit" / "audit.jsonl"},
                "services.default": service,
            }
            for name, (key, cert) in paths.items():
                tables.update(file_identity(name, cert, key))
            if rules is not None:
                tables["policy.rules"] = rules
            with daemon(write_toml(folder / "agent.toml", tables)) as agent:
                yield World(folder, sb, agent, members)
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture
def world(members: dict[str, Member]) -> Iterator[World]:
    with make_world(members) as w:
        yield w


@pytest.fixture(scope="module")
def open_world(members: dict[str, Member]) -> Iterator[World]:
    """A world shared by the tests that change nothing (reads and refusals)."""
    with make_world(members) as w:
        yield w


# -- reads ---


def test_members_shows_status_role_data_and_which_are_ours(open_world: World) -> None:
    body = json.loads(open_world.ok("members", "--json"))
    listed = {m["memberId"]: m for m in body["value"]}
    m0, m1 = open_world.members["m0"], open_world.members["m1"]
    assert set(listed) == {m0.member_id, m1.member_id}
    assert listed[m0.member_id]["identity"] == "m0"
    assert listed[m0.member_id]["status"] == "Active"
    assert listed[m0.member_id]["recoveryRole"] == "Participant"
    text = open_world.ok("members")
    assert f"{m1.member_id}  Active    Participant" in text
    assert "(identity m1)" in text


def test_nodes_lists_the_service_nodes_and_a_joining_one(world: World) -> None:
    (own,) = json.loads(world.ok("nodes", "--json"))["value"]
    assert own["status"] == "Trusted"
    joined = world.sandbox.join_node({"site": "b"})
    text = world.ok("nodes")
    assert f'{joined}  Pending   {{"site": "b"}}' in text


def test_service_identity_reports_the_presented_identity_and_the_trust(open_world: World) -> None:
    saved = open_world.folder / "presented.pem"
    out = open_world.ok("service", "identity", "--save", str(saved))
    pem = open_world.sandbox.service_cert.read_text()
    assert saved.read_text() == pem
    from signing_agent.proposals import fingerprint

    assert f"presents identity sha256 {fingerprint(pem)}" in out
    assert "trusted: pinned" in out
    body = json.loads(open_world.ok("service", "identity", "--json"))
    assert (body["trust"], body["trusted"], body["sha256"]) == ("pinned", True, fingerprint(pem))


# -- members ---


def test_member_add_then_activate_then_remove(world: World) -> None:
    m2 = world.members["m2"]
    cert = world.file("m2_cert.pem", m2.cert_pem)
    enc = world.file("m2_enc.pem", pem_public(make_rsa_key().public_key()))
    pid = world.proposal(
        "member", "add", "--cert", cert, "--encryption-key", enc, "--member-data", '{"name": "m2"}',
        "--recovery-role", "Participant", "--identity", "m0",
    )  # fmt: skip
    actions = world.sandbox.gov_get(f"/gov/members/proposals/{pid}/actions")["actions"]
    assert actions == [{"name": "set_member", "args": {
        "cert": m2.cert_pem.decode(), "encryption_pub_key": Path(enc).read_text(), "member_data": {"name": "m2"},
        "recovery_role": "Participant",
    }}]  # fmt: skip
    world.vote("m0", pid)
    assert world.vote("m1", pid)["proposalState"] == "Accepted"
    assert world.sandbox.gov_get(f"/gov/service/members/{m2.member_id}")["status"] == "Accepted"

    # Adding it again would reset it to Accepted: refused, nothing sent.
    world.sandbox.clear_requests()
    again = world.cli("member", "add", "--cert", cert, "--identity", "m0")
    assert again.returncode == 1, again.stderr
    assert "Conflict" in again.stderr
    assert "already a member" in again.stderr
    assert world.created() == []

    world.ok("activate", "--identity", "m2")
    remove = world.proposal("member", "remove", "--cert", cert, "--identity", "m0")
    world.vote("m0", remove)
    assert world.vote("m1", remove)["proposalState"] == "Accepted"  # two of three Active members
    members = json.loads(world.ok("members", "--json"))["value"]
    assert m2.member_id not in {m["memberId"] for m in members}
    gone = world.cli("member", "remove", "--member-id", m2.member_id, "--identity", "m0")
    assert gone.returncode == 1
    assert "is not a member" in gone.stderr


def test_dry_run_prints_the_proposal_and_the_decision_and_signs_nothing(open_world: World) -> None:
    cert = open_world.file("m2_cert.pem", open_world.members["m2"].cert_pem)
    open_world.sandbox.clear_requests()
    signed = open_world.signed()
    out = open_world.ok("member", "add", "--cert", cert, "--identity", "m0", "--dry-run")
    assert "nothing was signed or sent" in out
    assert '"name": "set_member"' in out
    assert "policy: allowed by rule" in out
    body = json.loads(open_world.ok("member", "add", "--cert", cert, "--identity", "m0", "--dry-run", "--json"))
    assert body["proposal"] == {"actions": [{"name": "set_member", "args": {"cert": Path(cert).read_text()}}]}
    assert body["explanation"]["decision"]["allowed"] is True
    assert open_world.created() == []
    assert open_world.signed() == signed


def test_wait_exits_0_when_accepted_and_1_when_rejected(world: World) -> None:
    cert = world.file("m2_cert.pem", world.members["m2"].cert_pem)
    for ballot, code, state in ((NO, 1, "Rejected"), (YES, 0, "Accepted")):
        proc = subprocess.Popen(
            [sys.executable, "-m", "signing_agent", "member", "add", "--cert", cert, "--identity", "m0", "--wait"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=cli_env({"SIGNING_AGENT_SOCK": str(world.agent.socket)}),
        )  # fmt: skip
        assert proc.stdout is not None
        pid = proc.stdout.readline().strip()  # printed (and flushed) before it waits
        assert HEX64.fullmatch(pid), pid
        world.vote("m0", pid, ballot)
        world.vote("m1", pid, ballot)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert state in out

    # With --json, only the agent's JSON; no ballot comes within --timeout: exit 6.
    late = world.cli("member", "add", "--cert", world.file("m3.pem", make_member("m3").cert_pem), "--identity", "m0",
                     "--wait", "--timeout", "1", "--json")  # fmt: skip
    assert late.returncode == 6, late.stderr
    assert "still Open after 1 s" in late.stderr
    assert late.stdout == ""


def test_identity_and_service_come_from_the_environment_when_there_are_several(open_world: World) -> None:
    cert = open_world.file("m2_cert.pem", open_world.members["m2"].cert_pem)
    several = open_world.cli("member", "add", "--cert", cert, "--dry-run")
    assert several.returncode == 2
    assert "SIGNING_AGENT_IDENTITY" in several.stderr
    chosen = open_world.cli("member", "add", "--cert", cert, "--dry-run", "--json", env={
        "SIGNING_AGENT_IDENTITY": "m1", "SIGNING_AGENT_SERVICE": "default"})  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["explanation"]["identity"] == "m1"


# -- nodes ---


def test_node_trust_then_retire(world: World) -> None:
    node = world.sandbox.join_node()
    pid = world.proposal("node", "trust", node, "--valid-from", "2025-01-01T00:00:00Z", "--validity-days", "30",
                         "--identity", "m0")  # fmt: skip
    (action,) = world.sandbox.gov_get(f"/gov/members/proposals/{pid}/actions")["actions"]
    args = {"node_id": node, "valid_from": "20250101000000Z", "validity_period_days": 30}
    assert action == {"name": "transition_node_to_trusted", "args": args}
    world.vote("m0", pid)
    assert world.vote("m1", pid)["proposalState"] == "Accepted"
    assert world.sandbox.gov_get(f"/gov/service/nodes/{node}")["status"] == "Trusted"
    again = world.cli("node", "trust", node, "--identity", "m0")
    assert again.returncode == 1
    assert "is Trusted, not Pending" in again.stderr

    default = world.sandbox.join_node()
    out = json.loads(world.ok("node", "trust", default, "--identity", "m0", "--dry-run", "--json"))
    valid_from = out["proposal"]["actions"][0]["args"]["valid_from"]
    assert re.fullmatch(r"\d{14}Z", valid_from), valid_from  # now, as CCF's tooling writes it

    retire = world.proposal("node", "retire", node, "--identity", "m1")
    world.vote("m0", retire)
    assert world.vote("m1", retire)["proposalState"] == "Accepted"
    assert world.sandbox.gov_get(f"/gov/service/nodes/{node}")["status"] == "Retired"


def test_node_trust_signs_ccf_s_own_time_form_as_written(world: World) -> None:
    """``--valid-from 20250101123456Z``, the form CCF's tooling (and the agent's default) writes: read as ISO 8601,
    its ninth digit was taken for the date-time separator and 2025-01-01 23:45:00 was signed instead."""
    node = world.sandbox.join_node()
    when = ("node", "trust", node, "--valid-from", "20250101123456Z", "--identity", "m0")
    shown = json.loads(world.ok(*when, "--dry-run", "--json"))
    assert shown["proposal"]["actions"][0]["args"]["valid_from"] == "20250101123456Z"
    pid = world.proposal(*when)
    (action,) = world.sandbox.gov_get(f"/gov/members/proposals/{pid}/actions")["actions"]
    assert action["args"]["valid_from"] == "20250101123456Z"
    short = json.loads(world.ok("node", "trust", node, "--valid-from", "250101123456Z", "--dry-run", "--json",
                                "--identity", "m0"))  # fmt: skip
    assert short["proposal"]["actions"][0]["args"]["valid_from"] == "250101123456Z"


def test_a_caller_allowed_one_action_gets_no_other_through_a_workflow(members: dict[str, Member]) -> None:
    """Every workflow signs through the same policy as a raw proposal: the rule judges the action it builds, so a
    caller allowed only to trust nodes gets nothing else signed through another workflow's parameters."""
    rule = {"name": "trust-only", "uids": [os.getuid()], "actions_allow": ["transition_node_to_trusted"]}
    with make_world(members, rules=[rule]) as world:
        node = world.sandbox.join_node()
        cert = world.file("m2.pem", world.members["m2"].cert_pem)
        pid = world.proposal("node", "trust", node, "--identity", "m0")
        refused: list[tuple[str, ...]] = [
            ("member", "add", "--cert", cert),
            ("member", "remove", "--member-id", world.members["m1"].member_id),
            ("node", "retire", node),
            ("recovery", "refresh-shares"),
        ]
        signed, created = world.signed(), len(world.created())
        for args in refused:
            dry = world.cli(*args, "--identity", "m0", "--dry-run")
            assert dry.returncode == 1, dry.stderr
            assert "policy: DENIED by rule trust-only" in dry.stdout, dry.stdout
            result = world.cli(*args, "--identity", "m0")
            assert result.returncode != 0
            assert "denied by rule 'trust-only'" in result.stderr, result.stderr
        assert (world.signed(), len(world.created())) == (signed, created)
        assert world.sandbox.gov_get(f"/gov/members/proposals/{pid}")["proposalState"] == "Open"


# -- proposals waiting for a ballot ---


def test_proposals_pending_lists_what_an_identity_has_not_voted_on(world: World) -> None:
    node = world.sandbox.join_node()
    pid = world.proposal("node", "trust", node, "--identity", "m0")
    for identity in ("m0", "m1"):
        body = json.loads(world.ok("proposals", "--pending", "--identity", identity, "--json"))
        assert [p["proposalId"] for p in body["value"]] == [pid]
        assert body["value"][0]["actions"][0]["name"] == "transition_node_to_trusted"
    world.vote("m0", pid)
    assert json.loads(world.ok("proposals", "--pending", "--identity", "m0", "--json"))["value"] == []
    text = world.ok("proposals", "--pending", "--identity", "m1")
    assert text.splitlines()[0] == pid
    assert "transition_node_to_trusted" in text


def test_proposals_pending_shows_which_certificate_a_proposal_names(world: World) -> None:
    """A reviewer must be able to tell which certificate it is asked to accept (a member, a service identity), and
    compare it with the fingerprint announced out of band: its length alone tells nothing."""
    m2 = world.members["m2"]
    world.proposal("member", "add", "--cert", world.file("m2.pem", m2.cert_pem), "--identity", "m0")
    text = world.ok("proposals", "--pending", "--identity", "m1")
    assert f"<CERTIFICATE PEM sha256 {m2.member_id}>" in text, text
    bundle = (m2.cert_pem + world.members["m1"].cert_pem).decode()
    world.client.call("POST", "/v1/services/default/proposals", {
        "identity": "m0", "proposal": {"actions": [{"name": "set_member", "args": {"cert": bundle}}]}})  # fmt: skip
    text = world.ok("proposals", "--pending", "--identity", "m1")
    both = f"<CERTIFICATE PEM bundle, sha256 {m2.member_id}, {world.members['m1'].member_id}>"
    assert both in text, text


# -- opening a new service, a recovered one, and refreshing shares ---


def test_service_open_opens_a_new_service(members: dict[str, Member]) -> None:
    with make_world(members, sandbox_args=("--opening",)) as world:
        assert world.sandbox.service_info()["status"] == "Opening"
        recovering = world.cli("recovery", "accept", "--identity", "m0")
        assert recovering.returncode == 1
        assert "not Recovering" in recovering.stderr
        out = world.ok("service", "open", "--identity", "m0")
        pid = out.splitlines()[0]
        from signing_agent.proposals import fingerprint

        assert f"next service identity sha256 {fingerprint(world.sandbox.service_cert.read_text())}" in out
        (action,) = world.sandbox.gov_get(f"/gov/members/proposals/{pid}/actions")["actions"]
        assert action == {"name": "transition_service_to_open",
                          "args": {"next_service_identity": world.sandbox.service_cert.read_text()}}  # fmt: skip
        world.vote("m0", pid)
        assert world.vote("m1", pid)["proposalState"] == "Accepted"
        assert world.sandbox.service_info()["status"] == "Open"
        again = world.cli("service", "open", "--identity", "m0")
        assert again.returncode == 1
        assert "is Open, not Opening" in again.stderr


def test_recovery_accept_proposes_the_previous_and_next_identity(members: dict[str, Member]) -> None:
    new = ServiceIdentity.generate()
    with make_world(members, accepted=new.cert_pem) as world:
        previous = world.sandbox.service_cert.read_text()
        world.sandbox.recover(new.key_pem, new.cert_pem)
        identity = json.loads(world.ok("service", "identity", "--json"))
        assert identity["trust"] == "listed"

        world.sandbox.clear_requests()
        other = world.file("other.pem", ServiceIdentity.generate().cert_pem)
        for flag in ("--previous", "--next"):
            refused = world.cli("recovery", "accept", flag, other, "--identity", "m0")
            assert refused.returncode == 2, refused.stderr
            field = "previous_service_identity" if flag == "--previous" else "next_service_identity"
            assert f"args.{field}: is sha256" in refused.stderr
        assert world.created() == []

        dry = world.ok("recovery", "accept", "--identity", "m0", "--dry-run")
        assert "previous service identity sha256" in dry
        assert "next service identity sha256" in dry
        out = world.ok("recovery", "accept", "--identity", "m0")
        pid = out.splitlines()[0]
        from signing_agent.proposals import fingerprint

        assert f"previous service identity sha256 {fingerprint(previous)}" in out
        assert f"next service identity sha256 {fingerprint(new.cert_pem.decode())}" in out
        (action,) = world.sandbox.gov_get(f"/gov/members/proposals/{pid}/actions")["actions"]
        assert action["args"] == {"previous_service_identity": previous,
                                  "next_service_identity": new.cert_pem.decode()}  # fmt: skip
        world.vote("m0", pid)
        assert world.vote("m1", pid)["proposalState"] == "Accepted"
        assert world.sandbox.service_info()["status"] == "WaitingForRecoveryShares"


def test_recovery_refresh_shares_issues_new_shares(world: World) -> None:
    m0 = world.members["m0"].member_id
    before = world.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{m0}")["encryptedShare"]
    pid = world.proposal("recovery", "refresh-shares", "--identity", "m0")
    assert world.sandbox.gov_get(f"/gov/members/proposals/{pid}/actions") == {
        "actions": [{"name": "trigger_recovery_shares_refresh"}]
    }
    world.vote("m0", pid)
    assert world.vote("m1", pid)["proposalState"] == "Accepted"
    assert world.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{m0}")["encryptedShare"] != before


# -- refusals: nothing signed, nothing sent ---


def _refused(world: World, run: Any, status: int, *expected: str) -> None:
    world.sandbox.clear_requests()
    signed = world.signed()
    result = run()
    if isinstance(result, subprocess.CompletedProcess):
        assert result.returncode == {400: 2, 409: 1}[status], result.stderr
        text = result.stderr
    else:
        assert isinstance(result, AgentRequestError), result
        assert result.status == status, result
        text = result.message
    for part in expected:
        assert part in text, text
    assert world.created() == []
    assert world.signed() == signed


def _ec_public_pem() -> bytes:
    return pem_public(ec.generate_private_key(ec.SECP256R1()).public_key())


def test_the_commands_refuse_what_ccf_would_refuse(open_world: World) -> None:
    w = open_world
    cert = w.file("m2_cert.pem", w.members["m2"].cert_pem)
    not_cert = w.file("not_cert.pem", "hello")
    bad_bundle = w.file("bad_bundle.pem", w.members["m2"].cert_pem.decode() + BAD_BLOCK)
    ec_key = w.file("ec_pub.pem", _ec_public_pem())
    small = w.file("rsa1024.pem", pem_public(make_rsa_key(1024).public_key()))
    node = w.sandbox.join_node()
    cases: list[tuple[tuple[str, ...], int, tuple[str, ...]]] = [
        (("member", "add", "--cert", not_cert), 400, ("args.cert: is not a PEM X.509 certificate",)),
        (("member", "add", "--cert", bad_bundle), 400, ("args.cert: holds a certificate block that is not",)),
        (("member", "add", "--cert", cert, "--recovery-role", "Owner"), 400,
         ("args.recovery_role: needs encryption_pub_key", "Cannot specify a recovery_role value")),
        (("member", "add", "--cert", cert, "--encryption-key", ec_key), 400, ("args.encryption_pub_key", "not an RSA")),
        (("member", "add", "--cert", cert, "--encryption-key", small), 400, ("args.encryption_pub_key", "RSA-1024")),
        (("member", "add", "--cert", cert, "--encryption-key", not_cert), 400, ("args.encryption_pub_key",)),
        (("member", "remove", "--member-id", "xyz"), 400, ("args.member_id", "not 64 hex")),
        (("member", "remove", "--member-id", "AB" * 32), 400, ("args.member_id: must be lower case",)),
        (("node", "trust", "abc"), 400, ("args.node_id", "must contain exactly 64 characters")),
        (("node", "trust", node, "--valid-from", "yesterday"), 400, ("args.valid_from", "'yesterday'")),
        (("node", "trust", node, "--validity-days", "400"), 400,
         ("args.validity_period_days", "Validity period 400 is not allowed: max allowed is 365")),
        (("node", "trust", "cd" * 32), 400, ("node_id", "No such node")),
        (("node", "retire", "cd" * 32), 409, ("has no such node",)),
        (("service", "open"), 409, ("is Open, not Opening",)),
        (("recovery", "accept"), 409, ("is Open, not Recovering",)),
    ]  # fmt: skip
    for args, status, expected in cases:
        _refused(w, lambda a=args: w.cli(*a, "--identity", "m0"), status, *expected)


HAND_WRITTEN: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"name": "trigger_recovery_shares_refresh", "args": {}},
     ("actions[0] trigger_recovery_shares_refresh: args: must be left out", 'found "[object Object]"')),
    ({"name": "remove_member", "args": {"cert": "PEM"}}, ("args.member_id: is required",)),
    ({"name": "set_member", "args": {"cert": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"}},
     ("args.cert: is not a PEM X.509 certificate",)),
    ({"name": "transition_node_to_trusted", "args": {"node_id": "ab" * 32, "valid_from": "2024-01-01T00:00:00-05:30"}},
     ("args.valid_from",)),
    # CCF: checkType(args.member_data, "object") -- required, unlike set_member's "object?" (null is an object to JS)
    ({"name": "set_member_data", "args": {"member_id": "ab" * 32}},
     ("args.member_data: is required", "member_data must be of type object but is undefined")),
]  # fmt: skip
BAD_BLOCK = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
"""A certificate block that does not parse: CCF's ``isValidX509CertBundle`` refuses a bundle holding one."""


def test_hand_written_proposals_get_the_same_checks(open_world: World) -> None:
    w = open_world
    cert = w.members["m2"].cert_pem.decode()
    presented = w.sandbox.service_cert.read_text()
    other = ServiceIdentity.generate().cert_pem.decode()
    rewrapped = presented.replace("\n", "\r\n")  # the same certificate, other bytes
    cases = [
        *HAND_WRITTEN,
        ({"name": "set_member", "args": {"cert": cert, "recovery_role": "Boss", "encryption_pub_key": None}},
         ("args.recovery_role: 'Boss' is not one of",)),
        ({"name": "transition_service_to_open", "args": {"next_service_identity": other}},
         ("args.next_service_identity: is sha256",)),
        ({"name": "transition_service_to_open",
          "args": {"previous_service_identity": presented, "next_service_identity": presented}},
         ("args.previous_service_identity", "is Open, not Recovering")),
        ({"name": "transition_service_to_open", "args": {"next_service_identity": rewrapped}},
         ("not the same PEM text", "byte for byte")),
        ({"name": "set_member", "args": {"cert": cert + BAD_BLOCK}},
         ("args.cert", "must be a valid X509 certificate (bundle)")),
    ]  # fmt: skip
    for i, (action, expected) in enumerate(cases):
        proposal = {"actions": [action]}
        path = w.file(f"hand{i}.json", json.dumps(proposal))
        _refused(w, lambda p=path: w.cli("propose", p, "--identity", "m0"), 400, *expected)

        def route(p: dict[str, Any] = proposal) -> AgentRequestError:
            with pytest.raises(AgentRequestError) as info:
                w.client.call("POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": p})
            return info.value

        _refused(w, route, 400, *expected)


def test_a_recovering_service_refuses_a_previous_identity_that_is_not_the_one_it_recovered_from(
    members: dict[str, Member],
) -> None:
    new = ServiceIdentity.generate()
    with make_world(members, accepted=new.cert_pem) as world:
        previous = world.sandbox.service_cert.read_text()
        world.sandbox.recover(new.key_pem, new.cert_pem)
        following = new.cert_pem.decode()
        other = ServiceIdentity.generate().cert_pem.decode()
        cases = [
            ({"next_service_identity": following}, ("args.previous_service_identity: is required", "Recovering")),
            ({"previous_service_identity": other, "next_service_identity": following},
             ("args.previous_service_identity: is sha256", "recovered from")),
            ({"previous_service_identity": previous.replace("\n", "\r\n"), "next_service_identity": following},
             ("args.previous_service_identity", "not the same PEM text")),
        ]  # fmt: skip
        for i, (args, expected) in enumerate(cases):
            proposal = {"actions": [{"name": "transition_service_to_open", "args": args}]}
            path = world.file(f"t{i}.json", json.dumps(proposal))
            _refused(world, lambda p=path: world.cli("propose", p, "--identity", "m0"), 400, *expected)
        _refused(world, lambda: world.cli("service", "open", "--identity", "m0"), 409, "is Recovering, not Opening")


def test_the_workflow_routes_take_strict_bodies(open_world: World) -> None:
    base = "/v1/services/default/workflows"
    cert = open_world.members["m2"].cert_pem.decode()
    cases = [
        ("member-add", {"identity": "m0", "cert": cert, "extra": 1}, "unknown field(s): extra"),
        ("member-add", {"identity": "m0"}, "missing field(s): cert"),
        ("member-add", {"identity": "m0", "cert": cert, "dry_run": "yes"}, "dry_run must be true or false"),
        ("node-trust", {"identity": "m0", "node_id": "ab" * 32, "validity_days": "3"}, "validity_days must be a whole"),
        ("member-remove", {"identity": "m0"}, "give member_id or cert"),
        ("service-open", {"identity": "nobody"}, "unknown identity 'nobody'"),
    ]
    open_world.sandbox.clear_requests()
    for name, body, message in cases:
        with pytest.raises(AgentRequestError) as info:
            open_world.client.call("POST", f"{base}/{name}", body)
        assert info.value.status in (400, 404), info.value
        assert message in info.value.message
    assert open_world.client.request("POST", f"{base}/make-coffee", {"identity": "m0"}).status == 404
    dry = open_world.client.call("POST", f"{base}/member-add", {"identity": "m0", "cert": cert, "dry_run": True}).json()
    assert dry["proposal"]["actions"][0]["name"] == "set_member"
    assert dry["explanation"]["identity"] == "m0"
    assert open_world.created() == []


def test_the_commands_name_what_they_cannot_read_or_write(open_world: World) -> None:
    w = open_world
    cert = w.file("m2_cert.pem", w.members["m2"].cert_pem)
    missing = w.cli("member", "add", "--cert", str(w.folder / "missing.pem"), "--identity", "m0")
    assert missing.returncode == 2
    assert "--cert: cannot read" in missing.stderr
    bad_json = w.cli("member", "add", "--cert", cert, "--member-data", "{nope", "--identity", "m0")
    assert bad_json.returncode == 2
    assert "--member-data: not JSON" in bad_json.stderr
    other = w.file("other.pem", "something else")
    kept = w.cli("service", "identity", "--save", other)
    assert kept.returncode == 2
    assert "exists with other content" in kept.stderr
    assert Path(other).read_text() == "something else"
    assert "no Open proposal waits for a ballot from m1" in w.ok("proposals", "--pending", "--identity", "m1")
