"""Who may ask the agent to sign what: a pure decision over the caller and what would be signed.

The caller is the Unix-socket peer as the kernel reports it (``SO_PEERCRED`` uid, gid, pid) plus the executable the
API layer read from ``/proc/<pid>/exe``. The action is what would be signed, read from the payload itself: the
proposal's action names and the ballot script's SHA-256 come from the bytes that get signed, never from a label the
caller chose, so a caller allowed only ``transition_node_to_trusted`` cannot get ``set_constitution`` signed through
``/v1/sign`` either. A ballot is judged by the proposal it votes on: its action names are the ones the governance
layer read from the CCF service (over pinned TLS) before asking; a ballot whose proposal the agent could not read, such
as one through ``/v1/sign``, is refused by any rule that constrains actions.

Evaluation (documented in config.example.toml and the README's Security model):

1. Rules are tried in order; the **first rule whose caller match fits decides** (uid in ``uids`` or primary gid in
   ``gids``, and, when ``executables`` is given, the peer's executable is one of them). Later rules are not tried,
   so a restrictive rule for a uid cannot be widened by a later, broader one.
2. Within that rule, every constraint must hold: identity, message type, CCF service (or ``raw_sign`` for
   ``/v1/sign``), proposal actions (``actions_deny`` wins over ``actions_allow``; for a ballot, the actions of the
   proposal it votes on), ballot script hash; then the rate limit (a token bucket per rule and uid) is charged.
3. The built-in ``default`` rule comes last (unless ``policy.default_rule = false``): root, the daemon's own uid and
   ``agent.allowed_uids`` / ``agent.allowed_gids`` may do everything. With no ``[policy]`` this is the whole policy.
4. A caller no rule matches may not use the agent at all (not even reads).

Pure: no I/O, no clock except the injected one, no aiohttp/asyncio. Must not import ``signing_agent.cose``
(a sibling layer): message types are the config's ``MsgTypeName`` literals here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from signing_agent.config import MsgTypeName, PolicyConfig, PolicyRuleConfig
from signing_agent.context import Caller as Caller  # the policy's subject; defined low, beside the request context
from signing_agent.names import ACCEPT_BALLOT as ACCEPT_BALLOT
from signing_agent.names import REJECT_BALLOT as REJECT_BALLOT

# The canonical ballots ``signing-agent vote --accept / --reject`` send (CCF's documented always-accept/reject).
BALLOT_ALIASES = {
    "accept": hashlib.sha256(ACCEPT_BALLOT.encode("utf-8")).hexdigest(),
    "reject": hashlib.sha256(REJECT_BALLOT.encode("utf-8")).hexdigest(),
}

DEFAULT_RULE = "default"

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Action:
    """What would be signed, as read from the message itself."""

    identity: str
    msg_type: MsgTypeName
    service: str | None = None
    """The CCF service it is forwarded to; None for ``POST /v1/sign`` (the signature goes back to the caller)."""
    proposal_actions: tuple[str, ...] | None = None
    """The action names of the proposal the message is about: a proposal's own (from the payload that gets signed),
    or, for a ballot, those of the proposal it votes on, as the governance layer read them from the CCF service. None
    when the agent does not know them (a ballot through ``/v1/sign``, or actions that could not be read): a rule
    that constrains actions then refuses (fail closed)."""
    actions_unknown: str | None = None
    """Why ``proposal_actions`` is None, for the refusal (e.g. what the CCF service answered when asked for them)."""
    ballot_sha256: str | None = None
    proposal_id: str | None = None

    @classmethod
    def recovery_share(cls, identity: str, service: str) -> Action:
        """Submitting ``identity``'s recovery share to the CCF service ``service``: the question asked before the
        share is fetched and decrypted. It needs no payload: a share's payload is the secret alone, and no rule
        looks into it (only identity, message type and CCF service), so this is the very action the signature of the
        real share is judged by, and the answer is the same, rate limit aside (charged when the share is signed)."""
        return cls(identity=identity, msg_type="recovery_share", service=service, proposal_actions=())

    @classmethod
    def approving_transition(cls, identity: str, service: str, proposal_id: str) -> Action:
        """Approving a recovered service identity (``recovery approve-identity``): ``identity``'s accepting ballot on
        the ``transition_service_to_open`` proposal ``proposal_id``. Asked before the agent adopts or checks anything
        for the caller; the real ballot is judged again, by the proposal's full list of actions, when it is signed."""
        return cls(
            identity=identity,
            msg_type="ballot",
            service=service,
            proposal_actions=("transition_service_to_open",),
            ballot_sha256=BALLOT_ALIASES["accept"],
            proposal_id=proposal_id,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None
    """The rule that decided, or None when no rule matched the caller."""
    reason: str

    def describe(self) -> str:
        verdict = "allowed" if self.allowed else "denied"
        return f"{verdict} by rule {self.rule!r}: {self.reason}" if self.rule else f"{verdict}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule. ``None`` in a constraint means "any"."""

    name: str
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    executables: frozenset[str] | None = None
    identities: frozenset[str] | None = None
    msg_types: frozenset[MsgTypeName] | None = None
    actions_allow: frozenset[str] | None = None
    actions_deny: frozenset[str] = frozenset()
    ballots: frozenset[str] | None = None
    services: frozenset[str] | None = None
    raw_sign: bool = True
    rate_limit: int | None = None
    rate_window: float = 60.0

    @classmethod
    def from_config(cls, cfg: PolicyRuleConfig) -> Rule:
        ballots = None if cfg.ballots is None else frozenset(BALLOT_ALIASES.get(b, b) for b in cfg.ballots)
        return cls(
            name=cfg.name,
            uids=frozenset(cfg.uids),
            gids=frozenset(cfg.gids),
            executables=_set_or_any(cfg.executables),
            identities=_set_or_any(cfg.identities),
            msg_types=_set_or_any(cfg.msg_types),
            actions_allow=_set_or_any(cfg.actions_allow),
            actions_deny=frozenset(cfg.actions_deny),
            ballots=ballots,
            services=_set_or_any(cfg.services),
            raw_sign=cfg.raw_sign,
            rate_limit=cfg.rate_limit,
            rate_window=cfg.rate_window,
        )

    def matches(self, caller: Caller) -> bool:
        if caller.uid not in self.uids and caller.gid not in self.gids:
            return False
        return self.executables is None or (caller.exe is not None and caller.exe in self.executables)

    def refusal(self, action: Action) -> str | None:
        """Why this rule refuses the action, or None when it allows it (rate limit aside)."""
        if self.identities is not None and action.identity not in self.identities:
            return f"identity {action.identity!r} is not allowed (allowed: {_names(self.identities)})"
        if self.msg_types is not None and action.msg_type not in self.msg_types:
            return f"message type {action.msg_type!r} is not allowed (allowed: {_names(self.msg_types)})"
        if action.service is None:
            if not self.raw_sign:
                return "raw signing (POST /v1/sign) is not allowed: submit through a service"
        elif self.services is not None and action.service not in self.services:
            return f"service {action.service!r} is not allowed (allowed: {_names(self.services)})"
        if action.msg_type == "proposal":
            why = self._actions_refusal(action, "proposal action(s)")
            if why is not None:
                return why
        if action.msg_type == "ballot":
            if self.ballots is not None and action.ballot_sha256 not in self.ballots:
                return f"ballot script sha256 {action.ballot_sha256} is not one of the allowed ballots"
            # A ballot is what makes a proposal's actions happen, so it passes the same action constraints as the
            # proposal would. A withdrawal needs no such check: CCF lets a member withdraw only its own proposal,
            # and withdrawing makes nothing happen (it can only stop that member's own proposal).
            return self._actions_refusal(action, f"the ballot's proposal {action.proposal_id} has action(s)")
        return None

    @property
    def constrains_actions(self) -> bool:
        return self.actions_allow is not None or bool(self.actions_deny)

    def _actions_refusal(self, action: Action, what: str) -> str | None:
        """Why ``actions_deny`` / ``actions_allow`` refuse the action names ``what`` introduces, if they do."""
        if not self.constrains_actions:
            return None
        if action.proposal_actions is None:
            return _unknown_actions(action)
        denied = [a for a in action.proposal_actions if a in self.actions_deny]
        if denied:
            return f"{what} denied: {', '.join(denied)}"
        if self.actions_allow is not None:
            outside = [a for a in action.proposal_actions if a not in self.actions_allow]
            if outside:
                return f"{what} not allowed: {', '.join(outside)}"
        return None


def _unknown_actions(action: Action) -> str:
    """The refusal for a message whose proposal actions the agent does not know, under a rule constraining them."""
    if action.msg_type == "ballot" and action.service is None:
        return (
            "this rule constrains proposal actions, and a ballot signed through POST /v1/sign cannot be checked "
            "against the actions of the proposal it votes on: vote through the agent instead "
            "(POST /v1/services/{svc}/proposals/{id}/ballots, or signing-agent vote), which reads them from the "
            "service first"
        )
    why = f" ({action.actions_unknown})" if action.actions_unknown else ""
    subject = f"proposal {action.proposal_id}" if action.proposal_id else "the proposal"
    return f"this rule constrains proposal actions, and the actions of {subject} are unknown{why}"


def _set_or_any(values: Iterable[H] | None) -> frozenset[H] | None:
    """A constraint's values as a set; None (a list left out) means "any"."""
    return None if values is None else frozenset(values)


def _names(values: frozenset[str]) -> str:
    return ", ".join(sorted(values)) or "none"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """Token buckets keyed by (rule, uid): ``limit`` signatures per ``window`` seconds, bursts up to ``limit``.

    The daemon keeps one for its lifetime and hands it to each reloaded policy, so a reload does not refill anyone's
    bucket; a rule whose limit changed keeps its bucket, capped to the new limit at its next use.
    """

    clock: Callable[[], float] = time.monotonic
    _buckets: dict[tuple[str, int], _Bucket] = field(default_factory=dict)

    def _refill(self, key: tuple[str, int], limit: int, window: float) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=float(limit), stamp=now)
        else:
            bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.stamp) * limit / window)
            bucket.stamp = now
        return bucket

    def available(self, key: tuple[str, int], limit: int, window: float) -> bool:
        return self._refill(key, limit, window).tokens >= 1.0

    def take(self, key: tuple[str, int], limit: int, window: float) -> bool:
        bucket = self._refill(key, limit, window)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def wait(self, key: tuple[str, int], limit: int, window: float) -> float:
        """Seconds until ``take`` would succeed (0 when it would now)."""
        bucket = self._refill(key, limit, window)
        return max(0.0, (1.0 - bucket.tokens) * window / limit)


class Policy:
    """Ordered rules; the first one matching the caller decides (see the module docstring)."""

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        clock: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
    ) -> None:
        """``limiter``: the buckets of the policy this one replaces (a reload), else fresh ones on ``clock``."""
        self.rules = tuple(rules)
        self.limiter = limiter if limiter is not None else RateLimiter(clock)

    @classmethod
    def from_config(
        cls,
        cfg: PolicyConfig,
        *,
        daemon_uid: int,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
    ) -> Policy:
        rules = [Rule.from_config(r) for r in cfg.rules]
        if cfg.default_rule:
            rules.append(default_rule(daemon_uid, allowed_uids, allowed_gids))
        return cls(rules, clock=clock, limiter=limiter)

    def rule_for(self, caller: Caller) -> Rule | None:
        return next((r for r in self.rules if r.matches(caller)), None)

    def admits(self, caller: Caller) -> Decision:
        """May this caller use the agent at all (reads included)?"""
        rule = self.rule_for(caller)
        if rule is None:
            exe = f", exe {caller.exe}" if caller.exe else ""
            return Decision(
                False, None, f"no policy rule matches peer uid {caller.uid} (gid {caller.gid}, pid {caller.pid}{exe})"
            )
        return Decision(True, rule.name, "the caller matches this rule")

    def decide(self, caller: Caller, action: Action, *, consume: bool = True) -> Decision:
        """Allow or deny ``action`` for ``caller``. ``consume=False`` (explain) checks the rate limit, uncharged."""
        rule = self.rule_for(caller)
        if rule is None:
            return self.admits(caller)
        why = rule.refusal(action)
        if why is not None:
            return Decision(False, rule.name, why)
        if rule.rate_limit is not None:
            key = (rule.name, caller.uid)
            ok = (
                self.limiter.take(key, rule.rate_limit, rule.rate_window)
                if consume
                else self.limiter.available(key, rule.rate_limit, rule.rate_window)
            )
            if not ok:
                return Decision(
                    False, rule.name, f"rate limit of {rule.rate_limit} per {rule.rate_window:g} s for uid {caller.uid}"
                )
        return Decision(True, rule.name, "every constraint of the rule holds")


def default_rule(daemon_uid: int, allowed_uids: Iterable[int] = (), allowed_gids: Iterable[int] = ()) -> Rule:
    """Root, the daemon's own uid and the configured extra uids/gids may do everything (ssh-agent's rule)."""
    return Rule(name=DEFAULT_RULE, uids=frozenset({0, daemon_uid, *allowed_uids}), gids=frozenset(allowed_gids))


def default_policy(daemon_uid: int, *, clock: Callable[[], float] = time.monotonic) -> Policy:
    return Policy([default_rule(daemon_uid)], clock=clock)
