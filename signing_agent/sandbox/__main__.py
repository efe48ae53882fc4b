"""Command line of the CCF governance sandbox: ``python -m signing_agent.sandbox`` (or ``signing-agent
sandbox``).

Runs the HTTPS test double until SIGTERM/SIGINT and logs every request. This is NOT a CCF node: it has an
unauthenticated ``/_sandbox/`` control API (``CONTROL_API_HELP``, printed by ``--help``) and must never face a
network you do not control.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from signing_agent.sandbox.server import SandboxServer, serve_until_signalled

CONTROL_API_HELP = """\
use it:
  signing-agent sandbox --member-cert member0_cert.pem --service-cert-out service_cert.pem --port 8000
  then, in the agent's config:
    [services.default]
    url = "https://127.0.0.1:8000"
    service_certificate = "service_cert.pem"
  It prints its URL and what to pin once it listens (and writes the URL to --ready-file). Each start makes a new
  service identity unless given --service-key; --service-cert-out then overwrites the file, and says so: an agent
  pinning it must be reloaded (signing-agent reload).

control API (unauthenticated, over the same HTTPS; a real CCF has nothing like it):
  POST   /_sandbox/members   {"cert": PEM, "encryption_pub_key"?: PEM, "member_data"?: any,
                              "status"?: "Active"|"Accepted", "recovery_role"?: str}   -> {"memberId"}
                             a member registered directly (as at the service's genesis)
  POST   /_sandbox/nodes     {"node_data"?: any}   -> {"nodeId", "status": "Pending"}
                             a node joins; members trust it with transition_node_to_trusted
  POST   /_sandbox/recover   {"service_key"?: PEM, "service_cert"?: PEM}   -> {"status": "Recovering",
                              "recoveryCount", "serviceCertificate", "previousServiceCertificate", ...}
                             the disaster: the node restarts in recovery with a new service identity
                             (--service-cert-out is rewritten); members then open it with
                             transition_service_to_open (previous and next identity) and submit shares
  GET    /_sandbox/faults    the pending faults;  DELETE: clear them
  POST   /_sandbox/faults    {"kind": "reset"|"drop_after"|"status"|"delay", "path": regex,
                              "method"?: str, "count"?: n, "status"?: n, "retry_after"?: str,
                              "code"?: str, "message"?: str, "delay"?: seconds}   -> the rule
  GET    /_sandbox/requests  {"value": [{"method", "path", "query", "status", "fault"}]}: every /gov and
                             /node request so far;  DELETE: clear the log

example:
  curl --cacert service_cert.pem -X POST https://127.0.0.1:PORT/_sandbox/nodes
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signing-agent sandbox",
        description="CCF governance sandbox: an HTTPS test double of CCF's /gov API "
        "(api-version 2024-07-01). For tests and demos only.",
        epilog=CONTROL_API_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: a free port)")
    parser.add_argument(
        "--member-cert",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="PEM certificate of an initial Active member (repeatable)",
    )
    parser.add_argument("--service-key", type=Path, metavar="FILE", help="service identity private key (PEM)")
    parser.add_argument(
        "--service-cert",
        type=Path,
        metavar="FILE",
        help="service identity certificate (PEM); needs --service-key. With only --service-key, a new "
        "certificate is issued for that key",
    )
    parser.add_argument(
        "--service-cert-out",
        type=Path,
        metavar="FILE",
        help="write the service certificate (the CA to pin) here",
    )
    parser.add_argument(
        "--opening",
        action="store_true",
        help="start as a new service, Opening: members open it with transition_service_to_open "
        "(default: an Open service)",
    )
    parser.add_argument(
        "--recovery-threshold",
        type=int,
        default=1,
        metavar="N",
        help="the recovery threshold the service starts with (default: %(default)s)",
    )
    parser.add_argument(
        "--ready-file", type=Path, metavar="FILE", help="write the URL here once the sandbox is listening"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logger = logging.getLogger("signing_agent.sandbox")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s ccf-sandbox %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.service_cert is not None and args.service_key is None:
        print("error: --service-cert needs --service-key", file=sys.stderr)
        return 2
    try:
        members = [path.read_bytes() for path in args.member_cert]
        key = args.service_key.read_bytes() if args.service_key is not None else None
        cert = args.service_cert.read_bytes() if args.service_cert is not None else None
        server = SandboxServer(
            args.host,
            args.port,
            members,
            key,
            cert,
            service_status="Opening" if args.opening else "Open",
            recovery_threshold=args.recovery_threshold,
        )
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_until_signalled(server, ready_file=args.ready_file, service_cert_out=args.service_cert_out))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
