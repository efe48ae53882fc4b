"""Ballots signed by the agent and forwarded to the CCF sandbox over keep-alive TLS, per second.

Next to it: the per-message time of the classic pipeline, ``ccf_cose_sign1 ... | curl`` (one process each, a new
TLS connection per message). Target: >= 500 ballots/s on a 2-core machine. The sandbox verifies every ballot's COSE
signature like CCF does, and runs on the same machine, so it shares the cores with the agent and the load.

    .venv/bin/python bench/bench_governance.py [--seconds 5] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Daemon, LoadResult, daemon, http_request, raw_load, workdir
from signing_agent.client import AgentClient
from tests.support.pki import make_member
from tests.support.sandbox_proc import SandboxProcess, sandbox

BALLOT = "export function vote (proposal, proposerId) { return true }"


def ballots(sock: Path, identity: str, proposal_id: str, clients: int, seconds: float) -> LoadResult:
    body = json.dumps({"identity": identity, "ballot": BALLOT}).encode()
    request = http_request("POST", f"/v1/services/default/proposals/{proposal_id}/ballots", body)
    return asyncio.run(raw_load(sock, request, clients=clients, seconds=seconds))


@contextlib.contextmanager
def governed_agent(folder: Path, curve: str) -> Iterator[tuple[Daemon, str, Path, Path, SandboxProcess, str]]:
    """An agent with one member identity, and the sandbox with that member and two more (so one accepting ballot
    never reaches a majority: the proposal stays Open, and every ballot is a full sign + verify + submit)."""
    member = make_member(f"m-{curve}", curve)
    key, cert = member.write(folder)
    others = [make_member(f"x{i}", curve).write(folder)[1] for i in range(2)]
    with sandbox(folder / "sandbox", [cert, *others]) as sb:
        config = folder / "agent.toml"
        config.write_text(
            f'[agent]\nsocket = "{folder}/run/agent.sock"\n'
            f'[identities.m]\ncertificate = "{cert}"\n'
            f'[identities.m.signing_key]\nbackend = "file"\npath = "{key}"\n'
            f'[services.default]\nurl = "{sb.url}"\nservice_certificate = "{sb.service_cert}"\n'
        )
        with daemon(config, {}) as agent:
            client = AgentClient(agent.socket)
            proposal = {
                "actions": [
                    {
                        "name": "transition_node_to_trusted",
                        "args": {"node_id": "ab" * 32, "valid_from": "20240101000000Z"},
                    }
                ]
            }
            pid = client.call("POST", "/v1/services/default/proposals", {"identity": "m", "proposal": proposal})
            yield agent, pid.json()["proposalId"], key, cert, sb, member.member_id


def measure(curve: str = "secp384r1", seconds: float = 5.0, clients: int = 16) -> LoadResult:
    """Ballots per second through the agent to the sandbox."""
    with governed_agent(workdir() / curve, curve) as (agent, proposal_id, *_):
        ballots(agent.socket, "m", proposal_id, clients, min(1.0, seconds))  # warm: TLS sessions, workers
        return ballots(agent.socket, "m", proposal_id, clients, seconds)


def classic_pipeline_seconds(folder: Path, key: Path, cert: Path, url: str, ca: Path, pid: str, mid: str) -> float:
    """``ccf_cose_sign1 | curl`` for one ballot, averaged over a few runs."""
    if shutil.which("curl") is None:
        return float("nan")
    content = folder / "ballot.json"
    content.write_text(json.dumps({"ballot": BALLOT}))
    tool = Path(sys.executable).parent / "ccf_cose_sign1"
    runs = 5
    started = time.monotonic()
    for _ in range(runs):
        script = (
            f"{tool} --signing-key {key} --signing-cert {cert} --ccf-gov-msg-type ballot "
            f"--ccf-gov-msg-proposal_id {pid} --ccf-gov-msg-created_at $(date -u +%Y-%m-%dT%H:%M:%S+00:00) "
            f"--content {content} | curl -sS --fail --cacert {ca} -H 'Content-Type: application/cose' "
            f"--data-binary @- '{url}/gov/members/proposals/{pid}/ballots/{mid}:submit?api-version=2024-07-01' "
            "-o /dev/null"
        )
        subprocess.run(["bash", "-c", script], check=True)
    return (time.monotonic() - started) / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    print(f"governance benchmark: ballots through the agent to the sandbox, {args.clients} clients, {args.seconds:g} s")
    print(f"\n{'':52} {'rate':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for curve, label in (("secp384r1", "P-384 (keygenerator.sh's default)"), ("secp256r1", "P-256")):
        load = measure(curve, args.seconds, args.clients)
        line = f"{'agent -> sandbox, ' + label:52} {load.rate:8.0f}/s {load.p50:7.1f} {load.pct(0.99):7.1f}"
        print(line + (f"  ({load.errors} errors)" if load.errors else ""))
    folder = workdir() / "classic"
    with governed_agent(folder, "secp384r1") as (_, proposal_id, key, cert, sb, member_id):
        per = classic_pipeline_seconds(folder, key, cert, sb.url, sb.service_cert, proposal_id, member_id)
    print(f"{'ccf_cose_sign1 | curl, P-384, one message at a time':52} {1 / per:8.1f}/s {per * 1000:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
