"""The ``signing-agent`` command line: the daemon (``serve``), its checks, and thin clients of the socket API.

Client commands find the socket through ``--socket``, then ``$SIGNING_AGENT_SOCK``, then the config's
``agent.socket`` (``--config`` or ``$SIGNING_AGENT_CONFIG``), then ``/run/signing-agent/agent.sock``. Errors print
their diagnostics and exit non-zero; a traceback only with ``-v``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from signing_agent import __version__
from signing_agent.client import AgentClient, AgentRequestError, AgentUnreachableError, default_socket
from signing_agent.config import AgentConfig, load_config
from signing_agent.cose.governance import MsgType
from signing_agent.errors import AgentError, ConfigError, InvalidRequestError
from signing_agent.log import setup_logging

CONFIG_ENV = "SIGNING_AGENT_CONFIG"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

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
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"--signing-cert: cannot read {path}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise InvalidRequestError(f"--signing-cert: {path} is not an X.509 certificate") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


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

    asyncio.run(serve(config, on_ready=ready))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from signing_agent.backends.factory import KeyStores
    from signing_agent.daemon import open_identities

    path = _config_path(args, required=True)
    assert path is not None  # noqa: S101 -- required=True
    config = load_config(path)
    setup_logging("warning")

    async def check(config: AgentConfig) -> int:
        stores = KeyStores()
        try:
            idents = await open_identities(config, stores)
            for ident in idents.values():
                print(f"ok  {ident.name}: member {ident.member_id} {ident.alg.name} {ident.backend} {ident.location}")
                for warning in ident.warnings:
                    print(f"    warning: {warning}")
                await ident.signing_key.aclose()
                if ident.decryption_key is not None:
                    await ident.decryption_key.aclose()
        finally:
            await stores.aclose()
        print(f"configuration {path} is valid: {len(config.identities)} identities, socket {config.agent.socket}")
        return EXIT_OK

    return asyncio.run(check(config))


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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate the config, open every key and self-test each identity")
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.set_defaults(func=cmd_check_config)

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
    p.set_defaults(func=cmd_sign)

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

    p = sub.add_parser(
        "sandbox",
        help="run the local CCF governance sandbox (a test double of CCF's /gov API)",
        add_help=False,
    )
    p.add_argument("sandbox_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_sandbox)


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from signing_agent.sandbox.__main__ import main as sandbox_main

    return sandbox_main(list(args.sandbox_args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except AgentError as exc:
        if args.verbose:
            raise
        print(f"signing-agent: {exc.code}: {exc.diagnostics()}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidRequestError | ConfigError) else EXIT_ERROR
    except AgentRequestError as exc:
        if args.verbose:
            raise
        print(f"signing-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except AgentUnreachableError as exc:
        print(f"signing-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
