"""A user's agent with no ``agent.socket`` listens on ``$XDG_RUNTIME_DIR/signing-agent/agent.sock``, and the CLI
finds it there with neither ``--socket`` nor ``SIGNING_AGENT_SOCK``: the two defaults agree, as ssh-agent's and
gpg-agent's do.

The suite runs as root, whose default is ``/run/signing-agent/``; the daemon and the CLI run in a user namespace
where they are an ordinary uid (``unshare --user``), each in its own, so each sees the other as that same uid.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agent import cli_env, daemon, file_identity, write_toml
from tests.support.p11kit import userns_wrapper
from tests.support.pki import make_member

pytestmark = pytest.mark.e2e


def test_a_users_agent_and_its_cli_meet_under_xdg_runtime_dir(tmp_path: Path) -> None:
    wrapper = userns_wrapper()  # empty when the suite is not root: then we are an ordinary uid already
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    (tmp_path / "home").mkdir()
    key, cert = make_member("m0", "secp256r1").write(tmp_path / "keys")
    config = write_toml(tmp_path / "agent.toml", file_identity("m0", cert, key))  # no [agent] socket
    env = {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path / "home")}

    with daemon(config, env=env, wrapper=wrapper) as agent:
        folder = runtime / "signing-agent"
        assert agent.socket == folder / "agent.sock"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o600
        assert (folder / "audit.jsonl").is_file()  # the audit log's default is beside the socket

        listed = subprocess.run(
            [*wrapper, sys.executable, "-m", "signing_agent", "identities"],
            env=cli_env(env), cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert "m0" in listed.stdout
