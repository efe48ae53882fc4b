"""A caller's created_at must be near the agent's clock, for every message type and every route that takes one.

The attack: CCF refuses a new proposal older than the median of its recent proposals, so a caller allowed to raw-sign
proposals who signs one for ``created_at = 9999999999`` (and submits it, with enough others) locks the consortium out
of proposal creation. A message signed for the past or the future is also one a caller can hold back and use later.
The real daemon as a subprocess, over its socket and through the CLI; nothing is signed for a refused time.
"""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from signing_agent.client import AgentClient
from tests.e2e.test_keyvault_e2e import MESSAGES
from tests.support.agent import DaemonProcess, cli_env, daemon, file_identity, write_toml
from tests.support.pki import make_member

pytestmark = pytest.mark.e2e


def start(folder: Path, **agent: Any) -> Any:
    key, cert = make_member("m0").write(folder / "keys")
    tables = {"agent": {"socket": folder / "run" / "agent.sock", **agent}, **file_identity("m0", cert, key)}
    return daemon(write_toml(folder / "agent.toml", tables))


@pytest.fixture
def agent(workdir: Path) -> Iterator[DaemonProcess]:
    with start(workdir) as proc:
        yield proc


def body(msg_type: str, payload: bytes, extra: dict[str, Any], created_at: int) -> dict[str, Any]:
    return {
        "identity": "m0",
        "msg_type": msg_type,
        "payload_base64": base64.b64encode(payload).decode(),
        "created_at": created_at,
        **extra,
    }


def audit_events(workdir: Path) -> list[str]:
    lines = (workdir / "run" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


def cli(sock: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        capture_output=True,
        env=cli_env({"SIGNING_AGENT_SOCK": str(sock)}),
        timeout=60,
        check=False,
    )


def test_a_created_at_far_from_now_is_refused_for_every_message_type(agent: DaemonProcess, workdir: Path) -> None:
    client = AgentClient(agent.socket, timeout=60)
    for msg_type, payload, extra in MESSAGES:
        for created_at in (9_999_999_999, int(time.time()) - 3600):
            for route in ("/v1/sign", "/v1/explain"):
                resp = client.request("POST", route, body(msg_type, payload, extra, created_at))
                assert resp.status == 400, (msg_type, route, resp.body[:300])
                error = resp.json()["error"]
                assert error["code"] == "InvalidRequest"
                assert f"created_at {created_at} is " in error["message"]
                assert "from the agent's clock (" in error["message"]
                assert "agent.max_created_at_skew allows 300 s" in error["message"]
    assert "signed" not in audit_events(workdir)

    for msg_type, payload, extra in MESSAGES:
        soon = int(time.time()) + 10
        resp = client.request("POST", "/v1/sign", body(msg_type, payload, extra, soon))
        assert resp.status == 200, (msg_type, resp.body[:300])
        assert cbor2.loads(cbor2.loads(resp.body).value[0])["ccf.gov.msg.created_at"] == soon
    assert audit_events(workdir).count("signed") == len(MESSAGES)


def test_the_cli_flag_is_held_to_the_same_window(agent: DaemonProcess, workdir: Path) -> None:
    an_hour_ago = datetime.datetime.now(datetime.UTC).replace(microsecond=0) - datetime.timedelta(hours=1)
    for when in ("9999999999", an_hour_ago.isoformat()):
        for explain in ([], ["--explain"]):
            result = cli(agent.socket, "sign", "--identity", "m0", "--ccf-gov-msg-type", "state_digest",
                         "--ccf-gov-msg-created_at", when, *explain)  # fmt: skip
            assert result.returncode != 0
            assert result.stdout == b""
            assert b"agent.max_created_at_skew" in result.stderr, result.stderr
            assert b"Traceback" not in result.stderr
    assert "signed" not in audit_events(workdir)
    soon = str(int(time.time()) + 10)
    result = cli(agent.socket, "sign", "--identity", "m0", "--ccf-gov-msg-type", "state_digest",
                 "--ccf-gov-msg-created_at", soon)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert cbor2.loads(cbor2.loads(result.stdout).value[0])["ccf.gov.msg.created_at"] == int(soon)


def test_the_window_is_the_configured_one(workdir: Path) -> None:
    state_digest = MESSAGES[3]
    with start(workdir / "wide", max_created_at_skew=7200) as proc:
        client = AgentClient(proc.socket, timeout=60)
        assert client.request("POST", "/v1/sign", body(*state_digest, int(time.time()) - 3600)).status == 200
        resp = client.request("POST", "/v1/sign", body(*state_digest, int(time.time()) - 3 * 3600))
        assert resp.status == 400
        assert "agent.max_created_at_skew allows 7200 s" in resp.json()["error"]["message"]
    with start(workdir / "strict", max_created_at_skew=0) as proc:
        client = AgentClient(proc.socket, timeout=60)
        assert client.request("POST", "/v1/sign", body(*state_digest, int(time.time()) + 10)).status == 400
        # Without created_at the agent's own clock is used: always within the window.
        resp = client.request("POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"})
        assert resp.status == 200, resp.body[:300]
