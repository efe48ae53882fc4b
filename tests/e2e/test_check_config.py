"""``signing-agent check-config`` proves what it says, and ``serve`` checks the same at start-up.

Each case here passed ``check-config`` as ``ok`` before it proved anything: a service that is down, a wrong pinned
service certificate, a socket in a world-writable folder or at a path too long to bind, an audit log the agent
cannot write, a SoftHSM2 encryption key that cannot do OAEP-SHA256, and member certificates out of their validity.
Each runs the real CLI (and, where ``serve`` acts on it, the real daemon) against real files, real TLS services
(``hostile_ccf``) and a real SoftHSM2 token.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signing_agent.certs import der_sha256
from signing_agent.client import AgentClient
from tests.e2e.test_local_attacks import vault_identity
from tests.support import p11kit, tokens
from tests.support.agent import cli_env, daemon, file_identity, write_toml
from tests.support.hostile_ccf import hostile_ccf
from tests.support.pki import Member, make_member, make_rsa_key
from tests.support.sandbox_proc import sandbox

pytestmark = pytest.mark.e2e

softhsm = tokens.softhsm


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


def check_config(
    config: Path, *args: str, env: dict[str, str] | None = None, wrapper: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "signing_agent", "check-config", "--config", str(config), *args],
        capture_output=True, text=True, env=cli_env(env), timeout=60, check=False,
    )  # fmt: skip


def tables(workdir: Path, member: Member, **extra: Any) -> dict[str, Any]:
    key, cert = member.write(workdir / "keys")
    return {
        "agent": {"socket": workdir / "run" / "agent.sock"},
        "audit": {"path": workdir / "audit" / "audit.jsonl"},
        **file_identity("m0", cert, key),
        **extra,
    }


def lines(result: subprocess.CompletedProcess[str], prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


def fingerprint(pem_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    return der_sha256(cert.public_bytes(serialization.Encoding.DER))


def test_a_healthy_configuration_passes_every_check(workdir: Path, member: Member) -> None:
    with hostile_ccf(workdir) as ccf:
        config = write_toml(
            workdir / "agent.toml",
            tables(workdir, member, **{"services.prod": {"url": ccf.url, "service_certificate": ccf.service_cert}}),
        )
        result = check_config(config)
        sent = ccf.seen()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ok    m0: member {member.member_id} ES256 file ")
    # The presented identity, by the fingerprint an operator compares with the one announced out of band.
    assert (
        f"ok    service prod: {ccf.url} presents service identity sha256 {fingerprint(ccf.service_cert)} (pinned;"
        in (result.stdout)
    )
    assert f"ok    socket: {workdir}/run/agent.sock: the folder {workdir}/run does not exist yet" in result.stdout
    assert f"ok    audit: {workdir}/audit/audit.jsonl: the folder {workdir}/audit does not exist yet" in result.stdout
    assert "FAIL" not in result.stdout
    assert "warn" not in result.stdout
    assert sent == []  # a TLS handshake, and nothing sent
    assert not (workdir / "run").exists()  # nothing made either
    assert not (workdir / "audit").exists()


def test_a_service_that_is_down_warns_and_fails_with_require_services(workdir: Path, member: Member) -> None:
    cert = workdir / "service_cert.pem"
    cert.write_bytes(trustme.CA().cert_pem.bytes())
    config = write_toml(
        workdir / "agent.toml",
        tables(workdir, member, **{"services.prod": {"url": "https://127.0.0.1:1", "service_certificate": cert}}),
    )
    result = check_config(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, "warn  service prod: https://127.0.0.1:1 is unreachable: ") != [], result.stdout
    assert "hint: is the service up? (--require-services makes this a failure)" in result.stdout
    assert "1 warning(s)" in result.stdout

    required = check_config(config, "--require-services")
    assert required.returncode == 1
    assert lines(required, "FAIL  service prod: https://127.0.0.1:1 is unreachable: ") != [], required.stdout
    assert "1 check(s) failed: service prod" in required.stderr


def test_a_wrong_pinned_service_certificate_fails_with_what_the_endpoint_presents(
    workdir: Path, member: Member
) -> None:
    wrong = workdir / "wrong_cert.pem"
    wrong.write_bytes(trustme.CA().cert_pem.bytes())
    with sandbox(workdir / "sandbox") as ccf:
        service = {"url": ccf.url, "service_certificate": wrong}
        config = write_toml(workdir / "agent.toml", tables(workdir, member, **{"services.prod": service}))
        ccf.clear_requests()
        result = check_config(config)
        assert [r["path"] for r in ccf.requests()] == ["/node/network"]  # the one read an untrusted endpoint gets
        assert result.returncode == 1
        [line] = lines(result, "FAIL  service prod: ")
        assert f"{ccf.url} presents a certificate the agent does not trust" in line
        assert "node certificate sha256 " in line
        # What it claims, checked against what it presented, and what the agent trusts instead.
        assert f"it claims service identity sha256 {fingerprint(ccf.service_cert)}, which does endorse its" in line
        assert f"trusted service identities: sha256 {fingerprint(wrong)}" in line
        assert "hint: if the service was recovered it has a new service identity" in result.stdout
        assert "1 check(s) failed: service prod" in result.stderr

        ccf.clear_requests()
        with daemon(write_toml(workdir / "serve.toml", tables(workdir, member, **{"services.prod": service}))) as agent:
            # serve starts (after a disaster recovery it must run to vote the new identity in) and says so at once.
            wait_for_log(agent.stderr_path, "service prod: ")
            assert "presents a certificate the agent does not trust" in agent.stderr
            assert ccf.requests() == []  # serve sends nothing at all to an endpoint it does not trust


def test_a_service_url_with_a_password_is_refused_before_anything_is_sent(workdir: Path, member: Member) -> None:
    """A password in a service URL would go, as HTTP Basic authentication, to whatever answers at that address: to a
    man in the middle that does not even present the pinned identity (the agent asks such an endpoint what it claims
    to be), and into the agent's messages. It is refused when the configuration is read, without quoting it."""
    wrong = workdir / "wrong_cert.pem"
    wrong.write_bytes(trustme.CA().cert_pem.bytes())
    with hostile_ccf(workdir) as mitm:
        url = mitm.url.replace("https://", "https://agent:s3cret-pw@")
        service = {"url": url, "service_certificate": wrong}
        config = write_toml(workdir / "agent.toml", tables(workdir, member, **{"services.prod": service}))
        result = check_config(config)
        assert mitm.seen() == [], [dict(s.headers).get("Authorization") for s in mitm.seen()]
        assert result.returncode != 0
        assert "services.prod.url: must not hold a user name or password" in result.stdout + result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
        with pytest.raises(RuntimeError, match="must not hold a user name or password") as refused, daemon(config):
            pass
        assert "s3cret-pw" not in str(refused.value)
        assert mitm.seen() == []


def wait_for_log(path: Path, text: str, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never logged:\n{path.read_text(errors='replace')}")
        time.sleep(0.05)


def test_a_socket_in_a_world_writable_folder_fails(workdir: Path, member: Member) -> None:
    folder = workdir / "public"
    folder.mkdir()
    folder.chmod(0o777)
    config = write_toml(workdir / "agent.toml", {**tables(workdir, member), "agent": {"socket": folder / "a.sock"}})
    result = check_config(config)
    assert result.returncode == 1
    assert f"FAIL  socket: agent.socket: the folder {folder} is world-writable (mode 0777)" in result.stdout
    assert f"      hint: chmod 0700 {folder}" in result.stdout
    assert "1 check(s) failed: socket" in result.stderr


def test_a_socket_path_over_107_bytes_fails_here_and_at_start_up(workdir: Path, member: Member) -> None:
    folder = workdir / ("x" * (107 - len(f"{workdir}/") - len("/a.sock")))
    folder.mkdir(mode=0o700)
    fits = folder / "a.sock"
    assert len(str(fits)) == 107
    config = write_toml(workdir / "fits.toml", {**tables(workdir, member), "agent": {"socket": fits}})
    assert check_config(config).returncode == 0

    too_long = folder / "ab.sock"
    config = write_toml(workdir / "agent.toml", {**tables(workdir, member), "agent": {"socket": too_long}})
    result = check_config(config)
    assert result.returncode == 1
    expected = f"agent.socket: {too_long} is 108 bytes long; a Unix socket path has at most 107"
    assert f"FAIL  socket: {expected}" in result.stdout
    assert "hint: put the socket in a private folder" in result.stdout
    with pytest.raises(RuntimeError, match="did not start") as info, daemon(config):
        pass
    assert expected in str(info.value)


def test_an_audit_path_the_agent_cannot_write_fails(workdir: Path, member: Member) -> None:
    """As the agent's user: a folder it may not write, and a socket folder it could not create. (As root, in a user
    namespace that makes it an ordinary user, so that the folders' permissions bind it.)"""
    folder = workdir / "audit"
    folder.mkdir(mode=0o500)
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    config = write_toml(
        workdir / "agent.toml", {**tables(workdir, member), "agent": {"socket": locked / "run" / "agent.sock"}}
    )
    result = check_config(config, wrapper=p11kit.userns_wrapper())
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL  audit: audit.path: cannot create files in {folder}: Permission denied" in result.stdout
    assert "hint: the agent's user must be able to write the audit log's folder" in result.stdout
    assert (
        f"FAIL  socket: agent.socket: the folder {locked}/run does not exist, and {locked} is not writable to create it"
        in result.stdout
    )
    assert "2 check(s) failed: audit, socket" in result.stderr


def test_an_audit_path_that_names_a_folder_or_a_folder_of_another_user_fails(workdir: Path, member: Member) -> None:
    (workdir / "audit" / "audit.jsonl").mkdir(parents=True, mode=0o700)
    (workdir / "audit").chmod(0o700)
    result = check_config(write_toml(workdir / "agent.toml", tables(workdir, member)))
    assert result.returncode == 1
    assert f"FAIL  audit: audit.path: cannot open {workdir}/audit/audit.jsonl: Is a directory" in result.stdout

    shared = workdir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    config = write_toml(workdir / "shared.toml", {**tables(workdir, member), "audit": {"path": shared / "audit.jsonl"}})
    result = check_config(config)
    assert result.returncode == 1
    assert f"FAIL  audit: audit.path: the folder {shared} is group- or world-writable (mode 0777)" in result.stdout
    assert "hint: keep the audit log in a folder of its own" in result.stdout


def test_beside_a_running_agent_it_says_so_and_changes_nothing(workdir: Path, member: Member) -> None:
    config = write_toml(workdir / "agent.toml", tables(workdir, member))
    with daemon(config) as agent:
        log = workdir / "audit" / "audit.jsonl"
        lock = workdir / "audit" / ".audit.jsonl.lock"
        before = (log.read_bytes(), lock.read_bytes(), sorted(p.name for p in log.parent.iterdir()))
        result = check_config(config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (
            f"ok    socket: {agent.socket}: a running agent listens on it (serve would refuse to start beside it)"
            in result.stdout
        )
        pid = agent.proc.pid
        assert f"ok    audit: {log} is writable; in use by a running signing-agent (pid {pid} holds {lock})" in (
            result.stdout
        )
        assert (log.read_bytes(), lock.read_bytes(), sorted(p.name for p in log.parent.iterdir())) == before
        assert AgentClient(agent.socket, timeout=10).health()["status"] == "ok"  # still its socket, its lock, its log
        assert agent.proc.poll() is None


def test_json_is_one_stable_document(workdir: Path, member: Member) -> None:
    folder = workdir / "public"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    config = write_toml(workdir / "agent.toml", {**tables(workdir, member), "agent": {"socket": folder / "a.sock"}})
    result = check_config(config, "--json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["config"] == str(config)
    assert document["status"] == "fail"
    assert {tuple(sorted(c)) for c in document["checks"]} == {("hint", "message", "name", "status")}
    by_name = {c["name"]: c for c in document["checks"]}
    assert by_name["m0"]["status"] == "ok"
    assert by_name["m0"]["hint"] is None
    assert by_name["socket"]["status"] == "fail"
    assert by_name["socket"]["message"].startswith(f"agent.socket: the folder {folder} is world-writable")
    assert by_name["socket"]["hint"].startswith(f"chmod 0700 {folder}")
    assert by_name["audit"]["status"] == "ok"


# -- member certificates --------------------------------------------------------------------------------------------


def test_an_expired_or_not_yet_valid_member_certificate_fails_here_and_stops_serve(workdir: Path) -> None:
    expired = make_member(
        "m0", "secp256r1", valid_from=datetime.timedelta(days=-30), valid_until=-datetime.timedelta(1)
    )
    config = write_toml(workdir / "agent.toml", tables(workdir, expired))
    result = check_config(config)
    assert result.returncode == 1
    [line] = lines(result, "FAIL  m0: identities.m0.certificate: ")
    assert " expired on " in line
    assert "hint: the member id is the certificate's SHA-256, so a new certificate is a new member" in result.stdout
    with pytest.raises(RuntimeError, match="did not start") as info, daemon(config):
        pass
    assert "identities.m0.certificate: " in str(info.value)
    assert " expired on " in str(info.value)

    future = make_member("m0", "secp256r1", valid_from=datetime.timedelta(days=2))
    result = check_config(write_toml(workdir / "future.toml", tables(workdir / "f", future)))
    assert result.returncode == 1
    [line] = lines(result, "FAIL  m0: identities.m0.certificate: ")
    assert " is not valid before " in line


def test_a_member_certificate_about_to_expire_warns_everywhere(workdir: Path) -> None:
    soon = make_member("m0", "secp256r1", valid_until=datetime.timedelta(days=10))
    config = write_toml(workdir / "agent.toml", tables(workdir, soon))
    result = check_config(config)
    assert result.returncode == 0, result.stdout + result.stderr
    [warning] = lines(result, "warn  m0: the member certificate expires on ")
    assert "(in 9.9 days)" in warning or "(in 10.0 days)" in warning
    assert "hint: the member id is the certificate's SHA-256" in result.stdout

    quiet = dict(tables(workdir, soon))
    quiet["agent"] = {**quiet["agent"], "certificate_expiry_warning_days": 5}
    assert "warn" not in check_config(write_toml(workdir / "quiet.toml", quiet)).stdout

    with daemon(config) as agent:
        assert "identity m0: the member certificate expires on " in agent.stderr
        client = AgentClient(agent.socket, timeout=10)
        [ident] = client.identities()
        assert ident["warnings"] == [warning.removeprefix("warn  m0: ")]
        health = client.health()
        assert health["status"] == "ok"  # a warning, not a failure
        [check] = health["identities"]
        assert check["warnings"] == ident["warnings"]
        text = subprocess.run(
            [sys.executable, "-m", "signing_agent", "health", "--socket", str(agent.socket)],
            capture_output=True, text=True, env=cli_env(), timeout=60, check=False,
        )  # fmt: skip
        assert text.returncode == 0, text.stderr
        assert f"warning: identity m0: {ident['warnings'][0]}" in text.stdout
        assert check["certificate_not_after"] == soon.cert.not_valid_after_utc.isoformat()
        metrics = client.call("GET", "/metrics").body.decode()
        [sample] = [
            m for m in metrics.splitlines() if m.startswith('signing_agent_certificate_expiry_seconds{identity="m0"}')
        ]
        assert 9.9 * 86400 < float(sample.rpartition(" ")[2]) <= 10 * 86400


# -- encryption keys -------------------------------------------------------------------------------------------------


@pytest.mark.softhsm
def test_a_softhsm_encryption_key_without_oaep_host_fails_with_a_hint(
    workdir: Path, member: Member, softhsm: tokens.SoftHSMSetup
) -> None:
    token = softhsm.tokens["agent-a"]
    label = tokens.unique_label("enc")
    tokens.import_rsa(token, make_rsa_key(), label=label)
    encryption: dict[str, Any] = {
        "backend": "pkcs11",
        "module": token.module,
        "token_label": token.token_label,
        "key_label": label,
        "pin_file": token.pin_file,
    }
    config = write_toml(workdir / "agent.toml", {**tables(workdir, member), "identities.m0.encryption_key": encryption})
    result = check_config(config, env=softhsm.env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"ok    m0: member {member.member_id}" in result.stdout  # it signs
    [line] = lines(result, "FAIL  m0: identities.m0.encryption_key: failed its self-test")
    assert "lacks RSA-OAEP with SHA-256" in line
    assert 'hint: set oaep = "host" on this key' in result.stdout
    assert "1 check(s) failed: m0" in result.stderr

    # serve starts (the identity still signs and votes), logs why its recovery shares would fail, and says so.
    with daemon(config, env=softhsm.env) as agent:
        assert "identities.m0.encryption_key: failed its self-test" in agent.stderr
        [ident] = AgentClient(agent.socket, timeout=10).identities()
        assert any("lacks RSA-OAEP with SHA-256" in w and "recovery shares will fail" in w for w in ident["warnings"])

    host = write_toml(
        workdir / "host.toml",
        {**tables(workdir, member), "identities.m0.encryption_key": {**encryption, "oaep": "host"}},
    )
    result = check_config(host, env=softhsm.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


@pytest.mark.parametrize("content", [b"", b"\xc3\xa9\n"], ids=["empty", "non-ascii only"])
def test_a_vault_ca_bundle_with_no_certificate_is_a_clear_error(workdir: Path, member: Member, content: bytes) -> None:
    """A key vault's ``ca_bundle`` that holds nothing (a file cut short, the wrong file) is a configuration error that
    names it, at start-up and in check-config: it was an uncaught ``ValueError`` ("Empty certificate data"), as
    ``ssl`` refuses empty ``cadata`` with no error of its own."""
    bundle = workdir / "trust" / "vault-ca.pem"
    bundle.parent.mkdir()
    bundle.write_bytes(content)
    config = write_toml(workdir / "agent.toml", tables(workdir, member, **vault_identity(workdir, member, bundle)))
    why = f"identities.kv.signing_key.ca_bundle: {bundle} holds no PEM certificate"
    result = check_config(config, env={"SA_TEST_VAULT_SECRET": "s"})
    assert why in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    with pytest.raises(RuntimeError, match=why) as refused, daemon(config, env={"SA_TEST_VAULT_SECRET": "s"}):
        pass
    assert "Traceback" not in str(refused.value)


def test_a_service_certificate_that_is_a_fifo_is_refused_not_waited_on(workdir: Path, member: Member) -> None:
    """A trust file is read when the configuration is, and the pinned service certificate again on the event loop:
    a FIFO at its path (a slip, or whoever may write the folder) hung check-config, and serve before it was ready,
    waiting for a writer that never comes. It is no regular file, and is refused at once."""
    fifo = workdir / "service_cert.pem"
    os.mkfifo(fifo, 0o600)
    service = {"url": "https://127.0.0.1:9", "service_certificate": fifo}
    config = write_toml(workdir / "agent.toml", tables(workdir, member, **{"services.prod": service}))
    why = f"services.prod.service_certificate: {fifo}: not a regular file"
    result = check_config(config)
    assert why in result.stdout + result.stderr, result.stdout + result.stderr
    with pytest.raises(RuntimeError, match=re.escape(why)), daemon(config):
        pass
