"""A hostile local user against the daemon's processes and files, through the real daemon, socket and file system.

Each test is an attack another uid (nobody, in a subprocess) can make on the machine the agent runs on; each failed
on the code before its fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from signing_agent.client import AgentClient
from tests.e2e.test_attacks import as_uid
from tests.e2e.test_peer_limits import NOBODY
from tests.support.agent import daemon, file_identity, private_dir, write_toml
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
