"""The ``signing-agent`` command line: the daemon (``serve``), its checks, and thin clients of the socket API.

Client commands find the socket through ``--socket``, then ``$SIGNING_AGENT_SOCK``, then the config's
``agent.socket`` (``--config`` or ``$SIGNING_AGENT_CONFIG``), then ``/run/signing-agent/agent.sock``. Errors print
their diagnostics and exit with the code ``cli_exit`` documents (the table is in ``--help``); a traceback only with
``-v``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signing_agent import __version__, policy
from signing_agent.cli_exit import EXIT_CODES_HELP, Exit, report
from signing_agent.client import AgentClient, AgentRequestError, AgentUnreachableError, default_socket
from signing_agent.config import AgentConfig, load_config
from signing_agent.cose.governance import MsgType
from signing_agent.errors import AgentError, ConfigError, InvalidRequestError
from signing_agent.log import setup_logging

if TYPE_CHECKING:
    from signing_agent.preflight import Check

CONFIG_ENV = "SIGNING_AGENT_CONFIG"
EXIT_OK, EXIT_ERROR = Exit.OK, Exit.ERROR

_logger = logging.getLogger("signing_agent.cli")


def _config_path(args: argparse.Namespace, *, required: bool) -> Path | None:
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if path is None and required:
        raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    return Path(path) if path else None


def _client(args: argparse.Namespace) -> AgentClient:
    if args.socket:
        return AgentClient(args.socket)
    if os.environ.get("SIGNING_AGENT_SOCK"):
        return AgentClient(default_socket())
    path = _config_path(args, required=False)
    return AgentClient(default_socket(load_config(path).agent.socket if path else None))


def parse_created_at(value: str) -> int:
    """ISO 8601 (no offset means UTC, unlike ccf_cose_sign1) or integer seconds since the epoch."""
    if value.isdigit():
        return int(value)
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"created_at: {value!r} is neither ISO 8601 nor integer seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


def _read_content(path: str | None) -> bytes:
    if path is None:
        return b""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"--content: cannot read {path}: {exc.strerror}") from None


def _member_id_of_cert_file(path: str) -> str:
    from signing_agent.certs import member_id, read_certificate

    return member_id(read_certificate(Path(path), "--signing-cert", error=InvalidRequestError))


def resolve_identity(client: AgentClient, identity: str | None, signing_cert: str | None) -> str:
    """The identity named, or the one whose certificate is given, or the only one the agent has."""
    if identity is not None:
        return identity
    idents = client.identities()
    if signing_cert is not None:
        mid = _member_id_of_cert_file(signing_cert)
        for ident in idents:
            if ident["member_id"] == mid:
                return str(ident["name"])
        raise InvalidRequestError(f"--signing-cert: the agent has no identity with member id {mid}")
    if len(idents) == 1:
        return str(idents[0]["name"])
    names = ", ".join(i["name"] for i in idents) or "none"
    raise InvalidRequestError(f"the agent has several identities ({names}): pick one with --identity")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- commands ------------------------------------------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    print(f"signing-agent {__version__}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from signing_agent.daemon import harden_process, serve

    path = _config_path(args, required=True)
    assert path is not None  # noqa: S101 -- required=True
    config = load_config(path)
    setup_logging(args.log_level or config.agent.log_level)
    harden_process()
    if sys.stdin.isatty() and not args.foreground:
        _logger.warning("serving in the foreground of a terminal; pass --foreground to silence this")

    def ready(sock: Path) -> None:
        if args.ready_file:
            Path(args.ready_file).write_text(str(sock))

    asyncio.run(serve(config, on_ready=ready, allow_degraded=args.allow_degraded))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Prove the configuration as ``serve`` would use it, beside a running agent if there is one: the socket (path
    length, folder, a bind), the audit log (folder, file, lock: never taken from a running agent, never written),
    every identity opened and self-tested by ``daemon.open_generation`` (certificate validity, probe signature, an
    encryption key's round trip), and each service's presented identity over pinned TLS. Prints each check (``--json``:
    one document) and exits 1 when any failed."""
    from signing_agent.audit import DryRunAuditSink
    from signing_agent.daemon import open_generation, open_resources
    from signing_agent.metrics import Metrics
    from signing_agent.preflight import Check, check_audit, check_services, check_socket, identity_checks

    path = _config_path(args, required=True)
    assert path is not None  # noqa: S101 -- required=True
    config = load_config(path)
    setup_logging("critical")  # each failure is printed below, once

    async def check(config: AgentConfig) -> list[Check]:
        checks: list[Check] = []
        try:
            async with (
                open_resources(config, DryRunAuditSink(), metrics=Metrics()) as resources,
                open_generation(config, resources, allow_degraded=True) as gen,
            ):
                checks += identity_checks(gen.service.identities, gen.failed)
                checks += await check_services(
                    gen.governance.ccf, require_reachable=args.require_services, ask_claimed=True
                )
        except AgentError as exc:
            checks.append(Check.failed("configuration", exc))
        return checks

    checks = [*asyncio.run(check(config)), check_socket(config.agent), check_audit(config.audit)]
    failed = sorted({c.name for c in checks if c.status == "fail"})
    if args.json:
        worst = "fail" if failed else "warn" if any(c.status == "warn" for c in checks) else "ok"
        _print_json({"config": str(path), "status": worst, "checks": [c.as_dict() for c in checks]})
    else:
        _print_checks(checks)
    if failed:
        print(
            f"signing-agent: configuration {path}: {len(failed)} check(s) failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if not args.json:
        warned = sum(c.status == "warn" for c in checks)
        print(
            f"configuration {path} is valid: {len(config.identities)} identities, socket {config.agent.socket}"
            + (f"; {warned} warning(s)" if warned else "")
        )
    return EXIT_OK


def _print_checks(checks: Sequence[Check]) -> None:
    """``check-config``'s lines: ``ok``, ``warn`` or ``FAIL``, the check's name and message, then its hint."""
    for check in checks:
        print(f"{'FAIL' if check.status == 'fail' else check.status:<6}{check.name}: {check.message}")
        if check.hint:
            print(f"      hint: {check.hint}")


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the agent is healthy (``--live``: when it answers at all), 1 when it is not, 3 when no agent
    answers and 6 when it does not answer within ``--timeout``: for probes."""
    client = _client(args)
    client.timeout = args.timeout
    report = client.health()
    if args.json:
        _print_json(report)
    else:
        print(f"{report.get('status')} (signing-agent {report.get('version')}, generation {report.get('generation')})")
        audit = report.get("audit")
        if isinstance(audit, dict):
            print(f"  {audit.get('status'):<11} audit log" + (f": {audit['error']}" if audit.get("error") else ""))
        for check in [*report.get("identities", []), *report.get("services", [])]:
            line = f"  {check.get('status'):<11} {check.get('name')}"
            if check.get("error"):
                line += f": {check['error']}"
            if check.get("members"):
                line += "  members: " + ", ".join(f"{k}={v}" for k, v in sorted(check["members"].items()))
            print(line)
    if args.live:
        return EXIT_OK
    return EXIT_OK if report.get("status") == "ok" else EXIT_ERROR


def cmd_identities(args: argparse.Namespace) -> int:
    idents = _client(args).identities()
    if args.json:
        _print_json(idents)
        return EXIT_OK
    for ident in idents:
        print(f"{ident['name']}\t{ident['member_id']}\t{ident['algorithm']}\t{ident['backend']}\t{ident['key']}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    if args.signing_key is not None:
        raise InvalidRequestError(
            "--signing-key: signing-agent never reads private keys; drop --signing-key "
            "(the agent signs with the identity's key store)"
        )
    msg_type = MsgType.parse(args.msg_type)
    client = _client(args)
    identity = resolve_identity(client, args.identity, args.signing_cert)
    if args.explain:
        explanation = client.explain(
            identity,
            msg_type,
            _read_content(args.content),
            created_at=parse_created_at(args.created_at) if args.created_at else None,
            proposal_id=args.proposal_id,
            service=args.service,
        )
        _print_json(explanation)
        return EXIT_OK if explanation["decision"]["allowed"] else EXIT_ERROR
    cose = client.sign(
        identity,
        msg_type,
        _read_content(args.content),
        created_at=parse_created_at(args.created_at) if args.created_at else None,
        proposal_id=args.proposal_id,
    )
    if args.out:
        Path(args.out).write_bytes(cose)
    else:
        sys.stdout.buffer.write(cose)
        sys.stdout.buffer.flush()
    return EXIT_OK


# -- parser --------------------------------------------------------------------------------------------------------


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="the agent's socket (default: $SIGNING_AGENT_SOCK, then the config's)")
    p.add_argument("--config", help=f"config file, to find the socket (default: ${CONFIG_ENV})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signing-agent",
        description="Sign CCF governance messages with keys that never leave an HSM or Key Vault.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("serve", help="run the agent daemon")
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--foreground", action="store_true", help="you mean to run it in a terminal")
    p.add_argument("--ready-file", help="write the socket path to this file once listening")
    p.add_argument(
        "--allow-degraded",
        action="store_true",
        help="start even if an identity fails its self-test (it is left out and health reports 'degraded')",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check-config",
        help="prove the config: socket, audit log, every key self-tested, each service's identity over pinned TLS",
    )
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument(
        "--require-services",
        action="store_true",
        help="fail (not warn) when a service cannot be reached",
    )
    p.add_argument("--json", action="store_true", help="one JSON document: {config, status, checks: [...]}")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("health", help="the agent's health; exit 0 only when healthy (for probes)")
    _add_client_options(p)
    p.add_argument("--live", action="store_true", help="exit 0 whenever the agent answers (liveness)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default: 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("identities", help="list the agent's identities")
    _add_client_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_identities)

    p = sub.add_parser(
        "sign",
        help="sign a governance message and write the COSE_Sign1 to stdout (ccf_cose_sign1's flags)",
        description="A drop-in for ccf_cose_sign1: same flags, minus --signing-key. "
        "ISO 8601 times without an offset are UTC.",
    )
    _add_client_options(p)
    p.add_argument("--identity", help="the identity to sign with")
    p.add_argument("--signing-cert", help="pick the identity whose certificate this is")
    p.add_argument("--signing-key", help=argparse.SUPPRESS)
    p.add_argument(
        "--ccf-gov-msg-type",
        dest="msg_type",
        required=True,
        choices=[m.value for m in MsgType],
        help="message type",
    )
    p.add_argument("--ccf-gov-msg-proposal_id", "--ccf-gov-msg-proposal-id", dest="proposal_id")
    p.add_argument(
        "--ccf-gov-msg-created_at",
        "--ccf-gov-msg-created-at",
        dest="created_at",
        help="ISO 8601 (no offset = UTC) or seconds since the epoch; default: now",
    )
    p.add_argument("--content", help="payload file, or - for stdin (default: empty)")
    p.add_argument("--out", help="write the COSE_Sign1 here instead of stdout")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print what would be signed and the policy decision as JSON; sign nothing (exit 1 when denied)",
    )
    p.add_argument("--service", help="with --explain: decide as if submitting to this service")
    p.set_defaults(func=cmd_sign)

    register_governance(sub)
    register_recovery(sub)
    register_audit(sub)
    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    """Command groups that live in their own modules."""
    try:
        from signing_agent import cli_keys
    except ImportError:  # pragma: no cover -- the module ships with the package
        pass
    else:
        cli_keys.register(sub)
    from signing_agent import cli_workflows

    cli_workflows.register(sub, _client)

    # Listed for --help only: main() hands "sandbox ..." to the sandbox's own parser.
    sub.add_parser("sandbox", help="run the local CCF governance sandbox (a test double of CCF's /gov API)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        # The sandbox has its own parser; argparse.REMAINDER cannot pass leading options through.
        from signing_agent.sandbox.__main__ import main as sandbox_main

        return sandbox_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except (AgentError, AgentRequestError, AgentUnreachableError) as exc:
        return report(exc, verbose=args.verbose)


# -- governance with a CCF service ---------------------------------------------------------------------------------

# The canonical ballots live with the policy, whose "accept"/"reject" ballot aliases are their hashes.
ACCEPT_BALLOT = policy.ACCEPT_BALLOT
REJECT_BALLOT = policy.REJECT_BALLOT


def _pick_service(client: AgentClient, service: str | None) -> str:
    if service is not None:
        return service
    services = [s["name"] for s in client.call("GET", "/v1/services").json()["services"]]
    if len(services) == 1:
        return str(services[0])
    if "default" in services:
        return "default"
    raise InvalidRequestError(f"the agent knows several services ({', '.join(services) or 'none'}): pick --service")


def _gov_context(args: argparse.Namespace, *, identity: bool = True) -> tuple[AgentClient, str, str]:
    client = _client(args)
    service = _pick_service(client, args.service)
    ident = resolve_identity(client, args.identity, None) if identity else ""
    return client, service, ident


def _describe_proposal(p: dict[str, Any]) -> str:
    ballots = p.get("ballotCount", 0)
    text = f"proposal {p.get('proposalId')} is {p.get('proposalState')} ({ballots} ballot{'s' if ballots != 1 else ''})"
    if p.get("failure"):
        text += f": {p['failure'].get('reason')}"
    return text


def _tx(resp_headers: dict[str, str]) -> str:
    tx = resp_headers.get("x-ms-ccf-transaction-id")
    return f" [tx {tx}]" if tx else ""


def cmd_propose(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    payload = _read_content(args.file)
    resp = client.call(
        "POST",
        f"/v1/services/{service}/proposals",
        {"identity": identity, "proposal_base64": base64.b64encode(payload).decode("ascii")},
    )
    body = resp.json()
    if args.json:
        _print_json(body)
    else:
        print(_describe_proposal(body) + _tx(resp.headers))
    return EXIT_OK


def cmd_vote(args: argparse.Namespace) -> int:
    if args.ballot is not None:
        ballot = _read_content(args.ballot).decode("utf-8")
    else:
        ballot = REJECT_BALLOT if args.reject else ACCEPT_BALLOT
    client, service, identity = _gov_context(args)
    resp = client.call(
        "POST", f"/v1/services/{service}/proposals/{args.proposal_id}/ballots", {"identity": identity, "ballot": ballot}
    )
    body = resp.json()
    if args.json:
        _print_json(body)
    else:
        print(f"ballot submitted by {identity}: " + _describe_proposal(body) + _tx(resp.headers))
    return EXIT_OK


def cmd_withdraw(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    resp = client.call("POST", f"/v1/services/{service}/proposals/{args.proposal_id}/withdraw", {"identity": identity})
    body = resp.json() if resp.status != 204 else None
    if args.json:
        _print_json(body)
    elif body is None:
        print(f"proposal {args.proposal_id} does not exist: nothing to withdraw")
    else:
        print(_describe_proposal(body) + _tx(resp.headers))
    return EXIT_OK


def cmd_activate(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    resp = client.call("POST", f"/v1/services/{service}/members/{identity}/activate")
    body = resp.json()
    if args.json:
        _print_json(body)
    else:
        print(f"member {identity} ({body['memberId']}) is {body['status']}{_tx(resp.headers)}")
    return EXIT_OK


def cmd_proposals(args: argparse.Namespace) -> int:
    if args.pending:
        from signing_agent import cli_workflows

        if args.proposal_id:
            raise InvalidRequestError("--pending lists proposals: give no proposal id with it")
        return cli_workflows.cmd_pending(args, _client(args))
    client, service, _ = _gov_context(args, identity=False)
    if args.proposal_id:
        body = client.call("GET", f"/v1/services/{service}/proposals/{args.proposal_id}").json()
        if args.json:
            _print_json(body)
            return EXIT_OK
        print(_describe_proposal(body))
        print(f"  proposer: {body.get('proposerId')}")
        print("  actions:")
        for action in body.get("actions") or []:
            print(f"    - {json.dumps(action, sort_keys=True)}")
        for member, ballot in (body.get("ballots") or {}).items():
            print(f"  ballot from {member}: {ballot}")
        return EXIT_OK
    body = client.call("GET", f"/v1/services/{service}/proposals").json()
    if args.json:
        _print_json(body)
        return EXIT_OK
    proposals = body.get("value", [])
    if not proposals:
        print("no proposals")
    for p in proposals:
        print(
            f"{p.get('proposalId')}  {p.get('proposalState'):<9}  ballots={p.get('ballotCount')}  "
            f"proposer={str(p.get('proposerId'))[:16]}"
        )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    client, service, _ = _gov_context(args, identity=False)
    body = client.call("GET", f"/v1/services/{service}/status").json()
    if args.json:
        _print_json(body)
        return EXIT_OK
    print(f"service {service} ({body.get('url')}): {body.get('status')}, recovery count {body.get('recoveryCount')}")
    for ident in body.get("identities", []):
        print(f"  {ident['name']}: member {ident['memberId'][:16]}… {ident['status']}")
    return EXIT_OK


def register_governance(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, *, identity: bool = True) -> None:
        _add_client_options(p)
        p.add_argument("--service", help="the configured service (default: the only one, or 'default')")
        if identity:
            p.add_argument("--identity", help="the identity to act as (default: the only one)")
        p.add_argument("--json", action="store_true", help="print CCF's JSON answer")

    p = sub.add_parser("propose", help="sign a proposal and submit it to CCF")
    p.add_argument("file", help='proposal JSON ({"actions": [...]}), or - for stdin')
    common(p)
    p.set_defaults(func=cmd_propose)

    p = sub.add_parser("vote", help="sign a ballot for an Open proposal and submit it")
    p.add_argument("proposal_id")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--accept", action="store_true", help="the canonical accepting ballot")
    choice.add_argument("--reject", action="store_true", help="the canonical rejecting ballot")
    choice.add_argument("--ballot", help="a ballot JavaScript module file")
    common(p)
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser("withdraw", help="withdraw one of your proposals")
    p.add_argument("proposal_id")
    common(p)
    p.set_defaults(func=cmd_withdraw)

    p = sub.add_parser("activate", help="activate an Accepted member (state digest update, then ack)")
    common(p)
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("proposals", help="list proposals, or show one with its actions and ballots")
    p.add_argument("proposal_id", nargs="?")
    p.add_argument(
        "--pending", action="store_true", help="the Open proposals --identity has not voted on yet, with their actions"
    )
    for flag in ("--dry-run", "--wait"):  # taken by every workflow command; a read signs and waits for nothing
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=cmd_proposals)

    p = sub.add_parser("status", help="the service's status and the member status of each identity")
    common(p, identity=False)
    p.set_defaults(func=cmd_status)


# -- recovery shares -----------------------------------------------------------------------------------------------


def cmd_recovery_submit(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    resp = client.call("POST", f"/v1/services/{service}/recovery/{identity}/share")
    body = resp.json()
    if args.json:
        _print_json(body)
        return EXIT_OK
    message = str(body.get("message", "")).replace("\n", "; ")
    print(
        f"recovery share of {identity} submitted to {service}: {message} "
        f"({body.get('submittedCount')}/{body.get('recoveryThreshold')}){_tx(resp.headers)}"
    )
    return EXIT_OK


def cmd_recovery_approve(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    resp = client.call(
        "POST",
        f"/v1/services/{service}/recovery/approve-identity",
        {"identity": identity, "proposal_id": args.proposal_id, "sha256": args.sha256},
    )
    body = resp.json()
    if args.json:
        _print_json(body)
        return EXIT_OK
    ballot = body.get("ballot") if isinstance(body.get("ballot"), dict) else {}
    print(
        f"service identity {body.get('certificate_sha256')} approved for recovery shares on {service} by "
        f"{identity}'s accepting ballot: " + _describe_proposal(ballot) + _tx(resp.headers)
    )
    return EXIT_OK


def cmd_recovery_status(args: argparse.Namespace) -> int:
    client = _client(args)
    body = client.call("GET", "/v1/recovery").json()
    if args.json:
        _print_json(body)
        return EXIT_OK
    watchers = body.get("watchers", [])
    if not body.get("enabled"):
        print("unattended recovery is off ([recovery] enabled = false)")
    for w in watchers:
        line = f"{w['service']}/{w['identity']}: {w['state']}"
        if w.get("service_status"):
            line += f" (service {w['service_status']})"
        last = w.get("last_submission")
        if last:
            line += f"; share submitted for recovery {last.get('recoveryCount')} at {last.get('submittedAt')}"
        if w.get("last_error"):
            line += f"; error: {w['last_error']}"
        print(line)
    return EXIT_OK


def register_recovery(sub: Any) -> None:
    p = sub.add_parser(
        "recovery",
        help="recovery shares: submit on request, approve a recovered service's identity, see the watchers",
    )
    rec_sub = p.add_subparsers(dest="recovery_command", required=True, metavar="COMMAND")
    s = rec_sub.add_parser(
        "submit-share",
        help="fetch, decrypt (in the key store), sign and submit an identity's recovery share",
    )
    _add_client_options(s)
    s.add_argument("--service", help="the configured service (default: the only one, or 'default')")
    s.add_argument("--identity", help="the identity whose share to submit (default: the only one)")
    s.add_argument("--json", action="store_true", help="print CCF's JSON answer")
    s.set_defaults(func=cmd_recovery_submit)
    a = rec_sub.add_parser(
        "approve-identity",
        help="after a disaster (accept_transition_to): vote accept on the transition_service_to_open proposal and "
        "approve the new service identity for recovery shares",
    )
    _add_client_options(a)
    a.add_argument("proposal_id", help="the transition_service_to_open proposal")
    a.add_argument(
        "--sha256",
        required=True,
        help="the new service certificate's SHA-256 fingerprint, as announced out of band (never copy it from the "
        "service itself)",
    )
    a.add_argument("--service", help="the configured service (default: the only one, or 'default')")
    a.add_argument("--identity", help="the identity that votes (default: the only one)")
    a.add_argument("--json", action="store_true", help="print the agent's JSON answer")
    a.set_defaults(func=cmd_recovery_approve)
    from signing_agent import cli_workflows

    cli_workflows.register_recovery(rec_sub, _client)
    st = rec_sub.add_parser("status", help="the state of each recovery watcher")
    _add_client_options(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_recovery_status)


# -- audit log -----------------------------------------------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from signing_agent.audit import chain_order, verify_audit

    report = verify_audit(chain_order([Path(f) for f in args.files]))
    if args.json:
        _print_json(report.as_dict())
    else:
        for note in report.notes:
            print(f"note: {note}")
        if report.ok:
            print(f"ok: {report.records} records in {len(report.files)} file(s); last hash {report.last_hash}")
        else:
            print(f"BROKEN after {report.records} good records: {report.first_break}")
    return EXIT_OK if report.ok else EXIT_ERROR


def register_audit(sub: Any) -> None:
    p = sub.add_parser("audit", help="work with the hash-chained audit log")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    v = audit_sub.add_parser(
        "verify",
        help="check the hash chain and report the first break",
        description="Give the rotated files and the current one in any order (e.g. audit.jsonl*): they are checked "
        "in chain order, oldest first.",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_verify)
