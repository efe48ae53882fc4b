"""``AsyncAgentClient``: the asyncio twin of ``AgentClient`` (same methods, awaited), over asyncio's own Unix-socket
streams. Importing it imports asyncio; ``signing_agent.client`` does not until it is asked for this class."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from signing_agent.client import _calls
from signing_agent.client._calls import BaseClient, Sleep, checked
from signing_agent.client._http import (
    MAX_ANSWER_BYTES,
    MalformedAnswerError,
    Response,
    decode_response,
    encode_request,
    no_answer,
    talk_failed,
    too_large,
    unreachable,
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
from signing_agent.names import ACCEPT_BALLOT

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from signing_agent.client._calls import Call, Flow

    T = TypeVar("T")


async def _read_bounded(reader: asyncio.StreamReader, path: str) -> bytes:
    """The answer to its end, refused once it grows past ``MAX_ANSWER_BYTES`` (see ``_http``)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await reader.read(65536):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise too_large(path)
        chunks.append(chunk)
    return b"".join(chunks)


class AsyncAgentClient(BaseClient):
    """An asyncio client of the agent's socket API; see ``AgentClient`` for the arguments and each method."""

    # -- the transport ---------------------------------------------------------------------------------------------

    async def request(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> Response:
        path_ = self.socket_path
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    reader, writer = await asyncio.open_unix_connection(path_)
                except OSError as exc:
                    raise unreachable(path_, exc) from None
                try:
                    writer.write(encode_request(method, path, body, headers))
                    # The agent may have answered (a 413, a 503) and closed before reading all of it: read that.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        await writer.drain()
                    raw = await _read_bounded(reader, path_)
                except OSError as exc:
                    raise talk_failed(path_, exc) from None
                finally:
                    writer.close()
        except TimeoutError:
            raise no_answer(path_, self.timeout) from None
        try:
            return decode_response(raw)
        except MalformedAnswerError as exc:
            raise talk_failed(path_, exc) from None

    async def call(self, method: str, path: str, body: Any = None) -> Response:
        return checked(await self.request(method, path, body))

    async def run(self, call: Call[T]) -> T:
        notice = None
        if self.on_wait is not None:
            notice = asyncio.get_running_loop().call_later(self.notice_after, self.on_wait, call.waiting_for)
        try:
            return self.parsed(call, await self.call(call.method, call.path, call.body))
        finally:
            if notice is not None:
                notice.cancel()

    async def drive(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    value = await self.run(step)
                except Exception as exc:  # noqa: BLE001 -- handed to the flow, which re-raises what it does not handle
                    step = flow.throw(exc)
                else:
                    step = flow.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result

    # -- the routes ------------------------------------------------------------------------------------------------

    async def health(self) -> Health:
        return await self.run(_calls.health())

    async def metrics(self) -> str:
        return await self.run(_calls.metrics())

    async def identities(self) -> list[Identity]:
        return await self.run(_calls.identities())

    async def services(self) -> list[Service]:
        return await self.run(_calls.services())

    async def sign(
        self,
        identity: str,
        msg_type: str,
        payload: bytes = b"",
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
    ) -> Signed:
        return await self.run(_calls.sign(identity, msg_type, payload, created_at, proposal_id))

    async def explain(
        self,
        identity: str,
        msg_type: str,
        payload: bytes = b"",
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
        service: str | None = None,
    ) -> Explanation:
        return await self.run(_calls.explain(identity, msg_type, payload, created_at, proposal_id, service))

    async def propose(self, service: str, identity: str, proposal: bytes | Mapping[str, Any]) -> Proposal:
        return await self.run(_calls.propose(service, identity, proposal))

    async def vote(self, service: str, identity: str, proposal_id: str, ballot: str = ACCEPT_BALLOT) -> Proposal:
        return await self.run(_calls.vote(service, identity, proposal_id, ballot))

    async def withdraw(self, service: str, identity: str, proposal_id: str) -> Proposal | None:
        return await self.run(_calls.withdraw(service, identity, proposal_id))

    async def activate(self, service: str, identity: str) -> Activation:
        return await self.run(_calls.activate(service, identity))

    async def status(self, service: str) -> ServiceStatus:
        return await self.run(_calls.status(service))

    async def proposals(self, service: str, *, actions: bool = False) -> list[Proposal]:
        return await self.run(_calls.proposals(service, actions=actions))

    async def proposal(self, service: str, proposal_id: str) -> Proposal:
        return await self.run(_calls.proposal(service, proposal_id))

    async def submit_share(self, service: str, identity: str) -> ShareSubmission:
        return await self.run(_calls.submit_share(service, identity))

    async def approve_identity(self, service: str, identity: str, proposal_id: str, sha256: str) -> IdentityApproval:
        return await self.run(_calls.approve_identity(service, identity, proposal_id, sha256))

    async def recovery(self) -> RecoveryStatus:
        return await self.run(_calls.recovery())

    async def reload(self) -> ReloadOutcome:
        return await self.run(_calls.reload())

    # -- flows -----------------------------------------------------------------------------------------------------

    async def resolve_identity(self, identity: str | None = None) -> str:
        return await self.drive(_calls.resolve_identity(identity))

    async def pick_service(self, service: str | None = None) -> str:
        return await self.drive(_calls.pick_service(service))

    async def resolve_proposal_id(self, service: str, proposal_id: str) -> str:
        return await self.drive(_calls.resolve_proposal_id(service, proposal_id))

    async def wait_for_proposal(
        self,
        service: str,
        proposal_id: str,
        *,
        timeout: float,  # noqa: ASYNC109 -- a deadline for polling, as in the sync twin
    ) -> Proposal:
        return await self.drive(_calls.wait_for_proposal(service, proposal_id, timeout))

    async def wait_for_service(
        self,
        service: str,
        status: str,
        *,
        timeout: float,  # noqa: ASYNC109 -- a deadline for polling, as in the sync twin
    ) -> ServiceStatus:
        return await self.drive(_calls.wait_for_service(service, status, timeout))

    async def wait_for_agent(self, *, timeout: float, healthy: bool = True) -> Health:  # noqa: ASYNC109
        return await self.drive(_calls.wait_for_agent(timeout, healthy=healthy))
