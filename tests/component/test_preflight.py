"""``preflight``'s checks against real files, a real lock, real sockets and real TLS services: what each one proves,
and that none of them disturbs a running agent (its socket, its audit log, its lock)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signing_agent.audit import AuditLock, FileAuditSink, lock_path
from signing_agent.ccf.connections import CCFConnections
from signing_agent.ccf.handshake import handshake
from signing_agent.certs import der_sha256
from signing_agent.config import AgentSection, AuditConfig, ServiceConfig
from signing_agent.errors import CCFUnavailableError
from signing_agent.preflight import check_audit, check_service, check_socket
from tests.support.hostile_ccf import hostile_ccf
from tests.support.prereq import missing
from tests.support.tls_endpoint import TLSEndpoint, tls_endpoint

NOBODY = 65534


def service(endpoint: TLSEndpoint | None, cert: Path, **kw: object) -> ServiceConfig:
    url = endpoint.url if endpoint is not None else "https://127.0.0.1:1"
    return ServiceConfig(name="prod", url=url, service_certificate=cert, **kw)  # type: ignore[arg-type]


def other_ca(folder: Path, name: str = "other.pem") -> Path:
    path = folder / name
    path.write_bytes(trustme.CA().cert_pem.bytes())
    return path


def fingerprint_of(ca: trustme.CA) -> str:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return der_sha256(cert.public_bytes(serialization.Encoding.DER))


# -- the TLS handshake ----------------------------------------------------------------------------------------------


async def test_the_handshake_names_the_identity_that_endorses_the_endpoint(workdir: Path) -> None:
    with tls_endpoint(workdir) as endpoint:
        pem = endpoint.service_cert.read_bytes()
        trusted = await handshake(service(endpoint, endpoint.service_cert), (other_ca(workdir).read_bytes(), pem))
        untrusted = await handshake(
            service(endpoint, endpoint.service_cert), (other_ca(workdir, "o2.pem").read_bytes(),)
        )
    assert trusted.trusted
    assert trusted.endorsed_by is not None
    assert der_sha256(trusted.endorsed_by.public_bytes(serialization.Encoding.DER)) == fingerprint_of(endpoint.ca)
    assert not untrusted.trusted
    assert untrusted.endorsed_by is None
    assert untrusted.certificate == trusted.certificate  # what it presented, read by the unverified handshake
    assert untrusted.refusal == "unable to get local issuer certificate"
    assert endpoint.handshakes == [True, False, True]  # the pinned one, refused, then the one that only looks


async def test_a_plain_http_endpoint_or_a_closed_port(workdir: Path) -> None:
    with hostile_ccf(workdir, tls=False) as plain:
        cfg = ServiceConfig(name="prod", url=plain.url.replace("http:", "https:"), service_certificate=None)
        presented = await handshake(cfg, (plain.service_cert.read_bytes(),))
    assert not presented.trusted
    assert presented.certificate is None
    assert presented.refusal is not None
    assert presented.refusal.startswith("TLS failed: ")
    with pytest.raises(CCFUnavailableError, match=r"cannot connect to 127\.0\.0\.1:1: Connection refused"):
        await handshake(service(None, plain.service_cert), (plain.service_cert.read_bytes(),))


async def test_check_service_says_how_the_presented_identity_is_trusted(workdir: Path) -> None:
    with tls_endpoint(workdir) as endpoint:
        pinned = service(endpoint, endpoint.service_cert)
        accepted = service(endpoint, other_ca(workdir), accepted_service_certificates=(endpoint.service_cert,))
        wrong = service(endpoint, other_ca(workdir, "wrong.pem"))
        fp = fingerprint_of(endpoint.ca)
        for cfg, status, said in (
            (pinned, "ok", f"presents service identity sha256 {fp} (pinned; node certificate sha256 "),
            (accepted, "ok", f"presents service identity sha256 {fp} (in accepted_service_certificates; "),
            (wrong, "fail", "presents a certificate the agent does not trust (unable to get local issuer"),
        ):
            connections = CCFConnections({"prod": cfg})
            try:
                check = await check_service(connections, "prod")
            finally:
                await connections.aclose()
            assert (check.name, check.status) == ("service prod", status)
            assert said in check.message, check.message
        # Trusted provisionally after a recovery (reads and ballots only): a warning.
        connections = CCFConnections({"prod": wrong})
        connections.trust_provisionally("prod", endpoint.service_cert.read_bytes())
        check = await check_service(connections, "prod")
        await connections.aclose()
    assert check.status == "warn"
    assert "trusted provisionally after a recovery: reads and ballots only" in check.message


async def test_an_unreachable_service_warns_unless_required(workdir: Path) -> None:
    connections = CCFConnections({"prod": service(None, other_ca(workdir))})
    warned = await check_service(connections, "prod")
    failed = await check_service(connections, "prod", require_reachable=True)
    await connections.aclose()
    assert (warned.status, failed.status) == ("warn", "fail")
    assert warned.message == "https://127.0.0.1:1 is unreachable: cannot connect to 127.0.0.1:1: Connection refused"


# -- the socket -----------------------------------------------------------------------------------------------------


def test_a_stale_socket_is_reported_and_left_alone(workdir: Path) -> None:
    path = workdir / "agent.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    check = check_socket(AgentSection(socket=path))
    assert check.status == "ok"
    assert "left by an earlier run" in check.message
    assert path.is_socket()
    assert sorted(p.name for p in workdir.iterdir()) == ["agent.sock"]  # the bind probe removed its own


@pytest.mark.parametrize(
    ("spoil", "agent", "message"),
    [
        (lambda p: p.write_text("x"), {}, "exists and is not a socket; refusing to replace it"),
        (lambda p: p.symlink_to(p.with_name("elsewhere")), {}, "is a symlink; refusing to follow or replace it"),
        (lambda p: None, {"socket_group": "no-such-group-xyz"}, "agent.socket_group: no group named"),
        (lambda p: p.parent.chmod(0o770), {}, "is group-writable (mode 0770)"),
    ],
)
def test_what_serve_would_refuse_fails(workdir: Path, spoil: object, agent: dict[str, str], message: str) -> None:
    folder = workdir / "run"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    spoil(path)  # type: ignore[operator]
    check = check_socket(AgentSection(socket=path, **agent))  # type: ignore[arg-type]
    assert check.status == "fail"
    assert message in check.message


def test_a_socket_group_without_search_on_the_folder_warns(workdir: Path) -> None:
    folder = workdir / "run"
    folder.mkdir(mode=0o700)
    check = check_socket(AgentSection(socket=folder / "agent.sock", socket_mode=0o660, socket_group="root"))
    assert check.status == "warn"
    assert check.message == (
        f"{folder}/agent.sock can be bound (the folder is the agent's own); but agent.socket_group is set, and the "
        f"folder {folder} has no group search permission: the group cannot reach the socket (chmod g+x)"
    )
    assert check.hint == f"chmod g+x {folder}"
    folder.chmod(0o750)
    assert check_socket(AgentSection(socket=folder / "agent.sock", socket_mode=0o660, socket_group="root")).status == (
        "ok"
    )


# -- the audit log --------------------------------------------------------------------------------------------------


async def test_the_audit_check_reports_a_held_lock_and_writes_nothing(workdir: Path) -> None:
    log = workdir / "audit" / "audit.jsonl"
    sink = await FileAuditSink.open(log, max_bytes=1 << 20)
    try:
        before = (log.read_bytes(), lock_path(log).read_bytes())
        check = check_audit(AuditConfig(path=log))
        assert check.status == "ok"
        assert check.message == (
            f"{log} is writable; in use by a running signing-agent (pid {os.getpid()} holds {lock_path(log)}), so "
            "serve would stop beside it"
        )
        assert (log.read_bytes(), lock_path(log).read_bytes()) == before
        assert sorted(p.name for p in log.parent.iterdir()) == [".audit.jsonl.lock", "audit.jsonl"]
    finally:
        await sink.aclose()
    free = check_audit(AuditConfig(path=log))
    assert free.message == f"{log} is writable and lockable"
    folder_fd = os.open(log.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert AuditLock.probe(folder_fd, lock_path(log)) is None  # taken and released at once
        assert AuditLock.probe(folder_fd, log.with_name(".missing.lock")) is None
    finally:
        os.close(folder_fd)
    assert not log.with_name(".missing.lock").exists()  # never made


def test_an_audit_file_of_another_user_fails(workdir: Path) -> None:
    if os.geteuid() != 0:
        missing("giving a file to another uid needs root")
    folder = workdir / "audit"
    folder.mkdir(mode=0o700)
    planted = folder / "audit.jsonl"
    planted.write_text("")
    os.chown(planted, NOBODY, -1)
    check = check_audit(AuditConfig(path=planted))
    assert check.status == "fail"
    assert f"audit.path: {planted} is owned by uid {NOBODY}, not by the agent's user" in check.message
    assert check.hint == "move it aside and look at it: the agent only writes its own files"
