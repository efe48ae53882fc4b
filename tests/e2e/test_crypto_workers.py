"""The crypto workers and the fsync helper through the real daemon (``python -m signing_agent serve``) and its socket.

The daemon runs ``agent.crypto_workers`` children that sign with its file keys, and one child that fsyncs the audit
log. These tests hold it to its promises when those children fail or are signalled: a worker killed with signatures
in it, the fsync helper killed with an fsync in it, and a systemd stop that signals every process of the unit at
once, each under a load of concurrent clients; and no secret in a child's command line or environment.

A process is made to hold work for certain before it is killed: it is stopped (SIGSTOP) first, and the test waits
until the work is seen waiting in it (bytes in a worker's pipe, requests in the audit log without their answer).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ccf.cose import validate_cose_sign1
from cryptography.hazmat.primitives import serialization

from signing_agent.client import AgentClient, Response
from signing_agent.client.errors import AgentUnreachableError
from tests.e2e.test_audit_log import cli, records, wait_for
from tests.support.agent import DaemonProcess, daemon, file_identity, write_toml
from tests.support.pki import Member, make_member
from tests.support.procs import children, private_proc_files, running_modules, unread_stdin

pytestmark = pytest.mark.e2e

WORKER = "signing_agent.workers.child"
"""The crypto worker's module; the daemon's other child (``signing_agent.workers.*``) is the fsync helper."""
CLIENTS = 8
SIGNATURES = 300


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    """One identity per algorithm: ES256, ES384 and ES512."""
    curves = {"p256": "secp256r1", "p384": "secp384r1", "p521": "secp521r1"}
    return {name: make_member(name, curve) for name, curve in curves.items()}


def agent_config(workdir: Path, members: dict[str, Member], *, workers: int, **tables: Any) -> Path:
    config: dict[str, Any] = {
        "agent": {"socket": workdir / "run" / "agent.sock", "crypto_workers": workers},
        "audit": {"path": audit_log(workdir)},
    }
    for name, member in members.items():
        key, cert = member.write(workdir / "keys")
        config.update(file_identity(name, cert, key))
    config.update(tables)
    return write_toml(workdir / "agent.toml", config)


def audit_log(workdir: Path) -> Path:
    return workdir / "audit" / "audit.jsonl"


def sign(sock: Path, identity: str) -> Response:
    return AgentClient(sock, timeout=120).request(
        "POST", "/v1/sign", {"identity": identity, "msg_type": "state_digest"}
    )


def crypto_children(daemon_pid: int) -> tuple[list[int], list[int]]:
    """The daemon's crypto workers and fsync helpers; fails unless this test may read their private /proc files."""
    modules = running_modules(daemon_pid, "signing_agent.workers")
    for pid in modules:
        private_proc_files(pid)
    workers = sorted(pid for pid, module in modules.items() if module == WORKER)
    return workers, sorted(pid for pid, module in modules.items() if module != WORKER)


def answered_in_audit(log: Path) -> tuple[set[str], set[str]]:
    """The request ids the live audit log has a ``received`` record for, and those it has an answer for (a
    ``signed`` or ``failed`` record). A line being written as we read is left for the next look."""
    received: set[str] = set()
    answered: set[str] = set()
    for line in log.read_bytes().split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "received":
            received.add(record["request_id"])
        elif record.get("event") in ("signed", "failed"):
            answered.add(record["request_id"])
    return received, answered


def in_flight_in_the_daemon(log: Path) -> int:
    received, answered = answered_in_audit(log)
    return len(received - answered)


def stuck_in(workers: Sequence[int], log: Path) -> bool:
    """Every client has a request in the daemon (received, not answered), and jobs wait in the (stopped) workers'
    pipes. With the workers stopped, no request can be answered: this state lasts until they go on."""
    return in_flight_in_the_daemon(log) == CLIENTS and sum(unread_stdin(pid) for pid in workers) > 0


def check_audit(log: Path, answers: int) -> None:
    """``audit verify`` accepts the log, and it holds one ``signed`` record for each signature answered, and no
    ``failed`` one."""
    result = cli("audit", "verify", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    events = [r["event"] for r in records(log)]
    assert events.count("failed") == 0
    assert events.count("signed") == events.count("received") == answers


class SigningLoad:
    """``CLIENTS`` clients (threads) that sign in a loop over the daemon's socket, one connection per request, round
    robin over the identities, until ``finish`` or ``stop``. Every answer, and every request that got none, is kept.
    """

    def __init__(self, sock: Path, identities: Sequence[str]) -> None:
        self._sock = sock
        self._identities = list(identities)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.answers: list[tuple[str, Response]] = []
        self.unanswered: list[str] = []
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)]

    def __enter__(self) -> SigningLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _client(self, number: int) -> None:
        for request in range(number, 1_000_000, CLIENTS):
            if self._stopping.is_set():
                return
            identity = self._identities[request % len(self._identities)]
            try:
                answer = sign(self._sock, identity)
            except AgentUnreachableError as exc:
                with self._lock:
                    self.unanswered.append(f"{identity}: {exc}")
                return
            with self._lock:
                self.answers.append((identity, answer))

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for(self, answers: int) -> None:
        wait_for(lambda: self.count >= answers or not self.running, f"{answers} signatures", timeout=120)
        assert not self.unanswered, self.unanswered

    def wait_until_stalled(self, seconds: float) -> None:
        """Until no answer has come for ``seconds`` (at most two minutes)."""
        since, last = time.monotonic(), self.count
        deadline = since + 120
        while time.monotonic() - since < seconds and time.monotonic() < deadline:
            time.sleep(0.05)
            if self.count != last:
                since, last = time.monotonic(), self.count

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def stop_sending(self) -> None:
        """Each client sends no more requests once it has the answer to the one it is in."""
        self._stopping.set()

    def stop(self) -> list[tuple[str, Response]]:
        """Let each client finish the request it is in, then stop; every answer."""
        self.stop_sending()
        for thread in self._threads:
            thread.join(180)
        assert not self.running, "a client is still waiting for its answer"
        return list(self.answers)

    def finish(self, answers: int = SIGNATURES) -> list[tuple[str, Response]]:
        """At least ``answers`` signatures, then stop."""
        self.wait_for(answers)
        return self.stop()


def check_signed(answers: list[tuple[str, Response]], members: dict[str, Member]) -> None:
    """Every answer is a 200 with a COSE_Sign1 that CCF's reference code validates against the member's key."""
    failures = [(identity, a.status, a.body[:300]) for identity, a in answers if a.status != 200]
    assert not failures, failures[:5]
    for identity, answer in answers:
        validate_cose_sign1(members[identity].cert.public_key(), answer.body)


@pytest.fixture
def agent(workdir: Path, members: dict[str, Member]) -> Iterator[DaemonProcess]:
    with daemon(agent_config(workdir, members, workers=2), timeout=60) as proc:
        yield proc


# -- (a) the workers are there and do the signing --------------------------------------------------------------------


def test_two_workers_and_the_fsync_helper_sign_what_ccf_validates(
    agent: DaemonProcess, members: dict[str, Member], workdir: Path
) -> None:
    daemon_pid = agent.proc.pid
    workers, syncers = crypto_children(daemon_pid)
    assert len(workers) == 2
    assert len(syncers) == 1
    assert sorted(children(daemon_pid)) == sorted(workers + syncers), children(daemon_pid)
    check_signed([(name, sign(agent.socket, name)) for _ in range(10) for name in members], members)
    # The signing is done in the workers: while both are stopped, no request is answered, and the jobs of those in
    # flight wait in the workers' pipes; once they go on, every one is answered.
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        with SigningLoad(agent.socket, list(members)) as load:
            wait_for(lambda: load.count > 0 or stuck_in(workers, audit_log(workdir)), "requests stuck", 120)
            assert load.count == 0
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            answers = load.finish(60)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    check_signed(answers, members)
    assert crypto_children(daemon_pid) == (workers, syncers)


def test_no_workers_with_crypto_workers_0(workdir: Path, members: dict[str, Member]) -> None:
    with daemon(agent_config(workdir, members, workers=0), timeout=60) as proc:
        assert children(proc.proc.pid) == {}
        answers = [(name, sign(proc.socket, name)) for name in members]
        check_signed(answers, members)
        assert children(proc.proc.pid) == {}


# -- (b) a worker killed with signatures in it ------------------------------------------------------------------------


def test_a_worker_killed_under_load_loses_no_request_and_is_replaced(
    agent: DaemonProcess, members: dict[str, Member], workdir: Path
) -> None:
    daemon_pid = agent.proc.pid
    workers, _ = crypto_children(daemon_pid)
    victim = workers[0]
    with SigningLoad(agent.socket, list(members)) as load:
        load.wait_for(50)
        os.kill(victim, signal.SIGSTOP)
        # Jobs sent to the stopped worker wait in its pipe: their requests are in flight in it.
        wait_for(lambda: unread_stdin(victim) > 0, "signing jobs waiting in the stopped worker", timeout=120)
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(now := crypto_children(daemon_pid)[0]) == 2 and victim not in now,
            "a replacement worker",
            timeout=120,
        )
        answers = load.finish()
    assert not load.unanswered, load.unanswered
    assert len(answers) >= SIGNATURES
    check_signed(answers, members)
    assert f"(pid {victim}) exited; starting another" in agent.stderr
    assert agent.stop() == 0
    check_audit(audit_log(workdir), len(answers))


# -- (c) the fsync helper killed with an fsync in it ----------------------------------------------------------------


def test_the_fsync_helper_killed_under_load_loses_no_request_and_no_record(
    agent: DaemonProcess, members: dict[str, Member], workdir: Path
) -> None:
    daemon_pid = agent.proc.pid
    workers, [helper] = crypto_children(daemon_pid)
    with SigningLoad(agent.socket, list(members)) as load:
        load.wait_for(50)
        os.kill(helper, signal.SIGSTOP)
        # Every request waits for the fsync of its group (the audit log's writer is one at a time): once none has
        # been answered for a second, the helper holds an fsync (were it not so, the helper would be killed between
        # two fsyncs, and the next one would find it dead: the fallback is tested all the same).
        load.wait_until_stalled(1.0)
        os.kill(helper, signal.SIGKILL)
        answers = load.finish()
    assert not load.unanswered, load.unanswered
    check_signed(answers, members)
    assert agent.stderr.count("fsyncing on a thread from now on") == 1, agent.stderr[-3000:]
    assert crypto_children(daemon_pid) == (workers, [])  # a thread for good: no helper is started again
    assert agent.stop() == 0
    check_audit(audit_log(workdir), len(answers))


# -- (d) systemctl stop: SIGTERM to every process of the unit -----------------------------------------------------


def test_a_stop_that_signals_every_process_drains_the_requests_in_flight(
    agent: DaemonProcess, members: dict[str, Member], workdir: Path
) -> None:
    """systemd's ``KillMode=control-group`` sends SIGTERM, then SIGCONT, to every process of the unit at once. The
    workers ignore it and the daemon drains: every request in flight (here all of them, stuck in the stopped
    workers) is answered with its signature, and the daemon exits 0."""
    daemon_pid = agent.proc.pid
    workers, syncers = crypto_children(daemon_pid)
    log = audit_log(workdir)
    with SigningLoad(agent.socket, list(members)) as load:
        load.wait_for(50)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: stuck_in(workers, log), "every client's request stuck in the workers", 120)
        answered = load.count
        unit = [daemon_pid, *workers, *syncers]
        assert sorted(children(daemon_pid)) == sorted(workers + syncers)
        load.stop_sending()  # no new request: each client waits for the answer to the one it is in
        for signum in (signal.SIGTERM, signal.SIGCONT):
            for pid in unit:
                os.kill(pid, signum)
        answers = load.stop()
        assert agent.proc.wait(60) == 0, agent.stderr[-3000:]
    assert not load.unanswered, load.unanswered
    assert len(answers) == answered + CLIENTS
    check_signed(answers, members)
    assert f"draining {CLIENTS} in-flight request(s)" in agent.stderr
    check_audit(log, len(answers))


# -- (e) no secret in a child's command line or environment -------------------------------------------------------


def test_no_secret_reaches_a_childs_command_line_or_environment(workdir: Path, members: dict[str, Member]) -> None:
    """Besides the file keys, one identity's PIN and another's client secret are in the daemon's environment (both
    identities then fail to open: no token, no vault; the daemon serves degraded). The workers get the file keys
    over their pipes only; no child inherits a secret variable."""
    pin, client_secret = base64.b32encode(os.urandom(15)).decode(), base64.b32encode(os.urandom(20)).decode()
    _, cert = members["p256"].write(workdir / "keys")
    config = agent_config(
        workdir,
        members,
        workers=2,
        keyvault={"max_attempts": 1, "total_timeout": 10.0},
        **{
            "identities.hsm": {"certificate": cert},
            "identities.hsm.signing_key": {
                "backend": "pkcs11",
                "module": workdir / "no-such-module.so",
                "token_label": "t",
                "key_label": "k",
                "pin_env": "SA_TEST_WORKER_PIN",
            },
            "identities.cs": {"certificate": cert},
            "identities.cs.signing_key": {
                "backend": "azure-keyvault",
                "vault_url": "https://127.0.0.1:1",
                "key_name": "k",
                "credential": "client-secret",
                "tenant_id": "00000000-0000-0000-0000-000000000001",
                "client_id": "00000000-0000-0000-0000-000000000002",
                "client_secret_env": "SA_TEST_WORKER_SECRET",
            },
        },
    )
    env = {"SA_TEST_WORKER_PIN": pin, "SA_TEST_WORKER_SECRET": client_secret}
    secrets: dict[str, bytes] = {"the PIN": pin.encode(), "the client secret": client_secret.encode()}
    for name, member in members.items():
        der = member.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pem_body = member.key_pem.decode().splitlines()[1:-1]
        scalar = member.key.private_numbers().private_value
        secrets[f"{name}'s PKCS#8 DER"] = der
        secrets[f"{name}'s PEM"] = max(pem_body, key=len).encode()
        secrets[f"{name}'s private value (hex)"] = f"{scalar:x}".encode()
        secrets[f"{name}'s private value (decimal)"] = str(scalar).encode()
    with daemon(config, env=env, args=["--allow-degraded"], timeout=60) as proc:
        answers = [(name, sign(proc.socket, name)) for name in members]
        check_signed(answers, members)
        workers, syncers = crypto_children(proc.proc.pid)
        assert len(workers) == 2
        assert len(syncers) == 1
        leaks = []  # named, never shown: an assertion on the bytes would print the secrets
        for pid in workers + syncers:
            for part in ("cmdline", "environ"):
                seen = Path(f"/proc/{pid}/{part}").read_bytes()
                leaks += [f"{what} in /proc/{pid}/{part}" for what, secret in secrets.items() if secret in seen]
                leaks += [f"a secret variable in /proc/{pid}/{part}"] if b"SA_TEST_WORKER_" in seen else []
        assert leaks == []
        assert "identity hsm failed" in proc.stderr
        assert "identity cs failed" in proc.stderr
