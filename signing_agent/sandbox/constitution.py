"""The sandbox constitution: proposal validation, ballot evaluation and vote resolution.

Real CCF runs a JavaScript constitution. The sandbox cannot run JavaScript, so this module implements a
fixed subset of CCF's default constitution in Python:

- ``validate``: the proposal must be JSON ``{"actions":[{"name","args"}]}`` with known actions whose
  arguments pass the default constitution's checks (``checkType``, ``checkEntityId``, ``checkX509CertBundle``,
  ``checkEnum``, ``checkBounds``, ``checkNone``), with its messages: ``"<name> at position <i> failed
  validation: Error: ..."`` (CCF appends the JavaScript stack; the sandbox does not) and ``"<name>: no such
  action"``. A non-JSON body fails like CCF's ``SyntaxError`` path (500).
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

from signing_agent.sandbox.errors import GovError, internal_error

SANDBOX_CONSTITUTION: Final = """\
// CCF governance sandbox constitution (a test double: the sandbox evaluates this in Python, not JavaScript).
// Actions: set_member, remove_member, set_member_data, transition_service_to_open,
// transition_node_to_trusted, remove_node, set_constitution, set_service_recent_cose_proposals_window_size,
// trigger_recovery_shares_refresh, trigger_ledger_rekey, set_recovery_threshold.
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
    """What the constitution's ``validate`` throws: a JavaScript ``Error`` (or ``TypeError``) and its message."""

    def __init__(self, message: str, kind: str = "Error") -> None:
        super().__init__(f"{kind}: {message}")


_UNDEFINED: Final = object()
"""A JavaScript ``undefined``: an argument that is not there (JSON ``null`` is ``null``)."""


def _typeof(value: object) -> str:
    """JavaScript's ``typeof`` of a JSON value."""
    if value is _UNDEFINED:
        return "undefined"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "object"  # null, arrays and objects


def _prop(args: object, field: str) -> object:
    """``args.field``: undefined when missing; a TypeError, as in QuickJS, when ``args`` is undefined or null."""
    if args is _UNDEFINED or args is None:
        raise _ArgError(f"cannot read property '{field}' of {'null' if args is None else 'undefined'}", "TypeError")
    return args.get(field, _UNDEFINED) if isinstance(args, dict) else _UNDEFINED


def _template(value: object) -> str:
    """A value as a JavaScript template literal shows it."""
    if value is _UNDEFINED:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "[object Object]"
    if isinstance(value, list):
        return ",".join("" if v is None else _template(v) for v in value)
    return str(value)


# The checks of CCF's default constitution (samples/constitutions/default/actions.js), with its messages.


def _check_type(value: object, kind: str, field: object) -> None:
    optional = kind.endswith("?")
    if optional:
        if value is _UNDEFINED or value is None:
            return
        kind = kind[:-1]
    name = _template(field)
    if kind == "array":
        if not isinstance(value, list):
            raise _ArgError(f"{name} must be an array")
    elif kind == "integer":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise _ArgError(f"{name} must be an integer")
    elif _typeof(value) != kind:
        raise _ArgError(f"{name} must be of type {kind} but is {_typeof(value)}")


def _check_enum(value: object, members: tuple[str, ...], field: str) -> None:
    if value not in members:
        raise _ArgError(f"{field} must be one of {','.join(members)}")


def _check_bounds(value: object, low: int | None, high: int | None, field: str) -> None:
    if not isinstance(value, int | float):
        return  # JavaScript: undefined < 1 is false
    if low is not None and value < low:
        raise _ArgError(f"{field} must be greater than {low}")
    if high is not None and value > high:
        raise _ArgError(f"{field} must be lower than {high}")


def _check_none(args: object) -> None:
    if args is not _UNDEFINED and args is not None:
        raise _ArgError(f'Proposal does not accept any argument, found "{_template(args)}"')


def _check_entity_id(value: object, field: str) -> None:
    _check_type(value, "string", field)
    if len(str(value)) != 64:
        raise _ArgError(f"{field} must contain exactly 64 characters")
    if re.fullmatch(r"[a-fA-F0-9]*", str(value)) is None:
        raise _ArgError(f"{field} contains non-hexadecimal character")


_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL)


def is_valid_x509_cert_bundle(value: object) -> bool:
    """``ccf.crypto.isValidX509CertBundle``: one or more PEM X.509 certificates."""
    if not isinstance(value, str):
        return False
    blocks = _PEM_CERT.findall(value)
    if not blocks:
        return False
    try:
        for block in blocks:
            x509.load_pem_x509_certificate(block.encode())
    except ValueError:
        return False
    return True


def _check_x509_cert_bundle(value: object, field: str) -> None:
    if not is_valid_x509_cert_bundle(value):
        raise _ArgError(f"{field} must be a valid X509 certificate (bundle) in PEM format")


def _validate_args(name: str, args: object) -> None:
    match name:
        case "set_constitution":
            _check_type(_prop(args, "constitution"), "string", _UNDEFINED)
        case "set_member":
            _check_x509_cert_bundle(_prop(args, "cert"), "cert")
            _check_type(_prop(args, "member_data"), "object?", "member_data")
            role = _prop(args, "recovery_role")
            if role is not _UNDEFINED:
                _check_enum(role, RECOVERY_ROLES, "recovery_role")
            key = _prop(args, "encryption_pub_key")
            if (key is _UNDEFINED or key is None) and role is not None and role is not _UNDEFINED:
                raise _ArgError("Cannot specify a recovery_role value when encryption_pub_key is not specified")
        case "remove_member":
            _check_entity_id(_prop(args, "member_id"), "member_id")
        case "set_member_data":
            _check_entity_id(_prop(args, "member_id"), "member_id")
            _check_type(_prop(args, "member_data"), "object", "member_data")
        case "set_recovery_threshold":
            threshold = _prop(args, "recovery_threshold")
            _check_type(threshold, "integer", "threshold")
            _check_bounds(threshold, 1, 254, "threshold")
        case "trigger_recovery_shares_refresh" | "trigger_ledger_rekey":
            _check_none(args)
        case "transition_service_to_open":
            following = _prop(args, "next_service_identity")
            _check_type(following, "string", "next service identity (PEM certificate)")
            _check_x509_cert_bundle(following, "next_service_identity")
            previous = _prop(args, "previous_service_identity")
            _check_type(previous, "string?", "previous service identity (PEM certificate)")
            if previous is not _UNDEFINED:
                _check_x509_cert_bundle(previous, "previous_service_identity")
        case "transition_node_to_trusted":
            _check_entity_id(_prop(args, "node_id"), "node_id")
            _check_type(_prop(args, "valid_from"), "string", "valid_from")
            days = _prop(args, "validity_period_days")
            if days is not _UNDEFINED:
                _check_type(days, "integer", "validity_period_days")
                _check_bounds(days, 1, None, "validity_period_days")
        case "remove_node":
            _check_entity_id(_prop(args, "node_id"), "node_id")
        case "set_service_recent_cose_proposals_window_size":  # the sandbox's own, for the replay-window tests
            count = _prop(args, "proposal_count")
            _check_type(count, "integer", "proposal_count")
            _check_bounds(count, 1, 10000, "proposal_count")
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
        args = action.get("args", _UNDEFINED) if isinstance(action, dict) else _UNDEFINED
        if not isinstance(name, str):
            errors.append(f"{_js_name(name)}: no such action")
            continue
        try:
            _validate_args(name, args)
        except KeyError:
            errors.append(f"{name}: no such action")
            continue
        except _ArgError as exc:
            errors.append(f"{name} at position {position} failed validation: {exc}")
            continue
        parsed.append(Action(name, args if isinstance(args, dict) else None))
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
