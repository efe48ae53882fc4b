"""The real daemon (``python -m signing_agent serve``) as a subprocess, driven by the real CLI over its socket."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from ccf.cose import validate_cose_sign1

from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, private_dir, write_toml
from tests.support.pki import Member, make_member

pytestmark = pytest.mark.e2e

PROPOSAL = b'{"actions":[{"name":"transition_node_to_trusted","args":{"node_id":"ab"}}]}'


def cli(*args: str, stdin: bytes | None = None, sock: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = cli_env({"SIGNING_AGENT_SOCK": str(sock)} if sock else None)
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0", "secp384r1"), "m1": make_member("m1", "secp256r1")}


def start(folder: Path, members: dict[str, Member]) -> contextlib.AbstractContextManager[DaemonProcess]:
    tables: dict[str, dict[str, object]] = {"agent": {"socket": folder / "run" / "agent.sock"}}
    for name, member in members.items():
        key, cert = member.write(folder)
        tables.update(file_identity(name, cert, key))
    return daemon(write_toml(folder / "agent.toml", tables))


@pytest.fixture(scope="module")
def agent(members: dict[str, Member]) -> Iterator[DaemonProcess]:
    """One daemon for the tests that only ask it things (each writes its own files in its own ``workdir``)."""
    with private_dir() as folder, start(folder, members) as proc:
        yield proc


@pytest.fixture
def own_agent(workdir: Path, members: dict[str, Member]) -> Iterator[DaemonProcess]:
    """A daemon of the test's own, for a test that stops it."""
    with start(workdir, members) as proc:
        yield proc


def test_cli_sign_matches_ccf_cose_sign1(agent: DaemonProcess, members: dict[str, Member], workdir: Path) -> None:
    content = workdir / "proposal.json"
    content.write_bytes(PROPOSAL)
    when = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()  # within agent.max_created_at_skew
    ours = cli(
        "sign",
        "--identity",
        "m0",
        "--ccf-gov-msg-type",
        "proposal",
        "--ccf-gov-msg-created_at",
        when,
        "--content",
        str(content),
        sock=agent.socket,
    )
    assert ours.returncode == 0, ours.stderr
    key, cert = members["m0"].write(workdir / "ref")
    theirs = subprocess.run(
        [
            str(Path(sys.executable).parent / "ccf_cose_sign1"),
            "--signing-key",
            str(key),
            "--signing-cert",
            str(cert),
            "--ccf-gov-msg-type",
            "proposal",
            "--ccf-gov-msg-created_at",
            when,
            "--content",
            str(content),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    validate_cose_sign1(members["m0"].cert.public_key(), ours.stdout)
    ours_msg, theirs_msg = cbor2.loads(ours.stdout), cbor2.loads(theirs)
    assert cbor2.loads(ours_msg.value[0]) == cbor2.loads(theirs_msg.value[0])
    assert ours_msg.value[0] == theirs_msg.value[0]
    assert ours_msg.value[2] == theirs_msg.value[2] == PROPOSAL


@pytest.mark.parametrize(
    ("msg_type", "extra", "content"),
    [
        (
            "ballot",
            ["--ccf-gov-msg-proposal_id", "c" * 64],
            b'{"ballot":"export function vote(p,i){return true}"}',
        ),
        ("withdrawal", ["--ccf-gov-msg-proposal-id", "c" * 64], b""),
        ("state_digest", [], b""),
        ("ack", [], b'{"stateDigest":"' + b"d" * 64 + b'"}'),
        ("recovery_share", [], b'{"share":"AAAA"}'),
    ],
)
def test_cli_signs_every_type_from_stdin(
    agent: DaemonProcess, members: dict[str, Member], msg_type: str, extra: list[str], content: bytes
) -> None:
    result = cli(
        "sign",
        "--identity",
        "m1",
        "--ccf-gov-msg-type",
        msg_type,
        *extra,
        "--content",
        "-",
        stdin=content,
        sock=agent.socket,
    )
    assert result.returncode == 0, result.stderr
    validate_cose_sign1(members["m1"].cert.public_key(), result.stdout)
    headers = cbor2.loads(cbor2.loads(result.stdout).value[0])
    assert headers["ccf.gov.msg.type"] == msg_type
    assert abs(headers["ccf.gov.msg.created_at"] - time.time()) < 60


def test_signing_cert_picks_the_identity_and_naive_times_are_utc(
    agent: DaemonProcess, members: dict[str, Member], workdir: Path
) -> None:
    _, cert = members["m1"].write(workdir / "c")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    result = cli(
        "sign",
        "--signing-cert",
        str(cert),
        "--ccf-gov-msg-type",
        "state_digest",
        "--ccf-gov-msg-created_at",
        now.replace(tzinfo=None).isoformat(),
        sock=agent.socket,
    )
    assert result.returncode == 0, result.stderr
    headers = cbor2.loads(cbor2.loads(result.stdout).value[0])
    assert headers[4] == members["m1"].member_id.encode()
    assert headers["ccf.gov.msg.created_at"] == int(now.timestamp())


def test_cli_errors_are_clear(agent: DaemonProcess, workdir: Path) -> None:
    result = cli("sign", "--ccf-gov-msg-type", "proposal", "--content", "-", stdin=PROPOSAL, sock=agent.socket)
    assert result.returncode != 0
    assert b"several identities" in result.stderr
    result = cli(
        "sign",
        "--identity",
        "m0",
        "--signing-key",
        "k.pem",
        "--ccf-gov-msg-type",
        "proposal",
        sock=agent.socket,
    )
    assert b"drop --signing-key" in result.stderr
    result = cli("sign", "--identity", "m0", "--ccf-gov-msg-type", "ballot", sock=agent.socket)
    assert b"needs proposal_id" in result.stderr
    assert b"Traceback" not in result.stderr
    result = cli("identities", sock=workdir / "nothing.sock")
    assert result.returncode != 0
    assert b"no agent is listening" in result.stderr


def test_identities_cli(agent: DaemonProcess, members: dict[str, Member]) -> None:
    result = cli("identities", "--json", sock=agent.socket)
    assert result.returncode == 0, result.stderr
    names = {i["name"]: i["member_id"] for i in json.loads(result.stdout)}
    assert names == {n: m.member_id for n, m in members.items()}


def test_garbage_on_the_socket_does_not_hurt_the_daemon(agent: DaemonProcess) -> None:
    for junk in (b"\x00" * 1000, b"GET / HTTP/9.9\r\n\r\n", os.urandom(4096)):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(agent.socket))
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
    assert cli("identities", sock=agent.socket).returncode == 0
    assert agent.proc.poll() is None
    # aiohttp's complaint about the junk goes through our log format, one line, no traceback.
    assert "Traceback" not in agent.stderr
    assert "malformed request from a client" in agent.stderr


def test_sigterm_drains_in_flight_requests_and_removes_the_socket(own_agent: DaemonProcess) -> None:
    agent = own_agent
    body = json.dumps({"identity": "m0", "msg_type": "state_digest"}).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(agent.socket))
        s.sendall(
            b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.3)  # the handler is now waiting for the rest of the body
        agent.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        s.sendall(body[10:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert agent.proc.wait(15) == 0
    assert not agent.socket.exists()


def test_a_key_that_does_not_match_its_certificate_is_refused_at_start_up(
    workdir: Path, members: dict[str, Member]
) -> None:
    key, _ = members["m0"].write(workdir)
    _, other_cert = members["m1"].write(workdir)
    config = write_toml(
        workdir / "bad.toml",
        {"agent": {"socket": workdir / "a.sock"}, **file_identity("m0", other_cert, key)},
    )
    with pytest.raises(RuntimeError, match="does not match the certificate"), daemon(config, timeout=15):
        pass
    assert not (workdir / "a.sock").exists()


def test_check_config(workdir: Path, members: dict[str, Member]) -> None:
    key, cert = members["m0"].write(workdir)
    good = write_toml(
        workdir / "good.toml", {"agent": {"socket": workdir / "a.sock"}, **file_identity("m0", cert, key)}
    )
    result = cli("check-config", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert members["m0"].member_id.encode() in result.stdout
    bad = write_toml(workdir / "bad.toml", {"agent": {"socket": workdir / "a.sock", "typo": 1}})
    result = cli("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert b"agent.typo" in result.stderr
