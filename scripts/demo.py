"""`make demo`: a governance round between CCF members whose keys live in a SoftHSM2 token.

It starts the local CCF governance sandbox and the agent (keys made in a SoftHSM2 token on the first run, kept in
.demo/), then drives the agent through its CLI, as a member would: sign a message and verify it with CCF's own
tooling, propose a new member, vote it in, activate it, and withdraw a proposal. Re-runs reuse the token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
TOKEN_LABEL = "signing-agent-demo"  # noqa: S105 -- a label, not a secret
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
MEMBERS = ("member0", "member1", "member2")

BOLD, DIM, GREEN, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[0m") if sys.stdout.isatty() else ("",) * 4


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def run(*args: str, env: dict[str, str], show: bool = True, stdin: bytes | None = None) -> str:
    """Run ``signing-agent ARGS`` and echo the command and its output."""
    cmd = [sys.executable, "-m", "signing_agent", *args]
    if show:
        print(f"{DIM}$ signing-agent {' '.join(args)}{RESET}", flush=True)
    result = subprocess.run(cmd, env=env, input=stdin, capture_output=True, timeout=120, check=False)
    out = result.stdout.decode("utf-8", "replace")
    if result.returncode != 0:
        sys.stderr.write(result.stderr.decode("utf-8", "replace"))
        raise SystemExit(f"demo: 'signing-agent {' '.join(args)}' failed ({result.returncode})")
    if show and out.strip():
        print(out.rstrip())
    return out


def ensure_token(env: dict[str, str]) -> None:
    """A SoftHSM2 token private to .demo/, with one member key per member, made on the first run."""
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        raise SystemExit("demo: SoftHSM2 is not installed (make demo installs it when run as root)")
    tokens = DEMO / "softhsm" / "tokens"
    conf = DEMO / "softhsm" / "softhsm2.conf"
    pin = DEMO / "token.pin"
    if not (DEMO / "member2_cert.pem").exists():
        step("first run: creating a SoftHSM2 token and member keys inside it")
        shutil.rmtree(DEMO / "softhsm", ignore_errors=True)
        tokens.mkdir(parents=True)
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n"
        )
        pin.write_text("1234\n")
        pin.chmod(0o600)
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin", "5678", "--pin", "1234"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        for name in MEMBERS:
            run(
                "keys", "generate", "--module", SOFTHSM_MODULE, "--token-label", TOKEN_LABEL,
                "--pin-file", str(pin), "--label", name, "--common-name", name,
                "--cert-out", str(DEMO / f"{name}_cert.pem"),
                env=env, show=name == "member0",
            )  # fmt: skip
            print(f"{GREEN}created {name}'s P-384 key in the token; its certificate is .demo/{name}_cert.pem{RESET}")


def write_config(service_url: str) -> Path:
    lines = [
        "[agent]",
        'socket = "run/agent.sock"',
        "",
        "[services.default]",
        f'url = "{service_url}"',
        'service_certificate = "sandbox/service_cert.pem"',
        "",
    ]
    for name in MEMBERS:
        lines += [
            f"[identities.{name}]",
            f'certificate = "{name}_cert.pem"',
            "",
            f"[identities.{name}.signing_key]",
            'backend = "pkcs11"',
            f'module = "{SOFTHSM_MODULE}"',
            f'token_label = "{TOKEN_LABEL}"',
            f'key_label = "{name}"',
            'pin_file = "token.pin"',
            "",
        ]
    path = DEMO / "agent.toml"
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def background(name: str, args: list[str], ready: Path, env: dict[str, str]) -> Iterator[str]:
    """Start ``signing-agent ARGS`` in the background and wait for its ready file."""
    ready.unlink(missing_ok=True)
    log = DEMO / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "signing_agent", *args], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.stderr.write(log.read_text())
            raise SystemExit(f"demo: the {name} did not start (log: {log})")
        time.sleep(0.05)
    try:
        yield ready.read_text().strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def verify_with_ccf(cose: Path, cert: Path) -> None:
    from ccf.cose import validate_cose_sign1
    from cryptography import x509

    public_key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    validate_cose_sign1(public_key, cose.read_bytes())  # type: ignore[no-untyped-call]  # ccf ships no types


def main() -> int:
    started = time.monotonic()
    DEMO.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNING_AGENT_")}
    env["SOFTHSM2_CONF"] = str(DEMO / "softhsm" / "softhsm2.conf")
    ensure_token(env)

    step("starting the CCF governance sandbox (member0 and member1 are its active members)")
    sandbox_args = ["sandbox", "--service-cert-out", str(DEMO / "sandbox" / "service_cert.pem")]
    sandbox_args += ["--member-cert", str(DEMO / "member0_cert.pem"), "--member-cert", str(DEMO / "member1_cert.pem")]
    (DEMO / "sandbox").mkdir(exist_ok=True)
    with background("sandbox", [*sandbox_args, "--ready-file", str(DEMO / "sandbox.ready")], DEMO / "sandbox.ready",
                    env) as url:  # fmt: skip
        print(f"CCF sandbox at {url}, TLS pinned to .demo/sandbox/service_cert.pem")
        config = write_config(url)

        step("starting signing-agent (keys stay in the SoftHSM2 token)")
        agent_args = ["serve", "--config", str(config), "--ready-file", str(DEMO / "agent.ready")]
        with background("agent", agent_args, DEMO / "agent.ready", env) as sock:
            env["SIGNING_AGENT_SOCK"] = sock
            print(f"agent listening on {sock}")
            run("identities", env=env)

            step("sign a governance message through the socket, then verify it with CCF's own ccf.cose")
            proposal = DEMO / "trust_node.json"
            trust = {
                "name": "transition_node_to_trusted",
                "args": {"node_id": "ab" * 32, "valid_from": "240101000000Z"},
            }
            proposal.write_text(json.dumps({"actions": [trust]}))
            cose = DEMO / "trust_node.cose"
            run("sign", "--identity", "member0", "--ccf-gov-msg-type", "proposal", "--content", str(proposal),
                "--out", str(cose), env=env)  # fmt: skip
            verify_with_ccf(cose, DEMO / "member0_cert.pem")
            print(f"{GREEN}{cose.stat().st_size}-byte COSE_Sign1 verified by ccf.cose.validate_cose_sign1 "
                  f"against member0's certificate{RESET}")  # fmt: skip

            run("status", env=env)

            step("member0 proposes to add member2; member0 and member1 vote to accept")
            add = DEMO / "add_member2.json"
            cert_pem = (DEMO / "member2_cert.pem").read_text()
            add.write_text(json.dumps({"actions": [{"name": "set_member", "args": {"cert": cert_pem}}]}))
            created = json.loads(run("propose", str(add), "--identity", "member0", "--json", env=env, show=False))
            proposal_id = created["proposalId"]
            print(f"{DIM}$ signing-agent propose {add} --identity member0{RESET}")
            print(f"proposal {proposal_id} is {created['proposalState']}")
            run("proposals", env=env)
            run("vote", proposal_id, "--accept", "--identity", "member0", env=env)
            run("vote", proposal_id, "--accept", "--identity", "member1", env=env)

            step("member2 activates itself through the agent (state digest update, then ack)")
            run("activate", "--identity", "member2", env=env)
            run("status", env=env)

            step("member2 proposes, then withdraws its proposal")
            created = json.loads(run("propose", str(proposal), "--identity", "member2", "--json", env=env, show=False))
            print(f"{DIM}$ signing-agent propose {proposal} --identity member2{RESET}")
            print(f"proposal {created['proposalId']} is {created['proposalState']}")
            run("withdraw", created["proposalId"], "--identity", "member2", env=env)

    step(f"done in {time.monotonic() - started:.1f} s: logs in .demo/agent.log and .demo/sandbox.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
