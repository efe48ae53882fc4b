"""The aiohttp application: middlewares (request id, peer credentials, errors to JSON) and the routes.

Errors leave as ``{"error": {"code", "message", "request_id"}}`` with a status from the error tree; a backend's raw
message is logged with the request id, never echoed. Nothing here touches a key store except through the service.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from signing_agent import __version__
from signing_agent.api.governance_routes import add_governance_routes
from signing_agent.api.peer import Peer, PeerAllowList, peer_of
from signing_agent.api.schemas import parse_sign_request
from signing_agent.errors import AgentError, BackendUnavailableError, PolicyDeniedError, ShuttingDownError
from signing_agent.governance import GovernanceService
from signing_agent.service import SigningService

_logger = logging.getLogger(__name__)
_access = logging.getLogger("signing_agent.access")


@dataclass(frozen=True, slots=True)
class APISettings:
    max_request_bytes: int
    request_timeout: float
    allow: PeerAllowList


class InFlight:
    """Counts requests being handled, so shutdown can wait for them while their connections stay open."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def exit(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    async def drain(self, limit: float) -> bool:
        """Refuse new requests and wait for the current ones. False if some were still running at the timeout."""
        self.draining = True
        try:
            async with asyncio.timeout(limit):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


SERVICE = web.AppKey("service", SigningService)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
SETTINGS = web.AppKey("settings", APISettings)
PEER = web.RequestKey("peer", Peer)
REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, request_id: str | None) -> web.Response:
    body: dict[str, object] = {"error": {"code": code, "message": message}}
    if request_id is not None:
        body["error"] = {"code": code, "message": message, "request_id": request_id}
    return web.json_response(body, status=status)


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
    peer: Peer | None = request.get(PEER)
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
    peer = peer_of(request)
    if peer is None:
        raise PolicyDeniedError("the agent only serves local Unix-socket peers")
    request[PEER] = peer
    in_flight = request.app[IN_FLIGHT]
    if in_flight.draining:
        raise ShuttingDownError("the agent is shutting down; retry against its successor")
    if not settings.allow.allows(peer):
        raise PolicyDeniedError(
            f"peer uid {peer.uid} (gid {peer.gid}, pid {peer.pid}) may not use this agent",
            hint="by default only the agent's own user and root may; see agent.allowed_uids / allowed_gids",
        )
    in_flight.enter()
    try:
        async with asyncio.timeout(settings.request_timeout):
            return await handler(request)
    except TimeoutError:
        raise BackendUnavailableError(
            f"the request took longer than agent.request_timeout ({settings.request_timeout:g} s)"
        ) from None
    finally:
        in_flight.exit()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def identities(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
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
    service = request.app[SERVICE]
    req = parse_sign_request(await request.read())
    signed = await service.sign(
        req.identity, req.msg_type, req.payload, created_at=req.created_at, proposal_id=req.proposal_id
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


def make_app(
    service: SigningService, settings: APISettings, governance: GovernanceService | None = None
) -> web.Application:
    """The API application. The daemon owns the services' lifecycles."""
    app = web.Application(
        middlewares=[error_middleware, peer_middleware],
        client_max_size=settings.max_request_bytes,
    )
    app[SERVICE] = service
    app[SETTINGS] = settings
    app[IN_FLIGHT] = InFlight()
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/identities", identities)
    app.router.add_post("/v1/sign", sign)
    if governance is not None:
        add_governance_routes(app, governance)
    return app
