"""Start-up of the command line: ``signing-agent sign`` against a running agent, next to ``ccf_cose_sign1`` signing
the same ballot with a key file, one process per message each, as a member's script runs them.

Runs each command ``--runs`` times, interleaved (so a busy machine slows both alike), through the console scripts a
user runs, and prints the medians, the interpreter's own start for reference, and the targets: ``sign``,
``--help`` and ``--version`` within 50 ms, ``sign`` at most 0.3x ``ccf_cose_sign1``'s per-message time.

    .venv/bin/python bench/bench_cli.py [--runs 20]

The package's bytecode is compiled first, as an installed wheel's is (``PYTHONDONTWRITEBYTECODE`` would otherwise
make every run compile the CLI from source).
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, daemon, workdir
from tests.support.agent import file_identity, write_toml
from tests.support.pki import make_member

PROPOSAL_ID = "ab" * 32
TARGET_MS = 50.0
TARGET_RATIO = 0.3


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    compileall.compile_dir(ROOT / "signing_agent", quiet=1)
    folder = workdir()
    key, cert = make_member("member0").write(folder)
    ballot = folder / "ballot.json"
    ballot.write_text('{"ballot":"export function vote (proposal, proposerId) { return true }"}')
    config = write_toml(
        folder / "agent.toml",
        {"agent": {"socket": folder / "run" / "agent.sock"}, "audit": {"path": folder / "audit.jsonl"},
         **file_identity("member0", cert, key)},
    )  # fmt: skip
    bin_dir = Path(sys.executable).parent
    message = ["--ccf-gov-msg-type", "ballot", "--ccf-gov-msg-proposal_id", PROPOSAL_ID, "--content", str(ballot)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNING_AGENT_", "COVERAGE_"))}
    with daemon(config, env) as agent:
        env["SIGNING_AGENT_SOCK"] = str(agent.socket)
        commands = {
            "python -c pass (the interpreter)": [sys.executable, "-c", "pass"],
            "signing-agent --version": [str(bin_dir / "signing-agent"), "--version"],
            "signing-agent --help": [str(bin_dir / "signing-agent"), "--help"],
            "signing-agent sign": [str(bin_dir / "signing-agent"), "sign", *message, "--out", str(folder / "a.cose")],
            "ccf_cose_sign1": [
                str(bin_dir / "ccf_cose_sign1"), "--signing-key", str(key), "--signing-cert", str(cert),
                "--ccf-gov-msg-created_at", "2024-07-01T00:00:00+00:00", *message,
            ],
        }  # fmt: skip
        for command in commands.values():  # warm the page cache and the agent
            timed(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                times[name].append(timed(command, env))
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}

    print(f"median of {args.runs} runs each, interleaved (ms):")
    for name, value in median.items():
        print(f"  {name:<36} {value:7.1f}   (min {min(times[name]) * 1000:.1f})")
    ratio = median["signing-agent sign"] / median["ccf_cose_sign1"]
    print(f"  signing-agent sign / ccf_cose_sign1    {ratio:7.2f}x")
    checks = [
        (f"signing-agent sign <= {TARGET_MS:g} ms", median["signing-agent sign"] <= TARGET_MS),
        (f"signing-agent --help <= {TARGET_MS:g} ms", median["signing-agent --help"] <= TARGET_MS),
        (f"signing-agent --version <= {TARGET_MS:g} ms", median["signing-agent --version"] <= TARGET_MS),
        (f"signing-agent sign <= {TARGET_RATIO:g}x ccf_cose_sign1", ratio <= TARGET_RATIO),
    ]
    print("targets:")
    for what, met in checks:
        print(f"  {what:<44} {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
