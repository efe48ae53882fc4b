"""The aiohttp application: middlewares (request id, peer credentials, errors to JSON) and the routes.

Errors leave as ``{"error": {"code", "message", "request_id"}}`` with a status from the error tree; a backend's raw
message is logged with the request id, never echoed. Nothing here touches a key store except through the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from signing_agent import __version__
from signing_agent.api.context import BODY_TIMEOUT, CALLER, REQUEST_ID, read_body
from signing_agent.api.governance_routes import add_governance_routes
from signing_agent.api.peer import peer_of
from signing_agent.api.runtime import GENERATION, RUNTIME, Generation, InFlight, Runtime, generation_of, service_of
from signing_agent.api.schemas import parse_explain_request, parse_sign_request
from signing_agent.errors import AgentError, BackendUnavailableError, PolicyDeniedError, ShuttingDownError
from signing_agent.governance import GovernanceService
from signing_agent.health import HealthChecker
from signing_agent.metrics import CONTENT_TYPE_LATEST, METRICS, Metrics
from signing_agent.recovery import RecoveryService
from signing_agent.service import SigningService

_logger = logging.getLogger(__name__)
_access = logging.getLogger("signing_agent.access")


@dataclass(frozen=True, slots=True)
class APISettings:
    """Who may do what is the service's policy (``SigningService.policy``), not a setting of the HTTP layer."""

    max_request_bytes: int
    request_timeout: float
    body_timeout: float = 30.0


# The current SigningService, GovernanceService and HealthChecker live in app[RUNTIME] (api/runtime.py), swapped on
# reload; handlers reach them with service_of(request) / governance_of(request), never through an app key.
IN_FLIGHT = web.AppKey("in_flight", InFlight)
SETTINGS = web.AppKey("settings", APISettings)
METRICS_KEY = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, request_id: str | None) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return web.json_response({"error": error}, status=status)


_HTTP_CODES = {
    404: ("NotFound", "no such route"),
    405: ("MethodNotAllowed", "method not allowed on this route"),
    413: ("PayloadTooLarge", "the request body is larger than agent.max_request_bytes"),
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id", "")
    if not (0 < len(request_id) <= 64 and request_id.replace("-", "").isalnum()):
        request_id = uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.monotonic()
    try:
        response = await handler(request)
    except AgentError as exc:
        level = logging.WARNING if exc.http_status < 500 else logging.ERROR
        _logger.log(level, "request %s failed: %s: %s", request_id, exc.code, exc.message)
        response = error_response(exc.http_status, exc.code, exc.diagnostics(), request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("InvalidRequest", exc.reason))
        if exc.status == 404:
            message = f"no route {request.method} {request.path}"
        response = error_response(exc.status, code, message, request_id)
    except Exception:
        _logger.exception("request %s: unexpected error", request_id)
        response = error_response(500, "InternalError", "internal error; see the agent's log", request_id)
    response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    # The route template ("/v1/services/{svc}/status"), never the raw path: labels must stay a small, fixed set.
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[METRICS_KEY]
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    metrics.request_seconds.labels(route).observe(time.monotonic() - started)
    peer = request.get(CALLER)
    _access.info(
        "%s %s -> %d (request %s, peer %s)",
        request.method,
        request.path,
        response.status,
        request_id,
        f"uid={peer.uid} pid={peer.pid}" if peer else "unknown",
    )
    return response


@web.middleware
async def peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    who = peer_of(request)
    if who is None:
        raise PolicyDeniedError("the agent only serves local Unix-socket peers")
    request[CALLER] = who
    in_flight = request.app[IN_FLIGHT]
    if in_flight.draining:
        raise ShuttingDownError("the agent is shutting down; retry against its successor")
    # Pin the configuration generation for the whole request (a reload swaps it for later requests only).
    gen = request.app[RUNTIME].current
    request[GENERATION] = gen
    admitted = gen.service.policy.admits(who)
    if not admitted.allowed:
        # Audited, but not synced on its own: nothing leaves the agent on a denial, and an unauthorised peer must
        # not be able to make the agent fsync at will. The next synced record makes it durable.
        await gen.service.record(
            "denied",
            {
                "request_id": request[REQUEST_ID],
                "peer": who.as_dict(),
                "route": f"{request.method} {request.path}",
                "rule": admitted.rule,
                "reason": admitted.reason,
            },
            sync=False,
        )
        raise PolicyDeniedError(
            f"peer uid {who.uid} (gid {who.gid}, pid {who.pid}) may not use this agent: {admitted.reason}",
            hint="by default only the agent's own user and root may; see agent.allowed_uids / allowed_gids "
            "and [[policy.rules]]",
        )
    in_flight.enter()
    gen.in_flight.enter()
    try:
        async with asyncio.timeout(settings.request_timeout):
            return await handler(request)
    except TimeoutError:
        raise BackendUnavailableError(
            f"the request took longer than agent.request_timeout ({settings.request_timeout:g} s)"
        ) from None
    finally:
        gen.in_flight.exit()
        in_flight.exit()


async def health(request: web.Request) -> web.Response:
    """Key stores, CCF services and member status: ``status`` is ``ok`` or ``degraded`` (200 either way)."""
    gen = generation_of(request)
    report = await gen.health.check()
    return web.json_response({**report, "version": __version__, "generation": gen.number})


async def metrics_exposition(request: web.Request) -> web.Response:
    """Prometheus text format."""
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def identities(request: web.Request) -> web.Response:
    service = service_of(request)
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
                    "warnings": list(ident.warnings),
                }
                for ident in service.identities.values()
            ]
        }
    )


async def sign(request: web.Request) -> web.Response:
    service = service_of(request)
    req = parse_sign_request(await read_body(request))
    signed = await service.sign(
        req.identity,
        req.msg_type,
        req.payload,
        created_at=req.created_at,
        proposal_id=req.proposal_id,
        caller=request[CALLER],
        request_id=request[REQUEST_ID],
    )
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
    voted = None
    if gen.governance is not None:
        voted = await gen.governance.voted_for_explain(req.msg_type, req.service, req.proposal_id)
    explanation = await gen.service.explain(
        req.identity,
        req.msg_type,
        req.payload,
        created_at=req.created_at,
        proposal_id=req.proposal_id,
        service=req.service,
        caller=request[CALLER],
        voted=voted,
    )
    return web.json_response(explanation.as_dict())


def make_app(
    service: SigningService,
    settings: APISettings,
    governance: GovernanceService | None = None,
    *,
    health_checker: HealthChecker | None = None,
    metrics: Metrics | None = None,
    recovery: RecoveryService | None = None,
) -> web.Application:
    """The API application. The daemon owns the services' lifecycles and swaps them through ``app[RUNTIME]``."""
    app = web.Application(
        middlewares=[error_middleware, peer_middleware],
        client_max_size=settings.max_request_bytes,
    )
    metrics = metrics or METRICS
    checker = health_checker or HealthChecker(service, governance, metrics=metrics)
    app[RUNTIME] = Runtime(Generation(1, service, governance, checker, recovery=recovery))
    app[METRICS_KEY] = metrics
    app[SETTINGS] = settings
    app[BODY_TIMEOUT] = settings.body_timeout
    app[IN_FLIGHT] = InFlight()
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics_exposition)
    app.router.add_get("/v1/identities", identities)
    app.router.add_post("/v1/sign", sign)
    app.router.add_post("/v1/explain", explain)
    if governance is not None:
        add_governance_routes(app, governance)
    return app
