"""Routes that sign and forward governance to a CCF service, and the reads a member needs before voting.

CCF's answers (success or error) are relayed with CCF's status, body and ``x-ms-ccf-transaction-id`` unchanged and
the header ``X-Relayed-From: ccf``; the agent's own errors use its ``{"error": {"code", "message"}}`` shape.
"""

from __future__ import annotations

from aiohttp import web

from signing_agent.api.request import read_body
from signing_agent.api.runtime import generation_of, governance_of, recovery_of
from signing_agent.api.schemas import decode_base64, get_str, parse_object
from signing_agent.cose.governance import compact_json
from signing_agent.errors import InvalidRequestError
from signing_agent.governance import Relay

_PROPOSAL_FIELDS = frozenset({"identity", "proposal", "proposal_base64"})
_BALLOT_FIELDS = frozenset({"identity", "ballot"})
_IDENTITY_ONLY = frozenset({"identity"})
_APPROVE_FIELDS = frozenset({"identity", "proposal_id", "sha256"})


def relay_response(relay: Relay) -> web.Response:
    headers: dict[str, str] = {}
    if relay.transaction_id:
        headers["x-ms-ccf-transaction-id"] = relay.transaction_id
    if relay.from_ccf:
        headers["X-Relayed-From"] = "ccf"
    if relay.raw is not None:
        if relay.content_type:
            headers["Content-Type"] = relay.content_type
        return web.Response(status=relay.status, body=relay.raw, headers=headers)
    if relay.status == 204:
        return web.Response(status=204, headers=headers)
    return web.json_response(relay.body, status=relay.status, headers=headers)


async def _no_fields(request: web.Request) -> None:
    """The body of a route that takes no fields: nothing (or only white space), or ``{}``."""
    raw = await read_body(request)
    if raw.strip():
        parse_object(raw, frozenset())


async def list_services(request: web.Request) -> web.Response:
    gov = governance_of(request)
    return web.json_response(
        {
            "services": [
                {"name": s.name, "url": s.url, "api_version": s.api_version}
                for s in sorted(gov.services.values(), key=lambda s: s.name)
            ]
        }
    )


async def propose(request: web.Request) -> web.Response:
    body = parse_object(await read_body(request), _PROPOSAL_FIELDS, frozenset({"identity"}))
    if ("proposal" in body) == ("proposal_base64" in body):
        raise InvalidRequestError("give proposal (a JSON object) or proposal_base64 (exact bytes)")
    payload = (
        decode_base64(body["proposal_base64"], "proposal_base64")
        if "proposal_base64" in body
        else compact_json(body["proposal"])
    )
    gov = governance_of(request)
    relay = await gov.propose(
        request.match_info["svc"],
        get_str(body, "identity"),
        payload,
    )
    return relay_response(relay)


async def vote(request: web.Request) -> web.Response:
    body = parse_object(await read_body(request), _BALLOT_FIELDS, _BALLOT_FIELDS)
    gov = governance_of(request)
    relay = await gov.vote(
        request.match_info["svc"],
        get_str(body, "identity"),
        request.match_info["pid"],
        get_str(body, "ballot"),
    )
    return relay_response(relay)


async def withdraw(request: web.Request) -> web.Response:
    body = parse_object(await read_body(request), _IDENTITY_ONLY, _IDENTITY_ONLY)
    gov = governance_of(request)
    relay = await gov.withdraw(
        request.match_info["svc"],
        get_str(body, "identity"),
        request.match_info["pid"],
    )
    return relay_response(relay)


async def activate(request: web.Request) -> web.Response:
    await _no_fields(request)
    gov = governance_of(request)
    relay = await gov.activate(
        request.match_info["svc"],
        request.match_info["identity"],
    )
    return relay_response(relay)


async def status(request: web.Request) -> web.Response:
    service = request.match_info["svc"]
    relay = await governance_of(request).status(service)
    recovery = generation_of(request).recovery
    if relay.raw is None and isinstance(relay.body, dict):
        relay = Relay(
            status=relay.status,
            body={**relay.body, "recovery_watchers": recovery.status(service)},
            transaction_id=relay.transaction_id,
        )
    return relay_response(relay)


async def submit_share(request: web.Request) -> web.Response:
    """Fetch, decrypt (in the key store), sign and submit the identity's recovery share; CCF's answer relayed."""
    await _no_fields(request)
    result = await recovery_of(request).submit_share(
        request.match_info["svc"],
        request.match_info["identity"],
    )
    return relay_response(result.relay)


async def approve_identity(request: web.Request) -> web.Response:
    """The proposal rule's approval: vote accept on a ``transition_service_to_open`` proposal, and so approve the new
    service identity for recovery shares, once the member has its fingerprint from out of band (``sha256``)."""
    body = parse_object(await read_body(request), _APPROVE_FIELDS, _APPROVE_FIELDS)
    relay = await recovery_of(request).approve_identity(
        request.match_info["svc"],
        get_str(body, "identity"),
        get_str(body, "proposal_id"),
        get_str(body, "sha256"),
    )
    return relay_response(relay)


async def recovery_status(request: web.Request) -> web.Response:
    recovery = recovery_of(request)
    return web.json_response({"enabled": recovery.config.enabled, "watchers": recovery.status()})


async def proposals(request: web.Request) -> web.Response:
    """The proposals; ``?actions=true``: each with its ``actions`` (one more read of CCF per proposal)."""
    with_actions = request.query.get("actions", "false")
    if with_actions not in ("true", "false"):
        raise InvalidRequestError(f"actions: expected true or false, got {with_actions!r}")
    gov = governance_of(request)
    return relay_response(await gov.proposals(request.match_info["svc"], with_actions=with_actions == "true"))


async def proposal(request: web.Request) -> web.Response:
    gov = governance_of(request)
    return relay_response(await gov.proposal(request.match_info["svc"], request.match_info["pid"]))


def add_governance_routes(app: web.Application) -> None:
    """The routes; handlers use the ``Governance`` of the generation their request pinned."""
    r = app.router
    r.add_get("/v1/services", list_services)
    r.add_get("/v1/services/{svc}/status", status)
    r.add_get("/v1/services/{svc}/proposals", proposals)
    r.add_post("/v1/services/{svc}/proposals", propose)
    r.add_get("/v1/services/{svc}/proposals/{pid}", proposal)
    r.add_post("/v1/services/{svc}/proposals/{pid}/ballots", vote)
    r.add_post("/v1/services/{svc}/proposals/{pid}/withdraw", withdraw)
    r.add_post("/v1/services/{svc}/members/{identity}/activate", activate)
    r.add_post("/v1/services/{svc}/recovery/{identity}/share", submit_share)
    r.add_post("/v1/services/{svc}/recovery/approve-identity", approve_identity)
    r.add_get("/v1/recovery", recovery_status)
