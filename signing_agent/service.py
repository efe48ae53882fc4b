"""The signing use case: validate -> prepare -> sign the digest in the key store -> verify -> finish.

Every signature is verified against the identity's certificate before the message leaves the agent, so a key store
that signs with the wrong key, or returns a malformed signature, can never put a bad message on the wire.
This module knows nothing of HTTP; the API and the CLI reach the key stores only through it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from signing_agent.algorithms import verify_digest
from signing_agent.audit import AuditEvent, AuditSink
from signing_agent.backends.base import Priority
from signing_agent.config import DEFAULT_MAX_CREATED_AT_SKEW, msg_type_name
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
    AuditError,
    InvalidRequestError,
    PolicyDeniedError,
    UnknownIdentityError,
)
from signing_agent.identity import Identity
from signing_agent.metrics import METRICS
from signing_agent.policy import Action, Caller, Decision, Policy, default_policy

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

    request_id: str | None = None
    caller: Caller | None = None
    service: str | None = None

    @property
    def cose_sha256(self) -> str:
        return hashlib.sha256(self.cose).hexdigest()

    def audit_fields(self) -> dict[str, Any]:
        return {
            **_who(self.request_id, self.caller),
            "identity": self.identity,
            "member_id": self.member_id,
            "msg_type": str(self.msg_type),
            "proposal_id": self.proposal_id,
            "service": self.service,
            "payload_sha256": self.summary.sha256,
            "cose_sha256": self.cose_sha256,
        }


@dataclass(frozen=True, slots=True)
class VotedProposal:
    """What the governance layer read from the service (over pinned TLS) of the proposal a ballot votes on.

    ``actions`` are its action names, parsed as a proposal payload is; None when they could not be read, and then
    ``unknown`` says why. The policy judges the ballot by these actions.
    """

    actions: tuple[str, ...] | None
    unknown: str | None = None


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


def _who(request_id: str | None, caller: Caller | None) -> dict[str, Any]:
    return {"request_id": request_id, "peer": caller.as_dict() if caller is not None else None}


def _listed(actions: tuple[str, ...] | None) -> list[str] | None:
    """Action names as explain and the audit log show them: a list, or None when there are none or they are unknown."""
    return list(actions) if actions else None


class SigningService:
    """Signs governance messages for the configured identities, as the policy allows, with every step audited.

    ``audit=None`` keeps no audit trail: for unit tests and embedding only; the daemon always passes a file sink.
    ``caller=None`` in ``sign`` means the agent itself (its own uid and pid), e.g. an internal watcher.
    ``max_created_at_skew``: how far (seconds, either way) a caller's ``created_at`` may be from ``clock``.
    ``denials`` (set by the API for the generation it serves) bounds what a peer's denials cost: past its budget a
    denial is refused with 429 and counted, not audited one by one (``signing_agent.denials``).
    """

    def __init__(
        self,
        identities: Mapping[str, Identity],
        *,
        clock: Callable[[], float] = time.time,
        policy: Policy | None = None,
        audit: AuditSink | None = None,
        max_created_at_skew: int = DEFAULT_MAX_CREATED_AT_SKEW,
        denials: DenialThrottle | None = None,
    ) -> None:
        self._identities = dict(identities)
        self._clock = clock
        self.max_created_at_skew = max_created_at_skew
        self.policy = policy if policy is not None else default_policy(os.getuid())
        self.audit = audit
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

    def _self_caller(self) -> Caller:
        return Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), exe=None)

    async def record(self, event: AuditEvent, fields: Mapping[str, Any], *, sync: bool = True) -> None:
        """Write one audit record; raises ``AuditError`` (fail closed). A no-op without a sink."""
        if self.audit is None:
            return
        try:
            await self.audit.record(event, fields, sync=sync)
        except AuditError:
            METRICS.audit_write_failures.inc()
            raise
        except Exception as exc:
            METRICS.audit_write_failures.inc()
            raise AuditError(f"the audit log cannot be written: {exc}") from exc

    def charge_denial(self, caller: Caller | None) -> None:
        """Charge a peer's denial to its uid's budget before it is audited; raises ``TooManyRequestsError`` (then
        audit nothing) past the budget. The agent's own work (``caller=None``) is not charged."""
        if self.denials is not None and caller is not None:
            self.denials.charge(caller.uid, "denied")

    async def explain(
        self,
        identity: str,
        msg_type: MsgType,
        payload: bytes,
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
        service: str | None = None,
        caller: Caller | None = None,
        voted: VotedProposal | None = None,
    ) -> Explanation:
        """What ``sign`` would sign and whether the policy allows it. Touches no key and charges no rate limit."""
        ident, request, summary = self._request(identity, msg_type, payload, created_at, proposal_id)
        action = self._action(ident.name, msg_type, summary, proposal_id, service, voted)
        decision = self.policy.decide(caller or self._self_caller(), action, consume=False)
        headers = {"alg": ident.alg.name, "kid": ident.member_id}
        headers.update({str(k): v for k, v in protected_headers(ident.member_id, request).items() if k != 4})
        return Explanation(
            identity=ident.name,
            member_id=ident.member_id,
            algorithm=ident.alg.name,
            headers=headers,
            summary=summary,
            service=service,
            decision=decision,
            proposal_actions=action.proposal_actions,
        )

    def _request(
        self, identity: str, msg_type: MsgType, payload: bytes, created_at: int | None, proposal_id: str | None
    ) -> tuple[Identity, GovernanceRequest, PayloadSummary]:
        """The identity, the validated request (created_at defaults to now) and what its payload says."""
        ident = self.identity(identity)
        request = GovernanceRequest(
            msg_type=msg_type,
            created_at=self.now() if created_at is None else created_at,
            payload=payload,
            proposal_id=proposal_id,
        )
        if created_at is not None:
            self._check_created_at(request.created_at)
        return ident, request, summarise_payload(msg_type, payload)

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
    def _action(
        identity: str,
        msg_type: MsgType,
        summary: PayloadSummary,
        proposal_id: str | None,
        service: str | None,
        voted: VotedProposal | None,
    ) -> Action:
        """What the policy judges. A ballot carries the actions of the proposal it votes on, as ``voted`` says
        (None: the agent did not read the proposal, as for ``/v1/sign``); any other message its payload's own."""
        if voted is not None and msg_type is not MsgType.BALLOT:
            raise ValueError(f"only a ballot votes on a proposal, not a {msg_type}")
        if msg_type is MsgType.BALLOT:
            actions, unknown = (voted.actions, voted.unknown) if voted is not None else (None, None)
        else:
            actions, unknown = summary.actions, None
        return Action(
            identity=identity,
            msg_type=msg_type_name(msg_type),
            service=service,
            proposal_actions=actions,
            actions_unknown=unknown,
            ballot_sha256=summary.ballot_sha256,
            proposal_id=proposal_id,
        )

    async def sign(
        self,
        identity: str,
        msg_type: MsgType,
        payload: bytes,
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
        service: str | None = None,
        caller: Caller | None = None,
        request_id: str | None = None,
        voted: VotedProposal | None = None,
    ) -> SignedMessage:
        """Sign one governance message, if the policy allows ``caller`` to; ``service`` is None for a raw signature.

        ``created_at`` defaults to now (integer seconds, UTC). ``voted``, for a ballot, is what the governance layer
        read of the proposal it votes on; the policy judges the ballot by those actions, and without them a rule
        that constrains actions refuses it. The ``received`` record, then ``denied``, ``failed`` or ``signed``, is
        durable in the audit log before this returns; if it cannot be written, ``AuditError`` is raised and the
        signature is dropped.
        """
        ident, request, summary = self._request(identity, msg_type, payload, created_at, proposal_id)
        action = self._action(ident.name, msg_type, summary, proposal_id, service, voted)
        who = caller or self._self_caller()
        base = {
            **_who(request_id, who),
            "identity": ident.name,
            "member_id": ident.member_id,
            "msg_type": str(msg_type),
            "proposal_id": proposal_id,
            "service": service,
            "payload_sha256": summary.sha256,
            "proposal_actions": _listed(action.proposal_actions),
            "ballot_sha256": summary.ballot_sha256,
        }
        decision = self.policy.decide(who, action)
        if not decision.allowed:
            self.charge_denial(caller)  # past the peer's budget: 429, and no record at all
        # Written, not yet synced: the fsync of the decision record below makes it durable too, before a
        # signature can leave (one fsync per request instead of two).
        await self.record("received", base, sync=False)
        if not decision.allowed:
            await self.record("denied", {**base, "rule": decision.rule, "reason": decision.reason})
            raise PolicyDeniedError(f"policy: {decision.describe()}")
        tbs = prepare_governance(ident.alg, ident.member_id, request)
        priority = Priority.HIGH if msg_type in _HIGH_PRIORITY else Priority.NORMAL
        try:
            signature = await ident.signing_key.sign_digest(ident.alg, tbs.digest, priority=priority)
            verify_digest(ident.public_key, ident.alg, tbs.digest, signature)
        except AgentError as exc:
            await self.record("failed", {**base, "rule": decision.rule, "error": exc.code})
            raise
        message = SignedMessage(
            identity=ident.name,
            member_id=ident.member_id,
            msg_type=msg_type,
            created_at=request.created_at,
            proposal_id=proposal_id,
            cose=finish(tbs, signature),
            summary=summary,
            request_id=request_id,
            caller=who,
            service=service,
        )
        await self.record("signed", {**base, "rule": decision.rule, "cose_sha256": message.cose_sha256})
        _logger.info(
            "signed %s for %s (member %s, payload sha256 %s)",
            msg_type,
            ident.name,
            ident.member_id[:12],
            summary.sha256[:16],
        )
        return message

    async def aclose(self) -> None:
        for ident in self._identities.values():
            await ident.signing_key.aclose()
            if ident.decryption_key is not None:
                await ident.decryption_key.aclose()
