"""Compressed soak: mixed traffic against the real daemon for a minute or so, with faults on a timer.

Faults: the CCF sandbox is killed and restarted on the same port and service key (a CCF restart), and the daemon is
sent SIGHUP (a configuration reload, which also drops every PKCS#11 session: the identity whose key is in a SoftHSM2
token then reconnects and logs in again under load, the key-store session loss of this soak). At the end it prints
the error counts by kind, the daemon's RSS growth after warm-up, and its open file descriptors, and exits 1 on
unexpected errors or leaks.

    .venv/bin/python -m bench.soak --seconds 60 --workers 8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.client import AgentClient, AgentRequestError, AgentUnreachableError
from tests.support.agent import daemon, file_identity, write_toml
from tests.support.pki import make_member

# Errors a client may see while CCF is down for a restart; anything else is a finding.
# ProposalCreatedTooLongAgo: a proposal signed before a CCF restart and resent after it (the restarted sandbox's
# clock window starts again).
EXPECTED_DURING_FAULTS = {
    "CCFUnavailable",
    "CCFTimeout",
    "ServiceUnavailable",
    "BackendUnavailable",
    "ProposalCreatedTooLongAgo",
}


def proc_stats(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Sandbox:
    """The CCF sandbox on a fixed port with a fixed service key, so a restart keeps the pinned identity."""

    def __init__(self, folder: Path, member_certs: list[Path]) -> None:
        self.folder = folder
        self.member_certs = member_certs
        self.key = folder / "service_key.pem"
        key = ec.generate_private_key(ec.SECP384R1())
        self.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.cert = folder / "service_cert.pem"
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ready = self.folder / "sandbox.ready"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "signing_agent", "sandbox", "--port", str(self.port), "--service-key",
                str(self.key), "--ready-file", str(ready), "--service-cert-out", str(self.cert)]  # fmt: skip
        for cert in self.member_certs:
            args += ["--member-cert", str(cert)]
        with (self.folder / "sandbox.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (ready.exists() and ready.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox did not start; see " + str(self.folder / "sandbox.log"))
            time.sleep(0.02)
        self.url = ready.read_text().strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def world(folder: Path) -> Iterator[tuple[Sandbox, Path, dict[str, dict[str, object]], int]]:
    members = {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1")}
    identities: dict[str, dict[str, object]] = {}
    certs = []
    for name, member in members.items():
        key, cert = member.write(folder / "keys")
        identities.update(file_identity(name, cert, key))
        certs.append(cert)
    env = softhsm_identity(folder, identities)
    sb = Sandbox(folder, certs)
    sb.start()
    try:
        tables: dict[str, dict[str, object]] = {
            "agent": {"socket": folder / "run" / "agent.sock"},
            **identities,
            "services.default": {
                "url": sb.url,
                "service_certificate": sb.cert,
                "max_attempts": 4,
                "backoff_initial": 0.1,
                "backoff_max": 0.5,
                "request_timeout": 5.0,
            },
        }
        config = write_toml(folder / "agent.toml", tables)
        with daemon(config, env=env) as agent:
            yield sb, config, tables, agent.proc.pid
    finally:
        sb.stop()


def softhsm_identity(folder: Path, identities: dict[str, dict[str, object]]) -> dict[str, str]:
    """Identity ``hsm`` with its key imported into a SoftHSM2 token under ``folder``; the daemon's environment."""
    from bench.common import SOFTHSM_MODULE, softhsm_token
    from signing_agent.backends._p11session import PinSource
    from signing_agent.backends.pkcs11_admin import TokenTarget, import_ec_key

    env = softhsm_token(folder / "hsm")
    member = make_member("hsm")
    _, cert = member.write(folder / "keys")
    pin = folder / "hsm" / "token.pin"
    import_ec_key(TokenTarget(module=SOFTHSM_MODULE, token_label="bench", pin=PinSource(pin_file=pin)), member.key,
                  label="hsm")  # fmt: skip
    identities["identities.hsm"] = {"certificate": cert}
    identities["identities.hsm.signing_key"] = {
        "backend": "pkcs11", "module": SOFTHSM_MODULE, "token_label": "bench", "key_label": "hsm", "pin_file": pin,
    }  # fmt: skip
    return {"SOFTHSM2_CONF": env["SOFTHSM2_CONF"]}


def worker(sock: Path, stop: threading.Event, errors: collections.Counter[str], ok: list[int], n: int) -> None:
    client = AgentClient(sock, timeout=30)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 4 == 0:
                proposal = {"actions": [{"name": "set_constitution", "args": {"constitution": f"w{n} {i}"}}]}
                client.call("POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": proposal})
            elif i % 4 == 1:
                client.sign("m1" if i % 8 == 1 else "hsm", "state_digest")
            else:
                proposal = {"actions": [{"name": "set_constitution", "args": {"constitution": f"s{n} {i}"}}]}
                client.sign("m0", "proposal", json.dumps(proposal).encode())
            ok[n] += 1
        except AgentRequestError as exc:
            errors[exc.code] += 1
        except AgentUnreachableError:
            errors["unreachable"] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="traffic duration (default: 60)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent client threads (default: 8)")
    parser.add_argument("--fault-every", type=float, default=6.0, help="seconds between faults (default: 6)")
    parser.add_argument("--max-rss-growth-kib", type=int, default=20_000, help="fail above this growth")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="sa-soak-", dir="/tmp"))
    with world(folder) as (sb, config, tables, pid):
        sock = Path(str(tables["agent"]["socket"]))
        client = AgentClient(sock, timeout=30)
        stop = threading.Event()
        errors: collections.Counter[str] = collections.Counter()
        ok = [0] * args.workers
        threads = [
            threading.Thread(target=worker, args=(sock, stop, errors, ok, n), daemon=True) for n in range(args.workers)
        ]
        for t in threads:
            t.start()
        time.sleep(min(5.0, args.seconds / 6))  # warm-up: caches, sessions, allocator arenas
        rss0, fds0 = proc_stats(pid)
        faults: collections.Counter[str] = collections.Counter()
        started = time.monotonic()
        step = 0
        while time.monotonic() - started < args.seconds:
            time.sleep(args.fault_every)
            step += 1
            if step % 2:
                sb.stop()  # CCF restart: requests retry, then fail with CCFUnavailable until it is back
                time.sleep(0.5)
                sb.start()
                faults["ccf restart"] += 1
            else:
                # A reload that changes something real (the retry budget), plus the PKCS#11 session reset.
                tables["services.default"]["max_attempts"] = 3 + step % 3
                write_toml(config, tables)
                os.kill(pid, signal.SIGHUP)
                faults["reload"] += 1
        stop.set()
        for t in threads:
            t.join(60)
        time.sleep(1.0)
        rss1, fds1 = proc_stats(pid)
        health = client.health()
    unexpected = {k: v for k, v in errors.items() if k not in EXPECTED_DURING_FAULTS}
    print(f"soak: {args.seconds:.0f} s, {args.workers} workers, faults {dict(faults)}")
    print(f"  requests ok: {sum(ok)}; errors: {dict(errors) or 'none'}; unexpected: {unexpected or 'none'}")
    print(f"  daemon RSS after warm-up {rss0} KiB -> {rss1} KiB ({rss1 - rss0:+d} KiB)")
    print(f"  daemon open fds {fds0} -> {fds1} ({fds1 - fds0:+d})")
    print(f"  final health: {health.status}")
    failed = bool(unexpected) or rss1 - rss0 > args.max_rss_growth_kib or fds1 - fds0 > 8
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
