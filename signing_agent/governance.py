"""Governance with a CCF service: sign once, forward, and relay CCF's answer (its status and body unchanged).

Use cases: propose, vote (only on an Open proposal: checked before anything is signed), withdraw, activate a member
(state digest update, then ack), and the reads a member needs to review before voting. Each message is signed exactly
once; ``CCFClient`` resends the identical bytes when the network or CCF asks for a retry. A proposal whose response
was lost comes back from CCF as ``ProposalReplay`` on the resend; that is turned into success with the original
proposal, so one submission never becomes two proposals.

A ballot is judged by the proposal it votes on: this layer reads the proposal's actions from the service (over
pinned TLS) and hands them to the policy with the ballot, before anything is signed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from signing_agent.audit import Auditor, Failed, Forwarded
from signing_agent.ccf.client import CCFClient, CCFResponse
from signing_agent.config import ServiceConfig
from signing_agent.context import current_request
from signing_agent.cose.governance import MsgType, check_proposal_id, compact_json, summarise_payload
from signing_agent.errors import AgentError, CCFError, ConflictError, InvalidRequestError, UnknownServiceError
from signing_agent.service import SignedMessage, SigningService, SignRequest, VotedProposal

_logger = logging.getLogger(__name__)

_REPLAY_ID = re.compile(r"\b([0-9a-f]{64})\b")


@dataclass(frozen=True, slots=True)
class Relay:
    """An answer for the API client. ``raw`` set means CCF's bytes, relayed unchanged."""

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
            body=resp.body,
            raw=resp.raw,
            content_type=resp.content_type or "application/octet-stream",
            transaction_id=resp.transaction_id,
            from_ccf=True,
        )


class GovernanceService:
    """Forwards signed governance messages to the configured CCF services.

    Two kinds of trust per service. The pinned identity (the configured ``service_certificate``, or one approved
    after a recovery) and ``accepted_service_certificates`` are trusted for everything. An identity adopted
    *provisionally* after a recovery (``RecoveryService``: the ``accept_transition_to`` rule) is trusted only by the
    clients asked for with ``provisional=True``: reads and ballots, so that members can review and vote the
    transition through the agent; never proposals, withdrawals, acks or recovery shares.
    """

    def __init__(self, signer: SigningService, services: Mapping[str, ServiceConfig], *, auditor: Auditor) -> None:
        self.signer = signer
        self.auditor = auditor
        self.services = dict(services)
        self._clients: dict[str, CCFClient] = {}
        self._provisional_clients: dict[str, CCFClient] = {}
        self._pinned: dict[str, bytes] = {}
        self._provisional: dict[str, bytes] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def pin(self, service: str, pem: bytes) -> None:
        """Pin ``pem`` instead of the configured service certificate (an identity approved after a recovery).

        The service's clients are rebuilt on their next use; requests already under way finish on the old ones.
        """
        self._pinned[service] = pem
        self._close_later(self._clients.pop(service, None))
        self._close_later(self._provisional_clients.pop(service, None))

    def trust_provisionally(self, service: str, pem: bytes | None) -> None:
        """Also trust ``pem`` for reads and ballots (``client(service, provisional=True)``); None: stop."""
        if pem is None:
            self._provisional.pop(service, None)
        else:
            self._provisional[service] = pem
        self._close_later(self._provisional_clients.pop(service, None))

    def provisional_identity(self, service: str) -> bytes | None:
        return self._provisional.get(service)

    def _close_later(self, old: CCFClient | None) -> None:
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def open_pinned(self) -> None:
        """Open the clients whose service certificate is a file now, so a bad path fails at start-up."""
        for name, cfg in self.services.items():
            if cfg.service_certificate is not None:
                await self.client(name)

    async def client(self, service: str, *, provisional: bool = False) -> CCFClient:
        """The service's client, pinned to its trusted identities; ``provisional`` (reads and ballots only): also
        to an identity adopted provisionally after a recovery, if there is one."""
        if service not in self.services:
            known = ", ".join(sorted(self.services)) or "none"
            raise UnknownServiceError(f"unknown service {service!r} (configured: {known})")
        async with self._lock:
            client = self._clients.get(service)
            if client is None:
                client = await CCFClient.open(self.services[service], pinned=self._pinned.get(service))
                self._clients[service] = client
            extra = self._provisional.get(service) if provisional else None
            if extra is None:
                return client
            wider = self._provisional_clients.get(service)
            if wider is None:
                wider = CCFClient(
                    client.config, client.service_cert_pem, also_trusted=(*client.trusted_pems[1:], extra)
                )
                self._provisional_clients[service] = wider
            return wider

    async def forward(
        self, service: str, path: str, signed: SignedMessage, *, provisional: bool = False
    ) -> CCFResponse:
        """Send a signed message to ``path`` of ``service`` and audit the outcome: ``forwarded`` with CCF's status
        and transaction id (CCF's errors included: they are answers), or ``failed`` when no answer came.
        ``provisional``: as for ``client`` (ballots only)."""
        client = await self.client(service, provisional=provisional)
        ctx, subject, payload = current_request(), signed.subject, signed.payload_digest
        try:
            resp = await client.post_cose(path, signed.cose)
        except AgentError as exc:
            await self.auditor.record(
                Failed(request=ctx, subject=subject, payload=payload, cose_sha256=signed.cose_sha256, error=exc.code)
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
        await self.client(service)  # an unknown service fails before anything is signed
        signed = await self.signer.sign(
            SignRequest(identity=identity, msg_type=MsgType.PROPOSAL, payload=proposal, service=service)
        )
        resp = await self.forward(service, "/gov/members/proposals:create", signed)
        if resp.error_code == "ProposalReplay" and resp.attempts > 1:
            recovered = await self._replayed_proposal(service, resp, signed)
            if recovered is not None:
                return recovered
        return Relay.of(resp)

    async def _replayed_proposal(self, service: str, resp: CCFResponse, signed: SignedMessage) -> Relay | None:
        """Our first attempt created the proposal and its answer was lost: return that proposal."""
        match = _REPLAY_ID.search(resp.error_message)
        if match is None:
            return None
        client = await self.client(service)
        got = await client.get(f"/gov/members/proposals/{match.group(1)}")
        if not got.ok or not isinstance(got.body, dict) or got.body.get("proposerId") != signed.member_id:
            return None
        _logger.info("proposal %s was created by an earlier attempt whose answer was lost", match.group(1))
        return Relay(status=200, body=got.body, transaction_id=got.transaction_id, from_ccf=True)

    async def vote(self, service: str, identity: str, proposal_id: str, ballot: str) -> Relay:
        check_proposal_id(proposal_id)
        ident = self.signer.identity(identity)
        client = await self.client(service, provisional=True)
        got = await client.get(f"/gov/members/proposals/{proposal_id}")
        if not got.ok:
            return Relay.of(got)
        state = got.body.get("proposalState") if isinstance(got.body, dict) else None
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
        path = f"/gov/members/proposals/{proposal_id}/ballots/{ident.member_id}:submit"
        return Relay.of(await self.forward(service, path, signed, provisional=True))

    async def voted_proposal(self, service: str, proposal_id: str) -> VotedProposal:
        """The action names of proposal ``proposal_id`` as ``service`` holds it, for the policy to judge a ballot by.

        CCF answers ``GET .../proposals/{id}/actions`` with the proposal body as it was proposed; it is parsed as a
        proposal payload is before signing (``summarise_payload``). When the actions cannot be read (an error
        answer, no answer, a body that is not a proposal) they are unknown, with the reason: a rule that constrains
        actions then refuses the ballot (fail closed), a rule that does not lets it go on.
        """
        check_proposal_id(proposal_id)
        client = await self.client(service, provisional=True)  # as the vote it judges: reads and ballots
        where = f"service {service!r}"
        try:
            resp = await client.get(f"/gov/members/proposals/{proposal_id}/actions")
        except CCFError as exc:
            return VotedProposal(None, f"{where} could not be asked for them: {exc.message}")
        if not resp.ok:
            code = f" {resp.error_code}" if resp.error_code else ""
            return VotedProposal(None, f"{where} answered {resp.status}{code} when asked for them")
        try:
            summary = summarise_payload(MsgType.PROPOSAL, resp.raw)
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
        await self.client(service)
        # No proposal actions to judge: CCF lets a member withdraw only its own proposal, and a withdrawal makes
        # nothing happen (the policy's action constraints apply to proposals and the ballots that accept them).
        signed = await self.signer.sign(
            SignRequest(
                identity=identity, msg_type=MsgType.WITHDRAWAL, payload=b"", proposal_id=proposal_id, service=service
            )
        )
        return Relay.of(await self.forward(service, f"/gov/members/proposals/{proposal_id}:withdraw", signed))

    async def activate(self, service: str, identity: str) -> Relay:
        """State-digest update, then ack: an Accepted member becomes Active."""
        ident = self.signer.identity(identity)
        client = await self.client(service)
        base = f"/gov/members/state-digests/{ident.member_id}"
        update_msg = await self.signer.sign(
            SignRequest(identity=identity, msg_type=MsgType.STATE_DIGEST, payload=b"", service=service)
        )
        update = await self.forward(service, f"{base}:update", update_msg)
        if not update.ok:
            return Relay.of(update)
        digest = update.body.get("stateDigest") if isinstance(update.body, dict) else None
        if not isinstance(digest, str):
            raise CCFError(f"service {service!r} answered :update without a stateDigest")
        # The ack signs the :update answer as it came (CCF reads its stateDigest and ignores the rest).
        ack_msg = await self.signer.sign(
            SignRequest(identity=identity, msg_type=MsgType.ACK, payload=update.raw, service=service)
        )
        ack = await self.forward(service, f"{base}:ack", ack_msg)
        if not ack.ok:
            return Relay.of(ack)
        member = await client.get(f"/gov/service/members/{ident.member_id}")
        status = member.body.get("status") if member.ok and isinstance(member.body, dict) else "Active"
        return Relay(
            status=200,
            body={"memberId": ident.member_id, "status": status, "stateDigest": digest},
            transaction_id=ack.transaction_id,
        )

    async def status(self, service: str) -> Relay:
        client = await self.client(service, provisional=True)
        info = await client.get("/gov/service/info")
        if not info.ok or not isinstance(info.body, dict):
            return Relay.of(info)
        identities = []
        for ident in self.signer.identities.values():
            member = await client.get(f"/gov/service/members/{ident.member_id}")
            if member.ok and isinstance(member.body, dict):
                member_status = member.body.get("status")
            elif member.status == 404:
                member_status = "NotAMember"
            else:
                member_status = None
            identities.append({"name": ident.name, "memberId": ident.member_id, "status": member_status})
        return Relay(
            status=200,
            body={**info.body, "service": service, "url": client.config.url, "identities": identities},
            transaction_id=info.transaction_id,
        )

    async def proposals(self, service: str) -> Relay:
        client = await self.client(service, provisional=True)
        return Relay.of(await client.get("/gov/members/proposals"))

    async def proposal(self, service: str, proposal_id: str) -> Relay:
        """A proposal with its actions and the ballots cast so far, to review before voting."""
        check_proposal_id(proposal_id)
        client = await self.client(service, provisional=True)
        got = await client.get(f"/gov/members/proposals/{proposal_id}")
        if not got.ok or not isinstance(got.body, dict):
            return Relay.of(got)
        actions = await client.get(f"/gov/members/proposals/{proposal_id}/actions")
        body: dict[str, Any] = dict(got.body)
        if actions.ok:
            try:
                body["actions"] = json.loads(actions.raw).get("actions")
            except (ValueError, AttributeError):
                body["actions"] = actions.raw.decode("utf-8", "replace")
        ballots: dict[str, str] = {}
        members = await client.get("/gov/service/members")
        if members.ok and isinstance(members.body, dict):
            for member in members.body.get("value", []):
                mid = member.get("memberId") if isinstance(member, dict) else None
                if not isinstance(mid, str):
                    continue
                ballot = await client.get(f"/gov/members/proposals/{proposal_id}/ballots/{mid}")
                if ballot.ok:
                    ballots[mid] = ballot.raw.decode("utf-8", "replace")
        body["ballots"] = ballots
        return Relay(status=200, body=body, transaction_id=got.transaction_id, from_ccf=True)

    async def aclose(self) -> None:
        for client in (*self._clients.values(), *self._provisional_clients.values()):
            await client.aclose()
        self._clients.clear()
        self._provisional_clients.clear()
        if self._closing:
            await asyncio.gather(*self._closing)
