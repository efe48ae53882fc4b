"""Hostile input against the real daemon: fuzzed requests, and kill -9 in the middle of a burst of signs.

After either, the daemon (or its log) must be intact: it still answers, it never answered 500, and the audit log's
hash chain verifies and holds a ``signed`` record for every request that got its signature.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing_agent.audit import verify_audit
from signing_agent.client import AgentClient
from tests.support.agent import DaemonProcess, daemon, file_identity, write_toml
from tests.support.pki import Member, make_member

pytestmark = pytest.mark.e2e

FUZZ_REQUESTS = 2000
FIELDS = ["identity", "msg_type", "proposal_id", "created_at", "payload", "payload_base64", "service", "proposal"]
PATHS = [
    "/v1/sign",
    "/v1/explain",
    "/v1/health",
    "/v1/identities",
    "/v1/services/default/proposals",
    "/v1/nope",
    "/v1/sign?x=%ff",
    "/" + "a" * 3000,
]


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


@pytest.fixture
def agent(workdir: Path, member: Member) -> Iterator[tuple[DaemonProcess, Path]]:
    key, cert = member.write(workdir)
    tables: dict[str, Any] = {
        "agent": {"socket": workdir / "run" / "agent.sock", "max_request_bytes": 65536, "header_timeout": 2.0},
        "audit": {"path": workdir / "audit" / "audit.jsonl"},
        **file_identity("m0", cert, key),
    }
    with daemon(write_toml(workdir / "agent.toml", tables)) as proc:
        yield proc, workdir / "audit" / "audit.jsonl"


def exchange(sock: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(sock))
        # No half-close: asyncio closes a transport on EOF, which would hide the answer. The agent may hang up on
        # garbage before reading it all.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass  # a request whose body never completes waits for agent.body_timeout; not worth waiting for
        return b"".join(chunks)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["m0", "proposal", "ballot", "ack", "a" * 64, "%%%", "AAAA", "=" * 4]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), children, max_size=6),
    max_leaves=12,
)

hostile_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"[" * 100_000 + b"]" * 100_000,
            b'{"identity": "m0", "msg_type": "proposal", "created_at": 1' + b"0" * 5000 + b"}",
            b'{"identity": "m0", "msg_type": "proposal", "payload_base64": "\xff\xfe"}',
            b'{"identity": "m0", "msg_type": "proposal", "payload": {"actions": [{"name": "x"}]}}',
            b'{"identity": "m0", "msg_type": "state_digest"}',
            b'{"identity": "m0", "msg_type": "proposal", "payload": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        ]
    ),
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE", "P\x00ST"]))
    path = draw(st.sampled_from(PATHS))
    body = draw(hostile_bodies)
    length = draw(st.sampled_from([str(len(body)), str(len(body)), "-1", "abc", "99999999999999999999"]))
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1", "replace") + body


@pytest.mark.slow
def test_fuzzed_requests_leave_a_healthy_agent_and_a_valid_audit_log(agent: tuple[DaemonProcess, Path]) -> None:
    proc, audit_path = agent
    statuses: dict[int, int] = {}
    started = time.monotonic()

    @settings(
        max_examples=FUZZ_REQUESTS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(hostile_requests())
    def fuzz(data: bytes) -> None:
        reply = exchange(proc.socket, data)
        statuses[0] = statuses.get(0, 0) + (not reply)  # 0: hung up without an answer (e.g. a body cut short)
        if reply:
            assert reply.startswith(b"HTTP/1."), reply[:80]
            status = int(reply.split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500, reply[:300]

    fuzz()
    elapsed = time.monotonic() - started
    assert proc.proc.poll() is None, proc.stderr[-2000:]
    assert AgentClient(proc.socket, timeout=10).health()["status"] == "ok"
    assert sum(statuses.values()) >= FUZZ_REQUESTS, statuses
    assert sum(n for status, n in statuses.items() if 400 <= status < 500) >= FUZZ_REQUESTS // 4, statuses
    assert elapsed < 60, f"{elapsed:.0f} s"
    report = verify_audit([audit_path])
    assert report.ok, report.first_break
    # aiohttp's own parser logs malformed HTTP with a traceback (see the report); our code must never fail.
    assert "/signing_agent/" not in proc.stderr
    assert '"level": "error"' not in proc.stderr


@pytest.mark.slow
def test_kill_9_during_a_burst_keeps_every_signed_request_in_the_audit_log(agent: tuple[DaemonProcess, Path]) -> None:
    proc, audit_path = agent
    got_200: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    body = {"identity": "m0", "msg_type": "proposal", "payload": {"actions": [{"name": "transition_node_to_trusted"}]}}

    def burst() -> None:
        client = AgentClient(proc.socket, timeout=10)
        while not stop.is_set():
            request_id = uuid.uuid4().hex
            try:
                resp = client.request("POST", "/v1/sign", body, headers={"X-Request-Id": request_id})
            except Exception:  # noqa: BLE001 -- the agent is being killed; any failure ends this client
                return
            if resp.status == 200 and resp.body:
                with lock:
                    got_200.append(request_id)

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(got_200) >= 10, "the burst never got going"
    report = verify_audit([audit_path])
    assert report.ok, report.first_break
    signed = set()
    for line in audit_path.read_bytes().splitlines():
        record = json.loads(line)
        if record["event"] == "signed":
            signed.add(record["request_id"])
    lost = [r for r in got_200 if r not in signed]
    assert not lost, f"{len(lost)} of {len(got_200)} signatures left the agent without a durable record"
