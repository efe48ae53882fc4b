"""``AgentClient``: the blocking client, one connection per call. Standard library only (the fast CLI's client)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

from signing_agent.client import _calls
from signing_agent.client._calls import BaseClient, Sleep, checked
from signing_agent.client._http import Response, encode_request, exchange
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
from signing_agent.names import ACCEPT_BALLOT

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from signing_agent.client._calls import Call, Flow

    T = TypeVar("T")


class AgentClient(BaseClient):
    """A blocking client of the agent's socket API.

    ``socket_path``: the agent's socket; None finds it as the CLI does (``$SIGNING_AGENT_SOCK``, the config's
    ``[client]`` section, the default socket: ``signing_agent.client_config``). ``timeout``: seconds to wait for each
    answer (``AgentNoAnswerError`` after it). ``on_wait``: told what a call waits for once it has taken
    ``notice_after`` seconds. Errors: ``signing_agent.client.errors``.
    """

    # -- the transport ---------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Response:
        """One request; any answer (errors too) is returned."""
        return exchange(self.socket_path, encode_request(method, path, body, headers), self.timeout)

    def call(self, method: str, path: str, body: Any = None) -> Response:
        """A request whose non-2xx answer raises (``AgentRequestError``, typed by the agent's error code)."""
        return checked(self.request(method, path, body))

    @contextlib.contextmanager
    def _notice(self, waiting_for: str) -> Iterator[None]:
        if self.on_wait is None:
            yield
            return
        import threading

        timer = threading.Timer(self.notice_after, self.on_wait, (waiting_for,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def run(self, call: Call[T]) -> T:
        with self._notice(call.waiting_for):
            return self.parsed(call, self.call(call.method, call.path, call.body))

    def drive(self, flow: Flow[T]) -> T:
        """Run a flow of calls (``signing_agent.client._calls``) to its result."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    value = self.run(step)
                except Exception as exc:  # noqa: BLE001 -- handed to the flow, which re-raises what it does not handle
                    step = flow.throw(exc)
                else:
                    step = flow.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result

    # -- the routes (each runs one call of _calls) -----------------------------------------------------------------

    def health(self) -> Health:
        return self.run(_calls.health())

    def metrics(self) -> str:
        return self.run(_calls.metrics())

    def identities(self) -> list[Identity]:
        return self.run(_calls.identities())

    def services(self) -> list[Service]:
        return self.run(_calls.services())

    def sign(
        self,
        identity: str,
        msg_type: str,
        payload: bytes = b"",
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
    ) -> Signed:
        """A COSE_Sign1 governance message (``bytes(signed)``), as ``ccf_cose_sign1`` makes it."""
        return self.run(_calls.sign(identity, msg_type, payload, created_at, proposal_id))

    def explain(
        self,
        identity: str,
        msg_type: str,
        payload: bytes = b"",
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
        service: str | None = None,
    ) -> Explanation:
        """What ``sign`` would sign and the policy's decision; nothing is signed."""
        return self.run(_calls.explain(identity, msg_type, payload, created_at, proposal_id, service))

    def propose(self, service: str, identity: str, proposal: bytes | Mapping[str, Any]) -> Proposal:
        """Sign a proposal (exact bytes, or a JSON object) and submit it."""
        return self.run(_calls.propose(service, identity, proposal))

    def vote(self, service: str, identity: str, proposal_id: str, ballot: str = ACCEPT_BALLOT) -> Proposal:
        """Sign a ballot (default: the canonical accepting one) for an Open proposal and submit it."""
        return self.run(_calls.vote(service, identity, proposal_id, ballot))

    def withdraw(self, service: str, identity: str, proposal_id: str) -> Proposal | None:
        """Withdraw a proposal of ``identity``'s; None when there is no such proposal."""
        return self.run(_calls.withdraw(service, identity, proposal_id))

    def activate(self, service: str, identity: str) -> Activation:
        return self.run(_calls.activate(service, identity))

    def status(self, service: str) -> ServiceStatus:
        return self.run(_calls.status(service))

    def proposals(self, service: str, *, actions: bool = False) -> list[Proposal]:
        """The service's proposals; with ``actions``, each with its actions (one more read of CCF per proposal)."""
        return self.run(_calls.proposals(service, actions=actions))

    def proposal(self, service: str, proposal_id: str) -> Proposal:
        """One proposal, with its actions and the ballots cast so far."""
        return self.run(_calls.proposal(service, proposal_id))

    def submit_share(self, service: str, identity: str) -> ShareSubmission:
        return self.run(_calls.submit_share(service, identity))

    def approve_identity(self, service: str, identity: str, proposal_id: str, sha256: str) -> IdentityApproval:
        return self.run(_calls.approve_identity(service, identity, proposal_id, sha256))

    def recovery(self) -> RecoveryStatus:
        return self.run(_calls.recovery())

    def reload(self) -> ReloadOutcome:
        """Ask the agent to reload its configuration (its own uid and root only); the outcome, refused or not."""
        return self.run(_calls.reload())

    # -- flows -----------------------------------------------------------------------------------------------------

    def resolve_identity(self, identity: str | None = None) -> str:
        """``identity``, or the one whose member id it begins, or the agent's only identity."""
        return self.drive(_calls.resolve_identity(identity))

    def pick_service(self, service: str | None = None) -> str:
        """``service``, or the agent's only one, or ``default``."""
        return self.drive(_calls.pick_service(service))

    def resolve_proposal_id(self, service: str, proposal_id: str) -> str:
        """The full id of the proposal ``proposal_id`` begins (at least 4 hex digits)."""
        return self.drive(_calls.resolve_proposal_id(service, proposal_id))

    def wait_for_proposal(self, service: str, proposal_id: str, *, timeout: float) -> Proposal:
        return self.drive(_calls.wait_for_proposal(service, proposal_id, timeout))

    def wait_for_service(self, service: str, status: str, *, timeout: float) -> ServiceStatus:
        return self.drive(_calls.wait_for_service(service, status, timeout))

    def wait_for_agent(self, *, timeout: float, healthy: bool = True) -> Health:
        return self.drive(_calls.wait_for_agent(timeout, healthy=healthy))
