"""Signing over the socket (16 concurrent clients) for the file and PKCS#11 backends, next to the baselines.

Baselines: in-process ``cryptography`` ES384 signing, direct PKCS#11 signing on the same SoftHSM2 token (python-pkcs11,
one session, CKM_ECDSA), and the per-message time of CCF's ``ccf_cose_sign1`` CLI. Prints a table and the targets:
file >= 0.5x in-process, PKCS#11 >= 0.8x direct, p99 <= 20 ms, RSS <= 120 MiB under load, start to ready <= 1.5 s.

    .venv/bin/python bench/bench_sign.py [--seconds 5] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SOFTHSM_MODULE, LoadResult, daemon, run_load, softhsm_token, unix_session, workdir
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


async def socket_load(sock: Path, identity: str, clients: int, seconds: float) -> LoadResult:
    body = {"identity": identity, "msg_type": "ballot", "proposal_id": PROPOSAL_ID, "payload": BALLOT}

    async def one(session: aiohttp.ClientSession) -> bool:
        async with session.post("http://agent/v1/sign", json=body) as resp:
            await resp.read()
            return resp.status == 200

    return await run_load(unix_session(sock), one, clients=clients, seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--curve", choices=["secp384r1", "secp256r1"], default="secp384r1")
    args = parser.parse_args()
    alg = ES384 if args.curve == "secp384r1" else ES256

    folder = workdir()
    env = softhsm_token(folder / "hsm")
    member_file, member_hsm = make_member("file", args.curve), make_member("hsm", args.curve)
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

    print(f"signing-agent benchmark: {alg.name}, {args.clients} concurrent clients, {args.seconds:g} s per run")
    in_proc = in_process_rate(member_file.key, alg, args.seconds)
    in_proc_verified = in_process_verified_rate(member_file.key, alg, args.seconds)
    direct = direct_pkcs11_rate("hsm", alg, args.seconds)
    with daemon(config, env) as agent:
        file_load = asyncio.run(socket_load(agent.socket, "file", args.clients, args.seconds))
        hsm_load = asyncio.run(socket_load(agent.socket, "hsm", args.clients, args.seconds))
        rss = agent.rss_mib()
        start = agent.start_seconds
    cli = ccf_cli_seconds(folder, key_path, cert_path)

    rows = [
        ("in-process cryptography (1 thread)", f"{in_proc:8.0f}/s", "", ""),
        ("in-process sign + verify (the agent's crypto)", f"{in_proc_verified:8.0f}/s", "", ""),
        ("agent, file backend, over the socket", f"{file_load.rate:8.0f}/s", f"{file_load.p50:6.1f}",
         f"{file_load.pct(0.99):6.1f}"),
        ("direct PKCS#11 on SoftHSM2 (1 session)", f"{direct:8.0f}/s", "", ""),
        ("agent, pkcs11 backend, over the socket", f"{hsm_load.rate:8.0f}/s", f"{hsm_load.p50:6.1f}",
         f"{hsm_load.pct(0.99):6.1f}"),
        ("ccf_cose_sign1 CLI, one process per message", f"{1 / cli:8.1f}/s", f"{cli * 1000:6.0f}", ""),
    ]  # fmt: skip
    print(f"\n{'':45} {'rate':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for name, rate, p50, p99 in rows:
        print(f"{name:45} {rate:>10} {p50:>7} {p99:>7}")
    errors = file_load.errors + hsm_load.errors
    worst_p99 = max(file_load.pct(0.99), hsm_load.pct(0.99))
    checks = [
        ("file backend >= 0.5x in-process", file_load.rate / in_proc, 0.5, f"{file_load.rate / in_proc:.2f}x"),
        (
            "(file backend vs in-process sign + verify)",
            file_load.rate / in_proc_verified,
            0.5,
            f"{file_load.rate / in_proc_verified:.2f}x",
        ),
        ("pkcs11 backend >= 0.8x direct", hsm_load.rate / direct, 0.8, f"{hsm_load.rate / direct:.2f}x"),
        ("p99 <= 20 ms", 20 / worst_p99, 1.0, f"{worst_p99:.1f} ms"),
        ("RSS <= 120 MiB under load", 120 / rss, 1.0, f"{rss:.0f} MiB"),
        ("start to ready <= 1.5 s", 1.5 / start, 1.0, f"{start:.2f} s"),
        ("no errors", 1.0 if errors == 0 else 0.0, 1.0, f"{errors} errors"),
    ]
    print()
    for name, value, target, shown in checks:
        print(f"{'MET ' if value >= target else 'MISS'}  {name:36} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
