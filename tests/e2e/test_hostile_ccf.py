"""A hostile pinned CCF service against the real daemon: pinned TLS has no exits, and its answers are bounded.

The service is the one the agent pins (tests.support.hostile_ccf): TLS verifies, so only the agent's own guards stand
between its answers and the agent. It redirects signed proposals, ballots and reads to plain ``http://`` and to
another HTTPS server the agent would trust just as much; it answers with 100 MB and endless bodies, drips a body one
byte a second, or goes silent after its headers; and it feeds the unattended recovery watcher an endless body.
The agent must answer an error that says what happened, send nothing anywhere else and nothing twice, and keep its
memory (the daemon's peak RSS, read from /proc) and its time bounded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signing_agent.audit import verify_audit
from signing_agent.client import AgentClient, Response
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, short_dir, write_toml
from tests.support.hostile_ccf import (
    HostileCCF,
    drip,
    hostile_ccf,
    huge,
    json_answer,
    redirect,
    silence,
)
from tests.support.pki import make_member, make_rsa_key, pem_private

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
RSS_LIMIT_MIB = 200
"""Well above the daemon's working set (about 60 MiB) and the 4 MiB answer cap; far below an answer held whole."""
PID = "ab" * 32
PROPOSAL = {
    "actions": [{"name": "transition_node_to_trusted", "args": {"node_id": "ab" * 32, "valid_from": "20240101000000Z"}}]
}
BALLOT = "export function vote (proposal, proposerId) { return true }"


@dataclass
class Stage:
    folder: Path
    ccf: HostileCCF
    agent: DaemonProcess

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.agent.socket, timeout=120)

    def peak_rss_mib(self) -> float:
        """The daemon's peak resident set (VmHWM): every byte it ever held at once, not a sample."""
        for line in Path(f"/proc/{self.agent.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def still_serves(self) -> None:
        """The daemon answers other requests, and the same service again once it behaves (a healthy pool)."""
        assert [i["name"] for i in self.client.identities()] == ["m0"]
        self.ccf.answer("GET", r"^/gov/members/proposals$", json_answer({"value": []}))
        assert self.client.call("GET", "/v1/services/default/proposals").json() == {"value": []}


@contextlib.contextmanager
def stage(
    service: dict[str, Any] | None = None,
    recovery: dict[str, Any] | None = None,
    *,
    targets: int = 0,
    pin: str = "service",
    settings: dict[str, Any] | None = None,
) -> Iterator[tuple[Stage, list[HostileCCF]]]:
    """A hostile service, ``targets`` redirect targets (plain http, then HTTPS trusted like the service), and the
    daemon configured with them (``settings``: more of its ``[agent]``). ``pin``: the agent pins the service's
    certificate (``service``), fetches it from the service's ``/ledgerIdentity/x`` (``identity_url``), or pins an
    unrelated one (``other``: pinned TLS fails)."""
    folder = short_dir()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        ccf = stack.enter_context(hostile_ccf(folder))
        others = [stack.enter_context(hostile_ccf(folder, ca=ccf.ca, tls=i > 0)) for i in range(targets)]
        member = make_member("m0", "secp256r1")
        key, cert = member.write(folder / "keys")
        trusts: dict[str, dict[str, Any]] = {
            "service": {"service_certificate": ccf.service_cert},
            "identity_url": {"identity_url": f"{ccf.url}/ledgerIdentity/x", "identity_ca_bundle": ccf.service_cert},
            "other": {"service_certificate": member.write(folder / "unrelated")[1]},
        }
        trust = trusts[pin]
        tables: dict[str, Any] = {
            "agent": {"socket": folder / "run" / "agent.sock", **(settings or {})},
            "audit": {"path": folder / "audit" / "audit.jsonl"},
            **file_identity("m0", cert, key),
            "services.default": {"url": ccf.url, **trust, **(service or {})},
        }
        if recovery is not None:
            enc = folder / "keys" / "m0_enc.pem"
            enc.write_bytes(pem_private(make_rsa_key()))
            enc.chmod(0o600)
            tables["identities.m0.encryption_key"] = {"backend": "file", "path": enc}
            tables["services.default"]["recovery_identities"] = ["m0"]
            tables["recovery"] = {**recovery, "state_dir": folder / "state"}
        agent = stack.enter_context(daemon(write_toml(folder / "agent.toml", tables)))
        yield Stage(folder, ccf, agent), others


def error_of(resp: Response) -> dict[str, str]:
    assert resp.headers.get("x-relayed-from") != "ccf", resp.body[:300]
    error: dict[str, str] = resp.json()["error"]
    return error


# --- Item 3: pinned TLS has no exits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """A socket route and the one request to CCF it ends with (the one the hostile service redirects)."""

    method: str
    route: str
    body: dict[str, Any] | None
    ccf_method: str
    ccf_path: str


OPERATIONS = {
    "propose": Operation(
        "POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": PROPOSAL},
        "POST", "/gov/members/proposals:create",
    ),
    "vote": Operation(
        "POST", f"/v1/services/default/proposals/{PID}/ballots", {"identity": "m0", "ballot": BALLOT},
        "POST", f"/gov/members/proposals/{PID}/ballots/", # + the member id, then :submit
    ),
    "read": Operation("GET", "/v1/services/default/proposals", None, "GET", "/gov/members/proposals"),
}  # fmt: skip


@pytest.fixture(scope="module")
def redirecting() -> Iterator[tuple[Stage, list[HostileCCF]]]:
    with stage({"max_attempts": 3}, targets=2) as world:
        yield world


@pytest.mark.parametrize("target", ["http", "https"])
@pytest.mark.parametrize("status", [302, 307, 308])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_redirect_is_an_error_that_names_it_and_is_never_followed(
    redirecting: tuple[Stage, list[HostileCCF]], operation: str, status: int, target: str
) -> None:
    world, targets = redirecting
    op = OPERATIONS[operation]
    elsewhere = targets[0] if target == "http" else targets[1]
    for server in (world.ccf, *targets):
        server.reset()
    # The target would take the request gladly (and the HTTPS one presents a certificate the agent trusts).
    for method in ("GET", "POST"):
        elsewhere.answer(method, "", json_answer({"proposalId": PID, "proposalState": "Open", "value": []}))
    location = f"{elsewhere.url}/stolen{op.ccf_path}?from={operation}"
    world.ccf.answer(
        "GET", rf"^/gov/members/proposals/{PID}$", json_answer({"proposalId": PID, "proposalState": "Open"})
    )
    world.ccf.answer("GET", rf"^/gov/members/proposals/{PID}/actions$", json_answer(PROPOSAL))
    world.ccf.answer(op.ccf_method, f"^{op.ccf_path}", redirect(status, location))

    resp = world.client.request(op.method, op.route, op.body)

    assert resp.status == 502
    error = error_of(resp)
    assert error["code"] == "CCFAnswerRefused"
    assert f"answered {status}" in error["message"]
    assert location in error["message"]
    assert elsewhere.seen() == []
    assert [s.path.startswith(op.ccf_path) for s in world.ccf.seen(op.ccf_method)] == [True], "sent exactly once"


def test_an_id_from_an_answer_never_walks_a_request_elsewhere(redirecting: tuple[Stage, list[HostileCCF]]) -> None:
    """Reviewing a proposal reads each listed member's ballot, with the member id the service listed in the path: a
    listed "id" such as ``../../../recovery/members/<id>:recover`` must not make the request another one (the
    service's own ids are 64 lowercase hex; anything else is left out)."""
    world, _ = redirecting
    world.ccf.reset()
    member = "cd" * 32
    walks = ["../../../../node/network", f"../../../recovery/members/{member}:recover", "x?api-version=1#", "AB" * 32]
    world.ccf.answer(
        "GET", rf"^/gov/members/proposals/{PID}$", json_answer({"proposalId": PID, "proposalState": "Open"})
    )
    world.ccf.answer("GET", rf"^/gov/members/proposals/{PID}/actions$", json_answer(PROPOSAL))
    world.ccf.answer("GET", r"^/gov/service/members$", json_answer({"value": [{"memberId": m} for m in [
        member, *walks]]}))  # fmt: skip
    world.ccf.answer("GET", rf"^/gov/members/proposals/{PID}/ballots/{member}$", json_answer(BALLOT))

    review = world.client.call("GET", f"/v1/services/default/proposals/{PID}").json()

    assert review["ballots"] == {member: json.dumps(BALLOT)}
    paths = sorted(s.path for s in world.ccf.seen())
    ballot = f"/gov/members/proposals/{PID}/ballots/{member}"
    assert paths == sorted([f"/gov/members/proposals/{PID}", f"/gov/members/proposals/{PID}/actions",
                            "/gov/service/members", ballot]), paths  # fmt: skip


def test_words_from_an_answer_stay_short_in_logs_and_messages() -> None:
    """CCF's error codes and proposal states go into the agent's log lines (each retry says why) and its error
    messages. A service (or an endpoint trusted provisionally for reads) answering with a megabyte "code" or
    "state", line breaks included, must not make each of them a megabyte: the agent's log is on the host's disk."""
    huge_word = "Busy\n" + "x" * MiB
    with stage({"max_attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.01}) as (world, _):
        world.ccf.answer("GET", "^/gov/members/proposals$", json_answer({"error": {"code": huge_word}}, status=503))
        world.ccf.answer("GET", rf"^/gov/members/proposals/{PID}$", json_answer({"proposalId": PID,
                         "proposalState": huge_word}))  # fmt: skip
        before = len(world.agent.stderr)

        listed = world.client.request("GET", "/v1/services/default/proposals")
        assert listed.status == 503  # CCF's answer, relayed unchanged once the attempts are spent
        assert len(listed.body) > MiB
        vote = world.client.request(
            "POST", f"/v1/services/default/proposals/{PID}/ballots", {"identity": "m0", "ballot": BALLOT}
        )
        assert vote.status == 409
        assert "not Open: no ballot was signed" in error_of(vote)["message"]
        assert len(vote.body) < 4096
        assert len(world.ccf.seen("GET")) == 4  # three attempts at the list, one read of the proposal

        logged = world.agent.stderr[before:]
        assert "Busy" in logged  # the retries say why...
        assert len(logged) < 64 * 1024  # ...in a few short lines
        assert "\nxxx" not in logged


def test_a_redirected_proposal_is_audited_as_failed(redirecting: tuple[Stage, list[HostileCCF]]) -> None:
    world, targets = redirecting
    world.ccf.reset()
    world.ccf.answer("POST", "proposals:create", redirect(307, f"{targets[0].url}/x"))
    assert world.client.request("POST", OPERATIONS["propose"].route, OPERATIONS["propose"].body).status == 502
    audit = world.folder / "audit" / "audit.jsonl"
    assert verify_audit([audit]).ok
    last = json.loads(audit.read_text().splitlines()[-1])
    assert (last["event"], last["error"], last["msg_type"]) == ("failed", "CCFAnswerRefused", "proposal")


def test_a_forward_cut_by_the_request_deadline_is_audited_as_failed() -> None:
    """agent.request_timeout (2 s) runs out while a signed proposal waits for the service (its own timeouts are
    longer): the caller gets a 504, and the log says the agent stopped waiting, rather than ending at ``signed``."""
    slow_service = {"request_timeout": 60.0, "read_timeout": 60.0, "total_timeout": 60.0, "max_attempts": 1}
    with stage(slow_service, settings={"request_timeout": 2.0}) as (world, _):
        world.ccf.answer("POST", "proposals:create", silence())
        resp = world.client.request("POST", OPERATIONS["propose"].route, OPERATIONS["propose"].body)
        assert resp.status == 504, resp.body
        assert error_of(resp)["code"] == "AgentTimeout"
        audit = world.folder / "audit" / "audit.jsonl"
        assert verify_audit([audit]).ok
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        signed, last = records[-2], records[-1]
        assert (signed["event"], last["event"], last["error"]) == ("signed", "failed", "Cancelled")
        assert last["cose_sha256"] == signed["cose_sha256"]
        assert last["request_id"] == signed["request_id"]


@pytest.mark.parametrize("status", [302, 307])
def test_the_identity_endpoint_does_not_redirect_either(status: int) -> None:
    with stage(pin="identity_url", targets=2) as (world, targets):
        location = f"{targets[1].url}/ledgerIdentity/x"
        world.ccf.answer("GET", "^/ledgerIdentity/x$", redirect(status, location))
        targets[1].answer("GET", "", json_answer({"ledgerTlsCertificate": world.ccf.ca.cert_pem.bytes().decode()}))

        error = error_of(world.client.request("GET", "/v1/services/default/proposals"))

        assert error["code"] == "CCFAnswerRefused"
        assert f"identity endpoint {world.ccf.url}/ledgerIdentity/x answered {status}" in error["message"]
        assert location in error["message"]
        assert targets[1].seen() == []
        assert [s.path for s in world.ccf.seen()] == ["/ledgerIdentity/x"]


def test_the_node_network_probe_does_not_redirect_either() -> None:
    """``accept_transition_to``: when pinned TLS fails, the agent reads the identity the endpoint claims."""
    with stage({"accept_transition_to": True}, {"enabled": False}, pin="other", targets=1) as (world, targets):
        location = f"{targets[0].url}/node/network"
        world.ccf.answer("GET", "^/node/network$", redirect(307, location))

        error = error_of(world.client.request("POST", "/v1/services/default/recovery/m0/share"))

        # The share is refused (untrusted), and the reason the claimed identity could not be adopted is the redirect.
        assert error["code"] == "CCFTrustError"
        assert "GET /node/network answered 307" in error["message"]
        assert location in error["message"]
        assert targets[0].seen() == []
        assert [s.path for s in world.ccf.seen()] == ["/node/network"]


# --- Item 4: bounded answers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flooding() -> Iterator[Stage]:
    with stage({"max_attempts": 3}) as (world, _):
        yield world


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"size": 100 * MiB, "declare": True}, id="100MB-declared"),
        pytest.param({"size": 100 * MiB, "declare": False}, id="100MB-chunked"),
        pytest.param({"size": None, "declare": False}, id="endless"),
    ],
)
@pytest.mark.parametrize("operation", ["read", "propose"])
def test_a_huge_answer_is_abandoned_at_the_cap_and_memory_stays_bounded(
    flooding: Stage, operation: str, body: dict[str, Any]
) -> None:
    world = flooding
    op = OPERATIONS[operation]
    world.ccf.reset()
    world.ccf.answer(op.ccf_method, f"^{op.ccf_path}", huge(**body))

    started = time.monotonic()
    resp = world.client.request(op.method, op.route, op.body)

    assert resp.status == 502
    error = error_of(resp)
    assert error["code"] == "CCFAnswerRefused"
    assert "over 4194304 bytes (services.default.max_response_bytes)" in error["message"]
    assert len(world.ccf.seen(op.ccf_method)) == 1, "an answer over the cap is not asked for again"
    # Abandoned at the cap, not drained: what the service got out is the cap plus what socket buffers hold.
    assert world.ccf.sent_body_bytes < 48 * MiB
    assert time.monotonic() - started < 60
    assert world.peak_rss_mib() < RSS_LIMIT_MIB
    world.still_serves()


def test_the_cap_is_per_service_for_big_reads() -> None:
    with stage({"max_response_bytes": 6 * MiB}) as (world, _):
        world.ccf.answer("GET", "^/gov/members/proposals$", huge(5 * MiB, declare=True))
        assert len(world.client.call("GET", "/v1/services/default/proposals").body) == 5 * MiB
        world.ccf.answer("GET", "^/gov/members/proposals$", huge(7 * MiB, declare=False))
        error = error_of(world.client.request("GET", "/v1/services/default/proposals"))
        assert "over 6291456 bytes (services.default.max_response_bytes)" in error["message"]


@pytest.mark.parametrize("pin", ["identity_url", "other"])
def test_identity_reads_are_capped_too(pin: str) -> None:
    """The identity endpoint (Azure Managed CCF) and ``/node/network`` (``accept_transition_to``): same cap."""
    with stage({"accept_transition_to": True}, {"enabled": False}, pin=pin) as (world, _):
        path = "/ledgerIdentity/x" if pin == "identity_url" else "/node/network"
        world.ccf.answer("GET", f"^{path}$", huge(None, declare=False))
        route = "/v1/services/default/proposals" if pin == "identity_url" else "/v1/services/default/recovery/m0/share"

        error = error_of(world.client.request("POST" if pin == "other" else "GET", route))

        # A share is refused as untrusted; the message says why the claimed identity could not be adopted.
        assert error["code"] == ("CCFTrustError" if pin == "other" else "CCFAnswerRefused")
        assert "over 4194304 bytes (services.default.max_response_bytes)" in error["message"]
        assert world.ccf.sent_body_bytes < 48 * MiB
        assert world.peak_rss_mib() < RSS_LIMIT_MIB


@pytest.fixture(scope="module")
def slow() -> Iterator[Stage]:
    with stage({"request_timeout": 3.0, "read_timeout": 2.0, "total_timeout": 5.0, "max_attempts": 5}) as (w, _):
        yield w


def test_a_slow_drip_answer_ends_in_a_timeout_within_total_timeout(slow: Stage) -> None:
    slow.ccf.reset()
    slow.ccf.answer("GET", "^/gov/members/proposals$", drip(10_000, 1.0))  # 1 byte/s: read_timeout never fires

    resp = slow.client.request("GET", "/v1/services/default/proposals")

    assert resp.status == 504
    error = error_of(resp)
    assert error["code"] == "CCFTimeout"
    assert "no complete answer within" in error["message"]
    assert "total_timeout (5 s)" in error["message"]
    # request_timeout ends each attempt, total_timeout the request: 2 attempts fit in 5 s, not max_attempts.
    assert len(slow.ccf.seen("GET")) <= 2
    slow.still_serves()


def test_a_service_gone_silent_after_its_headers_ends_at_read_timeout() -> None:
    with stage({"request_timeout": 60.0, "read_timeout": 1.0, "total_timeout": 60.0, "max_attempts": 2}) as (w, _):
        w.ccf.answer("GET", "^/gov/members/proposals$", silence())

        resp = w.client.request("GET", "/v1/services/default/proposals")

        assert resp.status == 504
        assert "the service sent nothing for 1 s (read_timeout) (after 2 attempts)" in error_of(resp)["message"]
        w.still_serves()


def test_the_recovery_watcher_stays_bounded_against_an_endless_answer() -> None:
    with stage(recovery={"enabled": True, "poll_interval": 0.2, "max_backoff": 0.5}) as (world, _):
        world.ccf.answer("GET", "^/gov/service/info$", huge(None, declare=False))
        deadline = time.monotonic() + 90
        while len(world.ccf.seen("GET")) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        polls = len(world.ccf.seen("GET"))
        assert polls >= 4, "the watcher keeps polling"
        watcher = world.client.call("GET", "/v1/recovery").json()["watchers"][0]
        assert watcher["state"] == "failed"
        assert "services.default.max_response_bytes" in watcher["last_error"]
        assert world.ccf.sent_body_bytes < polls * 48 * MiB
        assert world.peak_rss_mib() < RSS_LIMIT_MIB
        world.still_serves()


# --- What the CLI prints of CCF's answers -------------------------------------------------------------------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J\r\u202e"
"""Retitle the terminal, clear it, return to the start of the line, reverse the text that follows."""
CONTROLS = set("\x1b\x07\r\u202e")


def test_ccf_text_relayed_to_the_cli_reaches_the_terminal_escaped() -> None:
    """CCF's error messages and proposals are relayed by the agent unchanged (as the README says), and the CLI prints
    them: a service must not be able to write escape sequences to the operator's terminal through them."""
    with stage() as (world, _):
        world.ccf.answer(
            "GET", r"^/gov/members/proposals$",
            json_answer({"error": {"code": "Busy", "message": f"try later{ESCAPES}fake: all good"}}, status=400),
        )  # fmt: skip
        env = cli_env({"SIGNING_AGENT_SOCK": str(world.agent.socket)})
        argv = [sys.executable, "-m", "signing_agent", "proposals"]
        refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 5, refused.stderr
        assert "try later" in refused.stderr
        assert not CONTROLS & set(refused.stderr + refused.stdout)
        assert "\\x1b]0;owned\\x07\\x1b[2J\\r\\u202efake: all good" in refused.stderr

        listing = {"value": [{"proposalId": PID, "proposalState": f"Open{ESCAPES}", "ballotCount": 0}]}
        world.ccf.answer("GET", r"^/gov/members/proposals$", json_answer(listing))
        world.ccf.answer("GET", rf"^/gov/members/proposals/{PID}/actions$",
                         json_answer({"actions": [{"name": f"set_member{ESCAPES}"}]}))  # fmt: skip
        listed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert listed.returncode == 0, listed.stderr
        assert PID in listed.stdout
        assert not CONTROLS & set(listed.stdout + listed.stderr)
        assert "set_member\\x1b]0;owned" in listed.stdout
