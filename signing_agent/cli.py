"""The ``signing-agent`` command line: the daemon (``serve``), its checks, and thin clients of the socket API.

Client commands (all but ``serve``, ``check-config``, ``keys`` and ``sandbox``) import the standard library and the
client library (``signing_agent.client``) only, so they start in a few tens of milliseconds: the daemon's modules
(config, policy, cose, asyncio, aiohttp, cryptography) are imported inside the commands that need them, never at
the top of this module. A unit test holds that line.

Client commands find the agent and their defaults as ``signing_agent.client_config`` says: ``--socket``,
``--identity``, ``--service`` and ``--timeout``, then ``$SIGNING_AGENT_SOCK``, ``$SIGNING_AGENT_IDENTITY`` and
``$SIGNING_AGENT_SERVICE``, then the config's ``[client]`` section (``--config``, ``$SIGNING_AGENT_CONFIG``, or
``~/.config/signing-agent/config.toml``) and its ``agent.socket``, then the default socket
(``$XDG_RUNTIME_DIR/signing-agent/agent.sock``, root's ``/run/signing-agent/agent.sock``). Errors print their
diagnostics and exit with the code ``cli_exit`` documents (the table is in ``--help``); a traceback only with
``-v``. Every command that prints takes ``--json``; times shown to a person are ISO 8601 UTC.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable

from signing_agent import __version__
from signing_agent.cli_exit import EXIT_CODES_HELP, Exit, report
from signing_agent.cli_input import read_input, read_input_text
from signing_agent.client import AgentClient, AgentRequestError, AgentUnreachableError, Proposal, WaitTimeoutError
from signing_agent.client.errors import UNREADABLE_ANSWER, unreadable_answer
from signing_agent.client.results import Health, HealthCheck, ReloadOutcome, iso_utc
from signing_agent.client_config import (
    CONFIG_ENV,
    IDENTITY_ENV,
    SERVICE_ENV,
    SOCKET_ENV,
    ClientSettings,
    client_settings,
)
from signing_agent.errors import AgentError, ConfigError, InvalidRequestError
from signing_agent.names import ACCEPT_BALLOT, LOG_LEVELS, MSG_TYPES, REJECT_BALLOT
from signing_agent.text import PrintableStream

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from typing import Any

    from signing_agent.config import AgentConfig
    from signing_agent.preflight import Check

EXIT_OK, EXIT_ERROR = Exit.OK, Exit.ERROR

ENVIRONMENT_HELP = f"""\
environment:
  {SOCKET_ENV}      the agent's socket (default: the config's, else $XDG_RUNTIME_DIR/signing-agent/agent.sock,
                          root's /run/signing-agent/agent.sock)
  {IDENTITY_ENV}  the identity to sign or act as (default: [client] identity, else the agent's only one)
  {SERVICE_ENV}   the CCF service (default: [client] service, else the only one, or 'default')
  {CONFIG_ENV}    the config file (client commands read its [client] section and agent.socket;
                          default: ~/.config/signing-agent/config.toml when it exists)
"""


def _config_path(args: argparse.Namespace, *, required: bool) -> Path | None:
    from pathlib import Path  # the daemon's commands only: client commands do without pathlib (3 ms)

    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if path is None and required:
        raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    return Path(path) if path else None


def _settings(args: argparse.Namespace) -> ClientSettings:
    return client_settings(
        socket=getattr(args, "socket", None),
        config=getattr(args, "config", None),
        identity=getattr(args, "identity", None),
        service=getattr(args, "service", None),
        timeout=getattr(args, "timeout", None),
    )


def _notice(waiting_for: str) -> None:
    """On a terminal, a call that takes more than a second says what it waits for."""
    print(f"signing-agent: waiting for {waiting_for}...", file=sys.stderr, flush=True)


def _client(args: argparse.Namespace, settings: ClientSettings | None = None) -> AgentClient:
    settings = settings or _settings(args)
    on_wait = _notice if sys.stderr.isatty() else None
    args.agent_socket = settings.socket  # the command talks to an agent: see _run
    return AgentClient(settings.socket, timeout=settings.timeout, on_wait=on_wait)


def parse_created_at(value: str) -> int:
    """ISO 8601 (no offset means UTC, unlike ccf_cose_sign1) or integer seconds since the epoch."""
    if value.isdigit():
        return int(value)
    import datetime

    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"created_at: {value!r} is neither ISO 8601 nor integer seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


def _read_content(path: str | None, what: str = "--content") -> bytes:
    return b"" if path is None else read_input(path, what)


def _member_id_of_cert_file(path: str) -> str:
    from signing_agent.certs import load_certificate, member_id

    data = read_input(path, "--signing-cert")
    return member_id(load_certificate(data, f"--signing-cert: {path}", error=InvalidRequestError))


def resolve_identity(client: AgentClient, identity: str | None, signing_cert: str | None) -> str:
    """The identity named (or whose member id, or a unique prefix of it, is given), or the one whose certificate
    is given, or the only one the agent has."""
    if signing_cert is not None and identity is None:
        mid = _member_id_of_cert_file(signing_cert)
        for ident in client.identities():
            if ident.member_id == mid:
                return ident.name
        raise InvalidRequestError(f"--signing-cert: the agent has no identity with member id {mid}")
    return client.resolve_identity(identity)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns under their headers, two spaces apart; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())


# -- commands ------------------------------------------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        import platform

        _print_json({"version": __version__, "python": platform.python_version(), "api": "v1"})
    else:
        print(f"signing-agent {__version__}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from signing_agent.config import load_config
    from signing_agent.daemon import serve
    from signing_agent.log import setup_logging
    from signing_agent.workers.hardening import harden_process

    path = _config_path(args, required=True)
    assert path is not None  # noqa: S101 -- required=True
    config = load_config(path)
    setup_logging(args.log_level or config.agent.log_level)
    harden_process()
    if sys.stdin.isatty() and not args.foreground:
        import logging

        logging.getLogger("signing_agent.cli").warning(
            "serving in the foreground of a terminal; pass --foreground to silence this"
        )

    def ready(sock: Path) -> None:
        """Write the socket path to ``--ready-file`` atomically: whoever waits for the file never reads it half
        written (a temporary file beside it, renamed over it). Its folder may be anyone's: the temporary file is
        never one another user could have put a link at (``files.replace_at``)."""
        if args.ready_file:
            from pathlib import Path

            from signing_agent.files import replace_at

            replace_at(Path(args.ready_file), str(sock).encode())

    asyncio.run(serve(config, on_ready=ready, allow_degraded=args.allow_degraded))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Prove the configuration as ``serve`` would use it, beside a running agent if there is one: the socket (path
    length, folder, a bind), the audit log (folder, file, lock: never taken from a running agent, never written),
    every identity opened and self-tested by ``daemon.open_generation`` (certificate validity, probe signature, an
    encryption key's round trip), and each service's presented identity over pinned TLS. Prints each check (``--json``:
    one document) and exits 1 when any failed."""
    import asyncio

    from signing_agent.audit import DryRunAuditSink
    from signing_agent.config import load_config
    from signing_agent.daemon import open_generation, open_resources
    from signing_agent.log import setup_logging
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
                checks += identity_checks(gen.signer.identities, gen.failed)
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


def _check_row(kind: str, check: HealthCheck) -> list[str]:
    """A line of the health table: what, its status, when it was checked (or since when it fails), and details."""
    details = check.details
    when = iso_utc(check.checked_at) or ""
    since = details.get("unavailable_since")
    if isinstance(since, int | float):
        when = f"since {iso_utc(since)}"
    notes = []
    if details.get("node_state"):
        notes.append(f"node {details['node_state']}")
    members = details.get("members")
    if isinstance(members, dict) and members:
        notes.append("members: " + ", ".join(f"{k}={v}" for k, v in sorted(members.items())))
    return [f"{kind} {check.name}".strip(), check.status, when, "; ".join(notes)]


def _reload_line(outcome: ReloadOutcome) -> str:
    at = iso_utc(outcome.at) or "?"
    if outcome.reloaded:
        return f"last reload: {at}, configuration generation {outcome.generation} serves"
    return f"last reload: {at}, REFUSED (generation {outcome.generation} still serves): {outcome.error}"


def _print_health(health: Health) -> None:
    print(f"{health.status} (signing-agent {health.version}, configuration generation {health.generation})")
    if health.last_reload is not None:
        print(_reload_line(health.last_reload))
    checks = [("", health.audit)]
    checks += [("identity", c) for c in health.identities]
    checks += [("service", c) for c in health.services]
    checks += [("pkcs11 token", c) for c in health.pkcs11_tokens]
    _table(["CHECK", "STATUS", "CHECKED", "DETAILS"], [_check_row(kind, c) for kind, c in checks])
    failing = [(kind, c) for kind, c in checks if c.error]
    if failing:
        print("problems:")
        for kind, c in failing:
            print(f"  {f'{kind} {c.name}'.strip()}: {c.error}")
    for c in health.identities:  # an expiring certificate, a key store's warning: not failures, still worth a line
        warnings = c.details.get("warnings")
        for warning in warnings if isinstance(warnings, list) else ():
            print(f"warning: identity {c.name}: {warning}")
    for c in health.services:
        members = c.details.get("members")
        for name, status in sorted(members.items() if isinstance(members, dict) else ()):
            if status == "Accepted":
                print(f"{name} is Accepted at {c.name}: run 'signing-agent activate --identity {name}'")


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the agent is healthy (``--live``: when it answers at all), 1 when it is not, 3 when no agent
    answers and 6 when it does not answer within ``--timeout``: for probes. ``--wait``: until it is (6 if not)."""
    client = _client(args)
    health = client.wait_for_agent(timeout=client.timeout, healthy=not args.live) if args.wait else client.health()
    if args.json:
        _print_json(health.raw)
    else:
        _print_health(health)
    if args.live:
        return EXIT_OK
    return EXIT_OK if health.ok else EXIT_ERROR


def cmd_identities(args: argparse.Namespace) -> int:
    idents = _client(args).identities()
    if args.json:
        _print_json([dict(i.as_dict(), warnings=list(i.warnings)) for i in idents])
        return EXIT_OK
    _table(
        ["NAME", "MEMBER ID", "ALGORITHM", "BACKEND", "KEY"],
        [[i.name, i.member_id, i.algorithm, i.backend, i.key] for i in idents],
    )
    for ident in idents:
        for warning in ident.warnings:
            print(f"warning: {ident.name}: {warning}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    if args.signing_key is not None:
        raise InvalidRequestError(
            "--signing-key: signing-agent never reads private keys; drop --signing-key "
            "(the agent signs with the identity's key store)"
        )
    if not args.explain and not args.json and not args.out and sys.stdout.isatty():
        raise InvalidRequestError(
            "refusing to write a binary COSE_Sign1 to a terminal",
            hint="use --out FILE, or pipe it (signing-agent sign ... | curl --data-binary @- ...)",
        )
    settings = _settings(args)
    client = _client(args, settings)
    # --signing-cert names the identity as --identity does: it beats $SIGNING_AGENT_IDENTITY and [client].
    named = args.identity if args.identity is not None or args.signing_cert is not None else settings.identity
    identity = resolve_identity(client, named, args.signing_cert)
    payload = _read_content(args.content)
    created_at = parse_created_at(args.created_at) if args.created_at else None
    if args.explain:
        explanation = client.explain(
            identity, args.msg_type, payload, created_at=created_at, proposal_id=args.proposal_id, service=args.service
        )
        _print_json(explanation.raw)
        return EXIT_OK if explanation.allowed else EXIT_ERROR
    signed = client.sign(identity, args.msg_type, payload, created_at=created_at, proposal_id=args.proposal_id)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(signed.cose)
    if args.json:
        import binascii

        _print_json(
            {
                "cose_base64": binascii.b2a_base64(signed.cose, newline=False).decode("ascii"),
                "cose_sha256": signed.cose_sha256,
                "created_at": signed.created_at,
                "identity": identity,
                "member_id": signed.member_id,
            }
        )
    elif not args.out:
        sys.stdout.buffer.write(signed.cose)
        sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the agent to reload its configuration; exit 2 when it refused the new one (and still serves the old)."""
    outcome = _client(args).reload()
    if args.json:
        _print_json(outcome.as_dict())
    elif outcome.reloaded:
        print(f"configuration reloaded: generation {outcome.generation} serves")
    else:
        print(
            f"signing-agent: the new configuration was refused; generation {outcome.generation} still serves: "
            f"{outcome.error}",
            file=sys.stderr,
        )
    return EXIT_OK if outcome.reloaded else Exit.USAGE


def cmd_completion(args: argparse.Namespace) -> int:
    from signing_agent.cli_completion import completion_script

    print(completion_script(args.shell, build_parser()), end="")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from signing_agent.cli_init import run_init

    return run_init(args)


# -- parser --------------------------------------------------------------------------------------------------------


@functools.cache
def _columns() -> int:
    """The terminal's width, as ``shutil.get_terminal_size`` finds it: argparse imports shutil (and with it bz2,
    lzma and more, 2.5 ms of every command) for nothing else."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, width if width is not None else _columns() - 2)


class _RawDescriptionHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with our formatter by default (subcommands' parsers are made by their parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_client_options(p: argparse.ArgumentParser, *, timeout_default: float | None = None) -> None:
    p.add_argument("--socket", help=f"the agent's socket (default: ${SOCKET_ENV}, then the config's)")
    p.add_argument("--config", help=f"config file, for [client] defaults and the socket (default: ${CONFIG_ENV})")
    default = f"{timeout_default:g}" if timeout_default is not None else "[client] timeout, else 120"
    p.add_argument(
        "--timeout",
        type=float,
        default=timeout_default,
        metavar="SECONDS",
        help=f"seconds to wait for each answer, and for --wait (default: {default})",
    )


class _Skipped:
    """A command's parser that is not built: every method does nothing and returns it again (so
    ``p.add_mutually_exclusive_group().add_argument(...)`` and nested ``add_subparsers`` work)."""

    def __getattr__(self, name: str) -> Callable[..., _Skipped]:
        return lambda *args, **kwargs: self


class _Subcommands:
    """The ``add_subparsers`` action, building only the command the command line names: the others are
    ``_Skipped``. Building every command's parser costs a client command 4 ms; ``--help``, an unknown command
    and ``completion`` build them all (``only=None``)."""

    def __init__(self, action: argparse._SubParsersAction[_Parser], only: str | None) -> None:
        self._action = action
        self._only = only
        self.built: set[str] = set()

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self._only is not None and name != self._only:
            return _Skipped()  # type: ignore[return-value]  # takes the same calls, and keeps none
        self.built.add(name)
        return self._action.add_parser(name, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; ``only``: just the root and that command's (what ``main`` parses with)."""
    return _build_parser(only)[0]


def _build_parser(only: str | None) -> tuple[argparse.ArgumentParser, set[str]]:
    parser = _Parser(
        prog="signing-agent",
        description="Sign CCF governance messages with keys that never leave an HSM or Key Vault.",
        epilog=EXIT_CODES_HELP + "\n" + ENVIRONMENT_HELP,
        formatter_class=_RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"signing-agent {__version__}")
    sub = _Subcommands(
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser), only
    )

    p = sub.add_parser("version", help="print the version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("serve", help="run the agent daemon")
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument("--log-level", choices=LOG_LEVELS)
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

    p = sub.add_parser(
        "init",
        help="write a minimal configuration: a key store, one identity, one service",
        description="Write a minimal agent configuration (a PKCS#11 key store, or a key file for development, "
        "one identity, one CCF service, the audit log beside it) to stdout or --out. No Azure, NSS or policy "
        "sections unless asked: --backend azure-keyvault, --init-params, --policy.",
    )
    if only in (None, "init"):
        from signing_agent.cli_init import add_arguments

        add_arguments(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "reload",
        help="ask the running agent to reload its configuration (as SIGHUP does) and print the outcome",
        description="The agent loads and self-tests the new configuration while the old one serves, then swaps "
        "them; a configuration it refuses leaves the old one serving, and the reason is printed (exit 2). Only "
        "the agent's own user and root may ask.",
    )
    _add_client_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("health", help="the agent's health; exit 0 only when healthy (for probes)")
    _add_client_options(p, timeout_default=10.0)
    p.add_argument("--live", action="store_true", help="exit 0 whenever the agent answers (liveness)")
    p.add_argument("--wait", action="store_true", help="wait (up to --timeout) until it is healthy (--live: answers)")
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
        "ISO 8601 times without an offset are UTC. Refuses to write the binary COSE_Sign1 to a terminal.",
    )
    _add_client_options(p)
    p.add_argument("--identity", help=f"the identity to sign with, or its member id (default: ${IDENTITY_ENV})")
    p.add_argument("--signing-cert", help="pick the identity whose certificate this is")
    p.add_argument("--signing-key", help=argparse.SUPPRESS)
    p.add_argument("--ccf-gov-msg-type", dest="msg_type", required=True, choices=MSG_TYPES, help="message type")
    p.add_argument("--ccf-gov-msg-proposal_id", "--ccf-gov-msg-proposal-id", dest="proposal_id")
    p.add_argument(
        "--ccf-gov-msg-created_at",
        "--ccf-gov-msg-created-at",
        dest="created_at",
        help="ISO 8601 (no offset = UTC) or seconds since the epoch; default: now",
    )
    p.add_argument("--content", help="payload file, or - for stdin (default: empty)")
    p.add_argument("--out", help="write the COSE_Sign1 here instead of stdout")
    p.add_argument("--json", action="store_true", help="print the COSE_Sign1 (base64) and its member id as JSON")
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
    _register_optional(sub, only)

    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="bash: signing-agent completion bash > ~/.local/share/bash-completion/completions/signing-agent"
        "; zsh: signing-agent completion zsh > ~/.zfunc/_signing-agent (with ~/.zfunc in fpath, before compinit)"
        "; fish: signing-agent completion fish > ~/.config/fish/completions/signing-agent.fish",
    )
    p.add_argument("shell", choices=("bash", "zsh", "fish"))
    p.set_defaults(func=cmd_completion)
    return parser, sub.built


def _register_optional(sub: Any, only: str | None) -> None:
    """Command groups that live in their own modules (imported only when their command is built)."""
    if only in (None, "keys"):
        from signing_agent import cli_keys

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
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser, built = _build_parser(command if command is not None or "--version" not in argv else "")
    if command is not None and command not in built:
        parser = build_parser()  # no such command: argparse lists them all
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if func is cmd_serve:  # the daemon's log lines are escaped by its formatter; it prints nothing else
        return _run(func, args)
    stdout, stderr = sys.stdout, sys.stderr
    # What a command prints comes from others (the agent's answers, CCF's relayed, a log or a config being checked):
    # no escape sequence in it reaches the operator's terminal.
    sys.stdout, sys.stderr = PrintableStream(stdout), PrintableStream(stderr)
    try:
        return _run(func, args)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except (AgentError, AgentRequestError, AgentUnreachableError, WaitTimeoutError) as exc:
        return report(exc, verbose=args.verbose)
    except UNREADABLE_ANSWER as exc:
        # A command that reads an agent's raw JSON itself (``service identity``) meets an answer of another shape
        # here; a command that never talked to an agent has a bug, and shows its traceback.
        socket_path = getattr(args, "agent_socket", None)
        if socket_path is None:
            raise
        return report(unreadable_answer(socket_path, exc), verbose=args.verbose)


# -- governance with a CCF service ---------------------------------------------------------------------------------


def _pick_service(client: AgentClient, service: str | None) -> str:
    return client.pick_service(service)


def _gov_context(args: argparse.Namespace, *, identity: bool = True) -> tuple[AgentClient, str, str]:
    """The client, the service and (``identity``) the identity a governance command acts on: flags, environment,
    ``[client]``, else the only one."""
    settings = _settings(args)
    client = _client(args, settings)
    service = client.pick_service(settings.service)
    ident = resolve_identity(client, settings.identity, None) if identity else ""
    return client, service, ident


def _proposal_id(client: AgentClient, service: str, proposal_id: str) -> str:
    """The full id of the proposal ``proposal_id`` names, or begins (as git matches hash prefixes)."""
    return client.resolve_proposal_id(service, proposal_id)


def _describe_proposal(p: Mapping[str, Any]) -> str:
    ballots = p.get("ballotCount", 0)
    text = f"proposal {p.get('proposalId')} is {p.get('proposalState')} ({ballots} ballot{'s' if ballots != 1 else ''})"
    if p.get("failure"):
        text += f": {p['failure'].get('reason')}"
    return text


def _tx(resp_headers: Mapping[str, str]) -> str:
    return _txid(resp_headers.get("x-ms-ccf-transaction-id"))


def _txid(transaction_id: str | None) -> str:
    return f" [tx {transaction_id}]" if transaction_id else ""


def _decided(args: argparse.Namespace, client: AgentClient, service: str, proposal: Proposal) -> Proposal:
    """With ``--wait``, the proposal once it is no longer Open (the vote that decides it may be another's)."""
    if not args.wait or not proposal.open:
        return proposal
    return client.wait_for_proposal(service, proposal.proposal_id, timeout=client.timeout)


def cmd_propose(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    created = _decided(args, client, service, client.propose(service, identity, _read_content(args.file, "FILE")))
    if args.json:
        _print_json(created.raw)
    else:
        print(_describe_proposal(created.raw) + _txid(created.transaction_id))
    return EXIT_OK


def cmd_vote(args: argparse.Namespace) -> int:
    if args.ballot is not None:
        ballot = read_input_text(args.ballot, "--ballot")
    else:
        ballot = REJECT_BALLOT if args.reject else ACCEPT_BALLOT
    client, service, identity = _gov_context(args)
    proposal_id = _proposal_id(client, service, args.proposal_id)
    voted = _decided(args, client, service, client.vote(service, identity, proposal_id, ballot))
    if args.json:
        _print_json(voted.raw)
    else:
        print(f"ballot submitted by {identity}: " + _describe_proposal(voted.raw) + _txid(voted.transaction_id))
    return EXIT_OK


def cmd_withdraw(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    proposal_id = _proposal_id(client, service, args.proposal_id)
    withdrawn = client.withdraw(service, identity, proposal_id)
    if args.json:
        _print_json(withdrawn.raw if withdrawn is not None else None)
    elif withdrawn is None:
        print(f"proposal {proposal_id} does not exist: nothing to withdraw")
    else:
        print(_describe_proposal(withdrawn.raw) + _txid(withdrawn.transaction_id))
    return EXIT_OK


def cmd_activate(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    activated = client.activate(service, identity)
    if args.json:
        _print_json(activated.raw)
    else:
        print(f"member {identity} ({activated.member_id}) is {activated.status}{_txid(activated.transaction_id)}")
    return EXIT_OK


def cmd_proposals(args: argparse.Namespace) -> int:
    if args.pending:
        from signing_agent import cli_workflows

        if args.proposal_id:
            raise InvalidRequestError("--pending lists proposals: give no proposal id with it")
        return cli_workflows.cmd_pending(args, _client(args))
    client, service, _ = _gov_context(args, identity=False)
    if args.proposal_id:
        shown = client.proposal(service, _proposal_id(client, service, args.proposal_id))
        if args.json:
            _print_json(shown.raw)
            return EXIT_OK
        print(_describe_proposal(shown.raw))
        print(f"  proposer: {shown.proposer_id}")
        print("  actions:")
        for action in shown.actions or ():
            print(f"    - {json.dumps(action, sort_keys=True)}")
        for member, ballot in (shown.ballots or {}).items():
            print(f"  ballot from {member}: {ballot}")
        return EXIT_OK
    listed = client.proposals(service, actions=True)
    if args.json:
        _print_json({"value": [p.raw for p in listed]})
        return EXIT_OK
    if not listed:
        print("no proposals")
        return EXIT_OK
    _table(
        ["PROPOSAL ID", "STATE", "BALLOTS", "PROPOSER", "ACTIONS"],
        [
            [p.proposal_id, p.state, str(p.ballot_count), p.proposer_id or "-", ", ".join(p.action_names) or "-"]
            for p in listed
        ],
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    client, service, _ = _gov_context(args, identity=False)
    status = client.status(service)
    if args.json:
        _print_json(status.raw)
        return EXIT_OK
    count = f", recovery count {status.recovery_count}" if status.recovery_count is not None else ""
    print(f"service {service} ({status.url}): {status.status}{count}")
    if status.identities:
        _table(
            ["IDENTITY", "MEMBER ID", "STATUS"],
            [[m.name, m.member_id, m.status or "unknown"] for m in status.identities],
        )
    for member in status.identities:
        if member.needs_activation:
            print(
                f"{member.name} is Accepted, not yet Active: run "
                f"'signing-agent activate --identity {member.name}' to take part in governance"
            )
    return EXIT_OK


def register_governance(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, *, identity: bool = True, wait: bool = False) -> None:
        _add_client_options(p)
        p.add_argument("--service", help=f"the configured service (default: ${SERVICE_ENV}, the only one, 'default')")
        if identity:
            p.add_argument(
                "--identity", help=f"the identity to act as, or its member id (default: ${IDENTITY_ENV}, the only one)"
            )
        if wait:
            p.add_argument(
                "--wait", action="store_true", help="wait (up to --timeout) until the proposal is no longer Open"
            )
        p.add_argument("--json", action="store_true", help="print CCF's JSON answer")

    p = sub.add_parser("propose", help="sign a proposal and submit it to CCF")
    p.add_argument("file", help='proposal JSON ({"actions": [...]}), or - for stdin')
    common(p, wait=True)
    p.set_defaults(func=cmd_propose)

    p = sub.add_parser("vote", help="sign a ballot for an Open proposal and submit it")
    p.add_argument("proposal_id", help="the proposal's id, or a unique prefix of it (at least 4 hex digits)")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--accept", action="store_true", help="the canonical accepting ballot")
    choice.add_argument("--reject", action="store_true", help="the canonical rejecting ballot")
    choice.add_argument("--ballot", help="a ballot JavaScript module file")
    common(p, wait=True)
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser("withdraw", help="withdraw one of your proposals")
    p.add_argument("proposal_id", help="the proposal's id, or a unique prefix of it")
    common(p)
    p.set_defaults(func=cmd_withdraw)

    p = sub.add_parser("activate", help="activate an Accepted member (state digest update, then ack)")
    common(p)
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("proposals", help="list proposals with their actions, or show one with its ballots")
    p.add_argument("proposal_id", nargs="?", help="the proposal's id, or a unique prefix of it")
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
    submitted = client.submit_share(service, identity)
    if args.json:
        _print_json(submitted.raw)
    else:
        message = submitted.message.replace("\n", "; ")
        print(
            f"recovery share of {identity} submitted to {service}: {message} "
            f"({submitted.submitted_count}/{submitted.recovery_threshold}){_txid(submitted.transaction_id)}"
        )
    if args.wait:
        opened = client.wait_for_service(service, "Open", timeout=client.timeout)
        if not args.json:
            print(f"service {service} is {opened.status}")
    return EXIT_OK


def cmd_recovery_approve(args: argparse.Namespace) -> int:
    client, service, identity = _gov_context(args)
    proposal_id = _proposal_id(client, service, args.proposal_id)
    approval = client.approve_identity(service, identity, proposal_id, args.sha256)
    if args.json:
        _print_json(approval.raw)
        return EXIT_OK
    print(
        f"service identity {approval.certificate_sha256} approved for recovery shares on {service} by "
        f"{identity}'s accepting ballot: " + _describe_proposal(approval.ballot.raw) + _txid(approval.transaction_id)
    )
    return EXIT_OK


def cmd_recovery_status(args: argparse.Namespace) -> int:
    status = _client(args).recovery()
    if args.json:
        _print_json(status.raw)
        return EXIT_OK
    if not status.enabled:
        print("unattended recovery is off ([recovery] enabled = false)")
    if not status.watchers:
        return EXIT_OK
    rows = []
    for w in status.watchers:
        last = w.last_submission or {}
        submitted_at = last.get("submittedAt")
        submission = (
            f"recovery {last.get('recoveryCount')} at {iso_utc(submitted_at)}"
            if isinstance(submitted_at, int | float)
            else "-"
        )
        rows.append([
            w.service,
            w.identity,
            w.state,
            w.service_status or "-",
            iso_utc(w.last_checked_at) or "-",
            submission,
            w.last_error or "",
        ])  # fmt: skip
    _table(["SERVICE", "IDENTITY", "STATE", "SERVICE STATUS", "LAST CHECKED", "SHARE SUBMITTED", "ERROR"], rows)
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
    s.add_argument("--service", help=f"the configured service (default: ${SERVICE_ENV}, the only one, 'default')")
    s.add_argument("--identity", help=f"the identity whose share to submit (default: ${IDENTITY_ENV}, the only one)")
    s.add_argument("--wait", action="store_true", help="then wait (up to --timeout) until the service is Open")
    s.add_argument("--json", action="store_true", help="print CCF's JSON answer")
    s.set_defaults(func=cmd_recovery_submit)
    a = rec_sub.add_parser(
        "approve-identity",
        help="after a disaster (accept_transition_to): vote accept on the transition_service_to_open proposal and "
        "approve the new service identity for recovery shares",
    )
    _add_client_options(a)
    a.add_argument("proposal_id", help="the transition_service_to_open proposal (or a unique prefix of its id)")
    a.add_argument(
        "--sha256",
        required=True,
        help="the new service certificate's SHA-256 fingerprint, as announced out of band (never copy it from the "
        "service itself)",
    )
    a.add_argument("--service", help=f"the configured service (default: ${SERVICE_ENV}, the only one, 'default')")
    a.add_argument("--identity", help=f"the identity that votes (default: ${IDENTITY_ENV}, the only one)")
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
    from pathlib import Path

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
