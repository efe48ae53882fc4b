"""``make bench``: every performance figure the agent promises, next to its target, in one run (ES384, 16 clients).

The targets (issue 15), all with the audit record durable before a signature leaves and every signature verified:
- file backend over the socket >= 1.0x in-process sign + verify on one core;
- pkcs11 backend over the socket >= 1.0x direct single-session signing on the same SoftHSM2 token;
- at 16 clients p99 <= 20 ms and p50 <= 5 ms; one client p50 <= 1.5 ms (file);
- ballots signed and forwarded to the sandbox over keep-alive TLS >= 500/s with P-384;
- RSS of the whole process tree <= 150 MiB under load; start to ready <= 1 s.

Everything runs on this machine's cores: the load generator (and the sandbox) share them with the agent.

    .venv/bin/python bench/run.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_governance, bench_sign


def verdict(ok: bool) -> str:
    return "MET " if ok else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"signing-agent benchmarks: ES384, 16 clients, {args.seconds:g} s per run, {cores} cores")
    sign = bench_sign.measure("secp384r1", args.seconds, 16)
    bench_sign.print_table(sign, 16)
    gov = bench_governance.measure("secp384r1", args.seconds, 16)
    name = "ballots through the agent to the sandbox, P-384"
    print(f"\n{name:46} {gov.rate:8.0f}/s {gov.p50:7.1f} {gov.pct(0.99):7.1f}")

    file_ratio = sign.file.rate / sign.in_process_verified
    pkcs11_ratio = sign.pkcs11.rate / sign.direct_pkcs11
    p99 = max(sign.file.pct(0.99), sign.pkcs11.pct(0.99))
    p50 = max(sign.file.p50, sign.pkcs11.p50)
    errors = sign.file.errors + sign.file_one_client.errors + sign.pkcs11.errors + gov.errors
    checks = [
        ("file backend >= 1.0x in-process sign + verify", file_ratio >= 1.0,
         f"{file_ratio:.2f}x ({sign.file.rate:.0f}/s vs {sign.in_process_verified:.0f}/s)"),
        ("pkcs11 backend >= 1.0x direct SoftHSM2", pkcs11_ratio >= 1.0,
         f"{pkcs11_ratio:.2f}x ({sign.pkcs11.rate:.0f}/s vs {sign.direct_pkcs11:.0f}/s)"),
        ("p99 <= 20 ms at 16 clients", p99 <= 20, f"{p99:.1f} ms (worst of file, pkcs11)"),
        ("p50 <= 5 ms at 16 clients", p50 <= 5,
         f"{p50:.1f} ms (worst; 16 clients always waiting: p50 ~ 16 / rate, {16 / sign.file.rate * 1000:.1f} ms "
         "for the file rate)"),
        ("1 client p50 <= 1.5 ms (file)", sign.file_one_client.p50 <= 1.5, f"{sign.file_one_client.p50:.2f} ms"),
        (">= 500 ballots/s with P-384", gov.rate >= 500, f"{gov.rate:.0f}/s"),
        ("process tree RSS <= 150 MiB under load", sign.tree_rss_mib <= 150, f"{sign.tree_rss_mib:.0f} MiB"),
        ("start to ready <= 1 s", sign.start_seconds <= 1.0, f"{sign.start_seconds:.2f} s"),
        ("no errors", errors == 0, f"{errors} errors"),
    ]  # fmt: skip
    print()
    for name, ok, shown in checks:
        print(f"{verdict(ok)}  {name:40} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
