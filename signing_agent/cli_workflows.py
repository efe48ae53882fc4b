"""The consortium's workflows on the command line: ``members``, ``nodes``, ``member add|remove``, ``node
trust|retire``, ``service open|identity``, ``recovery accept|refresh-shares`` and ``proposals --pending``.

Thin clients of the socket routes of ``signing_agent.api.workflow_routes`` (where every check runs, for tools as for
this CLI): they read the files named on the command line, send their text, and print the answer. A proposal command
prints the proposal id on its own line first (``--json``: the agent's JSON only); ``--dry-run`` prints the proposal
and the policy's decision (nothing is signed or sent; exit 1 when the policy refuses); ``--wait`` polls the proposal
until it leaves Open and exits 0 only when it is Accepted.

Imports the standard library, ``client``, ``cli_exit`` and ``errors`` only, as the other client commands: they must
start fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

from signing_agent.cli_exit import Exit
from signing_agent.cli_input import read_input_text
from signing_agent.client import AgentClient, AgentNoAnswerError, AgentUnreachableError
from signing_agent.client_config import IDENTITY_ENV, SERVICE_ENV, client_settings
from signing_agent.errors import InvalidRequestError

TYPE_CHECKING = False  # not typing's: the client commands must not import typing (startup time)
if TYPE_CHECKING:
    from typing import Any

WAIT_INTERVAL = 1.0

Command = Callable[[argparse.Namespace], int]


class Context:
    """What every workflow command needs: the agent, the service, and (when asked for) the identity. Defaults are the
    client's, as for every other command: the flag, ``$SIGNING_AGENT_*``, ``[client]``, else the agent's only one."""

    def __init__(self, args: argparse.Namespace, client: AgentClient) -> None:
        self.args = args
        self.client = client
        self._settings = client_settings(
            config=getattr(args, "config", None), identity=args.identity, service=args.service
        )
        self.service = client.pick_service(self._settings.service)

    @property
    def identity(self) -> str:
        return self.client.resolve_identity(self._settings.identity)

    def base(self) -> str:
        return f"/v1/services/{self.service}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _tx(headers: dict[str, str]) -> str:
    tx = headers.get("x-ms-ccf-transaction-id")
    return f" [tx {tx}]" if tx else ""


# -- reads ---------------------------------------------------------------------------------------------------------


def _data(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if value is not None else "-"


def _member_row(m: dict[str, Any]) -> str:
    ours = f"  (identity {m['identity']})" if m.get("identity") else ""
    role = m.get("recoveryRole") or "-"
    return f"{m.get('memberId')}  {m.get('status', '?'):<8}  {role:<14}  {_data(m.get('memberData'))}{ours}"


def _node_row(n: dict[str, Any]) -> str:
    return f"{n.get('nodeId')}  {n.get('status', '?'):<8}  {_data(n.get('nodeData'))}"


def _listing(what: str, row: Callable[[dict[str, Any]], str]) -> Callable[[argparse.Namespace, AgentClient], int]:
    """A read of ``GET /v1/services/{svc}/{what}``: a line per entry, or the JSON."""

    def command(args: argparse.Namespace, client: AgentClient) -> int:
        body = client.call("GET", f"{Context(args, client).base()}/{what}").json()
        if args.json:
            _print_json(body)
        for entry in [] if args.json else body.get("value", []):
            print(row(entry))
        return Exit.OK

    return command


cmd_members = _listing("members", _member_row)
cmd_nodes = _listing("nodes", _node_row)


def cmd_service_identity(args: argparse.Namespace, client: AgentClient) -> int:
    ctx = Context(args, client)
    body = client.call("GET", f"{ctx.base()}/identity").json()
    pem = _presented_certificate(client, body)
    if args.save:
        _save(Path(args.save), pem)
    if args.json:
        _print_json(body)
        return Exit.OK
    trust = {
        "pinned": "trusted: pinned",
        "listed": "trusted: listed in accepted_service_certificates",
        "provisional": "trusted provisionally (reads and ballots only), after a recovery",
        "untrusted": "NOT trusted by this agent",
    }.get(body["trust"], body["trust"])
    print(f"service {ctx.service} presents identity sha256 {body['sha256']}")
    print(f"  {trust}; the agent pins sha256 {body['pinned_sha256']}")
    if args.save:
        print(f"  saved to {args.save} (compare the fingerprint out of band before you trust it)")
    return Exit.OK


def _presented_certificate(client: AgentClient, body: Any) -> str:
    """The certificate of a ``service identity`` answer, as plain PEM, once it is known to be exactly one certificate
    whose SHA-256 is the ``sha256`` the answer states: the fingerprint printed (and compared out of band) must be that
    of what is saved, and pinned. Whatever answers on the socket could otherwise show the announced fingerprint and
    have another certificate saved, or the announced one followed by its own CA (only the first certificate of a PEM
    is fingerprinted, and every one in a pinned file is a trust anchor)."""
    from signing_agent.certs import single_certificate_pem
    from signing_agent.proposals import fingerprint

    text = body.get("certificate") if isinstance(body, dict) else None
    pem = single_certificate_pem(text.encode()) if isinstance(text, str) else None
    if pem is None:
        raise AgentUnreachableError(
            f"the agent on {client.socket_path} answered a certificate that is not exactly one PEM certificate; "
            "nothing saved (is that socket really the agent's?)"
        )
    computed = fingerprint(pem.decode())
    if computed != body.get("sha256"):
        said = str(body.get("sha256"))[:80]
        raise AgentUnreachableError(
            f"the agent on {client.socket_path} answered sha256 {said} for a certificate whose SHA-256 is "
            f"{computed}; nothing saved (is that socket really the agent's?)"
        )
    return pem.decode()


def _save(path: Path, pem: str) -> None:
    """Write ``pem`` to a new file, never through a symbolic link; an existing file only when it already holds exactly
    that. A link planted at the path (in a folder others may write) would have had the certificate written wherever
    it points."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        if _holds(path, pem):
            return
        raise InvalidRequestError(
            f"--save: {path} exists with other content (or is a link); refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise InvalidRequestError(f"--save: cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(pem)


def _holds(path: Path, pem: str) -> bool:
    """Whether ``path`` is a regular file (not a link) holding exactly ``pem``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        data = f.read(len(pem.encode()) + 1) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None
    return data == pem.encode()


def cmd_pending(args: argparse.Namespace, client: AgentClient) -> int:
    ctx = Context(args, client)
    identity = ctx.identity
    body = client.call("GET", f"{ctx.base()}/identities/{identity}/pending").json()
    if args.json:
        _print_json(body)
        return Exit.OK
    pending = body.get("value", [])
    if not pending:
        print(f"no Open proposal waits for a ballot from {identity}")
    for p in pending:
        print(p.get("proposalId"))
        print(f"  proposer {p.get('proposerId')}, {p.get('ballotCount', 0)} ballot(s) so far")
        for action in p.get("actions") or []:
            print(f"  - {json.dumps(_shortened(action), sort_keys=True)}")
    return Exit.OK


def _shortened(value: Any) -> Any:
    """For reading: a PEM in an action shown by its kind and length, a certificate (or each one of a bundle) by its
    SHA-256, which a reviewer compares with the fingerprint announced out of band (``--json`` shows it whole)."""
    if isinstance(value, dict):
        return {k: _shortened(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shortened(v) for v in value]
    if isinstance(value, str) and value.startswith("-----BEGIN "):
        kind = value[len("-----BEGIN ") :].split("-----", 1)[0]
        return _certificates(value) if kind == "CERTIFICATE" else f"<{kind} PEM, {len(value)} characters>"
    return value


def _certificates(pem: str) -> str:
    from signing_agent.certs import bundle_ders, der_sha256

    ders = bundle_ders(pem)
    if ders is None:
        return f"<CERTIFICATE PEM that does not read as one, {len(pem)} characters>"
    fingerprints = ", ".join(der_sha256(der) for der in ders)
    return (
        f"<CERTIFICATE PEM sha256 {fingerprints}>"
        if len(ders) == 1
        else f"<CERTIFICATE PEM bundle, sha256 {fingerprints}>"
    )


# -- proposals -----------------------------------------------------------------------------------------------------


def _propose(args: argparse.Namespace, client: AgentClient, workflow: str, fields: dict[str, Any]) -> int:
    """Run ``workflow`` through the agent; print the proposal id first, then what happened."""
    ctx = Context(args, client)
    body = {"identity": ctx.identity, **{k: v for k, v in fields.items() if v is not None}}
    if args.dry_run:
        body["dry_run"] = True
    resp = client.call("POST", f"{ctx.base()}/workflows/{workflow}", body)
    answer = resp.json()
    if args.dry_run:
        return _print_dry_run(args, answer)
    pid = str(answer.get("proposalId"))
    if not args.json:
        print(pid, flush=True)  # on its own line, at once: a script (or --wait's caller) can take it
        _describe(answer, resp.headers)
    final = _wait(client, ctx.base(), pid, answer, args.timeout, quiet=args.json) if args.wait else answer
    if args.json:
        _print_json({**answer, **final})  # CCF's Proposal (its last state, with --wait) and the actions
    return Exit.OK if not args.wait or final.get("proposalState") == "Accepted" else Exit.ERROR


def _describe(answer: dict[str, Any], headers: dict[str, str]) -> None:
    ballots = answer.get("ballotCount", 0)
    print(f"  {answer.get('proposalState')} ({ballots} ballot{'s' if ballots != 1 else ''}){_tx(headers)}")
    for action in answer.get("actions") or []:
        print(f"  - {action.get('name')}")
    identities = answer.get("service_identity") or {}
    if identities.get("previous_sha256"):
        print(f"  previous service identity sha256 {identities['previous_sha256']}")
    if identities.get("next_sha256"):
        print(f"  next service identity sha256 {identities['next_sha256']}")
    if answer.get("failure"):
        print(f"  failure: {answer['failure'].get('reason')}")


def _print_dry_run(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    decision = answer["explanation"]["decision"]
    if args.json:
        _print_json(answer)
    else:
        print("dry run: nothing was signed or sent")
        print(json.dumps(answer["proposal"], indent=2))
        identities = answer.get("service_identity") or {}
        for which in ("previous", "next"):
            if identities.get(f"{which}_sha256"):
                print(f"{which} service identity sha256 {identities[f'{which}_sha256']}")
        verdict = "allowed" if decision["allowed"] else "DENIED"
        print(f"policy: {verdict} by rule {decision.get('rule')}: {decision.get('reason')}")
    return Exit.OK if decision["allowed"] else Exit.ERROR


def _wait(
    client: AgentClient, base: str, pid: str, answer: dict[str, Any], timeout: float, *, quiet: bool
) -> dict[str, Any]:
    """Poll the proposal (in CCF's list: one request a poll) until it leaves Open; its last state (printed unless
    ``quiet``)."""
    state = answer
    deadline = time.monotonic() + timeout
    while state.get("proposalState") == "Open":
        if time.monotonic() > deadline:
            raise AgentNoAnswerError(f"proposal {pid} is still Open after {timeout:g} s (--timeout)")
        time.sleep(WAIT_INTERVAL)
        listed = client.call("GET", f"{base}/proposals").json().get("value", [])
        found = next((p for p in listed if isinstance(p, dict) and p.get("proposalId") == pid), None)
        if found is None:
            if not quiet:
                print(f"  proposal {pid} is no longer listed (CCF drops a closed proposal when another one closes)")
            return {"proposalState": "Unknown"}
        state = found
    if not quiet:
        failure = f": {state['failure'].get('reason')}" if state.get("failure") else ""
        print(f"  {state.get('proposalState')}{failure}")
    return state


def cmd_member_add(args: argparse.Namespace, client: AgentClient) -> int:
    member_data = None
    if args.member_data is not None:
        try:
            member_data = json.loads(args.member_data)
        except ValueError as exc:
            raise InvalidRequestError(f"--member-data: not JSON: {exc}") from None
    fields = {
        "cert": read_input_text(args.cert, "--cert"),
        "encryption_pub_key": read_input_text(args.encryption_key, "--encryption-key") if args.encryption_key else None,
        "member_data": member_data,
        "recovery_role": args.recovery_role,
    }
    return _propose(args, client, "member-add", fields)


def cmd_member_remove(args: argparse.Namespace, client: AgentClient) -> int:
    cert = read_input_text(args.cert, "--cert") if args.cert else None
    return _propose(args, client, "member-remove", {"member_id": args.member_id, "cert": cert})


_CCF_TIME = re.compile(r"\d{12}(?:\d{2})?Z?")
"""CCF's own forms (``YYMMDDHHMMSSZ``, ``YYYYMMDDHHMMSSZ``): digits that ``fromisoformat`` misreads, taking the
ninth for the date-time separator (``20250101123456Z`` is 2025-01-01 23:45:00 to it)."""


def valid_from(text: str | None) -> str | None:
    """``--valid-from``: ISO 8601 (no offset means UTC) as ``YYYYMMDDHHMMSSZ``; CCF's own forms and other text are
    sent as written (the agent checks that CCF reads them as meant)."""
    if text is None or _CCF_TIME.fullmatch(text):
        return text
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return text
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC).strftime("%Y%m%d%H%M%SZ")


def cmd_node_trust(args: argparse.Namespace, client: AgentClient) -> int:
    fields = {"node_id": args.node_id, "valid_from": valid_from(args.valid_from), "validity_days": args.validity_days}
    return _propose(args, client, "node-trust", fields)


def cmd_node_retire(args: argparse.Namespace, client: AgentClient) -> int:
    return _propose(args, client, "node-retire", {"node_id": args.node_id})


def cmd_service_open(args: argparse.Namespace, client: AgentClient) -> int:
    return _propose(args, client, "service-open", {})


def cmd_recovery_accept(args: argparse.Namespace, client: AgentClient) -> int:
    fields = {
        "previous_service_identity": read_input_text(args.previous, "--previous") if args.previous else None,
        "next_service_identity": read_input_text(args.next, "--next") if args.next else None,
    }
    return _propose(args, client, "recovery-accept", fields)


def cmd_refresh_shares(args: argparse.Namespace, client: AgentClient) -> int:
    return _propose(args, client, "recovery-refresh-shares", {})


# -- parsers -------------------------------------------------------------------------------------------------------

ClientFactory = Callable[[argparse.Namespace], AgentClient]


def common_options(p: argparse.ArgumentParser, *, proposal: bool) -> None:
    """The options every workflow command takes."""
    p.add_argument("--socket", help="the agent's socket (default: $SIGNING_AGENT_SOCK, then the config's)")
    p.add_argument("--config", help="config file, to find the socket (default: $SIGNING_AGENT_CONFIG)")
    p.add_argument("--service", help=f"the configured service (default: ${SERVICE_ENV}, the only one, 'default')")
    p.add_argument(
        "--identity", help=f"the identity to act as, or its member id (default: ${IDENTITY_ENV}, the only one)"
    )
    p.add_argument("--json", action="store_true", help="print the agent's JSON answer")
    reads = "" if proposal else " (no effect on a read, which signs and waits for nothing)"
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"print the proposal and the policy's decision; sign nothing, send nothing{reads}",
    )
    p.add_argument(
        "--wait", action="store_true", help=f"poll the proposal until it leaves Open; exit 0 only if Accepted{reads}"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="with --wait: give up after this many seconds (default: 600)"
    )


def register(sub: Any, client: ClientFactory) -> None:
    """Add ``members``, ``nodes``, ``member``, ``node`` and ``service`` to the top-level subcommands."""

    def bind(command: Callable[[argparse.Namespace, AgentClient], int]) -> Command:
        return lambda args: command(args, client(args))

    p = sub.add_parser("members", help="the service's members (status, recovery role, data; which are ours)")
    common_options(p, proposal=False)
    p.set_defaults(func=bind(cmd_members))

    p = sub.add_parser("nodes", help="the service's nodes (Pending, Trusted, Retired) and their data")
    common_options(p, proposal=False)
    p.set_defaults(func=bind(cmd_nodes))

    member = sub.add_parser("member", help="propose to add or remove a member")
    member_sub = member.add_subparsers(dest="member_command", required=True, metavar="COMMAND")
    p = member_sub.add_parser("add", help="set_member: a new member (a recovery member with --encryption-key)")
    p.add_argument("--cert", required=True, metavar="FILE", help="the new member's certificate (PEM)")
    p.add_argument("--encryption-key", metavar="PUB.pem", help="its RSA encryption public key (PEM, >= 2048 bits)")
    p.add_argument("--member-data", metavar="JSON", help='free JSON kept with the member, e.g. \'{"name": "bob"}\'')
    p.add_argument("--recovery-role", choices=("NonParticipant", "Participant", "Owner"), help="needs --encryption-key")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_member_add))
    p = member_sub.add_parser("remove", help="remove_member, by member id or certificate")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--member-id", metavar="ID", help="the member id (64 hex)")
    which.add_argument("--cert", metavar="FILE", help="the member's certificate (PEM)")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_member_remove))

    node = sub.add_parser("node", help="propose to trust a joining node or retire one")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = node_sub.add_parser("trust", help="transition_node_to_trusted for a Pending node")
    p.add_argument("node_id", metavar="NODE_ID", help="the node id (64 hex; see `signing-agent nodes`)")
    p.add_argument("--valid-from", metavar="ISO8601", help="start of its certificate's validity (default: now)")
    p.add_argument("--validity-days", type=int, metavar="N", help="its certificate's validity (default: the maximum)")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_node_trust))
    p = node_sub.add_parser("retire", help="remove_node: retire a Trusted node (a Pending one is removed)")
    p.add_argument("node_id", metavar="NODE_ID")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_node_retire))

    service = sub.add_parser("service", help="open a new service; the identity a service presents")
    service_sub = service.add_subparsers(dest="service_command", required=True, metavar="COMMAND")
    p = service_sub.add_parser("open", help="transition_service_to_open of a new (Opening) service")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_service_open))
    p = service_sub.add_parser(
        "identity", help="the identity the service presents now, its SHA-256, and whether the agent trusts it"
    )
    p.add_argument("--save", metavar="FILE", help="write the certificate (PEM, as the service reports it) here")
    common_options(p, proposal=False)
    p.set_defaults(func=bind(cmd_service_identity))


def register_recovery(rec_sub: Any, client: ClientFactory) -> None:
    """Add ``accept`` and ``refresh-shares`` to ``signing-agent recovery``."""

    def bind(command: Callable[[argparse.Namespace, AgentClient], int]) -> Command:
        return lambda args: command(args, client(args))

    p = rec_sub.add_parser(
        "accept",
        help="transition_service_to_open of a recovered service, from the identity before the disaster to the one "
        "it presents; prints both fingerprints",
    )
    p.add_argument("--previous", metavar="FILE", help="the identity before the disaster (default: the pinned one)")
    p.add_argument("--next", metavar="FILE", help="the new identity (default: the one presented, if trusted)")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_recovery_accept))
    p = rec_sub.add_parser("refresh-shares", help="trigger_recovery_shares_refresh: new shares for recovery members")
    common_options(p, proposal=True)
    p.set_defaults(func=bind(cmd_refresh_shares))
