"""The real daemon under the process conditions the shipped unit (``deploy/systemd/signing-agent.service``) puts it
in, as far as they can be had without systemd: the unit's ``UMask=``, its ``MemoryDenyWriteExecute=`` (the kernel's
``PR_SET_MDWE``, inherited by every child: no memory both writable and executable, none made executable later, as
systemd's filter refuses), and an ordinary user (root in a user namespace as uid 65534, so that folder permissions
bind it as they bind the unit's ``User=``).

Read from the unit file, so a directive changed there is tested here. What needs a running systemd (its system call
filter, ``ProtectSystem=``, ``PrivateDevices=``) is checked by ``systemd-analyze`` in tests/unit/test_deploy.py.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from signing_agent.client import AgentClient
from tests.support import p11kit, tokens
from tests.support.agent import daemon, file_identity, write_toml
from tests.support.pki import make_member
from tests.support.prereq import missing
from tests.unit.test_deploy import one, unit

pytestmark = pytest.mark.e2e

softhsm = tokens.softhsm

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


def unit_conditions() -> list[str]:
    """The command prefix that starts the daemon as the unit would: its umask, W^X memory, an ordinary user."""
    service = unit("signing-agent.service")["Service"]
    umask = int(one(service, "UMask"), 8)
    code = f"import ctypes, os, sys\nos.umask({umask:#o})\n"
    if one(service, "MemoryDenyWriteExecute") == "yes":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
            missing("the kernel has no PR_SET_MDWE (Linux 6.3 or later) to stand for MemoryDenyWriteExecute=yes")
        code += (
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
            "    raise OSError(ctypes.get_errno(), 'PR_SET_MDWE')\n"
        )
    code += "os.execv(sys.argv[1], sys.argv[1:])\n"
    return [*p11kit.userns_wrapper(), sys.executable, "-c", code]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_daemon_makes_its_folders_and_signs_under_the_units_umask_and_wx_memory(workdir: Path) -> None:
    """The audit log's, the socket's and the recovery state's folders do not exist yet (an ``audit.path`` in a
    folder of its own below ``StateDirectory``): the agent makes them 0700, not 0600 folders its own user cannot
    enter (``mkdir``'s mode less ``UMask=0177``). Signing goes through a crypto worker and the fsync helper, both
    children under the same conditions."""
    key, cert = make_member("m0", "secp256r1").write(workdir / "keys")
    state = workdir / "state"
    config = write_toml(
        workdir / "agent.toml",
        {
            "agent": {"socket": workdir / "run" / "sock" / "agent.sock", "crypto_workers": 1},
            "audit": {"path": state / "audit" / "audit.jsonl"},
            **file_identity("m0", cert, key),
        },
    )
    with daemon(config, wrapper=unit_conditions(), cwd=Path("/")) as agent:
        client = AgentClient(agent.socket, timeout=60)
        for _ in range(3):
            answer = client.request("POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"})
            assert answer.status == 200, answer.body
    for folder in (state, state / "audit", workdir / "run", workdir / "run" / "sock"):
        assert mode(folder) == 0o700, (folder, oct(mode(folder)))
    assert mode(state / "audit" / "audit.jsonl") == 0o600
    verify = subprocess.run(
        [sys.executable, "-m", "signing_agent", "audit", "verify", str(state / "audit" / "audit.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.softhsm
@pytest.mark.p11kit
def test_a_softhsm2_token_through_p11_kits_proxy_signs_under_the_units_conditions(
    workdir: Path, softhsm: tokens.SoftHSMSetup
) -> None:
    """p11-kit's proxy and the module behind it are loaded into the daemon under W^X memory and the unit's umask."""
    token = softhsm.tokens["agent-a"]
    label = tokens.unique_label("unit")
    cert = workdir / "m0_cert.pem"
    generate = subprocess.run(
        [sys.executable, "-m", "signing_agent", "keys", "generate", "--module", tokens.SOFTHSM_MODULE, "--token-label",
         token.token_label, "--pin-file", str(token.pin_file), "--label", label, "--cert-out", str(cert)],
        env={**os.environ, **softhsm.env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    home = workdir / "home"
    p11kit.write_user_config(home, {"softhsm": (tokens.SOFTHSM_MODULE, None)})
    signing_key = {"backend": "pkcs11", "module": p11kit.P11KIT_PROXY, "token_label": token.token_label,
                   "key_label": label, "pin_file": token.pin_file}  # fmt: skip
    config = write_toml(
        workdir / "agent.toml",
        {
            "agent": {"socket": workdir / "run" / "agent.sock"},
            "audit": {"path": workdir / "state" / "audit.jsonl"},
            "identities.m0": {"certificate": cert},
            "identities.m0.signing_key": signing_key,
        },
    )
    env = {**softhsm.env, **p11kit.user_env(home)}
    with daemon(config, env=env, wrapper=unit_conditions(), cwd=Path("/"), timeout=60) as agent:
        answer = AgentClient(agent.socket, timeout=60).request(
            "POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"}
        )
        assert answer.status == 200, answer.body
