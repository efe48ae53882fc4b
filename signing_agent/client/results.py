"""The typed answers of the agent's routes, parsed once from the JSON the agent sent.

Each keeps that JSON as ``raw`` (what ``--json`` prints), so a field the agent or CCF adds later is not lost, and
``result["field"]`` reads it (as code written when the client returned plain dicts does). Times are seconds since
the epoch, as the agent sends them; ``iso_utc`` is how they are shown to a person.

They are ``NamedTuple``s, not dataclasses: creating a dataclass costs the fast CLI half a millisecond each, and
importing ``dataclasses`` a dozen more.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from signing_agent.record import Record

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any


def iso_utc(seconds: float | None) -> str | None:
    """``2026-01-31T12:00:00Z``: a time shown to a person (None stays None)."""
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class AsSent:
    """``result["field"]``: the JSON of the result as the agent sent it (``raw``)."""

    def __getitem__(self, key: str) -> Any:
        raw: Mapping[str, Any] = getattr(self, "raw")  # noqa: B009 -- a field of the Record it is mixed into
        return raw[key]


class Identity(Record, AsSent):
    """``GET /v1/identities``: one identity the agent signs as."""

    name: str
    member_id: str
    algorithm: str
    backend: str
    key: str
    certificate: str
    encryption_key: str | None
    warnings: tuple[str, ...]
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any) -> Identity:
        o = _obj(obj)
        return cls(
            raw=o,
            name=str(o.get("name")),
            member_id=str(o.get("member_id")),
            algorithm=str(o.get("algorithm")),
            backend=str(o.get("backend")),
            key=str(o.get("key")),
            certificate=str(o.get("certificate", "")),
            encryption_key=_str(o.get("encryption_key")),
            warnings=tuple(str(w) for w in o.get("warnings") or ()),
        )


class Service(Record):
    """``GET /v1/services``: a configured CCF service."""

    name: str
    url: str
    api_version: str

    @classmethod
    def from_json(cls, obj: Any) -> Service:
        o = _obj(obj)
        return cls(name=str(o.get("name")), url=str(o.get("url")), api_version=str(o.get("api_version")))


class ReloadOutcome(Record):
    """A configuration reload (``POST /v1/reload``, SIGHUP): whether the new configuration now serves, the generation
    serving after it, and why it was refused."""

    reloaded: bool
    generation: int
    at: float | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> ReloadOutcome:
        o = _obj(obj)
        generation = o.get("generation")
        return cls(
            reloaded=o.get("reloaded") is True,
            generation=generation if isinstance(generation, int) else 0,
            at=_num(o.get("at")),
            error=_str(o.get("error")),
        )


class HealthCheck(Record):
    """One line of the health report: the audit log, an identity, a service or a PKCS#11 token."""

    name: str
    status: str
    error: str | None = None
    checked_at: float | None = None
    details: Mapping[str, Any] = {}
    """The rest of the check as the agent sent it (``members``, ``node_state``, ``url``, ``unavailable_since``...)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, obj: Any, name: str | None = None) -> HealthCheck:
        o = _obj(obj)
        rest = {k: v for k, v in o.items() if k not in ("name", "status", "error", "checked_at")}
        return cls(
            name=name if name is not None else str(o.get("name") or o.get("token_label")),
            status=str(o.get("status")),
            error=_str(o.get("error")),
            checked_at=_num(o.get("checked_at")),
            details=rest,
        )


class Health(Record, AsSent):
    """``GET /v1/health``: ``status`` is ``ok`` when every check passed, else ``degraded``."""

    status: str
    version: str
    generation: int
    audit: HealthCheck
    identities: tuple[HealthCheck, ...]
    services: tuple[HealthCheck, ...]
    pkcs11_tokens: tuple[HealthCheck, ...]
    last_reload: ReloadOutcome | None
    raw: Mapping[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, obj: Any) -> Health:
        o = _obj(obj)
        generation = o.get("generation")
        last = o.get("last_reload")
        return cls(
            status=str(o.get("status")),
            version=str(o.get("version")),
            generation=generation if isinstance(generation, int) else 0,
            audit=HealthCheck.from_json(o.get("audit"), "audit log"),
            identities=tuple(HealthCheck.from_json(c) for c in o.get("identities") or ()),
            services=tuple(HealthCheck.from_json(c) for c in o.get("services") or ()),
            pkcs11_tokens=tuple(HealthCheck.from_json(c) for c in o.get("pkcs11_tokens") or ()),
            last_reload=ReloadOutcome.from_json(last) if isinstance(last, Mapping) else None,
            raw=o,
        )


class Signed(Record):
    """``POST /v1/sign``: the COSE_Sign1 bytes (``bytes(signed)``), and what the agent says of them."""

    cose: bytes
    member_id: str | None
    created_at: int | None
    cose_sha256: str | None

    def __bytes__(self) -> bytes:
        return self.cose

    @classmethod
    def from_answer(cls, body: bytes, headers: Mapping[str, str]) -> Signed:
        created = headers.get("x-created-at", "")
        return cls(
            cose=body,
            member_id=headers.get("x-member-id"),
            created_at=int(created) if created.isdigit() else None,
            cose_sha256=headers.get("x-cose-sha256"),
        )


class Decision(Record):
    allowed: bool
    rule: str | None
    reason: str | None


class Explanation(Record, AsSent):
    """``POST /v1/explain``: what would be signed, and the policy's decision; nothing was signed."""

    decision: Decision
    identity: str
    member_id: str | None
    proposal_actions: tuple[str, ...] | None
    raw: Mapping[str, Any]

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @classmethod
    def from_json(cls, obj: Any) -> Explanation:
        o = _obj(obj)
        d = _obj(o.get("decision"))
        actions = o.get("proposal_actions")
        return cls(
            decision=Decision(allowed=d.get("allowed") is True, rule=_str(d.get("rule")), reason=_str(d.get("reason"))),
            identity=str(o.get("identity")),
            member_id=_str(o.get("member_id")),
            proposal_actions=tuple(str(a) for a in actions) if isinstance(actions, list) else None,
            raw=o,
        )


def action_names(actions: Any) -> tuple[str, ...]:
    """The names of a proposal's actions (as CCF lists them: ``[{"name", "args"}]``)."""
    if not isinstance(actions, list):
        return ()
    return tuple(str(a.get("name")) for a in actions if isinstance(a, Mapping))


class Proposal(Record, AsSent):
    """A proposal as CCF describes it (the answer to a proposal, a ballot or a withdrawal, one of the list, or
    ``GET .../proposals/{id}`` with its ``actions`` and the ``ballots`` cast so far)."""

    proposal_id: str
    state: str
    proposer_id: str | None
    ballot_count: int
    actions: tuple[Mapping[str, Any], ...] | None
    """The actions as proposed, when the agent read them (``proposal``, ``proposals(actions=True)``)."""
    ballots: Mapping[str, str] | None
    failure: str | None
    transaction_id: str | None
    raw: Mapping[str, Any]

    @property
    def open(self) -> bool:
        return self.state == "Open"

    @property
    def action_names(self) -> tuple[str, ...]:
        return action_names(list(self.actions or ()))

    @classmethod
    def from_json(cls, obj: Any, transaction_id: str | None = None) -> Proposal:
        o = _obj(obj)
        actions = o.get("actions")
        ballots = o.get("ballots")
        count = o.get("ballotCount")
        return cls(
            proposal_id=str(o.get("proposalId")),
            state=str(o.get("proposalState")),
            proposer_id=_str(o.get("proposerId")),
            ballot_count=count if isinstance(count, int) else 0,
            actions=tuple(_obj(a) for a in actions) if isinstance(actions, list) else None,
            ballots={str(k): str(v) for k, v in ballots.items()} if isinstance(ballots, Mapping) else None,
            failure=_str(_obj(o.get("failure")).get("reason")) if o.get("failure") else None,
            transaction_id=transaction_id,
            raw=o,
        )


class Activation(Record, AsSent):
    """``POST .../members/{identity}/activate``: the member's status after the state digest and the ack."""

    member_id: str
    status: str
    state_digest: str | None
    transaction_id: str | None
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any, transaction_id: str | None = None) -> Activation:
        o = _obj(obj)
        return cls(
            member_id=str(o.get("memberId")),
            status=str(o.get("status")),
            state_digest=_str(o.get("stateDigest")),
            transaction_id=transaction_id,
            raw=o,
        )


class MemberStatus(Record):
    """One of the agent's identities as a member of a service: ``Accepted``, ``Active``, ``NotAMember``, or None
    when the service did not say."""

    name: str
    member_id: str
    status: str | None

    @property
    def needs_activation(self) -> bool:
        return self.status == "Accepted"


class ServiceStatus(Record, AsSent):
    """``GET /v1/services/{svc}/status``: CCF's service information, and each identity's member status."""

    service: str
    url: str
    status: str
    recovery_count: int | None
    identities: tuple[MemberStatus, ...]
    transaction_id: str | None
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any, transaction_id: str | None = None) -> ServiceStatus:
        o = _obj(obj)
        count = o.get("recoveryCount")
        return cls(
            service=str(o.get("service")),
            url=str(o.get("url")),
            status=str(o.get("status")),
            recovery_count=count if isinstance(count, int) else None,
            identities=tuple(
                MemberStatus(str(_obj(i).get("name")), str(_obj(i).get("memberId")), _str(_obj(i).get("status")))
                for i in o.get("identities") or ()
            ),
            transaction_id=transaction_id,
            raw=o,
        )


class ShareSubmission(Record, AsSent):
    """``POST .../recovery/{identity}/share``: CCF's answer to the share."""

    message: str
    submitted_count: int | None
    recovery_threshold: int | None
    transaction_id: str | None
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any, transaction_id: str | None = None) -> ShareSubmission:
        o = _obj(obj)
        submitted, threshold = o.get("submittedCount"), o.get("recoveryThreshold")
        return cls(
            message=str(o.get("message", "")),
            submitted_count=submitted if isinstance(submitted, int) else None,
            recovery_threshold=threshold if isinstance(threshold, int) else None,
            transaction_id=transaction_id,
            raw=o,
        )


class IdentityApproval(Record, AsSent):
    """``POST .../recovery/approve-identity``: the approved service certificate and the accepting ballot's answer."""

    certificate_sha256: str
    ballot: Proposal
    transaction_id: str | None
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any, transaction_id: str | None = None) -> IdentityApproval:
        o = _obj(obj)
        return cls(
            certificate_sha256=str(o.get("certificate_sha256")),
            ballot=Proposal.from_json(o.get("ballot"), transaction_id),
            transaction_id=transaction_id,
            raw=o,
        )


class RecoveryWatcher(Record):
    """One unattended recovery watcher: an identity's shares for a service."""

    service: str
    identity: str
    state: str
    service_status: str | None
    last_error: str | None
    last_checked_at: float | None
    last_submission: Mapping[str, Any] | None

    @classmethod
    def from_json(cls, obj: Any) -> RecoveryWatcher:
        o = _obj(obj)
        last = o.get("last_submission")
        return cls(
            service=str(o.get("service")),
            identity=str(o.get("identity")),
            state=str(o.get("state")),
            service_status=_str(o.get("service_status")),
            last_error=_str(o.get("last_error")),
            last_checked_at=_num(o.get("last_checked_at")),
            last_submission=last if isinstance(last, Mapping) else None,
        )


class RecoveryStatus(Record, AsSent):
    """``GET /v1/recovery``."""

    enabled: bool
    watchers: tuple[RecoveryWatcher, ...]
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any) -> RecoveryStatus:
        o = _obj(obj)
        watchers = tuple(RecoveryWatcher.from_json(w) for w in o.get("watchers") or ())
        return cls(enabled=o.get("enabled") is True, watchers=watchers, raw=o)
