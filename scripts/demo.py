"""`make demo`: a consortium's life, through the agent's workflow commands, with member keys in a SoftHSM2 token.

It starts the local CCF governance sandbox as a new service (Opening) and the agent (keys made in a SoftHSM2 token on
the first run, kept in .demo/), then drives the agent through its CLI, as members would: sign a proposal and verify
it with CCF's own tooling, open the service, add a member and activate it, trust a node that joins, propose and
withdraw. Then the disaster: the service restarts into recovery with a new identity, the operator reads that identity
(``service identity``), checks it, lists it (``accepted_service_certificates``, then ``signing-agent reload``), the
members accept the recovery (``recovery accept``: the previous and the next identity), and the agent's unattended
watchers decrypt member0's and member1's recovery shares in the token and submit them: the service is Open again.
Every proposal is built and checked by the agent; no proposal JSON is written by hand. Re-runs reuse the token.

The encryption keys are in the same SoftHSM2 token with ``oaep = "host"``: SoftHSM2 2.6 has no RSA-OAEP with
SHA-256, so the token does raw RSA and the agent decodes OAEP on the host. ``keys generate --encryption-key`` finds
that out and prints that configuration; it is the opt-in for such tokens (see the README's "Recovery" section for
its risk); an HSM or an NSS softoken does OAEP-SHA256 itself (``oaep = "token"``, the default), and the end-to-end
tests use both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
TOKEN_LABEL = "signing-agent-demo"  # noqa: S105 -- a label, not a secret
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
MEMBERS = ("member0", "member1", "member2")
RECOVERY_MEMBERS = ("member0", "member1")
PROCS: dict[str, subprocess.Popen[bytes]] = {}

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
    if not (DEMO / "member1_enc_pubk.pem").exists():
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
            for old in (DEMO / f"{name}_cert.pem", DEMO / f"{name}_enc_pubk.pem"):
                old.unlink(missing_ok=True)
            enc = ["--encryption-key", "--enc-pub-out", str(DEMO / f"{name}_enc_pubk.pem")]
            run(
                "keys", "generate", "--module", SOFTHSM_MODULE, "--token-label", TOKEN_LABEL,
                "--pin-file", str(pin), "--label", name, "--common-name", name,
                "--cert-out", str(DEMO / f"{name}_cert.pem"), *(enc if name in RECOVERY_MEMBERS else []),
                env=env, show=name == "member0",
            )  # fmt: skip
            print(f"{GREEN}created {name}'s P-384 key in the token; its certificate is .demo/{name}_cert.pem{RESET}")


def write_config(service_url: str, *, accepted: str | None = None) -> Path:
    lines = [
        "[agent]",
        'socket = "run/agent.sock"',
        "",
        "[recovery]",
        "enabled = true",
        "poll_interval = 0.5",
        'state_dir = "state"',
        "",
        "[services.default]",
        f'url = "{service_url}"',
        'service_certificate = "service_cert.pem"        # a copy: the sandbox rewrites its own on recovery',
        f"recovery_identities = {json.dumps(list(RECOVERY_MEMBERS))}",
        *([f'accepted_service_certificates = ["{accepted}"]'] if accepted else []),
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
        if name in RECOVERY_MEMBERS:
            lines += [
                f"[identities.{name}.encryption_key]",
                'backend = "pkcs11"',
                f'module = "{SOFTHSM_MODULE}"',
                f'token_label = "{TOKEN_LABEL}"',
                f'key_label = "{name}-enc"',
                'pin_file = "token.pin"',
                'oaep = "host"                     # SoftHSM2 2.6 lacks OAEP-SHA256: raw RSA in the token',
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
    PROCS[name] = proc
    try:
        yield ready.read_text().strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def sandbox_control(url: str, path: str, body: object) -> dict[str, object]:
    """The sandbox's control API (a test double's back door: a real CCF has nothing like it)."""
    ctx = ssl.create_default_context(cafile=str(DEMO / "sandbox" / "service_cert.pem"))
    req = urllib.request.Request(  # noqa: S310 -- https to loopback
        url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
        result: dict[str, object] = json.loads(resp.read())
    return result


def wait_for(env: dict[str, str], status: str, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, object] = json.loads(run("status", "--json", env=env, show=False))
        if body.get("status") == status or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def propose(env: dict[str, str], *args: str) -> str:
    """A workflow command that makes a proposal; the proposal id it prints on its first line."""
    return run(*args, env=env).splitlines()[0]


def vote(env: dict[str, str], proposal_id: str, *identities: str) -> None:
    for identity in identities:
        run("vote", proposal_id, "--accept", "--identity", identity, env=env)


def disaster(url: str, env: dict[str, str]) -> None:
    """The service restarts into recovery; the members accept it through the agent; the watchers submit shares."""
    step("DISASTER: the service restarts in recovery mode with a new service identity")
    answer = sandbox_control(url, "/_sandbox/recover", {})
    print(f"service is {answer['status']}, recovery count {answer['recoveryCount']}")
    result = subprocess.run([sys.executable, "-m", "signing_agent", "status"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    print(f"{DIM}$ signing-agent status{RESET}\n{result.stderr.strip().splitlines()[0]}")
    print(f"{GREEN}the agent refuses the new identity: nothing is sent to a service it does not trust{RESET}")

    step("the operator reads the identity the service presents, checks its fingerprint out of band, lists it")
    run("service", "identity", "--save", str(DEMO / "recovered_service_cert.pem"), env=env)
    write_config(url, accepted="recovered_service_cert.pem")
    print('accepted_service_certificates = ["recovered_service_cert.pem"]')
    run("reload", env=env)
    wait_for(env, "Recovering")
    run("service", "identity", env=env)

    step("the members accept the recovery: transition_service_to_open from the identity before to the one now")
    proposal_id = propose(env, "recovery", "accept", "--identity", "member0")
    vote(env, proposal_id, "member0", "member1")

    step("the agent's watchers see WaitingForRecoveryShares, decrypt each share in the token, sign and submit it")
    body = wait_for(env, "Open")
    run("recovery", "status", env=env)
    run("status", env=env)
    if body.get("status") != "Open":
        raise SystemExit("demo: the service did not open again")
    print(f"{GREEN}the service is Open again, recovery count {body.get('recoveryCount')}{RESET}")
    log = (DEMO / "agent.log").read_text()
    for line in log.splitlines():
        if "recovery share of" in line:
            print(f"{DIM}agent.log: {json.loads(line)['msg']}{RESET}")


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

    step("starting the CCF governance sandbox: a new service (Opening), member0 and member1 its recovery members")
    sandbox_args = ["sandbox", "--opening", "--recovery-threshold", "2",
                    "--service-cert-out", str(DEMO / "sandbox" / "service_cert.pem")]  # fmt: skip
    (DEMO / "sandbox").mkdir(exist_ok=True)
    shutil.rmtree(DEMO / "state", ignore_errors=True)  # each run is a new service
    for stale in ("recovered_service_cert.pem", "agent.log"):
        (DEMO / stale).unlink(missing_ok=True)
    with background("sandbox", [*sandbox_args, "--ready-file", str(DEMO / "sandbox.ready")], DEMO / "sandbox.ready",
                    env) as url:  # fmt: skip
        for name in RECOVERY_MEMBERS:
            sandbox_control(url, "/_sandbox/members", {
                "cert": (DEMO / f"{name}_cert.pem").read_text(),
                "encryption_pub_key": (DEMO / f"{name}_enc_pubk.pem").read_text(),
            })  # fmt: skip
        shutil.copyfile(DEMO / "sandbox" / "service_cert.pem", DEMO / "service_cert.pem")
        print(f"CCF sandbox at {url}, TLS pinned to .demo/service_cert.pem")
        config = write_config(url)

        step("starting signing-agent (keys stay in the SoftHSM2 token)")
        agent_args = ["serve", "--config", str(config), "--ready-file", str(DEMO / "agent.ready")]
        with background("agent", agent_args, DEMO / "agent.ready", env) as sock:
            env["SIGNING_AGENT_SOCK"] = sock
            print(f"agent listening on {sock}")
            run("identities", env=env)
            run("members", env=env)

            step("the proposal the agent would make (--dry-run), signed through the socket, verified by ccf.cose")
            member2 = str(DEMO / "member2_cert.pem")
            dry = json.loads(run("member", "add", "--cert", member2, "--identity", "member0", "--dry-run", "--json",
                                 env=env, show=False))  # fmt: skip
            print(f"{DIM}$ signing-agent member add --cert {member2} --identity member0 --dry-run{RESET}")
            print(f"policy: {dry['explanation']['decision']['reason']}; nothing signed, nothing sent")
            cose = DEMO / "add_member2.cose"
            run("sign", "--identity", "member0", "--ccf-gov-msg-type", "proposal", "--content", "-", "--out",
                str(cose), env=env, stdin=json.dumps(dry["proposal"]).encode())  # fmt: skip
            verify_with_ccf(cose, DEMO / "member0_cert.pem")
            print(f"{GREEN}{cose.stat().st_size}-byte COSE_Sign1 verified by ccf.cose.validate_cose_sign1 "
                  f"against member0's certificate{RESET}")  # fmt: skip

            step("the members open the new service (transition_service_to_open, to the identity it presents)")
            proposal_id = propose(env, "service", "open", "--identity", "member0")
            run("proposals", "--pending", "--identity", "member1", env=env)
            vote(env, proposal_id, "member0", "member1")
            run("status", env=env)

            step("member0 proposes to add member2; member0 and member1 vote it in; member2 activates itself")
            proposal_id = propose(env, "member", "add", "--cert", member2, "--identity", "member0")
            vote(env, proposal_id, "member0", "member1")
            run("activate", "--identity", "member2", env=env)
            run("members", env=env)

            step("a node joins; member1 proposes to trust it; member0 and member2 vote")
            joined = sandbox_control(url, "/_sandbox/nodes", {})
            run("nodes", env=env)
            proposal_id = propose(env, "node", "trust", str(joined["nodeId"]), "--identity", "member1")
            vote(env, proposal_id, "member0", "member2")
            run("nodes", env=env)

            step("member2 proposes to retire that node, then withdraws its proposal")
            proposal_id = propose(env, "node", "retire", str(joined["nodeId"]), "--identity", "member2")
            run("withdraw", proposal_id, "--identity", "member2", env=env)

            disaster(url, env)

    step(f"done in {time.monotonic() - started:.1f} s: logs in .demo/agent.log and .demo/sandbox.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
