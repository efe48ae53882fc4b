"""The Key Vault double (``python -m tests.doubles.keyvault``) as a subprocess, with a small sync control client.

For end-to-end tests where the daemon, itself a subprocess, signs with keys in the double: the double prints one JSON
line (vault_url, ca_bundle, env, keys) and serves until SIGTERM. Its unauthenticated control routes give the request
log and queue faults.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import procs

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class KeyVaultProcess:
    proc: subprocess.Popen[bytes]
    vault_url: str
    ca_bundle: Path
    env: dict[str, str]
    """IDENTITY_ENDPOINT and IDENTITY_HEADER: what the daemon's ManagedIdentityCredential needs."""
    kids: dict[str, str]
    """Key name -> versioned key id of the seeded keys."""
    log: Path
    authority_host: str
    """The Entra ID token endpoint double: ``AZURE_AUTHORITY_HOST`` for the other credentials (trust ``ca_bundle``)."""

    def version(self, name: str) -> str:
        return self.kids[name].rsplit("/", 1)[1]

    def key_table(self, name: str, *, key_name: str | None = None) -> dict[str, Any]:
        """A ``signing_key`` TOML table for seeded key ``name`` (pinned), with managed identity and the CA bundle."""
        return {
            "backend": "azure-keyvault",
            "vault_url": self.vault_url,
            "key_name": key_name or name,
            "key_version": self.version(name),
            "credential": "managed-identity",
            "ca_bundle": self.ca_bundle,
        }

    def control(self, method: str, path: str, body: Any = None, *, base: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        url = (base or self.vault_url) + path
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 -- https loopback
        if data is not None:
            req.add_header("Content-Type", "application/json")
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())

    def requests(self) -> list[dict[str, Any]]:
        """Every request the vault saw, in order (``method, path, op, status, authorized, ...``)."""
        result: list[dict[str, Any]] = self.control("GET", "/_double/requests")["requests"]
        return result

    def created(self) -> list[dict[str, Any]]:
        """Every ``POST /keys/{name}/create`` body the vault received (with the key's ``name``)."""
        result: list[dict[str, Any]] = self.control("GET", "/_double/requests")["created"]
        return result

    def soft_delete(self, name: str) -> None:
        self.control("POST", f"/_double/keys/{name}/delete", {})

    def register_app(self, client_id: str, registration: dict[str, Any]) -> None:
        """Register an app with Entra ID (``secret``, ``certificate_pem``, ``federated``: see
        ``tests.doubles.entra_id.registration_from_json``)."""
        self.control("PUT", f"/_double/apps/{client_id}", registration, base=self.authority_host)

    def grants(self) -> list[dict[str, Any]]:
        """Every token request Entra ID judged: ``client_id, method, ok, error, scope``."""
        result: list[dict[str, Any]] = self.control("GET", "/_double/grants", base=self.authority_host)["grants"]
        return result

    def max_in_flight(self) -> int:
        return int(self.control("GET", "/_double/requests")["max_in_flight"])

    def inject(
        self,
        *,
        status: int | None = 429,
        retry_after: str | None = None,
        count: int = 1,
        ops: tuple[str, ...] = ("sign",),
        delay: float = 0.0,
    ) -> None:
        """Queue a fault for the next ``count`` authenticated requests whose op is in ``ops``."""
        self.control(
            "POST",
            "/_double/faults",
            {"status": status, "retry_after": retry_after, "count": count, "ops": list(ops), "delay": delay},
        )


@contextlib.contextmanager
def keyvault(
    folder: Path, keys: Mapping[str, Path | str], *, timeout: float = 20.0, tier: str = "premium"
) -> Iterator[KeyVaultProcess]:
    """Start the double with ``keys`` (name -> PEM private key file, or a kind such as ``P-384``)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "keyvault.log"
    args = [sys.executable, "-m", "tests.doubles.keyvault", "--port", "0", "--cert-out", str(folder / "ca.pem")]
    args += ["--tier", tier]
    for name, source in keys.items():
        args += ["--key", f"{name}={source}"]
    with log.open("wb") as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        line = _read_line(proc, timeout)
        if not line:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the Key Vault double did not start (rc={proc.returncode}):\n{log.read_text()}")
        info = json.loads(line)
        handle = KeyVaultProcess(
            proc,
            info["vault_url"],
            Path(info["ca_bundle"]),
            dict(info["env"]),
            dict(info["keys"]),
            log,
            info["authority_host"],
        )
        yield handle
    finally:
        procs.stop(proc)
        proc.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The double's one JSON line, or b"" when it exits or stays silent for ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                return proc.stdout.readline()
            if proc.poll() is not None:
                return b""
    return b""
