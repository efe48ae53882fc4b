"""Secrets in environment variables stay in the daemon: no child process it spawns inherits them; SIGHUP still works.

The daemon (a real subprocess) has three identities, in this order: one in the Key Vault double whose credential is
``azure-cli`` (a fake ``az``, first on PATH, writes the environment it was given to a file and fails), one in a
SoftHSM2 token whose PIN is in ``pin_env``, and one whose ``client_secret_env`` holds a client secret. The ``az``
child runs before the other two identities open, so taking a variable out of the environment only when its own key
opens would not be enough.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signing_agent.client import AgentClient
from tests.doubles.keyvault import OTHER_AZURE_ENV
from tests.e2e.test_lifecycle import sighup_and_wait
from tests.support import prereq
from tests.support.agent import cli_env, daemon, write_toml
from tests.support.keyvault_proc import keyvault
from tests.support.pki import make_member
from tests.support.tokens import SO_PIN, SOFTHSM_MODULE

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

PIN_VAR = "SA_TEST_DAEMON_PIN"
SECRET_VAR = "SA_TEST_CLIENT_SECRET"
LATE_VAR = "SA_TEST_LATE_SECRET"
"""In the daemon's environment from the start, named only by the configuration a reload brings."""
FAKE_AZ = """#!/bin/sh
# A stand-in for the Azure CLI: record the environment the agent gave us, then fail as an unlogged-in az does.
{{ env; echo "--- end of az environment ---"; }} >> {dump}
echo "ERROR: Please run 'az login' to setup account." >&2
exit 1
"""


def make_token(folder: Path, pin: str) -> tuple[dict[str, str], Path]:
    """A private SoftHSM2 token with a member key made inside it; the environment to reach it and its certificate."""
    util = prereq.require_executable("softhsm2-util")
    prereq.require_file(SOFTHSM_MODULE, "the SoftHSM2 PKCS#11 module")
    (folder / "tokens").mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = cli_env({"SOFTHSM2_CONF": str(conf)})
    init = [util, "--init-token", "--free", "--label", "daemon-pin", "--so-pin", SO_PIN, "--pin", pin]
    subprocess.run(init, env=env, check=True, capture_output=True, timeout=60)
    cert = folder / "hsm_cert.pem"
    generate = [sys.executable, "-m", "signing_agent", "keys", "generate", "--module", SOFTHSM_MODULE,
                "--token-label", "daemon-pin", "--pin-env", PIN_VAR, "--label", "hsm",
                "--cert-out", str(cert)]  # fmt: skip
    result = subprocess.run(generate, env={**env, PIN_VAR: pin}, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return {"SOFTHSM2_CONF": str(conf)}, cert


def az_environments(dump: Path) -> list[str]:
    return [block for block in dump.read_text().split("--- end of az environment ---") if block.strip()]


def test_no_child_sees_a_secret_variable_and_reload_still_logs_in(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin, client_secret, late_secret = secrets.token_hex(16), secrets.token_hex(24), secrets.token_hex(24)
    token_env, hsm_cert = make_token(workdir / "hsm", pin)
    member = make_member("kv")
    kv_key, kv_cert = member.write(workdir / "keys")
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    dump = workdir / "az-environment.txt"
    (bin_dir / "az").write_text(FAKE_AZ.format(dump=dump))
    (bin_dir / "az").chmod(0o755)
    for var in OTHER_AZURE_ENV:
        monkeypatch.delenv(var, raising=False)
    with keyvault(workdir / "vault", {"kv": kv_key}) as vault:
        kv_table = {**vault.key_table("kv"), "credential": "azure-cli"}
        tables: dict[str, dict[str, Any]] = {
            "agent": {"socket": workdir / "run" / "agent.sock"},
            "keyvault": {"max_attempts": 1, "total_timeout": 10.0},
            "identities.kv": {"certificate": kv_cert},
            "identities.kv.signing_key": kv_table,
            "identities.hsm": {"certificate": hsm_cert},
            "identities.hsm.signing_key": {
                "backend": "pkcs11",
                "module": SOFTHSM_MODULE,
                "token_label": "daemon-pin",
                "key_label": "hsm",
                "pin_env": PIN_VAR,
            },
            "identities.cs": {"certificate": kv_cert},
            "identities.cs.signing_key": {
                **kv_table,
                "credential": "client-secret",
                "tenant_id": "00000000-0000-0000-0000-000000000001",
                "client_id": "00000000-0000-0000-0000-000000000002",
                "client_secret_env": SECRET_VAR,
                "vault_url": "https://127.0.0.1:1",  # nothing listens: the secret is read, never sent
            },
        }
        config = write_toml(workdir / "agent.toml", tables)
        env = {
            **token_env,
            PIN_VAR: pin,
            SECRET_VAR: client_secret,
            LATE_VAR: late_secret,
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        with daemon(config, env=env, args=["--allow-degraded"], timeout=60) as proc:
            client = AgentClient(proc.socket, timeout=60)
            assert {i["name"] for i in client.identities()} == {"hsm"}
            assert client.call("POST", "/v1/sign", {"identity": "hsm", "msg_type": "state_digest"}).status == 200
            [first] = az_environments(dump)  # the fake az really ran, as a child of the daemon
            assert "AZURE_CORE_NO_COLOR=true" in first

            # The reloaded configuration names a variable the first did not: taken out before its az child runs.
            tables["identities.cs.signing_key"]["client_secret_env"] = LATE_VAR
            write_toml(workdir / "agent.toml", tables)
            sighup_and_wait(proc, "configuration reloaded", 1)
            # The new generation logged in to the token again (the reload dropped every session and login) with the
            # PIN the daemon kept in memory: the environment no longer has it.
            assert "reload rejected" not in proc.stderr
            assert {i["name"] for i in client.identities()} == {"hsm"}
            assert client.call("POST", "/v1/sign", {"identity": "hsm", "msg_type": "state_digest"}).status == 200
            assert len(az_environments(dump)) == 2
        before, after = az_environments(dump)
        assert f"{LATE_VAR}={late_secret}" in before  # no configuration had named it yet: the agent cannot know
        named_at_start = [(PIN_VAR, pin), (SECRET_VAR, client_secret)]
        for environment, named in ((before, named_at_start), (after, [*named_at_start, (LATE_VAR, late_secret)])):
            for name, value in named:
                assert f"{name}=" not in environment, f"{name} reached the az child"
                assert value not in environment, f"the value of {name} reached the az child"
        for value in (pin, client_secret, late_secret):
            assert value not in proc.stderr
