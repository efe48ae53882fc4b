"""The policy is a pure function of caller and action: first matching rule decides, deny lists win, rate limits."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from signing_agent.config import PolicyConfig, PolicyRuleConfig, parse_config
from signing_agent.errors import ConfigError
from signing_agent.policy import (
    ACCEPT_BALLOT,
    DEFAULT_RULE,
    Action,
    Caller,
    Policy,
    default_policy,
)

ME = 4242
OPERATOR = Caller(uid=1000, gid=1000, pid=10, exe="/usr/bin/python3.11")
STRANGER = Caller(uid=2000, gid=2000, pid=11, exe="/usr/bin/python3.11")
ROOT = Caller(uid=0, gid=0, pid=1)
TRUST = Action(identity="m0", msg_type="proposal", proposal_actions=("transition_node_to_trusted",))
CONSTITUTION = Action(identity="m0", msg_type="proposal", proposal_actions=("set_constitution",))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(*rules: dict[str, Any], default_rule: bool = True, clock: Clock | None = None) -> Policy:
    cfg = PolicyConfig(rules=tuple(PolicyRuleConfig(**r) for r in rules), default_rule=default_rule)
    return Policy.from_config(cfg, daemon_uid=ME, clock=clock or Clock())


def test_default_policy_admits_only_root_and_the_daemon_uid() -> None:
    p = default_policy(ME)
    assert p.decide(ROOT, CONSTITUTION).allowed
    assert p.decide(Caller(uid=ME, gid=5, pid=3), CONSTITUTION).allowed
    denied = p.decide(STRANGER, TRUST)
    assert not denied.allowed
    assert denied.rule is None
    assert "uid 2000" in denied.reason
    assert not p.admits(STRANGER).allowed


def test_allowed_uids_and_gids_extend_the_default_rule() -> None:
    p = Policy.from_config(PolicyConfig(), daemon_uid=ME, allowed_uids=[2000], allowed_gids=[77])
    assert p.decide(STRANGER, CONSTITUTION).allowed
    assert p.decide(Caller(uid=3000, gid=77, pid=1), CONSTITUTION).allowed
    assert not p.decide(Caller(uid=3000, gid=78, pid=1), CONSTITUTION).allowed


def test_an_action_allow_list_reads_the_proposal_actions() -> None:
    p = policy({"name": "ops", "uids": (1000,), "actions_allow": ("transition_node_to_trusted",)})
    assert p.decide(OPERATOR, TRUST).allowed
    denied = p.decide(OPERATOR, CONSTITUTION)
    assert (denied.allowed, denied.rule) == (False, "ops")
    assert "set_constitution" in denied.reason
    mixed = Action(identity="m0", msg_type="proposal", proposal_actions=("transition_node_to_trusted", "set_member"))
    assert not p.decide(OPERATOR, mixed).allowed


def test_deny_wins_over_allow() -> None:
    p = policy(
        {"name": "r", "uids": (1000,), "actions_allow": ("set_constitution",), "actions_deny": ("set_constitution",)}
    )
    decision = p.decide(OPERATOR, CONSTITUTION)
    assert not decision.allowed
    assert "denied" in decision.reason


def test_first_rule_matching_the_caller_decides_and_later_rules_are_not_tried() -> None:
    p = policy(
        {"name": "narrow", "uids": (1000,), "msg_types": ("ballot",)},
        {"name": "broad", "uids": (1000,)},
    )
    decision = p.decide(OPERATOR, TRUST)
    assert (decision.allowed, decision.rule) == (False, "narrow")


def test_a_rule_can_restrict_root_before_the_default_rule() -> None:
    p = policy({"name": "root", "uids": (0,), "msg_types": ("ballot",)})
    assert p.decide(ROOT, TRUST).rule == "root"
    assert not p.decide(ROOT, TRUST).allowed
    assert p.decide(Caller(uid=ME, gid=1, pid=1), TRUST).rule == DEFAULT_RULE


def test_without_the_default_rule_only_the_rules_apply() -> None:
    p = policy({"name": "ops", "uids": (1000,)}, default_rule=False)
    assert not p.admits(ROOT).allowed
    assert p.admits(OPERATOR).allowed


def test_executables_must_match_and_an_unknown_exe_never_does() -> None:
    p = policy({"name": "py", "uids": (1000,), "executables": ("/usr/bin/python3.11",)})
    assert p.decide(OPERATOR, TRUST).allowed
    assert not p.admits(Caller(uid=1000, gid=1000, pid=1, exe="/usr/bin/perl")).allowed
    assert not p.admits(Caller(uid=1000, gid=1000, pid=1, exe=None)).allowed


def test_ballots_by_hash_with_the_canonical_aliases() -> None:
    p = policy({"name": "voter", "uids": (1000,), "ballots": ("accept",)})
    accept = hashlib.sha256(ACCEPT_BALLOT.encode()).hexdigest()
    ballot = Action(identity="m0", msg_type="ballot", ballot_sha256=accept, proposal_id="a" * 64)
    assert p.decide(OPERATOR, ballot).allowed
    evil = Action(identity="m0", msg_type="ballot", ballot_sha256="0" * 64, proposal_id="a" * 64)
    assert not p.decide(OPERATOR, evil).allowed


def test_identities_msg_types_and_services() -> None:
    p = policy(
        {"name": "r", "uids": (1000,), "identities": ("m0",), "msg_types": ("proposal",), "services": ("prod",)},
    )
    # services given: raw signing is off unless raw_sign says otherwise (config sets that default).
    assert p.decide(OPERATOR, Action(identity="m0", msg_type="proposal", service="prod")).allowed
    assert not p.decide(OPERATOR, Action(identity="m0", msg_type="proposal", service="test")).allowed
    assert not p.decide(OPERATOR, Action(identity="m1", msg_type="proposal", service="prod")).allowed
    assert not p.decide(OPERATOR, Action(identity="m0", msg_type="ballot", service="prod")).allowed
    no_raw = policy({"name": "r", "uids": (1000,), "raw_sign": False})
    assert "raw signing" in no_raw.decide(OPERATOR, TRUST).reason


def test_rate_limit_is_a_token_bucket_per_rule_and_uid() -> None:
    clock = Clock()
    p = policy({"name": "slow", "uids": (1000, 1001), "rate_limit": 2, "rate_window": 10.0}, clock=clock)
    other = Caller(uid=1001, gid=1, pid=1)
    assert p.decide(OPERATOR, TRUST).allowed
    assert p.decide(OPERATOR, TRUST).allowed
    limited = p.decide(OPERATOR, TRUST)
    assert not limited.allowed
    assert "rate limit" in limited.reason
    assert p.decide(other, TRUST).allowed  # its own bucket
    # explain never charges the bucket
    clock.now = 5.0  # one token back
    assert p.decide(OPERATOR, TRUST, consume=False).allowed
    assert p.decide(OPERATOR, TRUST, consume=False).allowed
    assert p.decide(OPERATOR, TRUST).allowed
    assert not p.decide(OPERATOR, TRUST).allowed


SLOW: dict[str, Any] = {"name": "slow", "uids": (1000,), "rate_limit": 5, "rate_window": 3600.0}


def reloaded(previous: Policy, **changes: Any) -> Policy:
    """The policy a reload builds: the rule (possibly changed) on the previous policy's rate limiter."""
    cfg = PolicyConfig(rules=(PolicyRuleConfig(**{**SLOW, **changes}),))
    return Policy.from_config(cfg, daemon_uid=ME, limiter=previous.limiter)


def test_a_reloaded_policy_keeps_the_buckets_capped_to_the_new_limit() -> None:
    clock = Clock()
    old = policy(SLOW, clock=clock)
    assert old.decide(OPERATOR, TRUST).allowed  # 4 tokens left
    same = reloaded(old)
    assert [same.decide(OPERATOR, TRUST).allowed for _ in range(5)] == [True] * 4 + [False]
    # A lower limit caps the bucket; a higher one does not refill it.
    fresh = policy(SLOW, clock=clock)
    assert fresh.decide(OPERATOR, TRUST).allowed
    lower = reloaded(fresh, rate_limit=2)
    assert [lower.decide(OPERATOR, TRUST).allowed for _ in range(3)] == [True, True, False]
    assert not reloaded(lower, rate_limit=50).decide(OPERATOR, TRUST).allowed


def _config(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "identities": {"m0": {"certificate": "c.pem", "signing_key": {"backend": "file", "path": "k.pem"}}},
        "services": {"prod": {"url": "https://x", "service_certificate": "s.pem"}},
        "policy": {"rules": rules},
    }


def test_policy_config_parses_and_defaults_raw_sign_from_services() -> None:
    config = parse_config(
        _config(
            [
                {"name": "a", "uids": [1000], "services": ["prod"], "ballots": ["accept", "f" * 64]},
                {"uids": [1001]},
            ]
        )
    )
    a, b = config.policy.rules
    assert (a.raw_sign, b.raw_sign) == (False, True)
    assert b.name == "rule1"
    assert config.audit is not None
    assert config.audit.path.name == "audit.jsonl"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "x"}, "must name the callers"),
        ({"uids": [1], "idenities": ["m0"]}, "policy.rules[0].idenities"),
        ({"uids": [1], "identities": ["m9"]}, "no identity named 'm9'"),
        ({"uids": [1], "services": ["test"]}, "no service named 'test'"),
        ({"uids": [1], "msg_types": ["vote"]}, "'vote' is not one of"),
        ({"uids": [1], "ballots": ["yes"]}, "neither 'accept'"),
        ({"uids": [1], "executables": ["python3"]}, "not an absolute path"),
        ({"uids": [1], "rate_limit": 0}, "at least 1"),
        ({"uids": ["1"]}, "non-negative integers"),
    ],
)
def test_policy_config_errors_name_the_key(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(_config([rule]))


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate rule name"):
        parse_config(_config([{"name": "a", "uids": [1]}, {"name": "a", "uids": [2]}]))


ACCEPT_SHA = hashlib.sha256(ACCEPT_BALLOT.encode()).hexdigest()
PID = "a" * 64


def ballot_on(actions: tuple[str, ...] | None, *, service: str | None = "prod", unknown: str | None = None) -> Action:
    """An accepting ballot for proposal PID whose actions the governance layer read as ``actions``."""
    return Action(
        identity="m0",
        msg_type="ballot",
        service=service,
        proposal_actions=actions,
        actions_unknown=unknown,
        ballot_sha256=ACCEPT_SHA,
        proposal_id=PID,
    )


NODE_OPERATOR = {
    "name": "ops",
    "uids": (1000,),
    "actions_allow": ("transition_node_to_trusted",),
    "ballots": ("accept", "reject"),
}


def test_a_ballot_is_judged_by_the_actions_of_the_proposal_it_accepts() -> None:
    p = policy(NODE_OPERATOR)
    assert p.decide(OPERATOR, ballot_on(("transition_node_to_trusted",))).allowed
    denied = p.decide(OPERATOR, ballot_on(("set_constitution",)))
    assert (denied.allowed, denied.rule) == (False, "ops")
    assert denied.reason == f"the ballot's proposal {PID} has action(s) not allowed: set_constitution"
    assert not p.decide(OPERATOR, ballot_on(("transition_node_to_trusted", "set_member"))).allowed


def test_a_ballot_passes_actions_deny_as_its_proposal_would() -> None:
    p = policy({"name": "r", "uids": (1000,), "actions_deny": ("set_constitution",)})
    assert p.decide(OPERATOR, ballot_on(("set_member",))).allowed
    denied = p.decide(OPERATOR, ballot_on(("set_member", "set_constitution")))
    assert not denied.allowed
    assert "denied: set_constitution" in denied.reason


def test_a_ballot_whose_proposal_actions_are_unknown_is_refused_by_a_rule_constraining_actions() -> None:
    p = policy(NODE_OPERATOR)
    unreadable = p.decide(OPERATOR, ballot_on(None, unknown="service 'prod' answered 500"))
    assert not unreadable.allowed
    assert unreadable.reason == (
        f"this rule constrains proposal actions, and the actions of proposal {PID} are unknown "
        "(service 'prod' answered 500)"
    )
    # The Action's default is "unknown", so a ballot built without its proposal's actions fails closed.
    bare = Action(identity="m0", msg_type="ballot", service="prod", ballot_sha256=ACCEPT_SHA, proposal_id=PID)
    assert not p.decide(OPERATOR, bare).allowed


def test_a_raw_ballot_is_refused_by_a_rule_constraining_actions_and_told_to_vote_through_the_agent() -> None:
    p = policy(NODE_OPERATOR)
    raw = p.decide(OPERATOR, ballot_on(None, service=None))
    assert not raw.allowed
    assert "POST /v1/sign" in raw.reason
    assert "POST /v1/services/{svc}/proposals/{id}/ballots" in raw.reason
    assert "signing-agent vote" in raw.reason
    # actions_deny alone constrains actions too.
    assert (
        not policy({**NODE_OPERATOR, "actions_allow": None, "actions_deny": ("x",)})
        .decide(OPERATOR, ballot_on(None, service=None))
        .allowed
    )


def test_a_rule_not_constraining_actions_judges_a_ballot_by_its_script_only() -> None:
    p = policy({"name": "voter", "uids": (1000,), "ballots": ("accept",)})
    assert p.decide(OPERATOR, ballot_on(None, service=None)).allowed
    assert p.decide(OPERATOR, ballot_on(None, unknown="unreadable")).allowed
    assert p.decide(OPERATOR, ballot_on(("set_constitution",))).allowed


def test_the_ballot_script_is_still_checked_when_the_proposal_actions_pass() -> None:
    p = policy(NODE_OPERATOR)
    evil = Action(
        identity="m0",
        msg_type="ballot",
        service="prod",
        proposal_actions=("transition_node_to_trusted",),
        ballot_sha256="0" * 64,
        proposal_id=PID,
    )
    assert "ballot script" in p.decide(OPERATOR, evil).reason


def test_a_withdrawal_is_not_judged_by_proposal_actions() -> None:
    """CCF lets a member withdraw only its own proposal, and a withdrawal enacts nothing."""
    p = policy(NODE_OPERATOR)
    withdrawal = Action(identity="m0", msg_type="withdrawal", proposal_id=PID)
    assert p.decide(OPERATOR, withdrawal).allowed
