"""The sandbox tells a person how to use it, and says so when it overwrites a service certificate file that an agent
may pin."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from signing_agent.sandbox import SandboxServer
from tests.support.agent import cli_env


def test_help_shows_the_control_api() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "signing_agent", "sandbox", "--help"],
        env=cli_env(), capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    for route in ("POST   /_sandbox/members", "/_sandbox/faults", "/_sandbox/requests", "POST   /_sandbox/recover"):
        assert route in shown


async def test_a_different_certificate_is_overwritten_only_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pinned = tmp_path / "service_cert.pem"
    async with SandboxServer() as first:
        first.write_service_cert(pinned)
        caplog.clear()
        first.write_service_cert(pinned)  # the same certificate: nothing to say
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        async with SandboxServer() as second:
            second.write_service_cert(pinned)
    assert pinned.read_bytes() == second.service_cert_pem
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"overwrote {pinned}, which held another service certificate" in warning
    assert "'signing-agent reload'" in warning
    assert not list(tmp_path.glob(".*partial"))  # written aside, then renamed into place


def test_once_listening_it_prints_its_url_what_to_pin_and_its_control_api(tmp_path: Path) -> None:
    ready, pinned = tmp_path / "url", tmp_path / "service_cert.pem"
    pinned.write_text("an older service certificate\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "signing_agent", "sandbox", "--service-cert-out", str(pinned), "--ready-file",
         str(ready)],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        url = ready.read_text().strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"CCF governance sandbox on {url} (a test double, not a CCF node" in err
    assert f"service certificate to pin: {pinned}" in err
    assert f'    url = "{url}"' in err
    assert f"control API: {url}/_sandbox/" in err
    assert f"overwrote {pinned}, which held another service certificate" in err
