"""The signing use case: validate -> prepare -> sign the digest in the key store -> verify -> finish.

Every signature is verified against the identity's certificate before the message leaves the agent, so a key store
that signs with the wrong key, or returns a malformed signature, can never put a bad message on the wire.
This module knows nothing of HTTP; the API and the CLI reach the key stores only through it.

Naming: ``Signer`` is the agent's signing use case. Wherever a ``service`` is named here
(``SignRequest.service``, ``SignedMessage.service``), it is a CCF service: the name of a configured
``[services.NAME]`` the message goes to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from signing_agent.algorithms import verify_digest
from signing_agent.audit import (
    CANCELLED,
    Auditor,
    Denied,
    Failed,
    Payload,
    QueuedRecord,
    Received,
    Signed,
    Subject,
)
from signing_agent.backends.base import Priority
from signing_agent.config import DEFAULT_MAX_CREATED_AT_SKEW, msg_type_name
from signing_agent.context import current_request
from signing_agent.cose.governance import (
    GovernanceRequest,
    MsgType,
    PayloadSummary,
    prepare_governance,
    protected_headers,
    summarise_payload,
)
from signing_agent.cose.sign1 import finish
from signing_agent.denials import DenialThrottle
from signing_agent.errors import (
    AgentError,
    InvalidRequestError,
    PolicyDeniedError,
    UnknownIdentityError,
)
from signing_agent.identity import Identity
from signing_agent.policy import Action, Decision, Policy
from signing_agent.proposals import ServiceFacts, check_proposal, needs
from signing_agent.waits import waiting_for
from signing_agent.workers.pool import CryptoPool

_logger = logging.getLogger(__name__)

_HIGH_PRIORITY = frozenset({MsgType.RECOVERY_SHARE, MsgType.ACK, MsgType.STATE_DIGEST})


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A signed governance message and the facts about it that audit and clients need (never a secret)."""

    identity: str
    member_id: str
    msg_type: MsgType
    created_at: int
    proposal_id: str | None
    cose: bytes
    summary: PayloadSummary
    service: str | None = None

    @property
    def cose_sha256(self) -> str:
        return hashlib.sha256(self.cose).hexdigest()

    @property
    def subject(self) -> Subject:
        return Subject(
            identity=self.identity,
            member_id=self.member_id,
            msg_type=str(self.msg_type),
            proposal_id=self.proposal_id,
            service=self.service,
        )

    @property
    def payload_digest(self) -> Payload:
        """The payload as the records of its delivery show it: its digest only."""
        return Payload(sha256=self.summary.sha256)


@dataclass(frozen=True, slots=True)
class VotedProposal:
    """What the governance layer read from the CCF service (over pinned TLS) of the proposal a ballot votes on.

    ``actions`` are its action names, parsed as a proposal payload is; None when they could not be read, and then
    ``unknown`` says why. The policy judges the ballot by these actions.
    """

    actions: tuple[str, ...] | None
    unknown: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignRequest:
    """One message to sign (``Signer.sign``) or to explain (``Signer.explain``); who asks is the
    request context (``signing_agent.context``).

    ``created_at`` defaults to now (integer seconds, UTC). ``service`` is the CCF service the message goes to (None:
    a raw signature returned to the caller). ``voted``, for a ballot, is what the governance layer read of the
    proposal it votes on: the policy judges the ballot by those actions, and without them a rule that constrains
    actions refuses it.
    """

    identity: str
    msg_type: MsgType
    payload: bytes
    created_at: int | None = None
    proposal_id: str | None = None
    service: str | None = None
    voted: VotedProposal | None = None
    service_facts: ServiceFacts | None = None
    """For a proposal to a service: what the governance layer read of the service's state for the proposal's checks
    (``Signer.check_proposal``); one whose checks need it cannot be signed without."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """What would be signed and what the policy says, computed without touching the key."""

    identity: str
    member_id: str
    algorithm: str
    headers: Mapping[str, Any]
    summary: PayloadSummary
    service: str | None
    decision: Decision
    proposal_actions: tuple[str, ...] | None = None
    """A proposal's own actions, or, for a ballot, those of the proposal it votes on (None: unknown)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "member_id": self.member_id,
            "algorithm": self.algorithm,
            "protected_headers": dict(self.headers),
            "payload_sha256": self.summary.sha256,
            "proposal_actions": _listed(self.proposal_actions),
            "ballot_sha256": self.summary.ballot_sha256,
            "service": self.service,
            "decision": {
                "allowed": self.decision.allowed,
                "rule": self.decision.rule,
                "reason": self.decision.reason,
            },
        }


def _listed(actions: tuple[str, ...] | None) -> list[str] | None:
    """Action names as explain and the audit log show them: a list, or None when there are none or they are unknown."""
    return list(actions) if actions else None


class Signer:
    """Signs governance messages for the configured identities, as the policy allows, with every step audited.

    Who asks is the current request context (``signing_agent.context``): a socket peer, or the agent itself (a
    recovery watcher). ``max_created_at_skew``: how far (seconds, either way) a caller's ``created_at`` may be from
    ``clock``. ``denials`` (one for the process, so a reload never refills it) bounds what a peer's denials cost:
    past its budget a denial is refused with 429 and counted, not audited one by one (``signing_agent.denials``).
    The identities belong to whoever opened them (``daemon.open_generation``), which also closes them.
    """

    def __init__(
        self,
        identities: Mapping[str, Identity],
        *,
        policy: Policy,
        auditor: Auditor,
        denials: DenialThrottle,
        clock: Callable[[], float] = time.time,
        max_created_at_skew: int = DEFAULT_MAX_CREATED_AT_SKEW,
        crypto: CryptoPool | None = None,
    ) -> None:
        """``crypto``: the crypto workers that verify each signature off the event loop (None: verify inline)."""
        self._identities = dict(identities)
        self._crypto = crypto
        self._clock = clock
        self.max_created_at_skew = max_created_at_skew
        self.policy = policy
        self.auditor = auditor
        self.denials = denials

    @property
    def identities(self) -> Mapping[str, Identity]:
        return self._identities

    def identity(self, name: str) -> Identity:
        try:
            return self._identities[name]
        except KeyError:
            known = ", ".join(sorted(self._identities)) or "none"
            raise UnknownIdentityError(f"unknown identity {name!r} (configured: {known})") from None

    def now(self) -> int:
        return int(self._clock())

    def charge_denial(self) -> None:
        """Charge the current peer's denial to its uid's budget before it is audited; raises
        ``TooManyRequestsError`` (then audit nothing) past the budget. The agent's own work is not charged."""
        ctx = current_request()
        if not ctx.by_agent:
            self.denials.charge(ctx.caller.uid, "denied")

    async def precheck(self, action: Action) -> None:
        """Ask the policy about ``action`` before work that must not happen for a refused caller (a decryption, an
        adoption of trust), without charging the rate limit (the signature that follows is charged). A refusal is
        charged to the peer's denial budget, audited ``denied`` and raised as ``PolicyDeniedError``."""
        ctx = current_request()
        decision = self.policy.decide(ctx.caller, action, consume=False)
        if decision.allowed:
            return
        self.charge_denial()  # past the peer's budget: 429, and no record
        member_id = self._identities[action.identity].member_id if action.identity in self._identities else None
        subject = Subject(
            identity=action.identity,
            member_id=member_id,
            msg_type=action.msg_type,
            proposal_id=action.proposal_id,
            service=action.service,
        )
        await self.auditor.record(Denied(request=ctx, subject=subject, rule=decision.rule, reason=decision.reason))
        raise PolicyDeniedError(f"policy: {decision.describe()}")

    async def explain(self, req: SignRequest) -> Explanation:
        """What ``sign`` would sign and whether the policy allows the current caller. Touches no key, charges no
        rate limit, and writes no audit record: nothing is decided, so nothing costs the disk."""
        ident, request, summary = self._request(req)
        action = self._action(ident.name, req, summary)
        decision = self.policy.decide(current_request().caller, action, consume=False)
        headers = {"alg": ident.alg.name, "kid": ident.member_id}
        headers.update({str(k): v for k, v in protected_headers(ident.member_id, request).items() if k != 4})
        return Explanation(
            identity=ident.name,
            member_id=ident.member_id,
            algorithm=ident.alg.name,
            headers=headers,
            summary=summary,
            service=req.service,
            decision=decision,
            proposal_actions=action.proposal_actions,
        )

    def _request(self, req: SignRequest) -> tuple[Identity, GovernanceRequest, PayloadSummary]:
        """The identity, the validated request (created_at defaults to now) and what its payload says."""
        ident = self.identity(req.identity)
        request = GovernanceRequest(
            msg_type=req.msg_type,
            created_at=self.now() if req.created_at is None else req.created_at,
            payload=req.payload,
            proposal_id=req.proposal_id,
        )
        if req.created_at is not None:
            self._check_created_at(request.created_at)
        return ident, request, summarise_payload(req.msg_type, req.payload)

    @staticmethod
    def check_proposal(req: SignRequest) -> None:
        """A proposal for a service is checked as CCF's constitution would check it (``signing_agent.proposals``),
        against the service's state where it matters, before anything is signed (a dry run calls this too)."""
        if req.msg_type is not MsgType.PROPOSAL or req.service is None:
            return
        if req.service_facts is None and needs(req.payload):
            raise ValueError("a proposal whose checks read the service's state needs service_facts")
        check_proposal(req.payload, req.service_facts)

    def _check_created_at(self, created_at: int) -> None:
        """Refuse a caller's ``created_at`` far from the agent's clock, for every message type.

        CCF refuses a proposal older than the median of its recent proposals, and never compares created_at with its
        own clock: one proposal signed for the far future locks the whole consortium out of proposing, and a message
        signed for the past or the future is one a caller can hold back and submit later.
        """
        now = self.now()
        if abs(created_at - now) > self.max_created_at_skew:
            raise InvalidRequestError(
                f"created_at {created_at} is {created_at - now:+d} s from the agent's clock ({now}); "
                f"agent.max_created_at_skew allows {self.max_created_at_skew} s either way",
                hint="leave created_at out to sign with the agent's clock",
            )

    @staticmethod
    def _action(identity: str, req: SignRequest, summary: PayloadSummary) -> Action:
        """What the policy judges. A ballot carries the actions of the proposal it votes on, as ``req.voted`` says
        (None: the agent did not read the proposal, as for ``/v1/sign``); any other message its payload's own."""
        voted, msg_type = req.voted, req.msg_type
        if voted is not None and msg_type is not MsgType.BALLOT:
            raise ValueError(f"only a ballot votes on a proposal, not a {msg_type}")
        if msg_type is MsgType.BALLOT:
            actions, unknown = (voted.actions, voted.unknown) if voted is not None else (None, None)
        else:
            actions, unknown = summary.actions, None
        return Action(
            identity=identity,
            msg_type=msg_type_name(msg_type),
            service=req.service,
            proposal_actions=actions,
            actions_unknown=unknown,
            ballot_sha256=summary.ballot_sha256,
            proposal_id=req.proposal_id,
        )

    async def _verify(self, ident: Identity, digest: bytes, signature: bytes) -> None:
        """Verify ``signature`` against the identity's certificate: in a crypto worker when there are any."""
        if self._crypto is None:
            verify_digest(ident.public_key, ident.alg, digest, signature)
            return
        with waiting_for("the crypto workers"):
            await self._crypto.verify(ident.public_key, ident.alg, digest, signature)

    async def sign(self, req: SignRequest) -> SignedMessage:
        """Sign one governance message, if the policy allows the current caller to.

        The ``received`` record, then ``denied``, ``failed`` or ``signed``, is durable in the audit log before this
        returns; if it cannot be written, ``AuditError`` is raised and the signature is dropped.
        """
        ident, request, summary = self._request(req)
        self.check_proposal(req)
        action = self._action(ident.name, req, summary)
        ctx = current_request()
        subject = Subject(
            identity=ident.name,
            member_id=ident.member_id,
            msg_type=str(req.msg_type),
            proposal_id=req.proposal_id,
            service=req.service,
        )
        payload = Payload(sha256=summary.sha256, actions=action.proposal_actions, ballot_sha256=summary.ballot_sha256)
        decision = self.policy.decide(ctx.caller, action)
        if not decision.allowed:
            self.charge_denial()  # past the peer's budget: 429, and no record at all
        # Queued, not awaited, and not synced: it is written before the decision record below, whose fsync makes it
        # durable too before a signature can leave (one fsync per request, and no wait for the log before signing).
        # While the log is failing, the request waits for it instead, so a broken log stops it before any key store.
        received = self.auditor.enqueue(Received(request=ctx, subject=subject, payload=payload))
        try:
            if not decision.allowed or self.auditor.failing:
                await received.written()
            return await self._decided(req, ident, request, summary, subject, payload, decision, received)
        except BaseException:
            await received.settle()
            raise

    async def _decided(
        self,
        req: SignRequest,
        ident: Identity,
        request: GovernanceRequest,
        summary: PayloadSummary,
        subject: Subject,
        payload: Payload,
        decision: Decision,
        received: QueuedRecord,
    ) -> SignedMessage:
        """``sign`` once the ``received`` record is queued: the ``denied``, ``failed`` or ``signed`` record, durable,
        each recorded only once ``received`` is written (never a decision without its request in the log)."""
        ctx = current_request()
        if not decision.allowed:
            await self.auditor.record(
                Denied(request=ctx, subject=subject, payload=payload, rule=decision.rule, reason=decision.reason)
            )
            raise PolicyDeniedError(f"policy: {decision.describe()}")
        tbs = prepare_governance(ident.alg, ident.member_id, request)
        priority = Priority.HIGH if req.msg_type in _HIGH_PRIORITY else Priority.NORMAL
        try:
            signature = await ident.signing_key.sign_digest(ident.alg, tbs.digest, priority=priority)
            if not ident.key_verifies:
                await self._verify(ident, tbs.digest, signature)
        except AgentError as exc:
            await received.written()
            await self.auditor.record(
                Failed(request=ctx, subject=subject, payload=payload, rule=decision.rule, error=exc.code)
            )
            raise
        except asyncio.CancelledError:  # the request's deadline, or a stop: no signature will leave
            await self.auditor.record_cancelled(
                Failed(request=ctx, subject=subject, payload=payload, rule=decision.rule, error=CANCELLED),
                after=received,
            )
            raise
        message = SignedMessage(
            identity=ident.name,
            member_id=ident.member_id,
            msg_type=req.msg_type,
            created_at=request.created_at,
            proposal_id=req.proposal_id,
            cose=finish(tbs, signature),
            summary=summary,
            service=req.service,
        )
        await received.written()  # queued before the signing began: written by now, or nearly
        await self.auditor.record(
            Signed(request=ctx, subject=subject, payload=payload, rule=decision.rule, cose_sha256=message.cose_sha256)
        )
        _logger.info(
            "signed %s for %s (member %s, payload sha256 %s)",
            req.msg_type,
            ident.name,
            ident.member_id[:12],
            summary.sha256[:16],
        )
        return message
