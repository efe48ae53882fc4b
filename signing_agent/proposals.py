"""The proposals of the consortium's workflows, and the checks every proposal for a service passes before it is signed.

CCF's default constitution (``samples/constitutions/default/actions.js``) validates each action's arguments when a
proposal is created, and its ``apply`` (with the node's ``transitionServiceToOpen``) refuses more when the proposal
is accepted: by then the mistake costs a vote round and shows as a 500 at the last ballot. ``check_proposal``
refuses here, before anything is signed, what CCF would refuse where the agent can know: the argument schemas of
the actions below, and, given ``ServiceFacts`` (the service's state, read over pinned TLS by ``ccf.facts``), what
``apply`` would refuse now. A refusal is an ``InvalidRequestError`` (400) naming the action and the field, with
CCF's own words. Actions the agent does not know (or a custom constitution's) pass unchecked.

CCF compares service identities as PEM *text*, byte for byte (``ccf::crypto::Pem`` equality), so a
``transition_service_to_open`` must carry exactly the text the service reports; the same certificate with other line
breaks is refused with that reason.

Also builds the proposals of the workflow commands (``set_member``, ``remove_member``...), as CCF expects them.

Pure: no I/O. Must not import aiohttp, asyncio, ``signing_agent.ccf`` or ``signing_agent.backends``.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from signing_agent import strict_json
from signing_agent.certs import bundle_ders, certificate_der, der_sha256
from signing_agent.errors import InvalidRequestError
from signing_agent.names import is_ccf_id

SET_MEMBER: Final = "set_member"
REMOVE_MEMBER: Final = "remove_member"
SET_MEMBER_DATA: Final = "set_member_data"
TRUST_NODE: Final = "transition_node_to_trusted"
REMOVE_NODE: Final = "remove_node"
OPEN_SERVICE: Final = "transition_service_to_open"
REFRESH_SHARES: Final = "trigger_recovery_shares_refresh"
REKEY_LEDGER: Final = "trigger_ledger_rekey"

RECOVERY_ROLES: Final = ("NonParticipant", "Participant", "Owner")
MIN_RSA_BITS: Final = 2048
_ANY_CASE_ID = re.compile(r"[0-9a-fA-F]{64}")


class Needs(enum.Flag):
    """What of the service's state a proposal's checks read (``needs``)."""

    NOTHING = 0
    INFO = enum.auto()
    """``/gov/service/info``: status, identity, recovery threshold, longest node certificate validity."""
    PREVIOUS_IDENTITY = enum.auto()
    """``/node/service/previous_identity``: the identity a recovering service recovered from."""
    MEMBERS = enum.auto()


@dataclass(frozen=True, slots=True)
class MemberFact:
    member_id: str
    status: str | None
    recovery_member: bool
    """Registered with an encryption key (CCF counts these against the recovery threshold)."""
    recovery_role: str | None = None
    """As the service reports it: ``NonParticipant``, ``Participant`` or ``Owner``."""

    def role(self) -> str:
        """The role shares are issued by: Participant for a recovery member the service names no role for."""
        if not self.recovery_member:
            return "NonParticipant"
        return self.recovery_role if self.recovery_role in RECOVERY_ROLES else "Participant"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceFacts:
    """What a service said of its state, for the checks of a proposal to it. None: not read (not needed)."""

    service: str
    status: str | None = None
    identity: str | None = None
    """The service identity (PEM text) as ``/gov/service/info`` reports it."""
    identity_trusted: bool = False
    """That identity is one the agent trusts for proposals (pinned or listed)."""
    recovered_from: str | None = None
    """The identity (PEM text) the service recovered from, as it reports it."""
    recovered_from_known: bool = False
    """The service said whether it has one (False: an older CCF without ``/node/service/previous_identity``)."""
    recovery_threshold: int | None = None
    max_node_validity_days: int | None = None
    members: tuple[MemberFact, ...] | None = None


# --- reading a proposal -------------------------------------------------------------------------------------------


def _actions(payload: bytes) -> list[tuple[int, str, dict[str, Any]]]:
    """(position, name, the action object) of each action; the shape is ``summarise_payload``'s to refuse."""
    body = strict_json.loads(payload, "a proposal payload")
    actions = body.get("actions") if isinstance(body, dict) else None
    found = []
    for i, action in enumerate(actions if isinstance(actions, list) else []):
        if isinstance(action, dict) and isinstance(action.get("name"), str):
            found.append((i, action["name"], action))
    return found


def needs(payload: bytes) -> Needs:
    """What ``check_proposal`` reads of the service's state to check this proposal (nothing for most)."""
    wanted = Needs.NOTHING
    for _, name, action in _actions(payload):
        args = action.get("args")
        if name == OPEN_SERVICE:
            wanted |= Needs.INFO | Needs.MEMBERS  # opening a new service issues the first recovery shares
            if isinstance(args, dict) and "previous_service_identity" in args:
                wanted |= Needs.PREVIOUS_IDENTITY
        elif name == REMOVE_MEMBER:
            wanted |= Needs.INFO | Needs.MEMBERS
        elif name == TRUST_NODE and isinstance(args, dict) and "validity_period_days" in args:
            wanted |= Needs.INFO
        elif name == REFRESH_SHARES:
            wanted |= Needs.INFO | Needs.MEMBERS
    return wanted


class _RefusedError(Exception):
    """One argument refused: its field (``None``: the args themselves) and why."""

    def __init__(self, field: str | None, why: str, ccf: str | None = None) -> None:
        super().__init__(why)
        self.field = field
        self.why = why if ccf is None else f'{why} (CCF: "{ccf}")'


def check_proposal(payload: bytes, facts: ServiceFacts | None) -> None:
    """Refuse (``InvalidRequestError`` naming the action and field) what CCF's default constitution would refuse.

    ``facts`` is the service's state for the checks ``apply`` makes (``needs`` says which); None checks the
    arguments only."""
    for i, name, action in _actions(payload):
        check = _CHECKS.get(name)
        if check is None:
            continue
        try:
            check(action, facts)
        except _RefusedError as refused:
            where = f"actions[{i}] {name}: " + ("args" if refused.field is None else f"args.{refused.field}")
            raise InvalidRequestError(f"{where}: {refused.why}; nothing was signed") from None


def _args(action: Mapping[str, Any]) -> dict[str, Any]:
    args = action.get("args")
    if not isinstance(args, dict):
        raise _RefusedError(None, "must be an object (CCF reads each argument from it)")
    return args


def _js_type(value: object) -> str:
    """``typeof`` in CCF's JavaScript, for its messages."""
    if value is None:
        return "undefined"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _string(args: Mapping[str, Any], field: str, *, ccf_name: str | None = None) -> str:
    value = args.get(field)
    if not isinstance(value, str):
        ccf = f"{ccf_name or field} must be of type string but is {_js_type(value)}"
        raise _RefusedError(field, "must be a string", ccf)
    return value


def _entity_id(args: Mapping[str, Any], field: str) -> str:
    value = _string(args, field)
    if not _ANY_CASE_ID.fullmatch(value):
        why = f"{value[:80]!r} is not 64 hex characters"
        raise _RefusedError(field, why, f"{field} must contain exactly 64 characters")
    if not is_ccf_id(value):
        why = "must be lower case: CCF keys members and nodes by the lower-case id, so the proposal would do nothing"
        raise _RefusedError(field, why)
    return value


def _certificate(args: Mapping[str, Any], field: str, *, ccf_name: str | None = None) -> str:
    """A PEM certificate, or a bundle of them: CCF's ``isValidX509CertBundle`` reads every certificate in the text,
    and refuses the whole argument when one of them is not a certificate (the first alone would pass here)."""
    value = _string(args, field, ccf_name=ccf_name)
    ccf = f"{field} must be a valid X509 certificate (bundle) in PEM format"
    if "-----BEGIN CERTIFICATE-----" not in value or certificate_der(value) is None:
        raise _RefusedError(field, "is not a PEM X.509 certificate", ccf)
    if bundle_ders(value) is None:
        raise _RefusedError(field, "holds a certificate block that is not a readable X.509 certificate", ccf)
    return value


def _json_object(args: Mapping[str, Any], field: str) -> None:
    value = args.get(field)
    if value is not None and not isinstance(value, dict | list):
        ccf = f"{field} must be of type object but is {_js_type(value)}"
        raise _RefusedError(field, "must be a JSON object", ccf)


def rsa_public_key(pem: str, field: str = "encryption_pub_key") -> rsa.RSAPublicKey:
    """``pem`` as CCF reads an encryption key (an RSA ``PUBLIC KEY`` PEM, at least 2048 bits); ``_RefusedError``."""
    unusable = "CCF could not encrypt recovery shares to it"
    if "-----BEGIN PUBLIC KEY-----" not in pem:
        why = f"is not a PEM public key (-----BEGIN PUBLIC KEY-----, as `openssl rsa -pubout` writes it): {unusable}"
        raise _RefusedError(field, why)
    try:
        key = load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise _RefusedError(field, f"is not a readable PEM public key: {unusable}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        kind = type(key).__name__.removeprefix("_")
        raise _RefusedError(field, f"is a {kind}, not an RSA key: CCF encrypts recovery shares with RSA-OAEP")
    if key.key_size < MIN_RSA_BITS:
        raise _RefusedError(field, f"is RSA-{key.key_size}: an encryption key needs at least {MIN_RSA_BITS} bits")
    return key


# --- the actions --------------------------------------------------------------------------------------------------


def _set_member(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    args = _args(action)
    _certificate(args, "cert")
    _json_object(args, "member_data")
    key = args.get("encryption_pub_key")
    if key is not None:
        rsa_public_key(_string(args, "encryption_pub_key"))
    if "recovery_role" in args:
        role = args["recovery_role"]
        if role not in RECOVERY_ROLES:
            ccf = f"recovery_role must be one of {','.join(RECOVERY_ROLES)}"
            raise _RefusedError("recovery_role", f"{role!r} is not one of {', '.join(RECOVERY_ROLES)}", ccf)
        if key is None:
            ccf = "Cannot specify a recovery_role value when encryption_pub_key is not specified"
            raise _RefusedError("recovery_role", "needs encryption_pub_key", ccf)


def _would_refuse(facts: ServiceFacts) -> str:
    return f"service {facts.service!r} would refuse it"


def _remove_member(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    args = _args(action)
    if "member_id" not in args:
        why = "is required: remove_member takes the member id (the SHA-256 of the certificate's DER), not a certificate"
        raise _RefusedError("member_id", why)
    member_id = _entity_id(args, "member_id")
    if facts is None or facts.members is None or facts.recovery_threshold is None:
        return
    member = next((m for m in facts.members if m.member_id == member_id), None)
    if member is not None and member.status == "Active" and member.recovery_member:
        after = sum(1 for m in facts.members if m.status == "Active" and m.recovery_member) - 1
        if after < facts.recovery_threshold:
            ccf = (
                f"Number of active recovery members ({after}) would be less than recovery threshold "
                f"({facts.recovery_threshold})"
            )
            raise _RefusedError("member_id", _would_refuse(facts), ccf)


def _set_member_data(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    """``member_data`` is required here (CCF checks it as an ``object``, where ``set_member`` has ``object?``); JSON
    null passes, as ``typeof null`` is ``"object"`` to CCF."""
    args = _args(action)
    _entity_id(args, "member_id")
    if "member_data" not in args:
        ccf = "member_data must be of type object but is undefined"
        raise _RefusedError("member_data", "is required: set_member_data replaces the member's data with it", ccf)
    _json_object(args, "member_data")


def _trust_node(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    args = _args(action)
    _entity_id(args, "node_id")
    try:
        ccf_x509_time(_string(args, "valid_from"))
    except ValueError as exc:
        raise _RefusedError("valid_from", str(exc)) from None
    days = args.get("validity_period_days", ...)
    if days is not ...:
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            why = f"{days!r} is not a whole number of days from 1"
            raise _RefusedError("validity_period_days", why, "validity_period_days must be an integer")
        limit = facts.max_node_validity_days if facts is not None else None
        if facts is not None and limit is not None and days > limit:
            ccf = f"Validity period {days} is not allowed: max allowed is {limit}"
            raise _RefusedError("validity_period_days", _would_refuse(facts), ccf)


def _remove_node(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    _entity_id(_args(action), "node_id")


def _no_args(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    args = action.get("args")
    if args is not None:
        ccf = f'Proposal does not accept any argument, found "{_template_text(args)}"'
        raise _RefusedError(None, "must be left out: this action takes no args at all, not even {}", ccf)


def _template_text(value: object) -> str:
    """A JSON value as a JavaScript template literal shows it (for CCF's messages)."""
    if isinstance(value, dict):
        return "[object Object]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_template_text(v) for v in value)
    return str(value)


def _cannot_issue_shares(facts: ServiceFacts) -> str | None:
    """Why CCF's share manager would refuse to issue recovery shares now (its message), or None."""
    if facts.members is None or facts.recovery_threshold is None:
        return None
    active = [m for m in facts.members if m.status == "Active"]
    participants = sum(1 for m in active if m.role() == "Participant")
    owners = sum(1 for m in active if m.role() == "Owner")
    threshold = facts.recovery_threshold
    if not participants and not owners:
        return "There should be at least one active recovery member to issue recovery shares"
    if participants and threshold > participants:
        return (
            f"Recovery threshold {threshold} should be equal to or less than the number of active recovery members "
            f"{participants}"
        )
    if not participants and threshold > 1:
        return (
            f"Recovery threshold {threshold} cannot be greater than 1 when the consortium consists of only active "
            f"recovery owner members ({owners})"
        )
    return None


def _refresh_shares(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    """New shares for the active recovery members, which CCF's share manager must be able to issue."""
    _no_args(action, facts)
    why = _cannot_issue_shares(facts) if facts is not None else None
    if facts is not None and why is not None:
        raise _RefusedError(None, _would_refuse(facts), why)


def _open_service(action: Mapping[str, Any], facts: ServiceFacts | None) -> None:
    args = _args(action)
    following = _certificate(args, "next_service_identity", ccf_name="next service identity (PEM certificate)")
    if len(bundle_ders(following) or ()) != 1:
        # A service identity is one certificate: members voting for a bundle would trust every certificate in it
        # (a service, even a compromised one, reporting its identity as one is no reason to).
        raise _RefusedError("next_service_identity", "is a bundle: a service identity is exactly one certificate")
    previous = None
    if "previous_service_identity" in args:
        ccf_name = "previous service identity (PEM certificate)"
        previous = _certificate(args, "previous_service_identity", ccf_name=ccf_name)
    if facts is None:
        return
    name = f"service {facts.service!r}"
    if facts.status == "Recovering":
        if previous is None:
            ccf = "Opening a recovering network requires both, the previous and the next service identity"
            raise _RefusedError("previous_service_identity", f"is required: {name} is Recovering", ccf)
        if facts.recovered_from_known:
            what = f"the identity {name} recovered from"
            _same_text(previous, facts.recovered_from, "previous_service_identity", what)
    elif previous is not None:
        why = f"{name} is {facts.status}, not Recovering: only the opening of a recovered service names one"
        raise _RefusedError("previous_service_identity", why)
    elif facts.status == "Opening" and (cannot := _cannot_issue_shares(facts)) is not None:
        raise _RefusedError(None, _would_refuse(facts), f"Failed to issue recovery shares: {cannot}")
    if facts.identity is None:
        raise _RefusedError("next_service_identity", f"{name} reported no service identity to compare it with")
    if not facts.identity_trusted:
        why = (
            f"{name} presents identity {_fp(facts.identity)}, which this agent does not trust: check it out of band "
            "and list it in accepted_service_certificates"
        )
        raise _RefusedError("next_service_identity", why)
    _same_text(following, facts.identity, "next_service_identity", f"the identity {name} presents")


def _fp(pem: str) -> str:
    return f"sha256 {(fingerprint(pem) or '?')[:16]}..."


def _same_text(given: str, reported: str | None, field: str, what: str) -> None:
    """CCF compares service identities as PEM text, byte for byte."""
    if reported is None:
        ccf = (
            "Recovery with service certificates requires both, a previous service identity written to the KV during "
            "recovery genesis and a transition_service_to_open proposal that contains previous and next service "
            "certificates"
        )
        raise _RefusedError(field, f"is not {what}: there is none", ccf)
    if given == reported:
        return
    if certificate_der(given) == certificate_der(reported):
        why = (
            f"is {what}, but not the same PEM text (line breaks or headers differ): CCF compares the text byte for "
            "byte; use exactly the text the service reports"
        )
        raise _RefusedError(field, why)
    raise _RefusedError(field, f"is {_fp(given)}, not {what} ({_fp(reported)})")


_CHECKS: Final = {
    SET_MEMBER: _set_member,
    REMOVE_MEMBER: _remove_member,
    SET_MEMBER_DATA: _set_member_data,
    TRUST_NODE: _trust_node,
    REMOVE_NODE: _remove_node,
    OPEN_SERVICE: _open_service,
    REFRESH_SHARES: _refresh_shares,
    REKEY_LEDGER: _no_args,
}


# --- CCF's X.509 time parser --------------------------------------------------------------------------------------

_UTC_TIME = re.compile(r"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z")
_GENERALIZED_TIME = re.compile(r"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z")
_ISO_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,6})?(Z|[+-]\d{2}:\d{2})?")
_TIME_FORMS = "YYYYMMDDHHMMSSZ (e.g. 20250101000000Z) or YYYY-MM-DDTHH:MM:SSZ"


def ccf_x509_time(text: str) -> datetime.datetime:
    """The UTC time CCF's X.509 time parser (``ccf::ds::time_point_from_string``) reads in ``text``; ``ValueError``
    for a text it does not read, or reads as another time than ISO 8601 means.

    Accepted: ``YYMMDDHHMMSSZ`` (years 2000-2049), ``YYYYMMDDHHMMSSZ``, and ``YYYY-MM-DD[T ]HH:MM:SS[.ffffff]`` with
    no offset (UTC), ``Z``, ``+HH:MM`` or a whole-hour ``-HH:00``. Refused although CCF reads them: offsets without a
    colon after a ``T`` (CCF ignores them), other negative offsets (CCF subtracts their minutes the wrong way) and
    two-digit years from 50 (CCF's two parsers disagree about their century)."""
    when = _read_x509_time(text)
    if when is None:
        raise ValueError(f"{text[:80]!r} is not a time CCF's X.509 parser reads as meant; write {_TIME_FORMS}")
    return when


def _read_x509_time(text: str) -> datetime.datetime | None:
    if match := _UTC_TIME.fullmatch(text):
        year = int(match[1])
        return None if year >= 50 else _utc(str(2000 + year), *match.groups()[1:])
    if match := _GENERALIZED_TIME.fullmatch(text):
        return _utc(*match.groups())
    match = _ISO_TIME.fullmatch(text)
    if match is None:
        return None
    when, offset = _utc(*match.groups()[:6]), match[7]
    if when is None or offset is None or offset == "Z":
        return when
    sign, hours, minutes = offset[0], int(offset[1:3]), int(offset[4:6])
    if (sign == "-" and (minutes or not hours)) or hours > 23 or minutes > 59:
        return None
    delta = datetime.timedelta(hours=hours, minutes=minutes)
    return when - delta if sign == "+" else when + delta


def _utc(*fields: str) -> datetime.datetime | None:
    year, month, day, hour, minute, second = (int(f) for f in fields)
    try:
        return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:
        return None


def x509_time(when: datetime.datetime) -> str:
    """``when`` as ``YYYYMMDDHHMMSSZ`` (UTC), the form CCF's own tooling writes for ``valid_from``."""
    return when.astimezone(datetime.UTC).strftime("%Y%m%d%H%M%SZ")


# --- building the workflows' proposals ----------------------------------------------------------------------------


def proposal(*actions: dict[str, Any]) -> dict[str, Any]:
    """``{"actions": [...]}``."""
    return {"actions": list(actions)}


def set_member(
    cert: str,
    *,
    encryption_pub_key: str | None = None,
    member_data: Any = None,
    recovery_role: str | None = None,
) -> dict[str, Any]:
    """Add a member (it is then ``Accepted`` until it activates): its certificate, and for a recovery member its RSA
    encryption key; ``member_data`` is free JSON; ``recovery_role`` one of ``RECOVERY_ROLES``."""
    args: dict[str, Any] = {"cert": cert}
    if encryption_pub_key is not None:
        args["encryption_pub_key"] = encryption_pub_key
    if member_data is not None:
        args["member_data"] = member_data
    if recovery_role is not None:
        args["recovery_role"] = recovery_role
    return {"name": SET_MEMBER, "args": args}


def remove_member(member_id: str) -> dict[str, Any]:
    return {"name": REMOVE_MEMBER, "args": {"member_id": member_id}}


def trust_node(node_id: str, valid_from: str, validity_period_days: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"node_id": node_id, "valid_from": valid_from}
    if validity_period_days is not None:
        args["validity_period_days"] = validity_period_days
    return {"name": TRUST_NODE, "args": args}


def remove_node(node_id: str) -> dict[str, Any]:
    return {"name": REMOVE_NODE, "args": {"node_id": node_id}}


def open_service(next_identity: str, previous_identity: str | None = None) -> dict[str, Any]:
    """``transition_service_to_open``: ``next_identity`` (and, opening a recovered service, ``previous_identity``)
    as the PEM text the service reports."""
    args: dict[str, Any] = {}
    if previous_identity is not None:
        args["previous_service_identity"] = previous_identity
    args["next_service_identity"] = next_identity
    return {"name": OPEN_SERVICE, "args": args}


def refresh_shares() -> dict[str, Any]:
    """``trigger_recovery_shares_refresh``: no ``args`` at all (CCF refuses even ``{}``)."""
    return {"name": REFRESH_SHARES}


def fingerprint(pem: str) -> str | None:
    """The SHA-256 fingerprint of a PEM certificate (lowercase hex), or None when it is not one."""
    der = certificate_der(pem)
    return der_sha256(der) if der is not None else None


def member_id_of(pem: str, field: str = "cert") -> str:
    """CCF's member id of a PEM certificate; ``InvalidRequestError`` naming ``field`` when it is not one."""
    der = certificate_der(pem)
    if der is None or "-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidRequestError(f"{field}: not a PEM X.509 certificate")
    return der_sha256(der)
