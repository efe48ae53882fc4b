"""The aiohttp application: middlewares (request id, peer credentials, errors to JSON) and the routes.

Errors leave as ``{"error": {"code", "message", "retryable", "request_id"}}`` with a status from the error tree (and
``Retry-After`` when the agent knows when a retry may succeed); a backend's raw message is logged with the request
id, never echoed. A request that outlives ``agent.request_timeout`` is a 504 ``AgentTimeout`` that names what it was
waiting for (``signing_agent.waits``). Nothing here touches a key store except through the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from signing_agent import __version__
from signing_agent.api.governance_routes import add_governance_routes
from signing_agent.api.peer import peer_of
from signing_agent.api.request import BODY_TIMEOUT, CALLER, REQUEST_ID, read_body
from signing_agent.api.runtime import GENERATION, RUNTIME, InFlight, Runtime, generation_of, signer_of
from signing_agent.api.schemas import parse_explain_request, parse_sign_request
from signing_agent.api.workflow_routes import add_workflow_routes
from signing_agent.audit import PeerRefused
from signing_agent.context import WATCHER_REQUEST_ID_PREFIX, RequestContext, bound, current_request
from signing_agent.errors import (
    AgentError,
    AgentTimeoutError,
    PolicyDeniedError,
    ShuttingDownError,
    TooManyRequestsError,
    UnsupportedOperationError,
)
from signing_agent.metrics import CONTENT_TYPE_LATEST
from signing_agent.waits import Waits

_logger = logging.getLogger(__name__)
_access = logging.getLogger("signing_agent.access")


@dataclass(frozen=True, slots=True)
class APISettings:
    """Who may do what is the service's policy (``Signer.policy``), not a setting of the HTTP layer."""

    max_request_bytes: int
    request_timeout: float
    body_timeout: float = 30.0


# The current Signer, Governance and HealthChecker live in app[RUNTIME] (api/runtime.py), swapped on
# reload; handlers reach them with signer_of(request) / governance_of(request), never through an app key.
IN_FLIGHT = web.AppKey("in_flight", InFlight)
SETTINGS = web.AppKey("settings", APISettings)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, request_id: str | None, *, retryable: bool = False
) -> web.Response:
    error: dict[str, str | bool] = {"code": code, "message": message, "retryable": retryable}
    if request_id is not None:
        error["request_id"] = request_id
    return web.json_response({"error": error}, status=status)


def agent_error_response(exc: AgentError, request_id: str) -> web.Response:
    """An agent error as the API answers it: its status and code, ``retryable``, and ``Retry-After`` when known."""
    response = error_response(exc.http_status, exc.code, exc.diagnostics(), request_id, retryable=exc.retryable)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


_HTTP_CODES = {
    404: ("NotFound", "no such route"),
    405: ("MethodNotAllowed", "method not allowed on this route"),
    413: ("PayloadTooLarge", "the request body is larger than agent.max_request_bytes"),
}


_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def request_id_of(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is safe to log and audit as it is, else a fresh id.

    Safe: 1-64 ASCII letters, digits, ``.``, ``_`` or ``-`` (starting with a letter or digit), and not in the form
    of the agent's own work (the recovery watcher's ``watcher-...`` ids), so a caller cannot pass its requests off
    as the agent's in the audit log or the logs.
    """
    given = request.headers.get("X-Request-Id", "")
    if _SAFE_REQUEST_ID.fullmatch(given) and not given.lower().startswith(WATCHER_REQUEST_ID_PREFIX):
        return given
    return uuid.uuid4().hex


def _is_malformed(response: web.StreamResponse) -> bool:
    """A client error of the agent's own (not CCF's, relayed): charged to the peer's budget of denials. 403s are
    charged where they are decided, 409 is about CCF's state, not the request."""
    return 400 <= response.status < 500 and response.status not in (403, 409, 429) and not _relayed(response)


def _relayed(response: web.StreamResponse) -> bool:
    return response.headers.get("X-Relayed-From") == "ccf"


def _logged_for(request_id: str) -> dict[str, str]:
    """The request id of a log line written outside the request context (before the peer is known, or after the
    request ended), as ``signing_agent.log`` shows it."""
    return {"request_id": request_id}


Failure = tuple[int, str, str, str]
"""A failure to log once the response is final: level, request id, error code, message."""

MAX_LOGGED_MESSAGE_CHARS = 1024
"""An error message is logged up to this length: many quote the caller's value (a msg_type, an identity name, the
unknown fields), which can be as long as ``agent.max_request_bytes``."""


def _loggable(message: str) -> str:
    if len(message) <= MAX_LOGGED_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_LOGGED_MESSAGE_CHARS]}...[{len(message)} characters in all]"


async def _respond(request: web.Request, handler: Handler) -> tuple[web.StreamResponse, Failure | None]:
    """The handler's response, or the error response for what it raised (and what to log about it)."""
    request_id = request[REQUEST_ID]
    try:
        return await handler(request), None
    except TooManyRequestsError as exc:
        return agent_error_response(exc, request_id), None  # counted in a summary, not logged one by one
    except AgentError as exc:
        level = logging.WARNING if exc.http_status < 500 else logging.ERROR
        response = agent_error_response(exc, request_id)
        return response, (level, request_id, exc.code, _loggable(exc.message))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("InvalidRequest", exc.reason))
        if exc.status == 404:
            message = f"no route {request.method} {request.path}"
        response = error_response(exc.status, code, message, request_id)
        if exc.status == 413:
            response.force_close()  # no keep-alive after a body we refused to read
        return response, None
    except Exception:
        _logger.exception("request %s: unexpected error", request_id, extra=_logged_for(request_id))
        return error_response(500, "InternalError", "internal error; see the agent's log", request_id), None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    started = time.monotonic()
    response, failure = await _respond(request, handler)
    peer = request.get(CALLER)
    throttled = response.status == 429 and not _relayed(response)  # the agent's own 429s are the throttle's
    if peer is not None and _is_malformed(response):
        try:
            request.app[RUNTIME].denials.charge(peer.uid, "malformed")
        except TooManyRequestsError as exc:
            closing = response.keep_alive is False  # e.g. a 413: still no keep-alive
            response, failure, throttled = agent_error_response(exc, request_id), None, True
            if closing:
                response.force_close()
    if failure is not None:
        _logger.log(failure[0], "request %s failed: %s: %s", *failure[1:], extra=_logged_for(request_id))
    response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    # The route template ("/v1/services/{svc}/status"), never the raw path: labels must stay a small, fixed set.
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[RUNTIME].metrics
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    metrics.request_seconds.labels(route).observe(time.monotonic() - started)
    if not throttled:  # a throttled flood is counted in metrics and one audit summary, not a log line each
        _access.info(
            "%s %s -> %d (request %s, peer %s)",
            request.method,
            request.path,
            response.status,
            request_id,
            f"uid={peer.uid} pid={peer.pid}" if peer else "unknown",
            extra=_logged_for(request_id),
        )
    return response


@web.middleware
async def peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    who = peer_of(request)
    if who is None:
        raise PolicyDeniedError("the agent only serves local Unix-socket peers")
    request[CALLER] = who
    # Who asks, for everything the request does below: the service reads it, the audit records carry it, and every
    # log line carries its id.
    with bound(RequestContext.for_peer(request[REQUEST_ID], who)) as ctx:
        return await _admitted(request, handler, ctx)


async def _admitted(request: web.Request, handler: Handler, ctx: RequestContext) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    runtime = request.app[RUNTIME]
    in_flight = request.app[IN_FLIGHT]
    if in_flight.draining:
        raise ShuttingDownError("the agent is shutting down; retry against its successor")
    # Pin the configuration generation for the whole request (a reload swaps it for later requests only).
    gen = runtime.current
    request[GENERATION] = gen
    admitted = gen.signer.policy.admits(ctx.caller)
    if not admitted.allowed:
        gen.signer.charge_denial()  # past the peer's budget: 429, and no record
        route = f"{request.method} {request.path}"
        await runtime.auditor.record(PeerRefused(request=ctx, route=route, rule=admitted.rule, reason=admitted.reason))
        who = ctx.caller
        raise PolicyDeniedError(
            f"peer uid {who.uid} (gid {who.gid}, pid {who.pid}) may not use this agent: {admitted.reason}",
            hint="by default only the agent's own user and root may; see agent.allowed_uids / allowed_gids "
            "and [[policy.rules]]",
        )
    if request.content_length is not None and request.content_length > settings.max_request_bytes:
        # Refused before reading a byte of the body: 413 at once, not a 408 once the body timeout ran out.
        raise web.HTTPRequestEntityTooLarge(settings.max_request_bytes, request.content_length)
    in_flight.enter()
    gen.in_flight.enter()
    waits = Waits()
    try:
        async with waits.deadline(settings.request_timeout):
            return await handler(request)
    except TimeoutError:
        raise _timed_out(settings.request_timeout, waits) from None
    finally:
        gen.in_flight.exit()
        in_flight.exit()


def _timed_out(limit: float, waits: Waits) -> AgentTimeoutError:
    """The 504 for a request that outlived ``agent.request_timeout``, naming what it was waiting for."""
    message = f"the request took longer than agent.request_timeout ({limit:g} s)"
    waited = waits.describe_expired()
    return AgentTimeoutError(
        f"{message}, {waited}" if waited else message,
        hint="if it may take that long, raise agent.request_timeout; a request that was being forwarded to CCF "
        "may have been recorded there all the same: read the proposals before sending it again",
    )


async def _write_summaries(runtime: Runtime, *, flush: bool = False) -> None:
    """Audit what the denial budget dropped: one ``throttled`` record per uid and window."""
    for dropped in runtime.denials.due(flush=flush):
        try:
            await runtime.auditor.record(dropped.audit_record())
        except AgentError as exc:
            _logger.error(  # noqa: TRY400 -- the audit failure is the news; its traceback adds nothing
                "cannot audit that %d request(s) of peer uid %d were throttled: %s",
                dropped.denied + dropped.malformed,
                dropped.uid,
                exc.message,
            )


async def _summarise_throttled(app: web.Application) -> AsyncIterator[None]:
    """While the app runs, write each due summary of throttled requests; at shutdown, the rest."""
    runtime = app[RUNTIME]
    tick = max(0.05, min(5.0, runtime.denials.window / 4))

    async def periodically() -> None:
        while True:
            await asyncio.sleep(tick)
            await _write_summaries(runtime)

    task = asyncio.get_running_loop().create_task(periodically())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _write_summaries(runtime, flush=True)


async def health(request: web.Request) -> web.Response:
    """Key stores, CCF services and member status: ``status`` is ``ok`` or ``degraded`` (200 either way); and the
    last configuration reload's result (``last_reload``: null until one was asked for)."""
    gen = generation_of(request)
    report = await gen.health.check()
    last = request.app[RUNTIME].last_reload
    return web.json_response(
        {
            **report,
            "version": __version__,
            "generation": gen.number,
            "last_reload": last.as_dict() if last is not None else None,
        }
    )


RELOAD_RULE = "reload"
"""The rule a refused reload is audited under: not the policy's, which cannot grant it."""


async def reload(request: web.Request) -> web.Response:
    """Reload the configuration as SIGHUP does, and answer the outcome (a refused configuration is an answer, 200,
    with the reason). Only the agent's own uid and root may: no policy rule can grant it to another peer, whose
    attempt is refused, charged to its denial budget and audited."""
    caller = request[CALLER]
    runtime = request.app[RUNTIME]
    if caller.uid not in (0, os.getuid()):
        signer_of(request).charge_denial()
        reason = f"only the agent's own user (uid {os.getuid()}) and root may reload it"
        route = f"{request.method} {request.path}"
        await runtime.auditor.record(
            PeerRefused(request=current_request(), route=route, rule=RELOAD_RULE, reason=reason)
        )
        raise PolicyDeniedError(f"peer uid {caller.uid}: {reason}", hint="or send the agent SIGHUP, as root")
    if runtime.reload is None:
        raise UnsupportedOperationError("this agent cannot reload its configuration (it was given none to reload)")
    _logger.info("configuration reload asked for by peer uid %d (pid %d)", caller.uid, caller.pid)
    result = await runtime.reload()
    return web.json_response(result.as_dict())


async def metrics_exposition(request: web.Request) -> web.Response:
    """Prometheus text format."""
    body = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def identities(request: web.Request) -> web.Response:
    service = signer_of(request)
    return web.json_response(
        {
            "identities": [
                {
                    "name": ident.name,
                    "member_id": ident.member_id,
                    "algorithm": ident.alg.name,
                    "backend": ident.backend,
                    "key": ident.location,
                    "certificate": ident.certificate_pem.decode("ascii"),
                    "encryption_key": ident.encryption_public_key_pem.decode("ascii")
                    if ident.encryption_public_key_pem
                    else None,
                    "warnings": list(ident.current_warnings()),
                }
                for ident in service.identities.values()
            ]
        }
    )


async def sign(request: web.Request) -> web.Response:
    service = signer_of(request)
    signed = await service.sign(parse_sign_request(await read_body(request)))
    return web.Response(
        body=signed.cose,
        content_type="application/cose",
        headers={
            "X-Member-Id": signed.member_id,
            "X-Created-At": str(signed.created_at),
            "X-Cose-Sha256": signed.cose_sha256,
        },
    )


async def explain(request: web.Request) -> web.Response:
    """What ``/v1/sign`` (or a submission to ``service``) would sign and the policy decision; no key is used."""
    gen = generation_of(request)
    req = parse_explain_request(await read_body(request))
    # A ballot for a service is judged by the proposal it votes on, which only the governance layer can read.
    voted = await gen.governance.voted_for_explain(req.msg_type, req.service, req.proposal_id)
    explanation = await gen.signer.explain(dataclasses.replace(req, voted=voted))
    return web.json_response(explanation.as_dict())


def make_app(runtime: Runtime, settings: APISettings) -> web.Application:
    """The API application. The daemon owns the generations' lifecycles and swaps them through ``runtime``."""
    app = web.Application(
        middlewares=[error_middleware, peer_middleware],
        client_max_size=settings.max_request_bytes,
    )
    app[RUNTIME] = runtime
    app[SETTINGS] = settings
    app[BODY_TIMEOUT] = settings.body_timeout
    app[IN_FLIGHT] = InFlight()
    app.cleanup_ctx.append(_summarise_throttled)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics_exposition)
    app.router.add_get("/v1/identities", identities)
    app.router.add_post("/v1/sign", sign)
    app.router.add_post("/v1/explain", explain)
    app.router.add_post("/v1/reload", reload)
    add_governance_routes(app)
    add_workflow_routes(app)
    return app
