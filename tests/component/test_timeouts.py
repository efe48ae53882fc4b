"""A request that outlives ``agent.request_timeout`` is a 504 ``AgentTimeout`` that names what it was waiting for.

The real app on a real Unix socket. The key store and CCF cases run end to end (tests/e2e/test_exit_codes.py, with a
slow Key Vault double and a slow sandbox); here, the request body and the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from signing_agent.client import AgentClient
from tests.support.agent import agent_config, file_identity, running_agent
from tests.support.pki import make_member
from tests.support.procs import running_modules

LIMIT = 0.5
"""agent.request_timeout of these tests."""


def tables(workdir: Path, **agent: object) -> dict[str, dict[str, object]]:
    key, cert = make_member("m0").write(workdir)
    return {
        "agent": {"socket": workdir / "run" / "agent.sock", "request_timeout": LIMIT, "body_timeout": 30.0, **agent},
        "audit": {"path": workdir / "audit" / "audit.jsonl"},
        **file_identity("m0", cert, key),
    }


@pytest.fixture
async def agent(workdir: Path) -> AsyncIterator[Path]:
    async with running_agent(agent_config(workdir, tables(workdir))) as sock:
        yield sock


async def call(sock: Path, method: str, path: str, body: object = None) -> tuple[int, dict[str, str], bytes]:
    """A blocking client in a thread, so the in-process server keeps serving."""
    resp = await asyncio.to_thread(AgentClient(sock, timeout=10).request, method, path, body)
    return resp.status, resp.headers, resp.body


def error_of(head_and_body: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = head_and_body.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


async def test_a_body_that_does_not_arrive_is_named(agent: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(agent))
    writer.write(b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    reply = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    status, error = error_of(reply)
    assert status == 504
    assert error["code"] == "AgentTimeout"
    assert error["retryable"] is True
    message = str(error["message"])
    assert f"longer than agent.request_timeout ({LIMIT:g} s)" in message
    assert "waiting for the request body from the client (for " in message
    assert time.monotonic() - started < 5  # the request deadline, not body_timeout's 30 s


@contextlib.contextmanager
def slow_disk(fsync_in: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """fsyncs that take ``2 * LIMIT`` seconds, where the audit log runs them: on a thread (``os.fsync`` slowed) or in
    the fsync helper (stopped that long)."""
    if fsync_in == "a thread":
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:  # on the audit writer's thread: a disk that takes its time
            time.sleep(2 * LIMIT)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", slow_fsync)
        yield
        return
    modules = running_modules(os.getpid(), "signing_agent.workers")
    [helper] = [pid for pid, module in modules.items() if module != "signing_agent.workers.child"]
    os.kill(helper, signal.SIGSTOP)
    timer = threading.Timer(2 * LIMIT, os.kill, (helper, signal.SIGCONT))
    timer.start()
    try:
        yield
    finally:
        timer.join()


@pytest.mark.parametrize(("fsync_in", "workers"), [("a thread", 0), ("the fsync helper", 2)])
async def test_a_slow_audit_log_is_named(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, fsync_in: str, workers: int
) -> None:
    async with running_agent(agent_config(workdir, tables(workdir, crypto_workers=workers))) as agent:
        with slow_disk(fsync_in, monkeypatch):
            status, headers, raw = await call(agent, "POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"})
            await asyncio.sleep(3 * LIMIT)  # let the shielded audit write finish before the sink closes
    assert status == 504
    error = json.loads(raw)["error"]
    assert error["code"] == "AgentTimeout"
    assert "waiting for the audit log (write and fsync)" in error["message"]
    assert "key store" not in error["message"]
    assert "retry-after" not in headers  # the agent does not know when the disk will be faster
