"""Routes of the consortium's workflows (``signing_agent.workflows``): the same checks for tools as for the CLI.

``POST /v1/services/{svc}/workflows/{name}`` builds, checks and submits (or, with ``"dry_run": true``, only checks
and explains) one workflow's proposal; its answer is CCF's Proposal object plus the proposal's ``actions``, or CCF's
error relayed unchanged. The reads: ``GET /v1/services/{svc}/members``, ``/nodes``, ``/identity`` and
``/identities/{identity}/pending``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from signing_agent.api.governance_routes import relay_response
from signing_agent.api.request import read_body
from signing_agent.api.runtime import governance_of
from signing_agent.api.schemas import get_str, parse_object
from signing_agent.errors import InvalidRequestError
from signing_agent.governance import Relay
from signing_agent.workflows import Workflows

_COMMON = frozenset({"identity", "dry_run"})


def workflows_of(request: web.Request) -> Workflows:
    """The workflows of the generation this request pinned."""
    return Workflows(governance_of(request))


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    return get_str(body, key) if body.get(key) is not None else None


def _dry_run(body: dict[str, Any]) -> bool:
    value = body.get("dry_run", False)
    if not isinstance(value, bool):
        raise InvalidRequestError("dry_run must be true or false")
    return value


def _validity_days(body: dict[str, Any]) -> int | None:
    value = body.get("validity_days")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidRequestError("validity_days must be a whole number of days")
    return value


_Run = Callable[[Workflows, str, str, dict[str, Any], bool], Awaitable[Relay]]

# name -> (its fields besides identity and dry_run, what it runs)
_WORKFLOWS: dict[str, tuple[frozenset[str], _Run]] = {
    "member-add": (
        frozenset({"cert", "encryption_pub_key", "member_data", "recovery_role"}),
        lambda w, svc, ident, b, dry: w.member_add(
            svc, ident, cert=get_str(b, "cert"), encryption_pub_key=_optional_str(b, "encryption_pub_key"),
            member_data=b.get("member_data"), recovery_role=_optional_str(b, "recovery_role"), dry_run=dry,
        ),
    ),
    "member-remove": (
        frozenset({"member_id", "cert"}),
        lambda w, svc, ident, b, dry: w.member_remove(
            svc, ident, member_id=_optional_str(b, "member_id"), cert=_optional_str(b, "cert"), dry_run=dry
        ),
    ),
    "node-trust": (
        frozenset({"node_id", "valid_from", "validity_days"}),
        lambda w, svc, ident, b, dry: w.node_trust(
            svc, ident, get_str(b, "node_id"), valid_from=_optional_str(b, "valid_from"),
            validity_days=_validity_days(b), dry_run=dry,
        ),
    ),
    "node-retire": (
        frozenset({"node_id"}),
        lambda w, svc, ident, b, dry: w.node_retire(svc, ident, get_str(b, "node_id"), dry_run=dry),
    ),
    "service-open": (frozenset(), lambda w, svc, ident, b, dry: w.service_open(svc, ident, dry_run=dry)),
    "recovery-accept": (
        frozenset({"previous_service_identity", "next_service_identity"}),
        lambda w, svc, ident, b, dry: w.recovery_accept(
            svc, ident, previous=_optional_str(b, "previous_service_identity"),
            following=_optional_str(b, "next_service_identity"), dry_run=dry,
        ),
    ),
    "recovery-refresh-shares": (
        frozenset(),
        lambda w, svc, ident, b, dry: w.refresh_shares(svc, ident, dry_run=dry),
    ),
}  # fmt: skip
_REQUIRED = {"member-add": {"cert"}, "node-trust": {"node_id"}, "node-retire": {"node_id"}}


def _workflow_handler(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    fields, run = _WORKFLOWS[name]
    allowed, required = fields | _COMMON, frozenset({"identity", *_REQUIRED.get(name, ())})

    async def handler(request: web.Request) -> web.Response:
        body = parse_object(await read_body(request), allowed, required)
        workflows, service = workflows_of(request), request.match_info["svc"]
        return relay_response(await run(workflows, service, get_str(body, "identity"), body, _dry_run(body)))

    return handler


async def members(request: web.Request) -> web.Response:
    return relay_response(await workflows_of(request).members(request.match_info["svc"]))


async def nodes(request: web.Request) -> web.Response:
    return relay_response(await workflows_of(request).nodes(request.match_info["svc"]))


async def service_identity(request: web.Request) -> web.Response:
    report = await workflows_of(request).service_identity(request.match_info["svc"])
    return web.json_response(report.as_dict())


async def pending(request: web.Request) -> web.Response:
    relay = await workflows_of(request).pending(request.match_info["svc"], request.match_info["identity"])
    return relay_response(relay)


def add_workflow_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/services/{svc}/members", members)
    r.add_get("/v1/services/{svc}/nodes", nodes)
    r.add_get("/v1/services/{svc}/identity", service_identity)
    r.add_get("/v1/services/{svc}/identities/{identity}/pending", pending)
    for name in _WORKFLOWS:
        r.add_post(f"/v1/services/{{svc}}/workflows/{name}", _workflow_handler(name))
