"""Signing over the socket (16 concurrent clients, and one) for the file and PKCS#11 backends, next to the baselines.

Baselines: in-process ``cryptography`` signing, with and without the verification the agent does for every signature,
direct PKCS#11 signing on the same SoftHSM2 token (python-pkcs11, one session, CKM_ECDSA), and the per-message time of
CCF's ``ccf_cose_sign1`` CLI. Prints a table; ``bench/run.py`` (``make bench``) prints the targets too.

    .venv/bin/python bench/bench_sign.py [--seconds 5] [--clients 16] [--curve secp384r1|secp256r1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    SOFTHSM_MODULE,
    LoadResult,
    PeakRSS,
    daemon,
    http_request,
    raw_load,
    softhsm_token,
    workdir,
)
from signing_agent.algorithms import ES256, ES384, SignatureAlgorithm
from tests.support.pki import make_member

BALLOT = {"ballot": "export function vote (proposal, proposerId) { return true }"}
PROPOSAL_ID = "ab" * 32


def rate_of(fn: Callable[[], object], seconds: float) -> float:
    count, deadline = 0, time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        fn()
        count += 1
    return count / (time.monotonic() - started)


def in_process_rate(key: ec.EllipticCurvePrivateKey, alg: SignatureAlgorithm, seconds: float) -> float:
    digest = alg.digest(b"x")
    return rate_of(lambda: key.sign(digest, ec.ECDSA(Prehashed(alg.hash_algorithm()))), seconds)


def in_process_verified_rate(key: ec.EllipticCurvePrivateKey, alg: SignatureAlgorithm, seconds: float) -> float:
    """Sign and verify, as the agent must before a signature leaves it (the same work, minus the socket)."""
    digest = alg.digest(b"x")
    public, algorithm = key.public_key(), ec.ECDSA(Prehashed(alg.hash_algorithm()))
    return rate_of(lambda: public.verify(key.sign(digest, algorithm), digest, algorithm), seconds)


def direct_pkcs11_rate(label: str, alg: SignatureAlgorithm, seconds: float) -> float:
    import pkcs11

    from signing_agent.backends import _p11session

    lib = _p11session.load_module(SOFTHSM_MODULE)
    token = lib.get_token(token_label="bench")
    digest = alg.digest(b"x")
    with token.open(user_pin="1234") as session:
        key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=label)
        return rate_of(lambda: key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA), seconds)


def ccf_cli_seconds(folder: Path, key: Path, cert: Path, runs: int = 5) -> float:
    content = folder / "ballot.json"
    content.write_text('{"ballot":"export function vote (proposal, proposerId) { return true }"}')
    tool = str(Path(sys.executable).parent / "ccf_cose_sign1")
    started = time.monotonic()
    for _ in range(runs):
        subprocess.run(
            [tool, "--signing-key", str(key), "--signing-cert", str(cert), "--ccf-gov-msg-type", "ballot",
             "--ccf-gov-msg-proposal_id", PROPOSAL_ID, "--ccf-gov-msg-created_at", "2024-07-01T00:00:00+00:00",
             "--content", str(content)],
            check=True, capture_output=True,
        )  # fmt: skip
    return (time.monotonic() - started) / runs


def sign_request(identity: str) -> bytes:
    body = {"identity": identity, "msg_type": "ballot", "proposal_id": PROPOSAL_ID, "payload": BALLOT}
    return http_request("POST", "/v1/sign", json.dumps(body).encode())


def socket_load(sock: Path, identity: str, clients: int, seconds: float) -> LoadResult:
    return asyncio.run(raw_load(sock, sign_request(identity), clients=clients, seconds=seconds))


@dataclass
class SignFigures:
    """What ``measure`` saw, for this script's table and ``bench/run.py``'s targets."""

    alg: str
    in_process: float
    in_process_verified: float
    direct_pkcs11: float
    file: LoadResult
    file_one_client: LoadResult
    pkcs11: LoadResult
    tree_rss_mib: float
    start_seconds: float
    cpu_ms_per_signature: float
    ccf_cli_seconds: float


def measure(curve: str = "secp384r1", seconds: float = 5.0, clients: int = 16, *, cli: bool = True) -> SignFigures:
    alg = ES384 if curve == "secp384r1" else ES256
    folder = workdir()
    env = softhsm_token(folder / "hsm")
    member_file, member_hsm = make_member("file", curve), make_member("hsm", curve)
    key_path, cert_path = member_file.write(folder)
    _, hsm_cert = member_hsm.write(folder)
    from signing_agent.backends._p11session import PinSource
    from signing_agent.backends.pkcs11_admin import TokenTarget, import_ec_key

    token = TokenTarget(
        module=SOFTHSM_MODULE, token_label="bench", pin=PinSource(pin_file=folder / "hsm" / "token.pin")
    )
    import_ec_key(token, member_hsm.key, label="hsm")

    config = folder / "agent.toml"
    config.write_text(
        f'[agent]\nsocket = "{folder}/run/agent.sock"\n'
        f'[identities.file]\ncertificate = "{cert_path}"\n'
        f'[identities.file.signing_key]\nbackend = "file"\npath = "{key_path}"\n'
        f'[identities.hsm]\ncertificate = "{hsm_cert}"\n'
        f'[identities.hsm.signing_key]\nbackend = "pkcs11"\nmodule = "{SOFTHSM_MODULE}"\ntoken_label = "bench"\n'
        f'key_label = "hsm"\npin_file = "{folder}/hsm/token.pin"\n'
    )
    in_proc = in_process_rate(member_file.key, alg, seconds)
    in_proc_verified = in_process_verified_rate(member_file.key, alg, seconds)
    direct = direct_pkcs11_rate("hsm", alg, seconds)
    with daemon(config, env) as agent:
        socket_load(agent.socket, "file", clients, min(1.0, seconds))  # warm: workers imported, connections open
        with PeakRSS(agent) as rss:
            cpu_before = agent.cpu_seconds()
            file_load = socket_load(agent.socket, "file", clients, seconds)
            cpu = (agent.cpu_seconds() - cpu_before) / max(file_load.count, 1) * 1000
            one = socket_load(agent.socket, "file", 1, seconds)
            hsm_load = socket_load(agent.socket, "hsm", clients, seconds)
    return SignFigures(
        alg=alg.name,
        in_process=in_proc,
        in_process_verified=in_proc_verified,
        direct_pkcs11=direct,
        file=file_load,
        file_one_client=one,
        pkcs11=hsm_load,
        tree_rss_mib=rss.peak,
        start_seconds=agent.start_seconds,
        cpu_ms_per_signature=cpu,
        ccf_cli_seconds=ccf_cli_seconds(folder, key_path, cert_path) if cli else float("nan"),
    )


def print_table(f: SignFigures, clients: int) -> None:
    def load(r: LoadResult) -> tuple[str, str, str]:
        return f"{r.rate:8.0f}/s", f"{r.p50:6.1f}", f"{r.pct(0.99):6.1f}"

    rows = [
        ("in-process cryptography, sign only (1 core)", f"{f.in_process:8.0f}/s", "", ""),
        ("in-process sign + verify (1 core)", f"{f.in_process_verified:8.0f}/s", "", ""),
        (f"agent, file backend, {clients} clients", *load(f.file)),
        ("agent, file backend, 1 client", *load(f.file_one_client)),
        ("direct PKCS#11 on SoftHSM2 (1 session)", f"{f.direct_pkcs11:8.0f}/s", "", ""),
        (f"agent, pkcs11 backend, {clients} clients", *load(f.pkcs11)),
        ("ccf_cose_sign1 CLI, one process per message", f"{1 / f.ccf_cli_seconds:8.1f}/s",
         f"{f.ccf_cli_seconds * 1000:6.0f}", ""),
    ]  # fmt: skip
    print(f"\n{'':46} {'rate':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for name, rate, p50, p99 in rows:
        print(f"{name:46} {rate:>10} {p50:>7} {p99:>7}")
    print(
        f"\nthe agent's process tree: {f.cpu_ms_per_signature:.2f} ms of CPU per signature (file, {clients} clients), "
        f"peak RSS {f.tree_rss_mib:.0f} MiB, start to ready {f.start_seconds:.2f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--curve", choices=["secp384r1", "secp256r1"], default="secp384r1")
    args = parser.parse_args()
    print(f"signing-agent benchmark: {args.curve}, {args.clients} concurrent clients, {args.seconds:g} s per run")
    print_table(measure(args.curve, args.seconds, args.clients), args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
