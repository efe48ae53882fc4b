"""Attacks on the security model's promises that went around the guards, against the real daemon and socket.

Each test is an attack a hostile local user (another uid, in a subprocess) or a hostile service could make; it
failed on the code before its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from signing_agent.client import AgentClient
from tests.e2e.test_hostile_ccf import error_of, stage
from tests.e2e.test_peer_limits import NOBODY, agent_with_limits, system_python
from tests.support.agent import DaemonProcess, daemon, file_identity, write_toml
from tests.support.hostile_ccf import Answer, HostileCCF, hostile_ccf, json_answer
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

pytestmark = pytest.mark.e2e

PROPOSAL = {"actions": [{"name": "transition_node_to_trusted", "args": {"node_id": "ab", "valid_from": "x"}}]}


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def as_uid(uid: int, code: str, *args: str) -> str:
    """Run ``code`` (a Python program) as ``uid`` (gid root, to reach a 0660 socket); its stdout."""
    if os.getuid() != 0:
        missing("switching to another uid needs root")
    result = subprocess.run(
        [system_python(), "-I", "-c", code, *args],
        user=uid,
        group=0,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@contextlib.contextmanager
def shared_agent(workdir: Path, member: Member) -> Iterator[DaemonProcess]:
    """The daemon on a 0660 socket that nobody (gid root) can reach; no rule admits nobody."""
    with agent_with_limits(workdir, member, resource.getrlimit(resource.RLIMIT_NOFILE)) as proc:
        yield proc


# --- Denials cost the caller, not the disk: malformed HTTP never reaches the denial budget -------------------------

# Sends argv[2] requests whose head aiohttp itself refuses (before any middleware, so before the denial budget), each
# on a new connection, and reads the 400.
MALFORMED_HTTP = r"""
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: -" + b"9" * 150 + b"\r\n\r\n"
answered = 0
for _ in range(n):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(head)
        answered += s.recv(4096).startswith(b"HTTP/1.0 400")
print(answered)
"""


def test_malformed_http_from_an_unadmitted_peer_cannot_flood_the_log(workdir: Path, member: Member) -> None:
    """No rule admits nobody, yet each request head aiohttp refuses was one log line (about 250 bytes): 2,000 of
    them wrote half a megabyte of log in well under a second, never charged to nobody's denial budget."""
    with shared_agent(workdir, member) as proc:
        before = len(proc.stderr)
        answered = as_uid(NOBODY, MALFORMED_HTTP, str(proc.socket), "2000")
        assert int(answered) == 2000  # each got its 400: the agent still answers them
        assert AgentClient(proc.socket, timeout=30).health()["status"] == "ok"
        grown = proc.stderr[before:]
    lines = grown.count("malformed request from a client")
    assert 1 <= lines <= 3, f"{lines} log lines ({len(grown)} bytes) for one peer's malformed requests"
    assert "Traceback" not in grown


# --- Denials cost the caller, not the disk: an error message quoting the caller's value whole ----------------------


def test_an_error_quoting_a_huge_value_is_not_logged_whole(workdir: Path, member: Member) -> None:
    """An admitted peer's malformed request is charged to its budget (30 a minute), but each could carry up to
    agent.max_request_bytes (8 MiB) into one log line: a msg_type, an identity name or a list of unknown fields is
    quoted in full in the error, and the error was logged. 30 a minute of those is 4 MiB of log a second."""
    big = "x" * (1024 * 1024)
    bodies: list[dict[str, Any]] = [
        {"identity": "m0", "msg_type": big},
        {"identity": big, "msg_type": "ack", "payload": {"stateDigest": "00"}},
        {"identity": "m0", "msg_type": "ack", **{f"k{i:06d}{'y' * 20}": 1 for i in range(40_000)}},
    ]
    with shared_agent(workdir, member) as proc:
        client = AgentClient(proc.socket, timeout=60)
        before = len(proc.stderr)
        for body in bodies:
            for route in ("/v1/sign", "/v1/explain"):
                resp = client.request("POST", route, body)
                assert resp.status in (400, 404), resp.body[:300]
        grown = proc.stderr[before:]
    assert grown.count("failed: ") == 6, grown[-2000:]
    assert len(grown) < 64 * 1024, f"{len(grown)} bytes of log for 6 malformed requests"
    for line in grown.splitlines():
        assert len(line) < 4096, line[:300]
        json.loads(line)  # still one JSON line each


# --- Files the agent trusts are really its own: the recovery state file ----------------------------------------------

PLANT = r"""
import sys
open(sys.argv[1], "w").write(sys.argv[2])
"""


def planted_state(configured_pem: bytes, attacker_pem: bytes) -> str:
    """A recovery state file that says the service's identity was adopted after a recovery: the attacker's. The
    configured certificate's fingerprint is public, so the agent finds nothing amiss."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    fingerprint = x509.load_pem_x509_certificate(configured_pem).fingerprint(hashes.SHA256()).hex()
    adopted = {"certificate": attacker_pem.decode(), "sha256": "0" * 64, "configured_sha256": fingerprint}
    return json.dumps({"version": 1, "submissions": {}, "adopted_identity": adopted})


@contextlib.contextmanager
def agent_with_state_dir(workdir: Path, member: Member, state: Path) -> Iterator[tuple[Path, HostileCCF]]:
    """A service at a hostile endpoint whose certificate the agent does not pin (it pins an unrelated one), and
    recovery state in ``state``. Yields the configuration file and the endpoint; the daemon is started by the test."""
    with hostile_ccf(workdir) as ccf:
        key, cert = member.write(workdir / "keys")
        _, configured = make_member("real-service", "secp256r1").write(workdir / "service")
        cfg = write_toml(
            workdir / "agent.toml",
            {
                "agent": {"socket": workdir / "run" / "a.sock"},
                "audit": {"path": workdir / "audit" / "audit.jsonl"},
                **file_identity("m0", cert, key),
                "services.default": {"url": ccf.url, "service_certificate": configured},
                "recovery": {"state_dir": state},
            },
        )
        yield cfg, ccf


@pytest.mark.parametrize("weakness", ["world-writable", "owned by another user", "a symlink to theirs"])
def test_a_planted_recovery_state_file_does_not_repin_the_service(workdir: Path, member: Member, weakness: str) -> None:
    """Another user who can write the recovery state folder plants ``recovery-default.json`` naming their own
    certificate as the identity adopted after a recovery. The agent used to re-pin the service to it at start-up,
    without an audit record, and then sent signed governance to whoever held that certificate. Now the agent
    refuses a state folder (or file) that is not its own (audited `recovery_state_refused`) and stays pinned to the
    configured certificate."""
    if os.getuid() != 0:
        missing("planting a file as another uid needs root")
    workdir.chmod(0o755)
    theirs = workdir / "theirs"
    state = workdir / "state"
    if weakness == "world-writable":
        state.mkdir(mode=0o700)
        state.chmod(0o1777)  # sticky like /tmp: nobody's file stays nobody's
        planted_in = state
    elif weakness == "owned by another user":
        state.mkdir(mode=0o700)
        os.chown(state, NOBODY, 0)
        planted_in = state
    else:
        theirs.mkdir(mode=0o700)
        os.chown(theirs, NOBODY, 0)
        state.symlink_to(theirs)
        planted_in = theirs
    with agent_with_state_dir(workdir, member, state) as (cfg, ccf):
        content = planted_state((workdir / "service" / "real-service_cert.pem").read_bytes(), ccf.ca.cert_pem.bytes())
        as_uid(NOBODY, PLANT, str(planted_in / "recovery-default.json"), content)
        ccf.answer("POST", r"proposals:create$", json_answer({"proposalId": "ab" * 32, "proposalState": "Open"}))
        with daemon(cfg) as proc:
            resp = AgentClient(proc.socket, timeout=60).request(
                "POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": PROPOSAL}
            )
            stderr = proc.stderr
    # The agent keeps serving, pinned to the configured certificate: the endpoint is not trusted, nothing is sent.
    assert resp.status == 502, resp.body
    assert ccf.seen("POST") == []
    records = [json.loads(line) for line in (workdir / "audit" / "audit.jsonl").read_bytes().splitlines()]
    refused = [r for r in records if r["event"] == "recovery_state_refused"]
    assert refused, [r["event"] for r in records]
    assert all(r["event"] != "identity_adopted" for r in records)
    assert "Traceback" not in stderr


# --- Bad input never gets a 500: a pinned service's answer nested too deeply for Python's json -----------------------

DEEP = b"[" * 200_000 + b"]" * 200_000  # 400 KB, well under max_response_bytes


def deep_json() -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=DEEP, content_type="application/json")

    return answer


def test_a_deeply_nested_answer_from_the_service_is_not_a_500(workdir: Path, member: Member) -> None:
    """A pinned service (compromised, or a node with a bug) answers JSON nested deeper than Python's recursion
    limit. Parsing it raised RecursionError, which no one caught: a 500 with a traceback for reads, health and the
    member's status, and a traceback per poll in the recovery watcher."""
    with hostile_ccf(workdir) as ccf:
        key, cert = member.write(workdir / "keys")
        cfg = write_toml(
            workdir / "agent.toml",
            {
                "agent": {"socket": workdir / "run" / "a.sock"},
                "audit": {"path": workdir / "audit" / "audit.jsonl"},
                **file_identity("m0", cert, key),
                "services.default": {"url": ccf.url, "service_certificate": ccf.service_cert},
            },
        )
        for path in (r"^/gov/", r"^/node/"):
            ccf.answer("GET", path, deep_json())
        with daemon(cfg) as proc:
            client = AgentClient(proc.socket, timeout=60)
            for route in (
                "/v1/services/default/proposals",
                f"/v1/services/default/proposals/{'ab' * 32}",
                "/v1/services/default/status",
                "/v1/health",
            ):
                resp = client.request("GET", route)
                assert resp.status != 500, (route, resp.body[:300])
            stderr = proc.stderr
    assert "Traceback" not in stderr
    assert "RecursionError" not in stderr


# --- Bad input never gets a 500: a claimed service certificate that is not ASCII -------------------------------------

NOT_ASCII_PEM = "-----BEGIN CERTIFICATE-----\u00e9\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("pin", "method", "route", "body"),
    [
        pytest.param("other", "POST", "/v1/services/default/recovery/m0/share", None, id="node-network-share"),
        pytest.param(
            "other",
            "POST",
            "/v1/services/default/recovery/approve-identity",
            {"identity": "m0", "proposal_id": "ab" * 32, "sha256": "cd" * 32},
            id="node-network-approve",
        ),
        pytest.param("identity_url", "GET", "/v1/services/default/proposals", None, id="identity-endpoint"),
    ],
)
def test_a_claimed_certificate_that_is_not_ascii_is_not_a_500(
    pin: str, method: str, route: str, body: dict[str, Any] | None
) -> None:
    """A network attacker in front of the service (``accept_transition_to``: the agent reads the identity the
    endpoint claims on ``/node/network``), or the identity endpoint, answers a "certificate" with a non-ASCII
    character in it. Encoding it raised UnicodeEncodeError, which no one caught: a 500 with a traceback for the
    share and approve-identity routes (and each recovery watcher poll), and for every request to an
    ``identity_url`` service."""
    with stage({"accept_transition_to": True}, {"enabled": False}, pin=pin) as (world, _):
        world.ccf.answer("GET", "^/node/network$", json_answer({"service_certificate": NOT_ASCII_PEM}))
        world.ccf.answer("GET", "^/ledgerIdentity/x$", json_answer({"ledgerTlsCertificate": NOT_ASCII_PEM}))
        resp = world.client.request(method, route, body)
        stderr = world.agent.stderr
    assert resp.status != 500, resp.body[:300]
    assert error_of(resp)["code"] in ("CCFTrustError", "CCFUnavailable", "Conflict"), resp.body[:300]
    assert "Traceback" not in stderr
    assert "UnicodeEncodeError" not in stderr
