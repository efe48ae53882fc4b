"""Policy and audit through the real socket: clients run as another uid, so SO_PEERCRED is the kernel's own answer."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from signing_agent import audit as audit_module
from signing_agent.audit import verify_audit
from signing_agent.client import AgentClient
from signing_agent.config import AgentConfig
from signing_agent.policy import ACCEPT_BALLOT, REJECT_BALLOT
from tests.support.agent import agent_config, file_identity, running_agent
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
TRUST = {"actions": [{"name": "transition_node_to_trusted", "args": {"node_id": "n"}}]}
CONSTITUTION = {"actions": [{"name": "set_constitution", "args": {"constitution": "..."}}]}
PID = "a" * 64


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1")}


def system_python() -> str:
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        missing("a system python3 that another uid can run")
    return python


def config_for(workdir: Path, members: dict[str, Member], rules: list[dict[str, Any]], **agent: Any) -> AgentConfig:
    run = workdir / "run"
    run.mkdir(mode=0o750, exist_ok=True)
    workdir.chmod(0o750)
    tables: dict[str, Any] = {"agent": {"socket": run / "a.sock", "socket_mode": "0660", **agent}}
    for name, member in members.items():
        key, cert = member.write(workdir / "keys")
        tables.update(file_identity(name, cert, key))
    if rules:
        tables["policy.rules"] = rules
    return agent_config(workdir, tables)


def as_nobody(sock: Path, calls: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """Run ``calls`` from a separate process as uid 65534 (gid 0, to reach the 0660 socket)."""
    if os.getuid() != 0:
        missing("switching to another uid needs root")
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from signing_agent.client import AgentClient\n"
        "c = AgentClient(sys.argv[2], timeout=20); out = []\n"
        "for m, p, b in json.loads(sys.argv[3]):\n"
        "    r = c.request(m, p, b)\n"
        "    ct = r.headers.get('content-type', '')\n"
        "    out.append([r.status, r.json() if ct.startswith('application/json') else r.body.hex()])\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [system_python(), "-I", "-c", code, str(REPO), str(sock), json.dumps(calls)],
        user=NOBODY,
        group=0,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return [(status, body) for status, body in json.loads(result.stdout)]


def sign_body(identity: str, msg_type: str, payload: Any, **extra: Any) -> dict[str, Any]:
    return {"identity": identity, "msg_type": msg_type, "payload": payload, **extra}


def audit_records(config: AgentConfig) -> list[dict[str, Any]]:
    assert config.audit is not None
    return [json.loads(line) for line in config.audit.path.read_bytes().splitlines()]


async def test_each_rule_is_enforced_for_a_real_peer_of_another_uid(workdir: Path, members: dict[str, Member]) -> None:
    rule = {
        "name": "nobody-trust",
        "uids": [NOBODY],
        "identities": ["m0"],
        "msg_types": ["proposal", "ballot"],
        "actions_allow": ["transition_node_to_trusted"],
        "ballots": ["accept"],
        "rate_limit": 2,
        "rate_window": 3600.0,
    }
    config = config_for(workdir, members, [rule])
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/v1/sign", sign_body("m0", "proposal", TRUST)),  # 0 allowed (token 1)
        ("POST", "/v1/sign", sign_body("m0", "proposal", CONSTITUTION)),  # 1 action not allowed
        ("POST", "/v1/sign", sign_body("m0", "ballot", {"ballot": ACCEPT_BALLOT}, proposal_id=PID)),  # 2 raw ballot
        ("POST", "/v1/sign", sign_body("m0", "ballot", {"ballot": REJECT_BALLOT}, proposal_id=PID)),  # 3 ballot
        ("POST", "/v1/sign", sign_body("m1", "proposal", TRUST)),  # 4 identity
        ("POST", "/v1/sign", sign_body("m0", "withdrawal", None, proposal_id=PID)),  # 5 msg type
        ("POST", "/v1/explain", sign_body("m0", "proposal", CONSTITUTION)),  # 6 explain, no key, no token
        ("POST", "/v1/sign", sign_body("m0", "proposal", TRUST)),  # 7 allowed (token 2)
        ("POST", "/v1/sign", sign_body("m0", "proposal", TRUST)),  # 8 rate limited
    ]
    async with running_agent(config) as sock:
        results = await asyncio.to_thread(as_nobody, sock, calls)
    statuses = [status for status, _ in results]
    assert statuses == [200, 403, 403, 403, 403, 403, 200, 200, 403], results
    reasons = {i: results[i][1]["error"]["message"] for i in (1, 2, 3, 4, 5, 8)}
    assert all(results[i][1]["error"]["code"] == "PolicyDenied" for i in reasons)
    assert all("nobody-trust" in reason for reason in reasons.values())
    assert "set_constitution" in reasons[1]
    # The agent cannot see which proposal a raw ballot accepts, and this rule constrains actions.
    assert "ballot signed through POST /v1/sign" in reasons[2]
    assert "ballot script" in reasons[3]
    assert "identity 'm1'" in reasons[4]
    assert "withdrawal" in reasons[5]
    assert "rate limit" in reasons[8]
    explained = results[6][1]
    assert explained["decision"] == {"allowed": False, "rule": "nobody-trust", "reason": reasons[1].split(": ", 2)[2]}
    assert explained["proposal_actions"] == ["set_constitution"]
    assert explained["member_id"] == members["m0"].member_id
    assert explained["protected_headers"]["ccf.gov.msg.type"] == "proposal"

    assert config.audit is not None
    report = verify_audit([config.audit.path])
    assert report.ok, report.first_break
    records = audit_records(config)
    denied = [r for r in records if r["event"] == "denied"]
    signed = [r for r in records if r["event"] == "signed"]
    assert len(denied) == 6
    assert len(signed) == 2
    assert {r["peer"]["uid"] for r in denied + signed} == {NOBODY}
    assert all(r["rule"] == "nobody-trust" and r["reason"] for r in denied)
    assert all(len(r["cose_sha256"]) == 64 and r["request_id"] for r in signed)
    # Digests only: no ballot script and no payload body in the log.
    assert b"export function" not in config.audit.path.read_bytes()


@pytest.mark.parametrize(("exe_matches", "expected"), [(True, 200), (False, 403)])
async def test_a_rule_can_require_the_peer_executable(
    workdir: Path, members: dict[str, Member], exe_matches: bool, expected: int
) -> None:
    exe = os.path.realpath(system_python()) if exe_matches else "/usr/bin/perl"
    config = config_for(workdir, {"m0": members["m0"]}, [{"name": "py", "uids": [NOBODY], "executables": [exe]}])
    async with running_agent(config) as sock:
        [(status, body)] = await asyncio.to_thread(as_nobody, sock, [("GET", "/v1/identities", None)])
    assert status == expected, body
    if expected == 403:
        assert "no policy rule matches peer uid 65534" in body["error"]["message"]


@pytest.fixture
async def local_agent(workdir: Path, members: dict[str, Member]) -> AsyncIterator[tuple[Path, AgentConfig]]:
    config = config_for(workdir, {"m0": members["m0"]}, [], header_timeout=1.0, body_timeout=1.0)
    async with running_agent(config) as sock:
        yield sock, config


async def call(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    resp = await asyncio.to_thread(AgentClient(sock, timeout=10).request, method, path, body)
    return resp.status, resp.headers, resp.body


@pytest.mark.parametrize("failing_event", [b'"event":"received"', b'"event":"signed"'])
async def test_no_signature_leaves_when_the_audit_log_cannot_be_written(
    local_agent: tuple[Path, AgentConfig], monkeypatch: pytest.MonkeyPatch, failing_event: bytes
) -> None:
    sock, config = local_agent
    real_write = audit_module._write_all

    def disk_full(fd: int, data: bytes) -> None:
        if failing_event in data:
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(audit_module, "_write_all", disk_full)
    status, headers, body = await call(sock, "POST", "/v1/sign", sign_body("m0", "proposal", TRUST))
    assert status == 503
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "AuditUnavailable"
    events = [r["event"] for r in audit_records(config)]
    assert "signed" not in events
    monkeypatch.setattr(audit_module, "_write_all", real_write)
    status, _, _ = await call(sock, "POST", "/v1/sign", sign_body("m0", "proposal", TRUST))
    assert status == 200
    assert config.audit is not None
    assert verify_audit([config.audit.path]).ok


async def test_a_slowloris_client_is_cut_off_while_others_are_served(local_agent: tuple[Path, AgentConfig]) -> None:
    sock, _ = local_agent
    reader, writer = await asyncio.open_unix_connection(str(sock))
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    started = time.monotonic()
    served = 0
    closed_after: float | None = None
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            # Others are served while the slow client dribbles.
            served += (await call(sock, "GET", "/v1/health"))[0] == 200
            try:
                eof = await asyncio.wait_for(reader.read(1), 0.25)
            except TimeoutError:
                continue
            if eof == b"":
                closed_after = time.monotonic() - started
                break
    except (ConnectionResetError, BrokenPipeError):
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None, "the slow client was never cut off"
    assert closed_after < 4.0
    assert served >= 2


async def test_a_slow_body_gets_408(local_agent: tuple[Path, AgentConfig]) -> None:
    sock, _ = local_agent
    reader, writer = await asyncio.open_unix_connection(str(sock))
    started = time.monotonic()
    writer.write(b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
    assert b"RequestTimeout" in reply
    assert time.monotonic() - started < 4.0


async def test_explain_uses_no_key_and_reports_the_payload(
    local_agent: tuple[Path, AgentConfig], members: dict[str, Member]
) -> None:
    sock, config = local_agent
    payload = json.dumps(TRUST).encode()
    body = {"identity": "m0", "msg_type": "proposal", "payload_base64": base64.b64encode(payload).decode()}
    now = int(time.time())
    status, _, raw = await call(sock, "POST", "/v1/explain", {**body, "created_at": now, "service": "default"})
    assert status == 200, raw
    got = json.loads(raw)
    assert got["decision"]["allowed"] is True
    assert got["decision"]["rule"] == "default"
    assert got["service"] == "default"
    assert got["protected_headers"]["ccf.gov.msg.created_at"] == now
    assert got["algorithm"] == "ES384"
    import hashlib

    assert got["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert [r["event"] for r in audit_records(config)] == ["started"]
    status, _, raw = await call(sock, "POST", "/v1/explain", {**body, "surprise": 1})
    assert (status, json.loads(raw)["error"]["code"]) == (400, "InvalidRequest")


def events_of(config: AgentConfig, event: str, uid: int) -> list[dict[str, Any]]:
    return [r for r in audit_records(config) if r["event"] == event and r["peer"]["uid"] == uid]


async def test_a_denial_flood_costs_the_caller_not_the_disk(workdir: Path, members: dict[str, Member]) -> None:
    """nobody, whom no rule admits, floods the agent; root, flooding malformed requests of its own, still signs."""
    config = config_for(workdir, {"m0": members["m0"]}, [], denial_rate_limit=5, denial_rate_window=3600.0)
    flood = 300
    async with running_agent(config) as sock:
        results = await asyncio.to_thread(as_nobody, sock, [("GET", "/v1/identities", None)] * flood)
        # Root is counted too: its malformed requests past the budget get 429s...
        statuses = [(await call(sock, "POST", "/v1/sign", {"identity": "m0"}))[0] for _ in range(7)]
        status, headers, body = await call(sock, "POST", "/v1/sign", {"identity": "m0"})
        assert (status, json.loads(body)["error"]["code"]) == (429, "TooManyRequests")
        assert 1 <= int(headers["retry-after"]) <= 3600
        assert json.loads(body)["error"]["retryable"] is True
        # An announced oversized body is refused at once (a 429 now, no longer a 413), without waiting for it.
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 429 "), reply[:100]
        assert b"Connection: close" in reply
        # ...but what the policy allows is never refused, not for root and not after anyone's flood.
        status, _, _ = await call(sock, "POST", "/v1/sign", sign_body("m0", "proposal", TRUST))
        assert status == 200
        size_while_running = config.audit.path.stat().st_size
    assert statuses == [400] * 5 + [429] * 2
    assert [status for status, _ in results] == [403] * 5 + [429] * (flood - 5)
    assert {body["error"]["code"] for _, body in results[5:]} == {"TooManyRequests"}
    assert "uid 65534" in results[-1][1]["error"]["message"]
    # Five denials audited one by one; the rest in one summary, written at shutdown (the window is an hour).
    assert len(events_of(config, "denied", NOBODY)) == 5
    assert size_while_running < 20_000
    [summary] = events_of(config, "throttled", NOBODY)
    assert (summary["dropped"], summary["denied"], summary["malformed"]) == (flood - 5, flood - 5, 0)
    assert float(summary["first_ts"]) <= float(summary["last_ts"]) <= float(summary["ts"])
    [root_summary] = events_of(config, "throttled", 0)
    assert (root_summary["dropped"], root_summary["malformed"]) == (4, 4)
    assert config.audit is not None
    assert verify_audit([config.audit.path]).ok


async def test_denials_of_an_admitted_peer_are_throttled_and_its_allowed_requests_are_not(
    workdir: Path, members: dict[str, Member]
) -> None:
    """nobody may sign only transition_node_to_trusted; it floods set_constitution, then asks for what it may."""
    rule = {"name": "nobody-trust", "uids": [NOBODY], "actions_allow": ["transition_node_to_trusted"]}
    config = config_for(workdir, {"m0": members["m0"]}, [rule], denial_rate_limit=3, denial_rate_window=3600.0)
    calls: list[tuple[str, str, Any]] = [("POST", "/v1/sign", sign_body("m0", "proposal", CONSTITUTION))] * 20
    calls.append(("POST", "/v1/sign", sign_body("m0", "proposal", TRUST)))
    async with running_agent(config) as sock:
        results = await asyncio.to_thread(as_nobody, sock, calls)
    assert [status for status, _ in results] == [403] * 3 + [429] * 17 + [200]
    # A throttled denial leaves no record at all: no "received", no "denied".
    assert len(events_of(config, "received", NOBODY)) == 3 + 1
    assert len(events_of(config, "denied", NOBODY)) == 3
    [summary] = events_of(config, "throttled", NOBODY)
    assert summary["denied"] == 17


async def test_a_summary_is_written_each_window_while_the_flood_goes_on(
    workdir: Path, members: dict[str, Member]
) -> None:
    config = config_for(workdir, {"m0": members["m0"]}, [], denial_rate_limit=2, denial_rate_window=1.0)
    async with running_agent(config) as sock:
        await asyncio.to_thread(as_nobody, sock, [("GET", "/v1/health", None)] * 50)
        for _ in range(200):  # the window is 1 s; give it 20
            if events_of(config, "throttled", NOBODY):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("no summary while the agent runs")
    summaries = events_of(config, "throttled", NOBODY)
    denied = events_of(config, "denied", NOBODY)
    assert sum(s["dropped"] for s in summaries) + len(denied) == 50


async def test_no_rule_lets_another_uid_reload_the_agent(workdir: Path, members: dict[str, Member]) -> None:
    config = config_for(workdir, {"m0": members["m0"]}, [{"name": "nobody-may-all", "uids": [NOBODY]}])
    async with running_agent(config) as sock:
        [(status, body)] = await asyncio.to_thread(as_nobody, sock, [("POST", "/v1/reload", None)])
        # The agent's own uid (this test's) may ask; this in-process agent has no configuration to reload with.
        own = await asyncio.to_thread(AgentClient(sock, timeout=10).request, "POST", "/v1/reload")
    assert status == 403, body
    assert body["error"]["code"] == "PolicyDenied"
    assert (
        f"peer uid {NOBODY}: only the agent's own user (uid {os.getuid()}) and root may reload it"
        in (body["error"]["message"])
    )
    assert (own.status, own.json()["error"]["code"]) == (500, "UnsupportedOperation")
    refused = [r for r in audit_records(config) if r["event"] == "denied"]
    assert [(r["peer"]["uid"], r["rule"], r["route"]) for r in refused] == [(NOBODY, "reload", "POST /v1/reload")]
