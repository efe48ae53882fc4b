"""The sandbox constitution: proposal validation, ballot evaluation and vote resolution.

Real CCF runs a JavaScript constitution. The sandbox cannot run JavaScript, so this module implements a
fixed subset of CCF's default constitution in Python:

- ``validate``: the proposal must be JSON ``{"actions":[{"name","args"}]}`` with known actions whose
  arguments type-check (messages shaped like the default constitution's ``"<name> at position <i> failed
  validation: ..."`` and ``"<name>: no such action"``). A non-JSON body fails like CCF's ``SyntaxError``
  path (500).
- ``evaluate_ballot``: only the canonical ballots ``export function vote (proposal, proposerId) { return
  true }`` (or ``false``) are understood; anything else is a vote failure, as a throwing ballot is in CCF.
- ``resolve``: Accepted on a strict majority of Active members voting true, Rejected on a strict majority
  voting false. The proposer does not vote implicitly.

Applying actions lives in :mod:`signing_agent.sandbox.state`, which owns the data they change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from signing_agent.sandbox.errors import GovError, internal_error

SANDBOX_CONSTITUTION: Final = """\
// CCF governance sandbox constitution (a test double: the sandbox evaluates this in Python, not JavaScript).
// Actions: set_member, remove_member, set_member_data, transition_service_to_open,
// transition_node_to_trusted, set_constitution, set_service_recent_cose_proposals_window_size,
// trigger_recovery_shares_refresh, set_recovery_threshold.
// Resolution: Accepted on a strict majority of active members voting true; Rejected on a strict majority
// voting false. Ballots: `export function vote (proposal, proposerId) { return true }` (or false).
export function validate(input) { /* see signing_agent/sandbox/constitution.py */ }
export function resolve(proposal, proposerId, votes) { /* majority of active members */ }
export function apply(proposal, proposalId) { /* see signing_agent/sandbox/state.py */ }
"""

RECOVERY_ROLES: Final = ("NonParticipant", "Participant", "Owner")

_BALLOT_RE: Final = re.compile(
    r"^\s*export\s+function\s+vote\s*\(\s*proposal\s*,\s*proposerId\s*\)\s*\{\s*return\s+(true|false)\s*;?\s*\}\s*;?\s*$"
)

Resolution = Literal["Open", "Accepted", "Rejected"]


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    args: Any


class _ArgError(Exception):
    pass


def _js_type(value: object) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _check(args: dict[str, Any], field: str, kind: str) -> None:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    value = args.get(field)
    if value is None:
        if optional:
            return
        raise _ArgError(f"{field} must be of type {kind} but is of type undefined")
    ok = {
        "string": isinstance(value, str),
        "object": isinstance(value, dict),
        "integer": isinstance(value, int) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise _ArgError(f"{field} must be of type {kind} but is of type {_js_type(value)}")


def _check_cert(args: dict[str, Any], field: str, *, optional: bool = False) -> None:
    _check(args, field, "string?" if optional else "string")
    value = args.get(field)
    if value is None:
        return
    try:
        x509.load_pem_x509_certificate(str(value).encode())
    except ValueError as exc:
        raise _ArgError(f"{field} must be a valid X509 certificate (PEM)") from exc


def _check_rsa_key(args: dict[str, Any], field: str) -> None:
    _check(args, field, "string?")
    value = args.get(field)
    if value is None:
        return
    try:
        key = load_pem_public_key(str(value).encode())
    except ValueError as exc:
        raise _ArgError(f"{field} must be a valid RSA public key (PEM)") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise _ArgError(f"{field} must be a valid RSA public key (PEM)")


def _validate_args(name: str, args: dict[str, Any]) -> None:
    match name:
        case "set_member":
            _check_cert(args, "cert")
            _check_rsa_key(args, "encryption_pub_key")
            _check(args, "recovery_role", "string?")
            role = args.get("recovery_role")
            if role is not None:
                if role not in RECOVERY_ROLES:
                    raise _ArgError(f"recovery_role must be one of {', '.join(RECOVERY_ROLES)}")
                if args.get("encryption_pub_key") is None and role != "NonParticipant":
                    raise _ArgError("recovery_role requires encryption_pub_key")
        case "remove_member":
            if args.get("member_id") is None and args.get("cert") is None:
                raise _ArgError("member_id or cert must be set")
            _check(args, "member_id", "string?")
            _check_cert(args, "cert", optional=True)
        case "set_member_data":
            _check(args, "member_id", "string")
            _check(args, "member_data", "object")
        case "transition_service_to_open":
            _check_cert(args, "previous_service_identity", optional=True)
            _check_cert(args, "next_service_identity")
        case "transition_node_to_trusted":
            _check(args, "node_id", "string")
            _check(args, "valid_from", "string?")
        case "set_constitution":
            _check(args, "constitution", "string")
        case "set_service_recent_cose_proposals_window_size":
            _check(args, "proposal_count", "integer")
            if not 1 <= int(args["proposal_count"]) <= 10000:
                raise _ArgError("proposal_count must be between 1 and 10000")
        case "trigger_recovery_shares_refresh":
            pass
        case "set_recovery_threshold":
            _check(args, "recovery_threshold", "integer")
            if not 1 <= int(args["recovery_threshold"]) <= 255:
                raise _ArgError("recovery_threshold must be between 1 and 255")
        case _:
            raise KeyError(name)


def validate_proposal(body: bytes) -> list[Action]:
    """Parse and validate a proposal body, or raise the GovError CCF would return."""
    try:
        proposal = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise internal_error(f"Failed to execute validation: SyntaxError: {exc}") from exc
    actions = proposal.get("actions") if isinstance(proposal, dict) else None
    if not isinstance(actions, list):
        raise internal_error("Failed to execute validation: TypeError: proposal.actions is not iterable")
    errors: list[str] = []
    parsed: list[Action] = []
    for position, action in enumerate(actions):
        name = action.get("name") if isinstance(action, dict) else None
        args = action.get("args") if isinstance(action, dict) else None
        if not isinstance(name, str):
            errors.append(f"{_js_name(name)}: no such action")
            continue
        try:
            _validate_args(name, args if isinstance(args, dict) else {})
        except KeyError:
            errors.append(f"{name}: no such action")
            continue
        except _ArgError as exc:
            errors.append(f"{name} at position {position} failed validation: Error: {exc}")
            continue
        parsed.append(Action(name, args if isinstance(args, dict) else {}))
    if errors:
        raise GovError(400, "ProposalFailedToValidate", f"Proposal failed to validate: {', '.join(errors)}")
    return parsed


def _js_name(value: object) -> str:
    return "undefined" if value is None else json.dumps(value)


def evaluate_ballot(ballot: str) -> bool | None:
    """The vote of a canonical ballot, or None when the sandbox cannot evaluate it."""
    match = _BALLOT_RE.match(ballot)
    if match is None:
        return None
    return match.group(1) == "true"


BALLOT_NOT_SUPPORTED: Final = (
    "The sandbox only evaluates the canonical ballots "
    "'export function vote (proposal, proposerId) { return true }' (or return false)"
)


def resolve(votes: dict[str, bool], active_member_count: int) -> Resolution:
    yes = sum(1 for vote in votes.values() if vote)
    no = len(votes) - yes
    if 2 * yes > active_member_count:
        return "Accepted"
    if 2 * no > active_member_count:
        return "Rejected"
    return "Open"
