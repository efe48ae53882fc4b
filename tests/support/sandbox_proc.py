"""The CCF governance sandbox as a subprocess (``python -m signing_agent sandbox``) with a small sync control client."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import procs


@dataclass
class SandboxProcess:
    proc: subprocess.Popen[bytes]
    url: str
    service_cert: Path
    log: Path

    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.service_cert))

    def control(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 -- https to loopback
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, context=self._ctx(), timeout=10) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None

    def gov_get(self, path: str) -> Any:
        sep = "&" if "?" in path else "?"
        return self.control("GET", f"{path}{sep}api-version=2024-07-01")

    def add_member(self, cert_pem: bytes, status: str = "Active", **extra: Any) -> str:
        return str(
            self.control("POST", "/_sandbox/members", {"cert": cert_pem.decode(), "status": status, **extra})[
                "memberId"
            ]
        )

    def join_node(self, node_data: Any = None) -> str:
        """A node joins (``POST /_sandbox/nodes``): Pending until members trust it. Its node id."""
        return str(self.control("POST", "/_sandbox/nodes", {"node_data": node_data})["nodeId"])

    def fault(self, kind: str, path: str, **extra: Any) -> Any:
        return self.control("POST", "/_sandbox/faults", {"kind": kind, "path": path, **extra})

    def clear_faults(self) -> None:
        self.control("DELETE", "/_sandbox/faults")

    def requests(self, path_contains: str = "") -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = self.control("GET", "/_sandbox/requests")["value"]
        return [r for r in log if path_contains in r["path"]]

    def clear_requests(self) -> None:
        self.control("DELETE", "/_sandbox/requests")

    def recover(self, service_key_pem: bytes | None = None, service_cert_pem: bytes | None = None) -> dict[str, Any]:
        """The disaster (``POST /_sandbox/recover``): the service restarts Recovering with a new identity (the
        given one, or a generated one), rewritten into ``service_cert``. Returns the sandbox's answer."""
        body: dict[str, str] = {}
        if service_key_pem is not None:
            body["service_key"] = service_key_pem.decode()
        if service_cert_pem is not None:
            body["service_cert"] = service_cert_pem.decode()
        result: dict[str, Any] = self.control("POST", "/_sandbox/recover", body)
        return result

    def service_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.gov_get("/gov/service/info")
        return info

    def wait_for_status(self, status: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll ``/gov/service/info`` until the service is ``status``; the last info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.service_info()
            if info["status"] == status or time.monotonic() > deadline:
                assert info["status"] == status, f"service is {info['status']}, not {status}"
                return info
            time.sleep(0.05)

    def proposals(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.gov_get("/gov/members/proposals")["value"]
        return result


@contextlib.contextmanager
def sandbox(
    folder: Path, member_certs: Sequence[Path] = (), *, timeout: float = 20.0, args: Sequence[str] = ()
) -> Iterator[SandboxProcess]:
    """The sandbox, with ``member_certs`` as its Active members and ``args`` more options (``--opening``...)."""
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "sandbox.ready"
    cert = folder / "service_cert.pem"
    log = folder / "sandbox.log"
    command = [
        sys.executable,
        "-m",
        "signing_agent",
        "sandbox",
        "--ready-file",
        str(ready),
        "--service-cert-out",
        str(cert),
        *args,
    ]
    for member in member_certs:
        command += ["--member-cert", str(member)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the sandbox did not start:\n{log.read_text()}")
        time.sleep(0.02)
    handle = SandboxProcess(proc, ready.read_text().strip(), cert, log)
    try:
        yield handle
    finally:
        procs.stop(proc)
