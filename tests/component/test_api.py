"""The API on a real Unix socket: routes, errors, peer credentials (SO_PEERCRED) and hostile input."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ccf.cose import validate_cose_sign1

from signing_agent.client import AgentClient, AgentRequestError
from signing_agent.log import RequestIdFilter
from tests.support.agent import agent_config, file_identity, running_agent
from tests.support.pki import Member, make_member
from tests.support.prereq import missing

REPO = Path(__file__).resolve().parents[2]
PROPOSAL = {"actions": [{"name": "transition_node_to_trusted", "args": {"node_id": "n"}}]}


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0", "secp384r1"), "m1": make_member("m1", "secp256r1")}


@pytest.fixture
async def agent(workdir: Path, members: dict[str, Member]) -> AsyncIterator[Path]:
    tables: dict[str, dict[str, object]] = {
        "agent": {"socket": workdir / "run" / "agent.sock", "max_request_bytes": 4096}
    }
    for name, member in members.items():
        key, cert = member.write(workdir)
        tables.update(file_identity(name, cert, key))
    async with running_agent(agent_config(workdir, tables)) as sock:
        yield sock


async def call(sock: Path, method: str, path: str, body: object = None) -> tuple[int, dict[str, str], bytes]:
    """A blocking client in a thread, so the in-process server keeps serving."""
    client = AgentClient(sock, timeout=10)
    resp = await asyncio.to_thread(client.request, method, path, body)
    return resp.status, resp.headers, resp.body


async def raw_exchange(sock: Path, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_health_and_identities(agent: Path, members: dict[str, Member]) -> None:
    status, _, body = await call(agent, "GET", "/v1/health")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    status, _, body = await call(agent, "GET", "/v1/identities")
    idents = {i["name"]: i for i in json.loads(body)["identities"]}
    assert idents["m0"]["member_id"] == members["m0"].member_id
    assert idents["m0"]["algorithm"] == "ES384"
    assert idents["m1"]["algorithm"] == "ES256"
    assert idents["m0"]["backend"] == "file"
    assert idents["m0"]["certificate"].encode() == members["m0"].cert_pem


@pytest.mark.parametrize("name", ["m0", "m1"])
async def test_sign_returns_cose_that_ccf_verifies(agent: Path, members: dict[str, Member], name: str) -> None:
    status, headers, body = await call(
        agent,
        "POST",
        "/v1/sign",
        {"identity": name, "msg_type": "proposal", "payload": PROPOSAL, "created_at": int(time.time()) - 60},
    )
    assert status == 200, body
    assert headers["content-type"] == "application/cose"
    assert headers["x-member-id"] == members[name].member_id
    validate_cose_sign1(members[name].cert.public_key(), body)


async def test_created_at_defaults_to_now(agent: Path) -> None:
    before = int(time.time())
    status, headers, _ = await call(agent, "POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"})
    assert status == 200
    assert before <= int(headers["x-created-at"]) <= int(time.time())


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"identity": "nobody", "msg_type": "ack", "payload": {"stateDigest": "x"}}, 404, "UnknownIdentity"),
        ({"identity": "m0", "msg_type": "ballot", "payload": {"ballot": "x"}}, 400, "InvalidRequest"),
        ({"identity": "m0", "msg_type": "proposal", "payload": {"actions": "all"}}, 400, "InvalidRequest"),
        ({"identity": "m0", "msg_type": "proposal", "payload_base64": "%%%"}, 400, "InvalidRequest"),
        ({"identity": "m0", "msg_type": "proposal", "surprise": 1}, 400, "InvalidRequest"),
        ({"identity": ["m0"], "msg_type": "proposal"}, 400, "InvalidRequest"),
        # a proposal id with a final line break: signed into the ballot's header, it passed a `$`-anchored match
        ({"identity": "m0", "msg_type": "ballot", "proposal_id": "c" * 64 + "\n",
          "payload": {"ballot": "export function vote (proposal, proposerId) { return true }"}}, 400, "InvalidRequest"),
    ],
)  # fmt: skip
async def test_errors_are_json_with_a_code(agent: Path, body: object, status: int, code: str) -> None:
    got, headers, raw = await call(agent, "POST", "/v1/sign", body)
    assert got == status
    error = json.loads(raw)["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == headers["x-request-id"]
    assert error["retryable"] is False  # the same request would fail again
    assert "retry-after" not in headers


async def test_unknown_route_and_method(agent: Path) -> None:
    status, _, raw = await call(agent, "GET", "/v1/nope")
    assert (status, json.loads(raw)["error"]["code"]) == (404, "NotFound")
    status, _, raw = await call(agent, "GET", "/v1/sign")
    assert (status, json.loads(raw)["error"]["code"]) == (405, "MethodNotAllowed")


async def test_oversized_body_is_413_and_the_agent_keeps_serving(agent: Path) -> None:
    big = {
        "identity": "m0",
        "msg_type": "proposal",
        "payload_base64": base64.b64encode(os.urandom(8000)).decode(),
    }
    status, _, raw = await call(agent, "POST", "/v1/sign", big)
    assert (status, json.loads(raw)["error"]["code"]) == (413, "PayloadTooLarge")
    assert (await call(agent, "GET", "/v1/health"))[0] == 200


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/sign HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n\xff\xfe\x00\x01\x02",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
    ],
)
async def test_malformed_http_gets_a_4xx_and_never_crashes(agent: Path, data: bytes) -> None:
    reply = await raw_exchange(agent, data)
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply[:100]
    assert (await call(agent, "GET", "/v1/health"))[0] == 200


async def test_a_client_that_hangs_up_mid_request_does_no_harm(agent: Path) -> None:
    _reader, writer = await asyncio.open_unix_connection(str(agent))
    writer.write(b'POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"identity":')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    assert (await call(agent, "GET", "/v1/health"))[0] == 200


def _as_other_user(sock: Path, uid: int, gid: int) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys, json; from signing_agent.client import AgentClient; "
        f"r = AgentClient({str(sock)!r}).request('GET', '/v1/identities'); "
        "print(r.status); print(r.body.decode())"
    )
    # The interpreter must be one another user may execute (the venv's may live under a private home); the
    # client module needs only the standard library, which this also proves.
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        missing("a system python3 that another uid can run")
    return subprocess.run(
        [python, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); " + code, str(REPO)],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(("allowed_gids", "expected"), [((), 403), ((0,), 200)])
async def test_peer_credentials_decide_who_may_use_the_agent(
    workdir: Path, members: dict[str, Member], allowed_gids: tuple[int, ...], expected: int
) -> None:
    """A real client process running as another uid (nobody, primary gid root) over the real socket."""
    if os.getuid() != 0:
        missing("switching to another uid needs root")
    key, cert = members["m0"].write(workdir)
    run = workdir / "run"
    run.mkdir(mode=0o750)
    workdir.chmod(0o750)
    config = agent_config(
        workdir,
        {
            "agent": {"socket": run / "a.sock", "socket_mode": "0660", "allowed_gids": list(allowed_gids)},
            **file_identity("m0", cert, key),
        },
    )
    async with running_agent(config) as sock:
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
        result = await asyncio.to_thread(_as_other_user, sock, 65534, 0)
    assert result.returncode == 0, result.stderr
    status, body = result.stdout.split("\n", 1)
    assert int(status) == expected, body
    denials = [r for r in map(json.loads, (run / "audit.jsonl").read_text().splitlines()) if r["event"] == "denied"]
    if expected == 403:
        error = json.loads(body)["error"]
        assert error["code"] == "PolicyDenied"
        assert "uid 65534" in error["message"]
        assert [(d["peer"]["uid"], d["route"]) for d in denials] == [(65534, "GET /v1/identities")]
    else:
        assert denials == []


async def test_client_error_mapping(agent: Path) -> None:
    client = AgentClient(agent)
    with pytest.raises(AgentRequestError) as info:
        await asyncio.to_thread(client.sign, "ghost", "proposal", b"{}")
    assert info.value.code == "UnknownIdentity"
    assert info.value.status == 404


def audit_of(sock: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (sock.parent / "audit.jsonl").read_text().splitlines()]


SIGN = b'{"identity":"m0","msg_type":"proposal",'


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        # 1e999 would be signed as the "Infinity" CCF refuses; a lone surrogate cannot be re-serialised as UTF-8.
        ("/v1/sign", SIGN + b'"payload":{"actions":[{"name":"a","args":1e999}]}}', "overflows to Infinity"),
        ("/v1/sign", SIGN + b'"payload":{"actions":[{"name":"a","args":"\\ud800"}]}}', "lone surrogate"),
        ("/v1/sign", SIGN + b'"payload":{"actions":[{"name":"a","args":NaN}]}}', "NaN"),
        ("/v1/sign", SIGN + b'"payload":{"actions":[{"name":"a","args":' + b"9" * 4000 + b"}]}}", "64-bit"),
        ("/v1/sign", b'{"identity":"m0","identity":"m1","msg_type":"proposal"}', "appears twice"),
        ("/v1/explain", SIGN + b'"payload":{"actions":[{"name":"a","args":"\\udc00x"}]}}', "lone surrogate"),
        ("/v1/services/default/proposals", b'{"identity":"m0","proposal":{"a":"\\ud800"}}', "lone surrogate"),
    ],
)
async def test_json_ccf_would_refuse_is_a_400_and_nothing_is_signed(
    agent: Path, path: str, raw: bytes, message: str
) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    reply = await raw_exchange(agent, head.encode() + raw)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "InvalidRequest"
    assert message in error["message"]
    assert not [r for r in audit_of(agent) if r["event"] == "signed"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"actions":[{"name":"a","args":NaN}]}', "NaN"),
        (b'{"actions":[{"name":"a","args":-1e999}]}', "overflows to Infinity"),
        (b'{"actions":[{"name":"a","args":' + b"1" * 40 + b"}]}", "64-bit"),
        (b'{"actions":[{"name":"a","args":"\\udbff"}]}', "lone surrogate"),
        (b'{"actions":[{"name":"set_constitution"}],"actions":[{"name":"a"}]}', "appears twice"),
    ],
)
async def test_exact_payload_bytes_ccf_would_refuse_are_never_signed(agent: Path, payload: bytes, message: str) -> None:
    body = {"identity": "m0", "msg_type": "proposal", "payload_base64": base64.b64encode(payload).decode()}
    status, _, raw = await call(agent, "POST", "/v1/sign", body)
    assert status == 400, raw
    assert message in json.loads(raw)["error"]["message"]
    assert not [r for r in audit_of(agent) if r["event"] == "signed"]


@pytest.mark.parametrize("msg_type", ["withdrawal", "state_digest"])
async def test_a_payload_ccf_ignores_is_empty_or_strict_json_never_arbitrary_bytes(agent: Path, msg_type: str) -> None:
    """CCF ignores withdrawal and state-digest payloads, so the agent would otherwise sign any bytes under them."""
    extra = {"proposal_id": "ab" * 32} if msg_type == "withdrawal" else {}
    for payload, status in ((b"\x00\xffnot json", 400), (b'{"a":NaN}', 400), (b"", 200), (b"{}", 200)):
        body = {"identity": "m0", "msg_type": msg_type, "payload_base64": base64.b64encode(payload).decode(), **extra}
        got, _, raw = await call(agent, "POST", "/v1/sign", body)
        assert got == status, (payload, raw)
    signed = [r for r in audit_of(agent) if r["event"] == "signed"]
    assert len(signed) == 2


async def test_a_content_length_over_the_limit_is_refused_before_the_body_arrives(agent: Path) -> None:
    """413 at once, from the head alone: not a 408 after agent.body_timeout (30 s) of waiting for the body."""
    reply = await raw_exchange(agent, b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{")
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "PayloadTooLarge"
    assert (await call(agent, "GET", "/v1/health"))[0] == 200


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("client-run.7_a", True),
        ("a" * 64, True),
        ("watcher-0123456789ab", False),  # the recovery watcher's own form: a caller cannot pass as the agent
        ("Watcher-0123456789ab", False),
        ("a" * 65, False),
        ("caf\u00e9", False),
        ("two words", False),
        ("-leading-dash", False),
        ("a;b", False),
    ],
)
async def test_a_callers_request_id_is_kept_only_when_safe(agent: Path, given: str, kept: bool) -> None:
    client = AgentClient(agent, timeout=10)
    body = {"identity": "m0", "msg_type": "proposal", "payload": PROPOSAL}
    resp = await asyncio.to_thread(client.request, "POST", "/v1/sign", body, headers={"X-Request-Id": given})
    assert resp.status == 200, resp.body
    answered = resp.headers["x-request-id"]
    if kept:
        assert answered == given
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", answered), answered
    records = [r for r in audit_of(agent) if r["event"] in ("received", "signed")]
    assert [r["request_id"] for r in records] == [answered, answered]


async def test_every_log_line_of_a_request_carries_its_id(agent: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The service's own lines (it never sees the id) and the access line, written after the request's context."""
    caplog.handler.addFilter(RequestIdFilter())
    client = AgentClient(agent, timeout=10)
    body = {"identity": "m0", "msg_type": "proposal", "payload": PROPOSAL}
    with caplog.at_level(logging.INFO, logger="signing_agent"):
        resp = await asyncio.to_thread(client.request, "POST", "/v1/sign", body, headers={"X-Request-Id": "trace-1"})
    assert resp.status == 200, resp.body
    lines = {r.name: getattr(r, "request_id", None) for r in caplog.records}
    assert lines["signing_agent.signer"] == "trace-1"
    assert lines["signing_agent.access"] == "trace-1"


@pytest.mark.parametrize("path", ["/v1/services/default/members/m0/activate", "/v1/services/default/recovery/m0/share"])
async def test_a_route_without_fields_takes_an_empty_body_or_an_empty_object_only(agent: Path, path: str) -> None:
    """The body is read before the service is looked up: a field is a 400, nothing or ``{}`` goes on (and finds no
    service ``default`` here: 404)."""
    for body, status, code in (
        (None, 404, "UnknownService"),
        ({}, 404, "UnknownService"),
        ({"x": 1}, 400, "InvalidRequest"),
    ):
        got, _, raw = await call(agent, "POST", path, body)
        assert (got, json.loads(raw)["error"]["code"]) == (status, code), (body, raw)
    reply = await raw_exchange(
        agent, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n \n ".encode()
    )
    assert reply.startswith(b"HTTP/1.1 404 "), reply[:200]
