"""The CLI and the client library as victims: whatever listens on the socket they were pointed at (a path another
user controls, a socket swapped under ``$SIGNING_AGENT_SOCK``) may be an impostor. It cannot sign for the member,
but it must not be able to exhaust the client's memory or write escape sequences to the operator's terminal. Each
attack runs the real command (``python -m signing_agent``) against a hostile server on a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signing_agent.client import AgentClient, AgentUnreachableError
from signing_agent.client._http import MAX_ANSWER_BYTES
from signing_agent.client.aio import AsyncAgentClient
from tests.support.agent import cli_env
from tests.support.fake_agent import FakeAgent, fake_agent
from tests.support.pki import make_member

Answer = Callable[[socket.socket], None]


@dataclass
class Impostor:
    socket: Path
    sent: int = 0
    """Bytes of answers written before the client hung up."""


@contextlib.contextmanager
def impostor(path: Path, answer: Answer) -> Iterator[Impostor]:
    """A server on ``path`` that reads each request's first bytes and then runs ``answer`` on the connection."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    state = Impostor(path)

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            answer(conn)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        path.unlink(missing_ok=True)


def endless(state: list[int]) -> Answer:
    """An answer whose body never ends (no length): it streams zeros until the client hangs up."""

    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        chunk = b"0" * (1 << 20)
        while True:
            state[0] += conn.send(chunk)

    return answer


def limit_memory() -> None:
    """The CLI gets 1 GiB of address space: far more than it needs, far less than an endless answer fills."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run_cli(sock: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        env=cli_env({"SIGNING_AGENT_SOCK": str(sock)}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=limit_memory,
    )


def test_an_endless_answer_is_cut_at_the_cap_not_read_until_memory_runs_out(workdir: Path) -> None:
    sent = [0]
    with impostor(workdir / "agent.sock", endless(sent)) as fake:
        done = run_cli(fake.socket, "identities", "--timeout", "90")
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert f"is larger than {MAX_ANSWER_BYTES >> 20} MiB" in done.stderr
    assert sent[0] < MAX_ANSWER_BYTES + (16 << 20)  # it stopped reading at the cap (plus the socket's buffers)


ASYNC_CLIENT = """\
import asyncio, sys
from signing_agent.client import AgentUnreachableError
from signing_agent.client.aio import AsyncAgentClient
try:
    asyncio.run(AsyncAgentClient(sys.argv[1], timeout=90).identities())
except AgentUnreachableError as exc:
    print(exc)
"""


def test_the_async_client_cuts_an_endless_answer_too(workdir: Path) -> None:
    sent = [0]
    with impostor(workdir / "agent.sock", endless(sent)) as fake:
        done = subprocess.run(
            [sys.executable, "-c", ASYNC_CLIENT, str(fake.socket)],
            capture_output=True, text=True, timeout=120, check=False, preexec_fn=limit_memory,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is larger than" in done.stdout
    assert sent[0] < MAX_ANSWER_BYTES + (16 << 20)


def json_answer(status: int, body: Any) -> Answer:
    def answer(conn: socket.socket) -> None:
        data = json.dumps(body).encode()
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%b" % (status, len(data), data))

    return answer


ESCAPES = "\x1b]0;owned\x07\x1b[2J\r\x9b31m\u202e"
"""Retitle the terminal, clear it, back to the start of the line, a C1 CSI, reverse what follows."""
CONTROLS = set("\x1b\x07\r\x9b\u202e")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (403, {"error": {"code": "PolicyDenied", "message": f"denied{ESCAPES}ok: signed"}}),
        (200, {"identities": [{"name": f"m0{ESCAPES}", "member_id": "a1" * 32, "algorithm": "ES384",
                               "backend": "pkcs11", "key": "k", "warnings": [f"w{ESCAPES}"]}]}),
    ],
)  # fmt: skip
def test_escape_sequences_in_an_answer_never_reach_the_terminal(workdir: Path, status: int, body: Any) -> None:
    with impostor(workdir / "agent.sock", json_answer(status, body)) as fake:
        done = run_cli(fake.socket, "identities")
    assert done.returncode == (4 if status == 403 else 0), done.stderr
    shown = done.stdout + done.stderr
    assert not CONTROLS & set(shown)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\r\\x9b31m\\u202e" in shown  # escaped, so the operator sees them


SERVICES = {"services": [{"name": "default", "url": "https://ccf:8000", "api_version": "2024-07-01"}]}

# -- service identity --save ---------------------------------------------------------------------------------------


def test_an_answer_of_another_shape_is_a_clear_error_not_a_traceback(workdir: Path) -> None:
    """An impostor, or an agent of another version, answers 200 with a body of a shape the command does not read:
    through the client library's typed results (``identities``), and in a command that reads the raw JSON itself
    (``service identity``: no ``trust`` field)."""
    with impostor(workdir / "agent.sock", json_answer(200, ["a list", "not an object"])) as fake:
        done = run_cli(fake.socket, "identities")
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert "is not one this client reads (TypeError:" in done.stderr
    assert "is that socket this version's agent?" in done.stderr

    body = {"certificate": ANNOUNCED.cert_pem.decode(), "sha256": ANNOUNCED.member_id}
    routes = {"GET /v1/services": (200, SERVICES), "GET /v1/services/default/identity": (200, body)}
    with fake_agent(workdir / "raw.sock", routes) as agent:
        done = run_cli(agent.socket, "service", "identity")
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert "is not one this client reads (KeyError:" in done.stderr
    assert "is that socket this version's agent?" in done.stderr


def test_the_client_library_turns_an_answer_of_another_shape_into_an_error(workdir: Path) -> None:
    """For every program that uses the library, not only the CLI: ``AgentUnreachableError``, never a bare
    ``TypeError`` from inside a typed result."""
    with impostor(workdir / "agent.sock", json_answer(200, ["a list", "not an object"])) as fake:
        with pytest.raises(AgentUnreachableError, match="is not one this client reads"):
            AgentClient(fake.socket, timeout=30).identities()
        with pytest.raises(AgentUnreachableError, match="is not one this client reads"):
            asyncio.run(AsyncAgentClient(fake.socket, timeout=30).identities())


ANNOUNCED, FORGED = make_member("service", "secp384r1"), make_member("attacker", "secp384r1")
# Each one's member_id is its certificate's SHA-256: the fingerprint the service identity is known by.


@contextlib.contextmanager
def identity_answer(workdir: Path, certificate: str, sha256: str) -> Iterator[FakeAgent]:
    body = {"certificate": certificate, "sha256": sha256, "trust": "pinned", "trusted": True, "pinned_sha256": sha256}
    routes = {"GET /v1/services": (200, SERVICES), "GET /v1/services/default/identity": (200, body)}
    with fake_agent(workdir / "agent.sock", routes) as agent:
        yield agent


def test_service_identity_never_saves_a_certificate_other_than_the_fingerprint_shown(workdir: Path) -> None:
    """The member compares the printed fingerprint with the one announced out of band, then pins the saved file.
    An impostor printed the announced fingerprint and had its own certificate saved."""
    saved = workdir / "service_cert.pem"
    with identity_answer(workdir, FORGED.cert_pem.decode(), ANNOUNCED.member_id) as agent:
        done = run_cli(agent.socket, "service", "identity", "--save", str(saved))
    assert done.returncode == 3, done.stderr
    assert f"answered sha256 {ANNOUNCED.member_id} for a certificate whose SHA-256 is {FORGED.member_id}" in (
        done.stderr
    )
    assert ANNOUNCED.member_id not in done.stdout
    assert not saved.exists()


def test_service_identity_save_never_writes_through_a_planted_link(workdir: Path) -> None:
    """A link planted at the path (in a folder others may write) had the certificate written where it points."""
    target, saved = workdir / "elsewhere" / "authorized_keys", workdir / "service_cert.pem"
    target.parent.mkdir()
    saved.symlink_to(target)
    with identity_answer(workdir, ANNOUNCED.cert_pem.decode(), ANNOUNCED.member_id) as agent:
        done = run_cli(agent.socket, "service", "identity", "--save", str(saved))
        assert done.returncode == 2, done.stderr
        assert "exists with other content (or is a link); refusing to overwrite it" in done.stderr
        assert not target.exists()
        saved.unlink()  # the same certificate saved again is fine, a real file is written
        assert run_cli(agent.socket, "service", "identity", "--save", str(saved)).returncode == 0
        again = run_cli(agent.socket, "service", "identity", "--save", str(saved))
    assert again.returncode == 0, again.stderr
    assert saved.read_bytes() == ANNOUNCED.cert_pem
    assert f"presents identity sha256 {ANNOUNCED.member_id}" in again.stdout


def test_service_identity_never_saves_a_bundle_behind_the_fingerprint_shown(workdir: Path) -> None:
    """The fingerprint is of the first certificate in the answer's PEM; every certificate in a pinned file is a
    trust anchor. An impostor answered the announced certificate followed by its own CA: the member saw the right
    fingerprint, pinned the file, and the agent trusted the impostor's CA for the service (recovery shares too)."""
    saved = workdir / "service_cert.pem"
    bundle = (ANNOUNCED.cert_pem + FORGED.cert_pem).decode()
    with identity_answer(workdir, bundle, ANNOUNCED.member_id) as agent:
        done = run_cli(agent.socket, "service", "identity", "--save", str(saved))
    assert done.returncode == 3, done.stderr
    assert "answered a certificate that is not exactly one PEM certificate" in done.stderr
    assert ANNOUNCED.member_id not in done.stdout
    assert not saved.exists()


def test_service_identity_saves_the_certificate_alone(workdir: Path) -> None:
    """Text around the one certificate (a comment, a header an impostor chose) is not saved: only the certificate."""
    saved = workdir / "service_cert.pem"
    wrapped = f"Subject: a note\n{ANNOUNCED.cert_pem.decode()}trailing words\n"
    with identity_answer(workdir, wrapped, ANNOUNCED.member_id) as agent:
        done = run_cli(agent.socket, "service", "identity", "--save", str(saved))
    assert done.returncode == 0, done.stderr
    assert saved.read_bytes() == ANNOUNCED.cert_pem
