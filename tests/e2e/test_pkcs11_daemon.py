"""The real daemon with keys in a software TPM, directly and through p11-kit's proxy: the TPM goes away and comes back.

tpm2-pkcs11 talks to ``swtpm`` directly here (one key per process is all a TPM without a resource manager allows,
and all the daemon needs); ``swtpm`` is stopped and started again on the same state under the running daemon. While
the TPM is away, signing answers 503 ``BackendUnavailable`` naming the token, health is degraded, the daemon lives
and logs one line per reconnection attempt, not per request; when the TPM is back, signing works again without a
restart or a SIGHUP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from signing_agent.client import AgentClient, Response
from tests.support import p11kit
from tests.support.agent import DaemonProcess, daemon, short_dir, write_toml
from tests.support.swtpm import TPM_MODULE, SoftwareTPM

pytestmark = [pytest.mark.e2e, pytest.mark.tpm]

PIN = "1234"
RETRY_SECONDS = 5.0  # signing_agent.backends.pkcs11.RETRY_SECONDS


def _keys_generate(tpm: SoftwareTPM, folder: Path) -> Path:
    """``signing-agent keys generate`` in the TPM, as an operator runs it; returns the member certificate."""
    cert = folder / "m0_cert.pem"
    result = subprocess.run(
        [sys.executable, "-m", "signing_agent", "keys", "generate", "--module", TPM_MODULE, "--token-label", "tpm",
         "--pin-file", str(folder / "user.pin"), "--label", "m0", "--cert-out", str(cert)],
        env={**os.environ, **tpm.env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cert


@pytest.fixture
def tpm() -> Iterator[SoftwareTPM]:
    folder = short_dir("sa-tpm-")
    tpm = SoftwareTPM(folder, resource_manager=False)
    try:
        tpm.start()
        tpm.init_token("tpm", PIN)
        pin = folder / "user.pin"
        pin.write_text(PIN + "\n")
        pin.chmod(0o600)
        yield tpm
    finally:
        tpm.stop()
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def _sign(client: AgentClient) -> Response:
    return client.request(
        "POST",
        "/v1/sign",
        {"identity": "m0", "msg_type": "proposal", "payload": {"actions": [{"name": "set_constitution", "args": {}}]}},
    )


def _backend_lines(proc: DaemonProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "token 'tpm'" in line and "request " not in line]


@pytest.fixture(params=["direct", pytest.param("p11-kit", marks=pytest.mark.p11kit)])
def agent(request: pytest.FixtureRequest, tpm: SoftwareTPM) -> Iterator[DaemonProcess]:
    folder = tpm.folder
    cert = _keys_generate(tpm, folder)
    x509.load_pem_x509_certificate(cert.read_bytes())
    env: dict[str, str] = dict(tpm.env)
    wrapper: list[str] = []
    module = TPM_MODULE
    if request.param == "p11-kit":
        home = folder / "home"
        p11kit.write_user_config(home, {"tpm": (TPM_MODULE, None)})
        env["HOME"] = str(home)
        wrapper = p11kit.userns_wrapper()
        module = p11kit.P11KIT_PROXY
    signing_key: dict[str, Any] = {"backend": "pkcs11", "module": module, "token_label": "tpm", "key_label": "m0",
                                   "pin_file": folder / "user.pin"}  # fmt: skip
    tables = {
        "agent": {"socket": folder / "run" / "agent.sock"},
        "identities.m0": {"certificate": cert},
        "identities.m0.signing_key": signing_key,
    }
    with daemon(write_toml(folder / "agent.toml", tables), env=env, wrapper=wrapper, timeout=60) as proc:
        yield proc


def test_signing_survives_the_tpm_going_away_and_coming_back(agent: DaemonProcess, tpm: SoftwareTPM) -> None:
    client = AgentClient(agent.socket, timeout=60)
    assert _sign(client).status == 200

    tpm.stop_tpm()
    started = time.monotonic()
    first = _sign(client)
    assert first.status == 503, first.body
    error = first.json()["error"]
    assert error["code"] == "BackendUnavailable"
    assert "token 'tpm' is unavailable" in error["message"]

    health = client.request("GET", "/v1/health").json()
    assert health["status"] == "degraded"
    [token] = health["pkcs11_tokens"]
    assert (token["token_label"], token["status"], token["connected"]) == ("tpm", "unavailable", False)

    # A burst of requests while it is away: each answered 503 at once; the backend logs per attempt, not per request.
    for _ in range(30):
        retry = _sign(client)
        assert retry.status == 503
        assert retry.json()["error"]["code"] == "BackendUnavailable"
        assert "token 'tpm' is unavailable since" in retry.json()["error"]["message"]
    assert agent.proc.poll() is None
    attempts_possible = 1 + int((time.monotonic() - started) / RETRY_SECONDS)
    assert 1 <= len(_backend_lines(agent)) <= 2 + attempts_possible, agent.stderr

    tpm.start()  # the same TPM state: the key in the token is the same key
    deadline = time.monotonic() + 6 * RETRY_SECONDS
    while (answer := _sign(client)).status != 200:
        assert answer.status == 503, answer.body
        assert time.monotonic() < deadline, agent.stderr
        time.sleep(0.5)
    assert agent.proc.poll() is None
    assert "is available again" in agent.stderr
    [token] = client.request("GET", "/v1/health").json()["pkcs11_tokens"]
    assert token["status"] == "ok"
