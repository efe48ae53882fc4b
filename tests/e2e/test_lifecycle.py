"""The daemon as a service: sd_notify to a real NOTIFY_SOCKET, an inherited (socket-activated) listener, SIGHUP
reloads that swap atomically or are rejected, degraded start, and the ``health`` / ``check-config`` commands."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signing_agent.client import AgentClient
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, write_toml
from tests.support.pki import Member, make_member

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1")}


def tables(workdir: Path, members: dict[str, Member], names: list[str], **agent: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"agent": {"socket": workdir / "run" / "agent.sock", **agent}}
    for name in names:
        key, cert = members[name].write(workdir / "keys")
        out.update(file_identity(name, cert, key))
    return out


def mismatched(workdir: Path, members: dict[str, Member], name: str = "bad") -> dict[str, dict[str, Any]]:
    key, _ = members["m0"].write(workdir / "keys")
    _, cert = members["m1"].write(workdir / "keys")
    return file_identity(name, cert, key)


def cli(*args: str, sock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        capture_output=True,
        text=True,
        env=cli_env({"SIGNING_AGENT_SOCK": str(sock)}),
        timeout=60,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def identity_names(sock: Path) -> set[str]:
    return {i["name"] for i in AgentClient(sock, timeout=10).identities()}


def metric(sock: Path, name: str) -> float:
    text = AgentClient(sock, timeout=10).call("GET", "/metrics").body.decode()
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def test_sd_notify_ready_watchdog_and_stopping(workdir: Path, members: dict[str, Member]) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(workdir / "notify.sock"))
    receiver.settimeout(10)
    env = {"NOTIFY_SOCKET": str(workdir / "notify.sock"), "WATCHDOG_USEC": "200000"}
    messages: list[str] = []

    def until(field: str) -> None:
        while not any(field in m.split("\n") for m in messages):
            messages.append(receiver.recv(4096).decode())

    with receiver, daemon(write_toml(workdir / "agent.toml", tables(workdir, members, ["m0"])), env=env) as proc:
        until("READY=1")
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert f"MAINPID={proc.proc.pid}" in ready
        assert "STATUS=serving: 1 identities" in ready
        # The watchdog pings every WATCHDOG_USEC / 2 = 0.1 s.
        started = time.monotonic()
        pings = 0
        while pings < 3:
            pings += receiver.recv(4096) == b"WATCHDOG=1"
        assert time.monotonic() - started < 3
        proc.proc.send_signal(signal.SIGTERM)
        messages.clear()
        until("STOPPING=1")
        assert proc.proc.wait(15) == 0


def test_socket_activation_serves_the_inherited_socket_and_leaves_it_alone(
    workdir: Path, members: dict[str, Member]
) -> None:
    sock_path = workdir / "run" / "agent.sock"
    sock_path.parent.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(16)
    config = write_toml(workdir / "agent.toml", tables(workdir, members, ["m0"]))
    # LISTEN_PID must be the daemon's pid, known only after fork: a tiny exec wrapper sets it, as systemd does.
    wrapper = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'signing_agent', *sys.argv[2:]])\n"
    )
    stderr = (workdir / "daemon.stderr").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(listener.fileno()), "serve", "--config", str(config)],
        pass_fds=(listener.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=cli_env(),
    )
    listener.close()  # only the daemon holds it now, as with a .socket unit
    try:
        # Clients may connect before the agent is ready: the kernel queues them on the inherited socket.
        assert identity_names(sock_path) == {"m0"}
        assert sock_path.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    log = (workdir / "daemon.stderr").read_text()
    assert "using the socket passed by systemd" in log, log
    assert sock_path.exists(), "the socket unit's path must not be unlinked by the daemon"


@pytest.fixture
def reloadable(workdir: Path, members: dict[str, Member]) -> Any:
    config = write_toml(workdir / "agent.toml", tables(workdir, members, ["m0"]))
    with daemon(config) as proc:
        yield proc, config


def sighup_and_wait(proc: DaemonProcess, line: str, count: int) -> None:
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.stderr.count(line) >= count, f"{line!r} x{count} in the log")


def test_sighup_reloads_identities_and_rejects_a_bad_config(
    reloadable: tuple[DaemonProcess, Path], workdir: Path, members: dict[str, Member]
) -> None:
    proc, config = reloadable
    assert identity_names(proc.socket) == {"m0"}

    write_toml(config, tables(workdir, members, ["m0", "m1"]))
    sighup_and_wait(proc, "configuration reloaded", 1)
    assert identity_names(proc.socket) == {"m0", "m1"}

    # A typo and an identity whose key does not match its certificate: both rejected, the old config serves on.
    write_toml(config, {**tables(workdir, members, ["m0"]), "agent": {"socket": proc.socket, "typo": 1}})
    sighup_and_wait(proc, "configuration reload rejected", 1)
    write_toml(config, {**tables(workdir, members, ["m0"]), **mismatched(workdir, members)})
    sighup_and_wait(proc, "configuration reload rejected", 2)
    assert "agent.typo" in proc.stderr
    assert "does not match the certificate" in proc.stderr
    assert identity_names(proc.socket) == {"m0", "m1"}
    assert proc.proc.poll() is None

    # The socket cannot move on reload: the log says so and the agent keeps its socket.
    write_toml(config, tables(workdir, members, ["m0"], socket=workdir / "elsewhere.sock"))
    sighup_and_wait(proc, "configuration reloaded", 2)
    assert "agent.socket changed" in proc.stderr
    assert identity_names(proc.socket) == {"m0"}
    assert metric(proc.socket, 'signing_agent_config_reloads_total{result="ok"}') == 2
    assert metric(proc.socket, 'signing_agent_config_reloads_total{result="rejected"}') == 2


def test_a_reload_lets_in_flight_requests_finish_on_the_old_configuration(
    reloadable: tuple[DaemonProcess, Path], workdir: Path, members: dict[str, Member]
) -> None:
    proc, config = reloadable
    body = json.dumps({"identity": "m0", "msg_type": "state_digest"}).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(proc.socket))
        s.sendall(
            b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.3)  # the request is in flight, pinned to generation 1 which has m0
        write_toml(config, tables(workdir, members, ["m1"]))
        sighup_and_wait(proc, "configuration reloaded", 1)
        assert identity_names(proc.socket) == {"m1"}
        s.sendall(body[10:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    wait_for(lambda: "configuration generation 1 closed" in proc.stderr, "the old generation to close")
    result = cli("sign", "--identity", "m0", "--ccf-gov-msg-type", "state_digest", sock=proc.socket)
    assert result.returncode != 0
    assert "unknown identity 'm0'" in result.stderr


def test_degraded_start_and_the_health_command(workdir: Path, members: dict[str, Member]) -> None:
    config = write_toml(workdir / "agent.toml", {**tables(workdir, members, ["m0"]), **mismatched(workdir, members)})
    with pytest.raises(RuntimeError, match="does not match the certificate"), daemon(config, timeout=15):
        pass
    with daemon(config, args=["--allow-degraded"]) as proc:
        assert identity_names(proc.socket) == {"m0"}
        ready = cli("health", sock=proc.socket)
        assert ready.returncode == 1, ready.stdout + ready.stderr
        assert ready.stdout.startswith("degraded")
        assert "bad: failed its self-test at start-up" in ready.stdout
        assert cli("health", "--live", sock=proc.socket).returncode == 0
        report = json.loads(cli("health", "--json", "--live", sock=proc.socket).stdout)
        assert {c["name"]: c["status"] for c in report["identities"]} == {"m0": "ok", "bad": "unavailable"}
    healthy = write_toml(workdir / "good.toml", tables(workdir, members, ["m0"]))
    with daemon(healthy) as proc:
        result = cli("health", sock=proc.socket)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("ok")
    assert cli("health", sock=workdir / "none.sock").returncode == 3  # no agent: unreachable, not "degraded"


def test_check_config_lists_every_failed_self_test(workdir: Path, members: dict[str, Member]) -> None:
    config = write_toml(workdir / "agent.toml", {**tables(workdir, members, ["m0"]), **mismatched(workdir, members)})
    result = cli("check-config", "--config", str(config), sock=workdir / "unused.sock")
    assert result.returncode == 1
    assert result.stdout.startswith("ok    m0: member " + members["m0"].member_id)
    assert "FAIL  bad: identities.bad: the signing key" in result.stdout
    assert "1 check(s) failed: bad" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_opens_what_serve_opens_and_writes_no_audit_record(
    workdir: Path, members: dict[str, Member]
) -> None:
    """The same wiring as ``serve``: a service certificate that is no certificate fails the check as it fails the
    start; and the check never touches the audit log (a running agent holds it)."""
    bad = workdir / "not-a-cert.pem"
    bad.write_text("not a certificate")
    service = {"url": "https://127.0.0.1:1", "service_certificate": bad}
    config = write_toml(workdir / "agent.toml", {**tables(workdir, members, ["m0"]), "services.prod": service})
    result = cli("check-config", "--config", str(config), sock=workdir / "unused.sock")
    assert result.returncode == 1
    assert f"FAIL  configuration: services.prod.service_certificate: {bad} is not a PEM certificate" in result.stdout
    assert "1 check(s) failed: configuration" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "run" / "audit.jsonl").exists()


def test_the_reload_command_prints_the_outcome_and_health_keeps_it(
    reloadable: tuple[DaemonProcess, Path], workdir: Path, members: dict[str, Member]
) -> None:
    proc, config = reloadable
    assert json.loads(cli("health", "--json", sock=proc.socket).stdout)["last_reload"] is None

    write_toml(config, tables(workdir, members, ["m0", "m1"]))
    reloaded = cli("reload", sock=proc.socket)
    assert (reloaded.returncode, reloaded.stdout) == (0, "configuration reloaded: generation 2 serves\n")
    assert identity_names(proc.socket) == {"m0", "m1"}  # done when the command returns: no waiting
    shown = cli("health", sock=proc.socket).stdout
    assert shown.startswith("ok (signing-agent ")
    assert ", configuration generation 2 serves" in shown.splitlines()[1]

    write_toml(config, {**tables(workdir, members, ["m0"]), **mismatched(workdir, members)})
    refused = cli("reload", sock=proc.socket)
    assert refused.returncode == 2
    assert "the new configuration was refused; generation 2 still serves: " in refused.stderr
    assert "does not match the certificate" in refused.stderr
    last = json.loads(cli("health", "--json", sock=proc.socket).stdout)["last_reload"]
    assert (last["reloaded"], last["generation"]) == (False, 2)
    assert "does not match the certificate" in last["error"]
    assert "REFUSED (generation 2 still serves)" in cli("health", sock=proc.socket).stdout
    assert identity_names(proc.socket) == {"m0", "m1"}

    # SIGHUP's outcome is kept the same way
    write_toml(config, tables(workdir, members, ["m1"]))
    sighup_and_wait(proc, "configuration reloaded", 2)
    last = json.loads(cli("health", "--json", sock=proc.socket).stdout)["last_reload"]
    assert (last["reloaded"], last["generation"], last["error"]) == (True, 3, None)
