"""Per-request facts the handlers share: who the caller is, the request id, and reading a body within a deadline.

A module of its own so ``app`` and ``governance_routes`` can both use these without importing each other.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from signing_agent.errors import RequestError
from signing_agent.policy import Caller
from signing_agent.waits import waiting_for

CALLER = web.RequestKey("caller", Caller)
REQUEST_ID = web.RequestKey("request_id", str)
BODY_TIMEOUT = web.AppKey("body_timeout", float)


class BodyTimeoutError(RequestError):
    code = "RequestTimeout"
    http_status = 408


async def read_body(request: web.Request) -> bytes:
    """The whole body, or 408 when it does not arrive within ``agent.body_timeout`` (a slow-body client)."""
    limit = request.app.get(BODY_TIMEOUT, 30.0)
    try:
        async with asyncio.timeout(limit):
            with waiting_for("the request body from the client"):
                return await request.read()
    except TimeoutError:
        raise BodyTimeoutError(f"the request body did not arrive within agent.body_timeout ({limit:g} s)") from None
