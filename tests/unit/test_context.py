"""The request context: set once at the edge, read by the service, the audit records and every log line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from signing_agent.context import (
    WATCHER_REQUEST_ID_PREFIX,
    Caller,
    RequestContext,
    agent_caller,
    bound,
    current_request,
    request_id,
)
from signing_agent.log import setup_logging

PEER = Caller(uid=1000, gid=1000, pid=7)


@pytest.mark.parametrize("forged", ["watcher-0123456789ab", "Watcher-x", "WATCHER-"])
def test_a_peer_cannot_take_the_agents_own_request_id(forged: str) -> None:
    with pytest.raises(ValueError, match="may not start with 'watcher-'"):
        RequestContext.for_peer(forged, PEER)
    assert not RequestContext.for_peer("my-watcher-1", PEER).by_agent


def test_the_agents_own_requests_act_as_the_agent_with_a_fresh_watcher_id() -> None:
    one, two = RequestContext.for_agent(), RequestContext.for_agent()
    assert one.by_agent
    assert one.request_id.startswith(WATCHER_REQUEST_ID_PREFIX)
    assert one.request_id != two.request_id
    assert one.caller == agent_caller() == Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), exe=None)


def test_there_is_no_default_context_and_a_bound_one_is_restored() -> None:
    with pytest.raises(LookupError, match="no request context"):
        current_request()
    assert request_id() is None
    outer = RequestContext.for_peer("outer", PEER)
    with bound(outer):
        with bound(RequestContext.for_agent()) as inner:
            assert current_request() is inner
        assert current_request() is outer
        assert request_id() == "outer"
    assert request_id() is None


async def test_tasks_started_inside_a_request_keep_its_context() -> None:
    async def who() -> str:
        await asyncio.sleep(0)
        return current_request().request_id

    with bound(RequestContext.for_peer("r1", PEER)):
        task = asyncio.create_task(who())
    with bound(RequestContext.for_peer("r2", PEER)):
        assert await task == "r1"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``setup_logging`` configures three loggers (the root's handlers too); put them back as they were."""
    loggers = [logging.getLogger(name) for name in ("signing_agent", "aiohttp.server", "")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.mark.usefixtures("restore_logging")
def test_every_log_line_carries_the_request_id_json_and_text() -> None:
    stream = io.StringIO()
    setup_logging("info", stream=stream, json_lines=True)
    log = logging.getLogger("signing_agent.ccf.client")  # a layer that never sees a request id itself
    with bound(RequestContext.for_peer("req-42", PEER)):
        log.info("inside")
    log.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["msg"], inside["request_id"]) == ("inside", "req-42")
    assert "request_id" not in outside

    text = io.StringIO()
    setup_logging("info", stream=text, json_lines=False)
    with bound(RequestContext.for_agent()) as ctx:
        log.warning("polled")
    log.warning("idle")
    first, second = text.getvalue().splitlines()
    assert f"signing_agent.ccf.client [{ctx.request_id}]: polled" in first
    assert "signing_agent.ccf.client [-]: idle" in second


@pytest.mark.usefixtures("restore_logging")
def test_other_libraries_warnings_are_formatted_lines_and_their_info_is_not_printed() -> None:
    stream = io.StringIO()
    setup_logging("debug", stream=stream, json_lines=True)
    setup_logging("debug", stream=stream, json_lines=True)  # a second set-up replaces its root handler
    azure = logging.getLogger("azure.identity._credentials.chained")
    azure.setLevel(logging.INFO)
    with bound(RequestContext.for_peer("req-7", PEER)):
        azure.warning("DefaultAzureCredential failed to retrieve a token")
        azure.info("a request to login.microsoftonline.com")
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert (entry["logger"], entry["level"], entry["request_id"]) == (azure.name, "warning", "req-7")
    assert entry["msg"] == "DefaultAzureCredential failed to retrieve a token"
