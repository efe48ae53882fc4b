"""HTTPS server of the CCF governance sandbox: routing, CCF's request pipeline, fault injection, control API.

Pipeline per request (as in CCF's frontend): route lookup (404/405) → COSE authentication for signed
endpoints (see :mod:`.auth`) → ``api-version`` check (``/gov`` routes only) → handler. Successes carry
``x-ms-ccf-transaction-id``. Errors are OData bodies and leave no state change behind.

The unauthenticated ``/_sandbox/`` control API exists because this is a test double; a real CCF has nothing
like it. It adds members, injects faults and exposes the request log:

- ``POST /_sandbox/members`` ``{"cert": PEM, "encryption_pub_key"?: PEM, "member_data"?: any, "status"?:
  "Accepted"|"Active", "recovery_role"?: str}`` → ``{"memberId": id}``
- ``POST /_sandbox/nodes`` ``{"node_data"?: any}`` (body optional) → ``{"nodeId": id, "status": "Pending"}``: a node
  joins, and waits for a ``transition_node_to_trusted`` proposal
- ``GET|POST|DELETE /_sandbox/faults`` (POST body: ``{"kind": "reset"|"drop_after"|"status"|"delay", "path":
  regex, "method"?: "POST"|"*", "count"?: n, "status"?: n, "retry_after"?: str, "code"?: str, "message"?:
  str, "delay"?: seconds}`` → the rule with its ``id``)
- ``GET|DELETE /_sandbox/requests`` → ``{"value": [{"method","path","query","status","fault"}]}``
- ``POST /_sandbox/recover`` ``{"service_key"?: PEM, "service_cert"?: PEM}`` (body optional) → ``{"status":
  "Recovering", "recoveryCount", "serviceCertificate", "previousServiceCertificate", "creationTransactionId",
  "previousServiceCreationTransactionId", "nodeId"}``: the disaster of :meth:`SandboxServer.recover`. The response
  is sent over the old TLS session with ``Connection: close``; every later connection gets the new node
  certificate.

Recovery identity switch: the live server keeps its port and its ``ssl.SSLContext`` object; ``recover()`` loads
the new node key and certificate into that context (OpenSSL copies the certificate into each connection when it
is accepted, so only new connections see the new one) and drops every open connection, as the restart of a real
node would (the control call's own connection closes right after its response). Clients pinned to the old
service identity then fail the TLS handshake; clients pinned to the new one succeed. Nothing needs restarting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from aiohttp import web

from signing_agent.files import replace_at
from signing_agent.sandbox.auth import (
    ACTIVE_MEMBER_POLICY,
    MEMBER_POLICY,
    Authenticated,
    Policy,
    authenticate,
)
from signing_agent.sandbox.errors import GovError, internal_error
from signing_agent.sandbox.faults import FaultRule, Faults, RequestRecord
from signing_agent.sandbox.identity import ServiceIdentity, client_ssl_context, load_node_cert, server_ssl_context
from signing_agent.sandbox.state import GovernanceState, MemberStatus, ServiceStatus, check_hex_id

_logger = logging.getLogger(__name__)

API_VERSIONS: Final = ("2023-06-01-preview", "2024-07-01")
_SUPPORTED: Final = ", ".join(API_VERSIONS)
_ID: Final = r"([^/:]+)"


@dataclass(frozen=True, slots=True)
class _Call:
    state: GovernanceState
    params: tuple[str, ...]
    auth: Authenticated | None
    body: bytes
    app: SandboxApp | None = None

    @property
    def signer(self) -> Authenticated:
        if self.auth is None:
            raise internal_error("endpoint has no authentication")
        return self.auth


_Handler = Callable[[_Call], web.Response]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: _Handler
    policy: Policy | None = None
    msg_type: str = ""


def _json(state: GovernanceState, body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"x-ms-ccf-transaction-id": state.txid},
    )


def _no_content(state: GovernanceState) -> web.Response:
    return web.Response(status=204, headers={"x-ms-ccf-transaction-id": state.txid})


def _error(error: GovError) -> web.Response:
    return web.Response(
        status=error.status,
        body=json.dumps(error.body()).encode(),
        content_type="application/json",
        headers=error.headers,
    )


class _Described(Protocol):
    def to_json(self) -> dict[str, Any]: ...


def _listed(call: _Call, items: Iterable[_Described]) -> web.Response:
    """A collection as CCF lists it: ``{"value": [...]}``."""
    return _json(call.state, {"value": [item.to_json() for item in items]})


def _found(call: _Call, what: str, find: Callable[[str], _Described | None]) -> web.Response:
    """The ``what`` (member, node) the path's id names, or CCF's 404 ``ResourceNotFound``."""
    item_id = check_hex_id(call.params[0], what)
    item = find(item_id)
    if item is None:
        raise GovError(404, "ResourceNotFound", f"{what.capitalize()} {item_id} does not exist.")
    return _json(call.state, item.to_json())


# -- handlers ---


def _create(call: _Call) -> web.Response:
    auth = call.signer
    proposal = call.state.create_proposal(auth.envelope, auth.member_id, call.body)
    return _json(call.state, proposal.to_json())


def _withdraw(call: _Call) -> web.Response:
    auth = call.signer
    proposal = call.state.withdraw(auth.envelope, auth.member_id, call.params[0], call.body)
    if proposal is None:
        return _no_content(call.state)
    return _json(call.state, proposal.to_json())


def _ballot(call: _Call) -> web.Response:
    auth = call.signer
    proposal = call.state.submit_ballot(auth.envelope, auth.member_id, call.params[0], call.params[1], call.body)
    return _json(call.state, proposal.to_json())


def _update(call: _Call) -> web.Response:
    return _json(call.state, call.state.update_state_digest(call.signer.member_id, call.params[0]))


def _ack(call: _Call) -> web.Response:
    auth = call.signer
    call.state.ack(auth.envelope, auth.member_id, call.params[0], call.body)
    return _no_content(call.state)


def _recover(call: _Call) -> web.Response:
    auth = call.signer
    body, initiated = call.state.submit_recovery_share(auth.envelope, auth.member_id, call.params[0])
    if initiated and call.app is not None:
        call.app.start_private_recovery()
    return _json(call.state, body)


def _find_proposal(call: _Call) -> tuple[str, Any]:
    proposal_id = check_hex_id(call.params[0], "proposal")
    proposal = call.state.proposal(proposal_id)
    if proposal is None:
        raise GovError(404, "ProposalNotFound", f"Could not find proposal {proposal_id}.")
    return proposal_id, proposal


def _list_proposals(call: _Call) -> web.Response:
    return _listed(call, call.state.proposals())


def _get_proposal(call: _Call) -> web.Response:
    return _json(call.state, _find_proposal(call)[1].to_json())


def _get_actions(call: _Call) -> web.Response:
    proposal = _find_proposal(call)[1]
    return web.Response(
        body=proposal.body,
        content_type="application/json",
        headers={"x-ms-ccf-transaction-id": call.state.txid},
    )


def _get_ballot(call: _Call) -> web.Response:
    proposal_id = check_hex_id(call.params[0], "proposal")
    member_id = check_hex_id(call.params[1], "member")
    proposal = call.state.proposal(proposal_id)
    if proposal is None:
        raise GovError(404, "ProposalNotFound", f"Proposal {proposal_id} does not exist.")
    ballot = proposal.ballots.get(member_id)
    if ballot is None:
        raise GovError(404, "VoteNotFound", f"Member {member_id} has not voted for proposal {proposal_id}.")
    return web.Response(
        text=ballot, content_type="text/javascript", headers={"x-ms-ccf-transaction-id": call.state.txid}
    )


def _get_state_digest(call: _Call) -> web.Response:
    member_id = call.params[0]
    digest = call.state.state_digest(member_id)
    if digest is None:
        raise GovError(404, "ResourceNotFound", f"No ACK record exists for member {member_id}.")
    return _json(call.state, {"memberId": member_id, "stateDigest": digest})


def _service_info(call: _Call) -> web.Response:
    return _json(call.state, call.state.service_info())


def _members(call: _Call) -> web.Response:
    return _listed(call, call.state.members())


def _member(call: _Call) -> web.Response:
    return _found(call, "member", call.state.member)


def _constitution(call: _Call) -> web.Response:
    return web.Response(
        text=call.state.constitution,
        content_type="text/javascript",
        headers={"x-ms-ccf-transaction-id": call.state.txid},
    )


def _commit(call: _Call) -> web.Response:
    return _json(call.state, {"transactionId": call.state.txid, "status": "Committed"})


def _transaction(call: _Call) -> web.Response:
    txid = call.params[0]
    match = re.fullmatch(r"(\d+)\.(\d+)", txid)
    if match is None:
        raise GovError(400, "InvalidResourceName", f"'{txid}' is not a valid transaction ID")
    status = call.state.transaction_status(int(match.group(1)), int(match.group(2)))
    return _json(call.state, {"transactionId": txid, "status": status})


def _encrypted_share(call: _Call) -> web.Response:
    member_id = check_hex_id(call.params[0], "member")
    encrypted = call.state.encrypted_share(member_id)
    if encrypted is None:
        raise GovError(404, "ResourceNotFound", f"Recovery share not found for member {member_id}.")
    return _json(call.state, {"memberId": member_id, "encryptedShare": base64.b64encode(encrypted).decode()})


def _nodes(call: _Call) -> web.Response:
    return _listed(call, call.state.nodes())


def _node(call: _Call) -> web.Response:
    return _found(call, "node", call.state.node)


def _previous_identity(call: _Call) -> web.Response:
    previous = call.state.previous_service_cert_pem
    if previous is None:
        raise GovError(404, "ResourceNotFound", "This service is not a recovery of a previous service.")
    return _json(call.state, {"previous_service_identity": previous})


def _node_state(call: _Call) -> web.Response:
    state = call.state
    body: dict[str, Any] = {
        "node_id": state.node_id,
        "state": state.node_state,
        "last_signed_seqno": state.seqno,
        "startup_seqno": 0,
    }
    if state.node_state == "ReadingPrivateLedger" and state.recovery_target_seqno is not None:
        body["recovery_target_seqno"] = state.recovery_target_seqno
        body["last_recovered_seqno"] = max(state.recovery_target_seqno - 1, 0)
    return _json(state, body)


def _node_network(call: _Call) -> web.Response:
    state = call.state
    return _json(
        state,
        {
            "service_status": state.service_status,
            "service_certificate": state.service_cert_pem,
            "current_view": 2,
            "primary_id": state.node_id,
            "recovery_count": state.recovery_count,
            "service_data": {},
            "current_service_create_txid": state.creation_txid,
        },
    )


def _route(method: str, path: str, handler: _Handler, policy: Policy | None = None, msg_type: str = "") -> _Route:
    return _Route(method, re.compile(path), handler, policy, msg_type)


_PROPOSALS: Final = "/gov/members/proposals"
_ROUTES: Final[tuple[_Route, ...]] = (
    _route("POST", rf"{_PROPOSALS}:create", _create, ACTIVE_MEMBER_POLICY, "proposal"),
    _route("POST", rf"{_PROPOSALS}/{_ID}:withdraw", _withdraw, ACTIVE_MEMBER_POLICY, "withdrawal"),
    _route("POST", rf"{_PROPOSALS}/{_ID}/ballots/{_ID}:submit", _ballot, ACTIVE_MEMBER_POLICY, "ballot"),
    _route("POST", rf"/gov/members/state-digests/{_ID}:update", _update, MEMBER_POLICY, "state_digest"),
    _route("POST", rf"/gov/members/state-digests/{_ID}:ack", _ack, MEMBER_POLICY, "ack"),
    _route("POST", rf"/gov/recovery/members/{_ID}:recover", _recover, ACTIVE_MEMBER_POLICY, "recovery_share"),
    _route("GET", _PROPOSALS, _list_proposals),
    _route("GET", rf"{_PROPOSALS}/{_ID}", _get_proposal),
    _route("GET", rf"{_PROPOSALS}/{_ID}/actions", _get_actions),
    _route("GET", rf"{_PROPOSALS}/{_ID}/ballots/{_ID}", _get_ballot),
    _route("GET", rf"/gov/members/state-digests/{_ID}", _get_state_digest),
    _route("GET", r"/gov/service/info", _service_info),
    _route("GET", r"/gov/service/members", _members),
    _route("GET", rf"/gov/service/members/{_ID}", _member),
    _route("GET", r"/gov/service/nodes", _nodes),
    _route("GET", rf"/gov/service/nodes/{_ID}", _node),
    _route("GET", r"/gov/service/constitution", _constitution),
    _route("GET", r"/gov/service/transactions/commit", _commit),
    _route("GET", rf"/gov/service/transactions/{_ID}", _transaction),
    _route("GET", rf"/gov/recovery/encrypted-shares/{_ID}", _encrypted_share),
    _route("GET", r"/node/state", _node_state),
    _route("GET", r"/node/network", _node_network),
    _route("GET", r"/node/service/previous_identity", _previous_identity),
)


def _check_api_version(request: web.Request) -> None:
    versions = request.query.getall("api-version", [])
    if not versions:
        raise GovError(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests. "
            f"The supported api-versions are: {_SUPPORTED}",
        )
    if versions[0] not in API_VERSIONS:
        raise GovError(
            400,
            "UnsupportedApiVersionValue",
            f"Unsupported api-version '{versions[0]}'. The supported api-versions are: {_SUPPORTED}",
        )


class SandboxApp:
    """The aiohttp application around one :class:`GovernanceState`."""

    def __init__(
        self,
        state: GovernanceState,
        faults: Faults,
        *,
        private_recovery_seconds: float = 0.2,
        on_recover: Callable[[dict[str, Any], object], Awaitable[dict[str, Any]]] | None = None,
        on_join: Callable[[Any], str] | None = None,
    ) -> None:
        self.state = state
        self.faults = faults
        self.requests: list[RequestRecord] = []
        self.private_recovery_seconds = private_recovery_seconds
        self.on_recover = on_recover
        self.on_join = on_join
        self._replay: asyncio.TimerHandle | None = None
        self.app = web.Application(client_max_size=1024 * 1024)
        self.app.router.add_route("*", "/_sandbox/{tail:.*}", self._control)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    # -- CCF pipeline ---

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        rule = self.faults.take(request.method, request.path)
        if rule is not None and rule.kind == "delay":
            await asyncio.sleep(rule.delay)
        if rule is not None and rule.kind == "reset":
            self._record(request, None, rule)
            return _abort(request)
        if rule is not None and rule.kind == "status":
            headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else None
            error = GovError(rule.status, rule.error_code, rule.message, headers=headers)
            self._record(request, rule.status, rule)
            return _error(error)
        response = await self._process(request)
        self._record(request, response.status, rule)
        if rule is not None and rule.kind == "drop_after":
            return _abort(request)
        return response

    async def _process(self, request: web.Request) -> web.Response:
        try:
            route, params = self._match(request)
            body = await request.read()
            auth = None
            if route.policy is not None:
                auth = authenticate(self.state, request.headers.get("Content-Type"), body, route.policy, route.msg_type)
            if request.path.startswith("/gov/"):
                _check_api_version(request)
            return route.handler(_Call(self.state, params, auth, body, self))
        except GovError as error:
            return _error(error)
        except Exception as exc:
            _logger.exception("unexpected error handling %s %s", request.method, request.path)
            return _error(internal_error(f"Unexpected error: {exc}"))

    def _match(self, request: web.Request) -> tuple[_Route, tuple[str, ...]]:
        allowed: list[str] = []
        for route in _ROUTES:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            if route.method == request.method:
                return route, match.groups()
            allowed.append(route.method)
        if allowed:
            raise GovError(405, "MethodNotAllowed", f"Allowed methods for '{request.path}' are: {', '.join(allowed)}")
        raise GovError(404, "ResourceNotFound", f"Unknown path: {request.path}.")

    def _record(self, request: web.Request, status: int | None, rule: FaultRule | None) -> None:
        record = RequestRecord(
            request.method, request.path, request.query_string, status, None if rule is None else rule.kind
        )
        self.requests.append(record)
        suffix = f" [fault: {rule.kind}]" if rule is not None else ""
        _logger.info("%s %s -> %s%s", request.method, request.path, status or "no response", suffix)

    # -- private recovery (the replay of the private ledger, simulated by a timer) ---

    def start_private_recovery(self) -> None:
        self.cancel_private_recovery()
        loop = asyncio.get_running_loop()
        self._replay = loop.call_later(self.private_recovery_seconds, self._finish_private_recovery)

    def cancel_private_recovery(self) -> None:
        if self._replay is not None:
            self._replay.cancel()
            self._replay = None

    def _finish_private_recovery(self) -> None:
        self._replay = None
        if self.state.complete_private_recovery():
            _logger.info("private ledger recovered: service is Open (recovery count %d)", self.state.recovery_count)

    # -- control API (test double only) ---

    async def _control(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._control_call(request)
        except (ValueError, TypeError, KeyError, re.error) as exc:
            return web.json_response({"error": {"code": "InvalidInput", "message": str(exc)}}, status=400)

    async def _control_call(self, request: web.Request) -> web.StreamResponse:
        what = request.match_info["tail"]
        match (request.method, what):
            case ("POST", "members"):
                body = await request.json()
                status: MemberStatus = body.get("status", "Active")
                member_id = self.state.add_member(
                    body["cert"],
                    status=status,
                    encryption_pub_key=body.get("encryption_pub_key"),
                    member_data=body.get("member_data"),
                    recovery_role=body.get("recovery_role"),
                )
                return web.json_response({"memberId": member_id})
            case ("POST", "nodes"):
                if self.on_join is None:
                    raise ValueError("no node can join this sandbox")
                raw = await request.read()
                body = json.loads(raw) if raw.strip() else {}
                if not isinstance(body, dict):
                    raise TypeError("the body must be a JSON object")
                unknown = set(body) - {"node_data"}
                if unknown:
                    raise ValueError(f"unknown node fields: {', '.join(sorted(unknown))}")
                node_id = self.on_join(body.get("node_data"))
                return web.json_response({"nodeId": node_id, "status": "Pending"})
            case ("GET", "faults"):
                return web.json_response({"value": [rule.to_json() for rule in self.faults.pending()]})
            case ("POST", "faults"):
                body = await request.json()
                allowed = {
                    "kind",
                    "path",
                    "method",
                    "count",
                    "status",
                    "retry_after",
                    "code",
                    "message",
                    "delay",
                }
                unknown = set(body) - allowed
                if unknown:
                    raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
                if "retry_after" in body and body["retry_after"] is not None:
                    body["retry_after"] = str(body["retry_after"])
                if "method" in body:
                    body["method"] = str(body["method"]).upper()
                rule = self.faults.add(FaultRule(**body))
                return web.json_response(rule.to_json())
            case ("DELETE", "faults"):
                self.faults.clear()
                return web.Response(status=204)
            case ("GET", "requests"):
                return web.json_response({"value": [r.to_json() for r in self.requests]})
            case ("DELETE", "requests"):
                self.requests.clear()
                return web.Response(status=204)
            case ("POST", "recover"):
                if self.on_recover is None:
                    raise ValueError("this sandbox cannot recover")
                raw = await request.read()
                body = json.loads(raw) if raw.strip() else {}
                if not isinstance(body, dict):
                    raise TypeError("the body must be a JSON object")
                unknown = set(body) - {"service_key", "service_cert"}
                if unknown:
                    raise ValueError(f"unknown recover fields: {', '.join(sorted(unknown))}")
                result = await self.on_recover(body, request.protocol)
                return web.json_response(result, headers={"Connection": "close"})
            case _:
                return web.json_response(
                    {"error": {"code": "ResourceNotFound", "message": f"Unknown control call {what}"}},
                    status=404,
                )


def _abort(request: web.Request) -> web.Response:
    """Close the connection without a response; aiohttp then discards whatever the handler returns."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=204)


class SandboxServer:
    """A CCF governance sandbox listening on HTTPS; use as ``async with SandboxServer(...) as sandbox``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        members: Sequence[bytes | str] = (),
        service_key_pem: bytes | None = None,
        service_cert_pem: bytes | None = None,
        *,
        service_status: ServiceStatus = "Open",
        recovery_threshold: int = 1,
        private_recovery_seconds: float = 0.2,
    ) -> None:
        if service_key_pem is None and service_cert_pem is not None:
            raise ValueError("a service certificate needs its key (service_key_pem)")
        self.identity = (
            ServiceIdentity.generate()
            if service_key_pem is None
            else ServiceIdentity.load(service_key_pem, service_cert_pem)
        )
        self.host = host
        self.port = port
        self.state = GovernanceState(
            self.identity.cert_pem.decode(), service_status=service_status, recovery_threshold=recovery_threshold
        )
        self.faults = Faults()
        for cert in members:
            self.state.add_member(cert, status="Active")
        self._app = SandboxApp(
            self.state,
            self.faults,
            private_recovery_seconds=private_recovery_seconds,
            on_recover=self._control_recover,
            on_join=self.add_node,
        )
        self._runner: web.AppRunner | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self.url = ""
        self.service_cert_out: Path | None = None
        """If set, :meth:`recover` rewrites the service certificate there (the CLI sets it from
        ``--service-cert-out``)."""

    @property
    def private_recovery_seconds(self) -> float:
        """How long the node stays ``ReadingPrivateLedger`` once the recovery threshold is reached."""
        return self._app.private_recovery_seconds

    @private_recovery_seconds.setter
    def private_recovery_seconds(self, seconds: float) -> None:
        self._app.private_recovery_seconds = seconds

    @property
    def service_cert_pem(self) -> bytes:
        return self.identity.cert_pem

    @property
    def requests(self) -> list[RequestRecord]:
        """The request log (everything outside ``/_sandbox/``), oldest first."""
        return self._app.requests

    def add_member(
        self,
        cert_pem: bytes | str,
        *,
        status: MemberStatus = "Active",
        encryption_pub_key: bytes | str | None = None,
        member_data: Any = None,
        recovery_role: str | None = None,
    ) -> str:
        """Register a member directly. With ``encryption_pub_key`` (RSA PEM) it is a recovery member (role
        Participant unless ``recovery_role`` says Owner/NonParticipant); an Active one gets a share at once."""
        return self.state.add_member(
            cert_pem,
            status=status,
            encryption_pub_key=encryption_pub_key,
            member_data=member_data,
            recovery_role=recovery_role,
        )

    def add_node(self, node_data: Any = None) -> str:
        """A new node joins the service: Pending (``GET /gov/service/nodes``) until members trust it. Returns its
        node id."""
        _, node_cert = self.identity.issue_node_cert()
        return self.state.add_node(node_cert, node_data)

    def issued_share(self, member_id: str) -> bytes | None:
        """The plaintext (44 bytes) of the share currently issued to ``member_id``, or None.

        In-process only (never over HTTP): lets tests check what a member must submit, and that the agent never
        leaks it.
        """
        return self.state.issued_share(member_id)

    async def recover(self, service_key_pem: bytes | None = None, service_cert_pem: bytes | None = None) -> None:
        """Simulate a disaster and a node restarted in Recover mode.

        The service gets a new identity (generated, or loaded from ``service_key_pem``/``service_cert_pem``), a
        new node certificate endorsed by it, status ``Recovering`` (node ``PartOfPublicNetwork``), recovery count
        + 1 and ``previousServiceCreationTransactionId``. Members keep their status and the issued encrypted shares
        stay readable. A running server switches its TLS certificate in place and drops open connections (see
        the module docstring); it keeps its URL.
        """
        await self._recover(service_key_pem, service_cert_pem, None)

    async def _recover(self, service_key_pem: bytes | None, service_cert_pem: bytes | None, keep: object) -> None:
        """:meth:`recover`; ``keep`` is the connection of the control call, closed after its response."""
        if service_key_pem is None and service_cert_pem is not None:
            raise ValueError("a service certificate needs its key (service_key_pem)")
        identity = (
            ServiceIdentity.generate()
            if service_key_pem is None
            else ServiceIdentity.load(service_key_pem, service_cert_pem)
        )
        if identity.cert_pem == self.identity.cert_pem:
            raise ValueError("the recovered service needs a new service identity")
        node_key, node_cert = identity.issue_node_cert()
        self._app.cancel_private_recovery()
        self.identity = identity
        self.state.recover(identity.cert_pem.decode())
        self.state.set_node_identity(node_cert)
        if self._ssl_context is not None:
            load_node_cert(self._ssl_context, node_key, node_cert)
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                if connection is keep:
                    connection.close()  # after the control call's response (sent with Connection: close)
                else:
                    connection.force_close()  # a restarted node has no connections left
        if self.service_cert_out is not None:
            self.write_service_cert(self.service_cert_out)
        _logger.info("service recovering with a new identity (recovery count %d)", self.state.recovery_count)

    async def _control_recover(self, body: dict[str, Any], connection: object) -> dict[str, Any]:
        key = body.get("service_key")
        cert = body.get("service_cert")
        previous = self.state.service_cert_pem
        await self._recover(
            None if key is None else str(key).encode(), None if cert is None else str(cert).encode(), connection
        )
        return {
            "status": self.state.service_status,
            "recoveryCount": self.state.recovery_count,
            "serviceCertificate": self.state.service_cert_pem,
            "previousServiceCertificate": previous,
            "creationTransactionId": self.state.creation_txid,
            "previousServiceCreationTransactionId": self.state.previous_creation_txid,
            "nodeId": self.state.node_id,
        }

    def write_service_cert(self, path: str | Path) -> Path:
        """Write the service certificate (the CA to pin) to ``path``, atomically. An agent may pin that file: when
        it held another certificate, a warning says that this file now names this sandbox's identity, which such an
        agent trusts from its next reload on (and refuses until then)."""
        target = Path(path)
        try:
            previous = target.read_bytes()
        except FileNotFoundError:
            previous = None
        if previous == self.service_cert_pem:
            return target
        replace_at(target, self.service_cert_pem)
        if previous is not None:
            _logger.warning(
                "overwrote %s, which held another service certificate: an agent pinning that file trusts this "
                "sandbox's new service identity only after a reload ('signing-agent reload'), and refuses this "
                "sandbox until then",
                target,
            )
        return target

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting only this sandbox's service identity."""
        return client_ssl_context(self.service_cert_pem)

    async def start(self) -> None:
        node_key, node_cert = self.identity.issue_node_cert()
        self.state.set_node_identity(node_cert)
        runner = web.AppRunner(self._app.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._ssl_context = server_ssl_context(node_key, node_cert)
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"https://{host}:{port}"

    async def close(self) -> None:
        self._app.cancel_private_recovery()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SandboxServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def usage(server: SandboxServer, service_cert_out: Path | None) -> str:
    """What a person needs once the sandbox listens: its URL, what to pin, the agent's config, the control API."""
    members = len(server.state.active_member_ids())
    pinned = str(service_cert_out.absolute()) if service_cert_out is not None else None
    lines = [
        f"CCF governance sandbox on {server.url} (a test double, not a CCF node; never expose it)",
        f"  service certificate to pin: {pinned or '(not written: pass --service-cert-out FILE)'}",
        f"  active members: {members} (--member-cert; more with POST /_sandbox/members)",
        "  the agent's config:",
        "    [services.default]",
        f'    url = "{server.url}"',
        f'    service_certificate = "{pinned or "service_cert.pem"}"',
        f"  control API: {server.url}/_sandbox/ (members, faults, requests, recover: signing-agent sandbox --help)",
        "  stop: Ctrl-C or SIGTERM",
    ]
    return "\n".join(lines)


async def serve_until_signalled(
    server: SandboxServer,
    *,
    ready_file: Path | None = None,
    service_cert_out: Path | None = None,
    on_ready: Callable[[SandboxServer], Awaitable[None]] | None = None,
) -> None:
    """Run ``server`` until SIGTERM or SIGINT. The ready file is written (atomically) once it listens."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with server:
            if service_cert_out is not None:
                server.service_cert_out = service_cert_out
                server.write_service_cert(service_cert_out)
            if ready_file is not None:
                replace_at(ready_file, f"{server.url}\n".encode())  # never through a link planted beside it
            if on_ready is not None:
                await on_ready(server)
            _logger.info("CCF governance sandbox listening on %s", server.url)
            print(usage(server, service_cert_out), file=sys.stderr, flush=True)
            await stop.wait()
            _logger.info("stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
