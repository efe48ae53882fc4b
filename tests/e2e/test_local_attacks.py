"""A hostile local user against the daemon's processes and files, through the real daemon, socket and file system.

Each test is an attack another uid (nobody, in a subprocess) can make on the machine the agent runs on; each failed
on the code before its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signing_agent.client import AgentClient
from tests.component.test_policy_api import REPO
from tests.e2e.test_attacks import as_uid
from tests.e2e.test_peer_limits import NOBODY
from tests.support import procs
from tests.support.agent import cli_env, daemon, file_identity, private_dir, write_toml
from tests.support.pki import Member, make_member
from tests.support.procs import running_modules

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def member() -> Member:
    return make_member("m0", "secp256r1")


@pytest.fixture
def nobodys_folder() -> Iterator[Path]:
    """A folder that belongs to another user (nobody), who may put anything in it."""
    with private_dir("sa-nobody-") as path:
        os.chown(path, NOBODY, NOBODY)
        yield path


# Another user's package, named as the agent's: it leaves a note of the uid it ran as, and is no agent at all.
PLANT = r"""
import pathlib, sys
package = pathlib.Path(sys.argv[1], "signing_agent")
package.mkdir()
(package / "__init__.py").write_text(
    "import os, pathlib\n"
    "with open(pathlib.Path(__file__).parent.parent / 'ran-as', 'a') as note:\n"
    "    note.write(f'{os.getuid()}\\n')\n"
)
"""


def test_a_package_planted_in_the_daemons_working_folder_never_runs_in_its_children(
    workdir: Path, member: Member, nobodys_folder: Path
) -> None:
    """The agent's user starts the daemon in a folder another user can write (``/tmp``, a shared checkout). Its
    crypto workers and fsync helper ran ``python -m signing_agent.workers...``, which puts the working folder first
    on ``sys.path``: a ``signing_agent`` package planted there ran as the agent's user, in the process the file keys
    are handed to. They must import the agent's own code only."""
    as_uid(NOBODY, PLANT, str(nobodys_folder))
    key, cert = member.write(workdir)
    tables = {
        "agent": {"socket": workdir / "run" / "agent.sock", "crypto_workers": 1},
        "audit": {"path": workdir / "audit" / "audit.jsonl"},
        **file_identity("m0", cert, key),
    }
    # PYTHONSAFEPATH: this test starts the daemon as ``python -m signing_agent``, which would import the planted
    # package itself; the installed ``signing-agent`` command never has its working folder on sys.path.
    with daemon(write_toml(workdir / "agent.toml", tables), cwd=nobodys_folder, env={"PYTHONSAFEPATH": "1"}) as proc:
        # A file key's signature is a worker's job: it has imported everything it runs once it answered (or died).
        ack = {"identity": "m0", "msg_type": "ack", "payload": {"stateDigest": "00"}}
        resp = AgentClient(proc.socket, timeout=60).request("POST", "/v1/sign", ack)
        assert resp.status == 200, resp.body
        children = running_modules(proc.proc.pid, "signing_agent.workers")
        assert (nobodys_folder / "ran-as").exists() is False, (nobodys_folder / "ran-as").read_text()
        assert sorted(children.values()) == ["signing_agent.workers.child", "signing_agent.workers.fsync_child"]
        assert "crypto worker" not in proc.stderr


def reachable_by_nobody(workdir: Path, member: Member, **tables: dict[str, object]) -> Path:
    """A configuration whose 0660 socket nobody (gid root, in ``as_uid``) can reach; nothing else is nobody's."""
    workdir.chmod(0o750)
    run = workdir / "run"
    run.mkdir(mode=0o750)
    key, cert = member.write(workdir / "keys")
    config = {
        "agent": {"socket": run / "a.sock", "socket_mode": "0660"},
        "audit": {"path": workdir / "audit" / "audit.jsonl"},
        **file_identity("m0", cert, key),
        **tables,
    }
    return write_toml(workdir / "agent.toml", config)


SIGN_AS_NOBODY = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from signing_agent.client import AgentClient
resp = AgentClient(sys.argv[2], timeout=30).request("POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"})
print(json.dumps([resp.status, resp.json() if resp.status != 200 else None]))
"""

# Another user who may write the configuration (a group-writable file) grants itself everything.
GRANT_NOBODY = r"""
import pathlib, sys
config = pathlib.Path(sys.argv[1])
config.write_text(config.read_text().replace("[agent]\n", "[agent]\nallowed_uids = [65534]\n", 1))
"""


@pytest.mark.parametrize("whose", ["a group's", "another user's"])
def test_a_configuration_another_user_can_write_is_never_loaded(workdir: Path, member: Member, whose: str) -> None:
    """The configuration decides who may sign: a file another user may write (a group's, or one that user owns) is
    theirs to grant themselves every key with. The agent refuses it at a reload (and at start-up), as it refuses a
    PIN file or an audit folder others may write; the configuration it serves stays in force."""
    config = reachable_by_nobody(workdir, member)
    with daemon(config) as proc:
        [status, denied] = json.loads(as_uid(NOBODY, SIGN_AS_NOBODY, str(REPO), str(proc.socket)))
        assert (status, denied["error"]["code"]) == (403, "PolicyDenied")
        if whose == "a group's":
            config.chmod(0o664)  # e.g. edited by a tool, or shared with an operators' group
            why = "mode 0664 lets group or others write it"
        else:
            os.chown(config, NOBODY, -1)  # e.g. copied in by another user, mode kept
            why = f"owned by uid {NOBODY}, not by the agent's user (uid {os.geteuid()}) or root"
        as_uid(NOBODY, GRANT_NOBODY, str(config))
        assert "allowed_uids = [65534]" in config.read_text()
        reloaded = AgentClient(proc.socket, timeout=60).request("POST", "/v1/reload").json()
        [status, denied] = json.loads(as_uid(NOBODY, SIGN_AS_NOBODY, str(REPO), str(proc.socket)))
        assert (status, reloaded["reloaded"]) == (403, False), reloaded
        assert f"{config}: {why}" in reloaded["error"]
    with pytest.raises(RuntimeError, match=re.escape(why)), daemon(config):
        pass


# Another user who may write the pinned service certificate puts its own there.
REPLACE_FILE = r"""
import pathlib, sys
pathlib.Path(sys.argv[1]).write_text(sys.argv[2])
"""


def test_a_service_certificate_another_user_can_write_is_never_pinned(workdir: Path, member: Member) -> None:
    """The pinned service certificate decides where governance, and recovery shares, may go: a file another user may
    write is theirs to re-pin the service to an endpoint of their own (as a planted recovery state file would). The
    agent refuses it, at a reload as at start-up, and keeps pinning the certificate it read before."""
    service = make_member("service", "secp384r1")
    _, service_cert = service.write(workdir / "service")
    tables = {"services.default": {"url": "https://127.0.0.1:9", "service_certificate": service_cert}}
    config = reachable_by_nobody(workdir, member, **tables)
    with daemon(config) as proc:
        service_cert.chmod(0o664)
        (workdir / "service").chmod(0o750)
        as_uid(NOBODY, REPLACE_FILE, str(service_cert), make_member("attacker", "secp384r1").cert_pem.decode())
        assert service_cert.read_bytes() != service.cert_pem
        reloaded = AgentClient(proc.socket, timeout=60).request("POST", "/v1/reload").json()
        assert reloaded["reloaded"] is False, reloaded
        why = f"services.default.service_certificate: {service_cert}: mode 0664 lets group or others write it"
        assert why in reloaded["error"]
    with pytest.raises(RuntimeError, match="mode 0664 lets group or others write it"), daemon(config):
        pass


def test_an_identity_ca_bundle_another_user_can_write_is_never_trusted(workdir: Path, member: Member) -> None:
    """``identity_ca_bundle`` decides which endpoint passes for the identity service (Azure Managed CCF), and so which
    service certificate the agent pins: another user who may write it adds a CA of its own, to have the agent pin a
    service of its choosing. The agent refuses the file when it first reads it (the first talk to the service)."""
    _, bundle = make_member("identity-ca", "secp384r1").write(workdir / "trust")
    service = {"url": "https://127.0.0.1:9", "identity_url": "https://127.0.0.1:9/id", "identity_ca_bundle": bundle}
    config = reachable_by_nobody(workdir, member, **{"services.default": service})
    with daemon(config) as proc:
        bundle.chmod(0o664)
        (workdir / "trust").chmod(0o750)
        as_uid(NOBODY, REPLACE_FILE, str(bundle), make_member("attacker", "secp384r1").cert_pem.decode())
        resp = AgentClient(proc.socket, timeout=60).request("GET", "/v1/services/default/proposals")
        assert resp.status >= 400, resp.body
        why = f"services.default.identity_ca_bundle: {bundle}: mode 0664 lets group or others write it"
        assert why in resp.json()["error"]["message"], resp.body


def vault_identity(workdir: Path, member: Member, ca_bundle: Path) -> dict[str, dict[str, object]]:
    """The tables of an identity ``kv`` whose key is in a vault that no one answers for (port 9), trusted through
    ``ca_bundle``; its secret is ``SA_TEST_VAULT_SECRET``."""
    _, cert = member.write(workdir / "kv")
    key = {
        "backend": "azure-keyvault", "vault_url": "https://127.0.0.1:9", "key_name": "m0", "ca_bundle": ca_bundle,
        "credential": "client-secret", "client_secret_env": "SA_TEST_VAULT_SECRET",
        "tenant_id": "00000000-0000-0000-0000-000000000001", "client_id": "00000000-0000-0000-0000-000000000002",
    }  # fmt: skip
    return {"identities.kv": {"certificate": cert}, "identities.kv.signing_key": key}


def test_a_vault_ca_bundle_another_user_can_write_is_never_trusted(workdir: Path, member: Member) -> None:
    """A key vault's ``ca_bundle`` decides which servers pass for the vault, and so who receives the vault's access
    tokens (with one, anyone signs with the member key in the real vault). Another user who may write it adds a CA
    of its own; the agent refuses the file, and the identity with it."""
    _, bundle = make_member("vault-ca", "secp384r1").write(workdir / "trust")
    config = reachable_by_nobody(workdir, member, **vault_identity(workdir, member, bundle))
    bundle.chmod(0o664)
    (workdir / "trust").chmod(0o750)
    as_uid(NOBODY, REPLACE_FILE, str(bundle), make_member("attacker", "secp384r1").cert_pem.decode())
    why = f"identities.kv.signing_key.ca_bundle: {bundle}: mode 0664 lets group or others write it"
    with pytest.raises(RuntimeError, match=re.escape(why)), daemon(config, env={"SA_TEST_VAULT_SECRET": "s"}):
        pass


# Another user plants a link where the daemon writes its ready file first, to the agent's user's own file.
PLANT_LINK = r"""
import os, sys
os.symlink(sys.argv[2], sys.argv[1])
"""


def test_a_link_planted_beside_the_ready_file_never_redirects_the_write(
    workdir: Path, member: Member, nobodys_folder: Path
) -> None:
    """``serve --ready-file`` in a folder others may write (a group's, a sticky-less shared one): it wrote the socket
    path to ``.NAME.<pid>.tmp`` first, following a link, truncating whatever file of the agent's user another user
    pointed it at (here: a file standing for its shell profile or audit log). The ready file must still appear."""
    nobodys_folder.chmod(0o777)
    key, cert = member.write(workdir / "keys")
    tables = {"agent": {"socket": workdir / "run" / "a.sock"}, "audit": {"path": workdir / "audit" / "audit.jsonl"}}
    config = write_toml(workdir / "agent.toml", {**tables, **file_identity("m0", cert, key)})
    precious = workdir / "precious"
    precious.write_text("the agent's user's own file\n")
    ready, pid_file, go = nobodys_folder / "agent.ready", workdir / "pid", workdir / "go"
    # The daemon's pid is known before it runs: a shell writes its own, waits, then execs the daemon in its place.
    wait_then_exec = 'echo $$ > "$0"; while [ ! -e "$1" ]; do sleep 0.02; done; shift; exec "$@"'
    command = [sys.executable, "-m", "signing_agent", "serve", "--config", str(config), "--ready-file", str(ready)]
    proc = subprocess.Popen(["sh", "-c", wait_then_exec, str(pid_file), str(go), *command], env=cli_env())
    try:
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert proc.poll() is None
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        as_uid(NOBODY, PLANT_LINK, str(nobodys_folder / f".agent.ready.{pid}.tmp"), str(precious))
        go.touch()
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None, "the daemon exited"
            time.sleep(0.02)
        assert ready.read_text() == str(workdir / "run" / "a.sock")
        assert precious.read_text() == "the agent's user's own file\n"
    finally:
        procs.stop(proc, 15.0)


# Another user whom no rule admits asks for a path that holds a line break, a forged log line and terminal escapes.
FORGE_LOG_LINE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
forged = "\n2026-01-01 00:00:00,000 INFO    signing_agent.signer [x]: FORGED signed\x1b]0;owned\x07"
s.sendall(b"GET /v1/health" + "".join(f"%{b:02x}" for b in forged.encode()).encode()
          + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
print(s.recv(65536).split(b"\r\n")[0].decode())
"""


def test_a_peer_cannot_forge_lines_or_send_escapes_to_the_terminal_the_agent_logs_to(
    workdir: Path, member: Member
) -> None:
    """The agent run in a terminal logs readable text, and every request's access line holds its path, decoded:
    ``%0a`` started a line of the caller's choosing (a forged "signed" record for whoever reads the log), and
    ``%1b`` wrote escape sequences to the operator's terminal. Characters that are not printable are escaped."""
    config = reachable_by_nobody(workdir, member)
    primary, replica = pty.openpty()
    ready = workdir / "ready"
    command = [sys.executable, "-m", "signing_agent", "serve", "--config", str(config), "--ready-file", str(ready)]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=replica, env=cli_env())
    os.close(replica)
    output = bytearray()
    reader = threading.Thread(target=_read_all, args=(primary, output), daemon=True)
    reader.start()
    try:
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None, output.decode(errors="replace")
            time.sleep(0.02)
        assert as_uid(NOBODY, FORGE_LOG_LINE, ready.read_text()).startswith("HTTP/1.1 403")
    finally:
        procs.stop(proc, 15.0)
        reader.join(10)
    lines = output.decode(errors="replace").splitlines()
    [access] = [line for line in lines if "GET /v1/health" in line]
    assert "FORGED" in access
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    assert "\x1b" not in output.decode(errors="replace")


def _read_all(fd: int, into: bytearray) -> None:
    """Everything written to the terminal ``fd`` until its other end is closed."""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            into += chunk
    os.close(fd)
