"""Governance with a CCF service: sign once, forward, and relay CCF's answer (its status and body unchanged).

Use cases: propose, vote (only on an Open proposal: checked before anything is signed), withdraw, activate a member
(state digest update, then ack), and the reads a member needs to review before voting. Each message is signed exactly
once; the CCF client resends the identical bytes when the network or CCF asks for a retry. A proposal whose response
was lost comes back from CCF as ``ProposalReplay`` on the resend; that is turned into success with the original
proposal, so one submission never becomes two proposals.

A ballot is judged by the proposal it votes on: this layer reads the proposal's actions from the service (over
pinned TLS) and hands them to the policy with the ballot, before anything is signed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from signing_agent.audit import CANCELLED, Auditor, Failed, Forwarded
from signing_agent.ccf.api import Answer, Connector, GovernanceAPI, Proposal
from signing_agent.ccf.client import CCFResponse
from signing_agent.ccf.connections import CCFConnections
from signing_agent.ccf.facts import read_facts
from signing_agent.config import ServiceConfig
from signing_agent.context import current_request
from signing_agent.cose.governance import MsgType, check_proposal_id, compact_json, summarise_payload
from signing_agent.errors import AgentError, CCFError, ConflictError, InvalidRequestError
from signing_agent.names import is_ccf_id
from signing_agent.proposals import ServiceFacts, needs
from signing_agent.signer import SignedMessage, Signer, SignRequest, VotedProposal

_logger = logging.getLogger(__name__)

_REPLAY_ID = re.compile(r"\b([0-9a-f]{64})\b")
PROPOSAL_READS_AT_ONCE = 8
"""Proposals whose actions are read from a service at the same time (``proposals(with_actions=True)``)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Relay:
    """An answer for the API client. ``raw`` set means CCF's bytes, relayed unchanged (``body`` is then CCF's JSON
    object, or None)."""

    status: int
    body: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"
    transaction_id: str | None = None
    from_ccf: bool = False

    @classmethod
    def of(cls, resp: CCFResponse) -> Relay:
        return cls(
            status=resp.status,
            body=resp.json_object(),
            raw=resp.raw,
            content_type=resp.content_type or "application/octet-stream",
            transaction_id=resp.transaction_id,
            from_ccf=True,
        )


class Governance:
    """Forwards signed governance messages to the configured CCF services.

    The clients, and the trust each one has (the pinned identity, ``accepted_service_certificates``, an identity
    trusted provisionally after a recovery for reads and ballots only), are ``ccf``'s (``CCFConnections``).
    ``connector`` is how those clients reach the services (tests put a fake there).
    """

    def __init__(
        self,
        signer: Signer,
        services: Mapping[str, ServiceConfig],
        *,
        auditor: Auditor,
        connector: Connector | None = None,
    ) -> None:
        self.signer = signer
        self.auditor = auditor
        self.ccf = CCFConnections(services, connector)
        self.services = self.ccf.services

    async def open_pinned(self) -> None:
        """Open the clients whose service certificate is a file now, so a bad path fails at start-up."""
        await self.ccf.open_pinned()

    async def forward(
        self,
        service: str,
        signed: SignedMessage,
        send: Callable[[GovernanceAPI, bytes], Awaitable[Answer[T]]],
        *,
        provisional: bool = False,
    ) -> Answer[T]:
        """Send a signed message to ``service`` (``send`` posts the COSE bytes where they go) and audit the outcome:
        ``forwarded`` with CCF's status and transaction id (CCF's errors included: they are answers), or ``failed``
        when no answer came. ``provisional``: as for ``CCFConnections.client`` (ballots only)."""
        ctx, subject, payload = current_request(), signed.subject, signed.payload_digest
        try:
            # Inside: a client that cannot be had now (a trust file gone bad since the last read) is an outcome too.
            client = await self.ccf.client(service, provisional=provisional)
            resp = await send(client, signed.cose)
        except AgentError as exc:
            await self.auditor.record(
                Failed(request=ctx, subject=subject, payload=payload, cose_sha256=signed.cose_sha256, error=exc.code)
            )
            raise
        except asyncio.CancelledError:
            # The request's deadline (agent.request_timeout) or a stop cut the wait: the message may have reached CCF,
            # or not. The log says the agent stopped waiting, rather than leaving a signed message without an outcome.
            await self.auditor.record_cancelled(
                Failed(request=ctx, subject=subject, payload=payload, cose_sha256=signed.cose_sha256, error=CANCELLED)
            )
            raise
        await self.auditor.record(
            Forwarded(
                request=ctx,
                subject=subject,
                payload=payload,
                cose_sha256=signed.cose_sha256,
                ccf_status=resp.status,
                ccf_error=resp.error_code,
                transaction_id=resp.transaction_id,
                attempts=resp.attempts,
            )
        )
        _logger.info(
            "forwarded %s from %s to %s: %d%s (tx %s, %d attempt%s)",
            signed.msg_type,
            signed.identity,
            service,
            resp.status,
            f" {resp.error_code}" if resp.error_code else "",
            resp.transaction_id,
            resp.attempts,
            "" if resp.attempts == 1 else "s",
        )
        return resp

    async def propose(self, service: str, identity: str, proposal: bytes) -> Relay:
        await self.ccf.client(service)  # an unknown service fails before anything is signed
        facts = await self.proposal_facts(service, proposal)
        signed = await self.signer.sign(
            SignRequest(
                identity=identity, msg_type=MsgType.PROPOSAL, payload=proposal, service=service, service_facts=facts
            )
        )
        resp = await self.forward(service, signed, lambda api, cose: api.create_proposal(cose))
        if resp.error_code == "ProposalReplay" and resp.attempts > 1:
            recovered = await self._replayed_proposal(service, resp, signed)
            if recovered is not None:
                return recovered
        return Relay.of(resp)

    async def proposal_facts(self, service: str, proposal: bytes) -> ServiceFacts | None:
        """What a proposal to ``service`` is checked against before it is signed (``signing_agent.proposals``),
        read over the connection it would go through; None when its checks need nothing of the service."""
        wanted = needs(proposal)
        if not wanted:
            return None
        return await read_facts(await self.ccf.client(service), service, wanted)

    async def _replayed_proposal(self, service: str, resp: Answer[Proposal], signed: SignedMessage) -> Relay | None:
        """Our first attempt created the proposal and its answer was lost: return that proposal."""
        match = _REPLAY_ID.search(resp.error_message)
        if match is None:
            return None
        client = await self.ccf.client(service)
        got = await client.proposal(match.group(1))
        if got.value is None or got.value.proposer_id != signed.member_id:
            return None
        _logger.info("proposal %s was created by an earlier attempt whose answer was lost", match.group(1))
        return Relay(status=200, body=got.value.fields, transaction_id=got.transaction_id, from_ccf=True)

    async def vote(self, service: str, identity: str, proposal_id: str, ballot: str) -> Relay:
        check_proposal_id(proposal_id)
        ident = self.signer.identity(identity)
        client = await self.ccf.client(service, provisional=True)
        got = await client.proposal(proposal_id)
        if not got.ok:
            return Relay.of(got)
        state = got.value.state if got.value is not None else None
        if state != "Open":
            raise ConflictError(f"proposal {proposal_id} is {state}, not Open: no ballot was signed")
        voted = await self.voted_proposal(service, proposal_id)  # the policy judges the ballot by these actions
        signed = await self.signer.sign(
            SignRequest(
                identity=identity,
                msg_type=MsgType.BALLOT,
                payload=compact_json({"ballot": ballot}),
                proposal_id=proposal_id,
                service=service,
                voted=voted,
            )
        )
        return Relay.of(
            await self.forward(
                service,
                signed,
                lambda api, cose: api.submit_ballot(proposal_id, ident.member_id, cose),
                provisional=True,
            )
        )

    async def voted_proposal(self, service: str, proposal_id: str) -> VotedProposal:
        """The action names of proposal ``proposal_id`` as ``service`` holds it, for the policy to judge a ballot by.

        CCF answers ``GET .../proposals/{id}/actions`` with the proposal body as it was proposed; it is parsed as a
        proposal payload is before signing (``summarise_payload``). When the actions cannot be read (an error
        answer, no answer, a body that is not a proposal) they are unknown, with the reason: a rule that constrains
        actions then refuses the ballot (fail closed), a rule that does not lets it go on.
        """
        check_proposal_id(proposal_id)
        client = await self.ccf.client(service, provisional=True)  # as the vote it judges: reads and ballots
        where = f"service {service!r}"
        try:
            resp = await client.proposal_actions(proposal_id)
        except CCFError as exc:
            return VotedProposal(None, f"{where} could not be asked for them: {exc.message}")
        if resp.value is None:
            code = f" {resp.error_code}" if resp.error_code else ""
            return VotedProposal(None, f"{where} answered {resp.status}{code} when asked for them")
        try:
            summary = summarise_payload(MsgType.PROPOSAL, resp.value.raw)
        except InvalidRequestError as exc:
            return VotedProposal(None, f"{where} answered with something that is not a proposal: {exc.message}")
        return VotedProposal(summary.actions)

    async def voted_for_explain(
        self, msg_type: MsgType, service: str | None, proposal_id: str | None
    ) -> VotedProposal | None:
        """For ``explain``: what a ballot for ``service`` would be judged by, read as ``vote`` reads it. None for
        other messages, and for a ballot without a service (a ``/v1/sign`` ballot, whose proposal the agent cannot
        see) or without a proposal id (refused when the request is validated)."""
        if msg_type is not MsgType.BALLOT or service is None or proposal_id is None:
            return None
        return await self.voted_proposal(service, proposal_id)

    async def withdraw(self, service: str, identity: str, proposal_id: str) -> Relay:
        check_proposal_id(proposal_id)
        await self.ccf.client(service)
        # No proposal actions to judge: CCF lets a member withdraw only its own proposal, and a withdrawal makes
        # nothing happen (the policy's action constraints apply to proposals and the ballots that accept them).
        signed = await self.signer.sign(
            SignRequest(
                identity=identity, msg_type=MsgType.WITHDRAWAL, payload=b"", proposal_id=proposal_id, service=service
            )
        )
        return Relay.of(await self.forward(service, signed, lambda api, cose: api.withdraw_proposal(proposal_id, cose)))

    async def activate(self, service: str, identity: str) -> Relay:
        """State-digest update, then ack: an Accepted member becomes Active."""
        ident = self.signer.identity(identity)
        mid = ident.member_id
        client = await self.ccf.client(service)
        update_msg = await self.signer.sign(
            SignRequest(identity=identity, msg_type=MsgType.STATE_DIGEST, payload=b"", service=service)
        )
        update = await self.forward(service, update_msg, lambda api, cose: api.update_state_digest(mid, cose))
        if not update.ok:
            return Relay.of(update)
        if update.value is None:
            raise CCFError(f"service {service!r} answered :update without a stateDigest")
        digest = update.value.digest
        # The ack signs the :update answer as it came (CCF reads its stateDigest and ignores the rest).
        ack_msg = await self.signer.sign(
            SignRequest(identity=identity, msg_type=MsgType.ACK, payload=update.raw, service=service)
        )
        ack = await self.forward(service, ack_msg, lambda api, cose: api.ack_state_digest(mid, cose))
        if not ack.ok:
            return Relay.of(ack)
        member = await client.member(mid)
        status = member.value.status if member.value is not None else "Active"
        return Relay(
            status=200,
            body={"memberId": mid, "status": status, "stateDigest": digest},
            transaction_id=ack.transaction_id,
        )

    async def status(self, service: str) -> Relay:
        client = await self.ccf.client(service, provisional=True)
        info = await client.service_info()
        if info.value is None:
            return Relay.of(info)
        identities = []
        for ident in self.signer.identities.values():
            member = await client.member(ident.member_id)
            if member.value is not None:
                member_status = member.value.status
            elif member.status == 404:
                member_status = "NotAMember"
            else:
                member_status = None
            identities.append({"name": ident.name, "memberId": ident.member_id, "status": member_status})
        return Relay(
            status=200,
            body={**info.value.fields, "service": service, "url": client.config.url, "identities": identities},
            transaction_id=info.transaction_id,
        )

    async def proposals(self, service: str, *, with_actions: bool = False) -> Relay:
        """The service's proposals, relayed; ``with_actions``: each with its ``actions`` as proposed (read from the
        service, a few at a time; a proposal whose actions cannot be read is listed without them)."""
        client = await self.ccf.client(service, provisional=True)
        listed = await client.proposals()
        body = listed.json_object()
        if not with_actions or listed.value is None or body is None:
            return Relay.of(listed)
        limit = asyncio.Semaphore(PROPOSAL_READS_AT_ONCE)

        async def with_its_actions(entry: Any) -> Any:
            pid = entry.get("proposalId") if isinstance(entry, dict) else None
            if not is_ccf_id(pid):
                return entry
            async with limit:
                actions = await client.proposal_actions(pid, max_attempts=1)
            return {**entry, "actions": actions.value.listed()} if actions.value is not None else entry

        values = body.get("value")
        if isinstance(values, list):
            body = {**body, "value": list(await asyncio.gather(*(with_its_actions(v) for v in values)))}
        return Relay(status=listed.status, body=body, transaction_id=listed.transaction_id, from_ccf=True)

    async def proposal(self, service: str, proposal_id: str) -> Relay:
        """A proposal with its actions and the ballots cast so far, to review before voting."""
        check_proposal_id(proposal_id)
        client = await self.ccf.client(service, provisional=True)
        got = await client.proposal(proposal_id)
        if got.value is None:
            return Relay.of(got)
        body: dict[str, Any] = dict(got.value.fields)
        actions = await client.proposal_actions(proposal_id)
        if actions.value is not None:
            body["actions"] = actions.value.listed()
        ballots: dict[str, str] = {}
        members = await client.members()
        for member in members.value or ():
            if not is_ccf_id(member.member_id):
                continue  # not a member id CCF would list: never put in a path
            ballot = await client.ballot(proposal_id, member.member_id)
            if ballot.value is not None:
                ballots[member.member_id] = ballot.value.script
        body["ballots"] = ballots
        return Relay(status=200, body=body, transaction_id=got.transaction_id, from_ccf=True)

    async def aclose(self) -> None:
        await self.ccf.aclose()
