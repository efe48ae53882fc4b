"""Each route of the agent's API once: its method, path and body, how its answer is read, and what a person waits
for meanwhile; and the few flows made of several calls (pick the only identity, match an id prefix, wait for a
state change); and what both clients hold (``BaseClient``: the socket, the timeout, whom to tell of a slow call) and
how they read an answer (``checked``). Both clients run these, so the sync and async clients cannot drift apart.

Adding a route: a function here that returns a ``Call``, and a one-line method on each client
(``AgentClient`` and ``AsyncAgentClient``) that runs it.

A flow is a generator that yields ``Call``s (and ``Sleep``s) and is sent their results; the client drives it,
blocking or awaiting, and throws a call's error into it.
"""

from __future__ import annotations

import binascii
import os
import time
from collections.abc import Callable, Generator, Iterable, Mapping

from signing_agent.client._http import Response
from signing_agent.client.errors import (
    UNREADABLE_ANSWER,
    AgentUnreachableError,
    WaitTimeoutError,
    answered_error,
    unreadable_answer,
)
from signing_agent.client.results import (
    Activation,
    Explanation,
    Health,
    Identity,
    IdentityApproval,
    Proposal,
    RecoveryStatus,
    ReloadOutcome,
    Service,
    ServiceStatus,
    ShareSubmission,
    Signed,
)
from signing_agent.client_config import DEFAULT_TIMEOUT, client_settings
from signing_agent.errors import InvalidRequestError
from signing_agent.record import Record

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any, Generic, TypeVar

    T = TypeVar("T")

    class _Answer(Generic[T]):
        """What a call's answer becomes: a type parameter for mypy alone."""

else:
    T = None

    class _Answer:
        def __class_getitem__(cls, item: object) -> type:
            return cls


FULL_ID_LENGTH = 64
"""CCF's proposal and member ids: 64 lowercase hex digits (a SHA-256)."""
MIN_PREFIX = 4
"""The shortest id prefix matched (as git does for hashes)."""
_HEX = frozenset("0123456789abcdef")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class Call(Record, _Answer[T]):
    """One request to the agent, and how its (2xx) answer becomes a result."""

    method: str
    path: str
    parse: Callable[[Response], T]
    body: Any = None
    waiting_for: str = "the agent"
    """What a person waits for while it runs: "the agent to sign ...", "CCF service 'default' ..."."""


class Sleep(Record):
    seconds: float


if TYPE_CHECKING:
    Step = Call[Any] | Sleep
    Flow = Generator[Step, Any, T]


Notice = Callable[[str], None]
"""Told what a call waits for, once it has taken ``notice_after`` seconds (the CLI prints it on a terminal)."""


class BaseClient:
    """What ``AgentClient`` and ``AsyncAgentClient`` share (as httpx's ``BaseClient``): where the agent listens, how
    long to wait for each answer, and whom to tell what a slow call waits for."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        on_wait: Notice | None = None,
        notice_after: float = 1.0,
    ) -> None:
        self.socket_path = str(socket_path if socket_path is not None else client_settings().socket)
        self.timeout = timeout
        self.on_wait = on_wait
        self.notice_after = notice_after

    def parsed(self, call: Call[T], resp: Response) -> T:
        """``call``'s result from its (2xx) answer. An answer of a shape the call does not read (a list for an object,
        a field missing, not JSON) is ``AgentUnreachableError``: whatever answers on the socket may be an agent of
        another version, or no agent at all; either way its answer is no result."""
        try:
            return call.parse(resp)
        except UNREADABLE_ANSWER as exc:
            raise unreadable_answer(self.socket_path, exc) from exc


def checked(resp: Response) -> Response:
    """A 2xx answer as it came; any other raised as the agent's typed error (``AgentRequestError``)."""
    if resp.status >= 300:
        raise answered_error(resp.status, resp.headers, resp.body)
    return resp


def segment(value: str, what: str) -> str:
    """A name or id as one segment of a route's path: refused (not escaped) when it holds anything else."""
    if not value or not set(value) <= _NAME_CHARS or value in (".", ".."):
        raise InvalidRequestError(f"{what} {value!r}: use letters, digits, '_', '.' and '-' only")
    return value


def _base64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")  # base64's module costs an import


def _tx(resp: Response) -> str | None:
    return resp.headers.get("x-ms-ccf-transaction-id")


def _at_ccf(service: str) -> str:
    return f"CCF service {service!r}"


# -- the routes ----------------------------------------------------------------------------------------------------


def health() -> Call[Health]:
    return Call("GET", "/v1/health", lambda r: Health.from_json(r.json()), waiting_for="the agent's health checks")


def metrics() -> Call[str]:
    return Call("GET", "/metrics", lambda r: r.body.decode("utf-8", "replace"))


def identities() -> Call[list[Identity]]:
    return Call("GET", "/v1/identities", lambda r: [Identity.from_json(i) for i in r.json()["identities"]])


def services() -> Call[list[Service]]:
    return Call("GET", "/v1/services", lambda r: [Service.from_json(s) for s in r.json()["services"]])


def _sign_body(
    identity: str, msg_type: str, payload: bytes, created_at: int | None, proposal_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "identity": identity,
        "msg_type": msg_type,
        "payload_base64": _base64(payload),
    }
    if created_at is not None:
        body["created_at"] = created_at
    if proposal_id is not None:
        body["proposal_id"] = proposal_id
    return body


def sign(identity: str, msg_type: str, payload: bytes, created_at: int | None, proposal_id: str | None) -> Call[Signed]:
    return Call(
        "POST",
        "/v1/sign",
        lambda r: Signed.from_answer(r.body, r.headers),
        _sign_body(identity, msg_type, payload, created_at, proposal_id),
        f"the agent to sign a {msg_type} as {identity} (its key store)",
    )


def explain(
    identity: str,
    msg_type: str,
    payload: bytes,
    created_at: int | None,
    proposal_id: str | None,
    service: str | None,
) -> Call[Explanation]:
    body = _sign_body(identity, msg_type, payload, created_at, proposal_id)
    if service is not None:
        body["service"] = service
    return Call("POST", "/v1/explain", lambda r: Explanation.from_json(r.json()), body, "the agent's policy decision")


def _proposal(r: Response) -> Proposal:
    return Proposal.from_json(r.json(), _tx(r))


def propose(service: str, identity: str, proposal: bytes | Mapping[str, Any]) -> Call[Proposal]:
    body: dict[str, Any] = {"identity": identity}
    if isinstance(proposal, bytes):
        body["proposal_base64"] = _base64(proposal)
    else:
        body["proposal"] = dict(proposal)
    return Call(
        "POST",
        f"/v1/services/{segment(service, 'service')}/proposals",
        _proposal,
        body,
        f"the agent to sign the proposal as {identity} and submit it to {_at_ccf(service)}",
    )


def vote(service: str, identity: str, proposal_id: str, ballot: str) -> Call[Proposal]:
    return Call(
        "POST",
        f"/v1/services/{segment(service, 'service')}/proposals/{segment(proposal_id, 'proposal')}/ballots",
        _proposal,
        {"identity": identity, "ballot": ballot},
        f"the agent to read proposal {proposal_id} from {_at_ccf(service)}, sign the ballot as {identity} and "
        "submit it",
    )


def withdraw(service: str, identity: str, proposal_id: str) -> Call[Proposal | None]:
    return Call(
        "POST",
        f"/v1/services/{segment(service, 'service')}/proposals/{segment(proposal_id, 'proposal')}/withdraw",
        lambda r: None if r.status == 204 else _proposal(r),
        {"identity": identity},
        f"the agent to sign the withdrawal as {identity} and submit it to {_at_ccf(service)}",
    )


def activate(service: str, identity: str) -> Call[Activation]:
    return Call(
        "POST",
        f"/v1/services/{segment(service, 'service')}/members/{segment(identity, 'identity')}/activate",
        lambda r: Activation.from_json(r.json(), _tx(r)),
        None,
        f"the agent to update {identity}'s state digest and acknowledge it at {_at_ccf(service)}",
    )


def status(service: str) -> Call[ServiceStatus]:
    return Call(
        "GET",
        f"/v1/services/{segment(service, 'service')}/status",
        lambda r: ServiceStatus.from_json(r.json(), _tx(r)),
        waiting_for=f"{_at_ccf(service)} (service and member status)",
    )


def proposals(service: str, *, actions: bool = False) -> Call[list[Proposal]]:
    query = "?actions=true" if actions else ""
    return Call(
        "GET",
        f"/v1/services/{segment(service, 'service')}/proposals{query}",
        lambda r: [Proposal.from_json(p) for p in (r.json() or {}).get("value", [])],
        waiting_for=f"{_at_ccf(service)} (the proposals{' and their actions' if actions else ''})",
    )


def proposal(service: str, proposal_id: str) -> Call[Proposal]:
    return Call(
        "GET",
        f"/v1/services/{segment(service, 'service')}/proposals/{segment(proposal_id, 'proposal')}",
        _proposal,
        waiting_for=f"{_at_ccf(service)} (proposal {proposal_id}, its actions and ballots)",
    )


def submit_share(service: str, identity: str) -> Call[ShareSubmission]:
    return Call(
        "POST",
        f"/v1/services/{segment(service, 'service')}/recovery/{segment(identity, 'identity')}/share",
        lambda r: ShareSubmission.from_json(r.json(), _tx(r)),
        None,
        f"the agent to fetch, decrypt and submit {identity}'s recovery share to {_at_ccf(service)}",
    )


def approve_identity(service: str, identity: str, proposal_id: str, sha256: str) -> Call[IdentityApproval]:
    return Call(
        "POST",
        f"/v1/services/{segment(service, 'service')}/recovery/approve-identity",
        lambda r: IdentityApproval.from_json(r.json(), _tx(r)),
        {"identity": identity, "proposal_id": proposal_id, "sha256": sha256},
        f"the agent to check proposal {proposal_id} at {_at_ccf(service)} and vote to accept it as {identity}",
    )


def recovery() -> Call[RecoveryStatus]:
    return Call("GET", "/v1/recovery", lambda r: RecoveryStatus.from_json(r.json()))


def reload() -> Call[ReloadOutcome]:
    return Call(
        "POST",
        "/v1/reload",
        lambda r: ReloadOutcome.from_json(r.json()),
        None,
        "the agent to load the configuration and self-test every identity",
    )


# -- flows ---------------------------------------------------------------------------------------------------------


def unique_prefix(prefix: str, candidates: Iterable[str], what: str) -> str:
    """The one candidate ``prefix`` begins (as git matches hash prefixes); an error names the candidates when
    several match, and says so when none does."""
    if len(prefix) < MIN_PREFIX:
        raise InvalidRequestError(f"{what} id {prefix!r}: give at least {MIN_PREFIX} characters")
    matches = sorted({c for c in candidates if c.startswith(prefix)})
    if prefix in matches:
        return prefix
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise InvalidRequestError(f"no {what} id starts with {prefix!r}")
    raise InvalidRequestError(
        f"{what} id prefix {prefix!r} is ambiguous; it begins:\n  " + "\n  ".join(matches),
        hint="give more characters",
    )


def is_id_prefix(text: str) -> bool:
    """Hex, and long enough to be matched as an id prefix."""
    return len(text) >= MIN_PREFIX and set(text) <= _HEX


def resolve_identity(identity: str | None) -> Flow[str]:
    """The identity named; else the agent's only one. A member id (or a unique prefix of one, at least 4 hex digits)
    names the identity that has it."""
    if identity is not None and not is_id_prefix(identity.lower()):
        return identity
    idents: list[Identity] = yield identities()
    if identity is not None:
        if any(i.name == identity for i in idents):
            return identity
        member_id = unique_prefix(identity.lower(), (i.member_id for i in idents), "member")
        return next(i.name for i in idents if i.member_id == member_id)
    if len(idents) == 1:
        return str(idents[0].name)
    names = ", ".join(i.name for i in idents) or "none"
    raise InvalidRequestError(
        f"the agent has several identities ({names}): pick one with --identity",
        hint="or set SIGNING_AGENT_IDENTITY, or [client] identity in the config",
    )


def pick_service(service: str | None) -> Flow[str]:
    """The service named; else the agent's only one, or the one called ``default``."""
    if service is not None:
        return service
    listed: list[Service] = yield services()
    names = [s.name for s in listed]
    if len(names) == 1:
        return names[0]
    if "default" in names:
        return "default"
    raise InvalidRequestError(
        f"the agent knows several services ({', '.join(names) or 'none'}): pick one with --service",
        hint="or set SIGNING_AGENT_SERVICE, or [client] service in the config",
    )


def resolve_proposal_id(service: str, proposal_id: str) -> Flow[str]:
    """A full proposal id as it is; a unique prefix of one (at least 4 hex digits) as the proposal it begins."""
    text = proposal_id.lower()
    if len(text) == FULL_ID_LENGTH or not set(text) <= _HEX:
        return proposal_id  # a full id, or no id at all: the agent says which
    listed: list[Proposal] = yield proposals(service)
    return unique_prefix(text, (p.proposal_id for p in listed), "proposal")


def wait_for_proposal(service: str, proposal_id: str, timeout: float, interval: float = 0.5) -> Flow[Proposal]:
    """Poll until the proposal is no longer ``Open`` (accepted, rejected, withdrawn, failed...)."""
    deadline = time.monotonic() + timeout
    while True:
        listed: list[Proposal] = yield proposals(service)
        found = next((p for p in listed if p.proposal_id == proposal_id), None)
        if found is not None and not found.open:
            return found
        if time.monotonic() + interval > deadline:
            state = found.state if found is not None else "not listed"
            raise WaitTimeoutError(
                f"proposal {proposal_id} is still {state} after {timeout:g} s (waited for it to be decided)"
            )
        yield Sleep(interval)


def wait_for_service(service: str, wanted: str, timeout: float, interval: float = 0.5) -> Flow[ServiceStatus]:
    """Poll until the service's status is ``wanted`` (e.g. ``Open`` after a recovery)."""
    deadline = time.monotonic() + timeout
    while True:
        current: ServiceStatus = yield status(service)
        if current.status == wanted:
            return current
        if time.monotonic() + interval > deadline:
            raise WaitTimeoutError(
                f"service {service} is still {current.status} after {timeout:g} s (waited for {wanted})"
            )
        yield Sleep(interval)


def wait_for_agent(timeout: float, *, healthy: bool, interval: float = 0.2) -> Flow[Health]:
    """Poll until an agent answers on the socket (``healthy``: and reports ``ok``): after starting one."""
    deadline = time.monotonic() + timeout
    last = "no agent answered"
    while True:
        try:
            report: Health = yield health()
        except AgentUnreachableError as exc:
            last = str(exc)
        else:
            if report.ok or not healthy:
                return report
            last = f"the agent is {report.status}"
        if time.monotonic() + interval > deadline:
            raise WaitTimeoutError(f"waited {timeout:g} s for the agent: {last}")
        yield Sleep(interval)
