"""A software TPM for tests: ``swtpm`` on Unix sockets in a temp folder, optionally behind a private ``tpm2-abrmd``.

tpm2-pkcs11 reaches it through ``TPM2_PKCS11_TCTI`` and keeps its token database in ``TPM2_PKCS11_STORE``; both
point into the test's folder, so nothing touches a system TPM or store. Two shapes:

- ``resource_manager=True``: ``swtpm`` + a private ``dbus-daemon`` + ``tpm2-abrmd --session`` on that bus
  (``TPM2_PKCS11_TCTI=tabrmd:bus_type=session``). A TPM has three object slots and tpm2-pkcs11 keeps keys
  loaded, so without a resource manager one process can use one key at most; the backend suite needs many.
- ``resource_manager=False``: tpm2-pkcs11 talks to ``swtpm`` directly (``swtpm:path=...``). One key per
  process; used to stop and restart the TPM under a running agent (``stop()``, ``start()`` on the same state).

The token is made the way an operator would: ``C_InitToken`` and ``C_InitPIN`` on the module's empty slot, with
OpenSC's ``pkcs11-tool``. Every process is a child of the test and is stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.support import prereq, procs

TPM_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
SO_PIN = "5678"


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (rc={proc.poll()})")
        time.sleep(0.02)


class SoftwareTPM:
    """One ``swtpm`` (and maybe its resource manager) with a tpm2-pkcs11 store, all under ``folder``."""

    def __init__(self, folder: Path, *, resource_manager: bool) -> None:
        for tool in ("swtpm", "pkcs11-tool", *(("dbus-daemon", "tpm2-abrmd") if resource_manager else ())):
            prereq.require_executable(tool)
        prereq.require_file(TPM_MODULE, "the tpm2-pkcs11 module (libtpm2-pkcs11-1)")
        self.folder = folder
        self.resource_manager = resource_manager
        self.state = folder / "state"
        self.store = folder / "store"
        self.socket = folder / "tpm.sock"  # the swtpm TCTI finds the control channel at <path>.ctrl
        if len(str(self.socket)) > 90:
            raise ValueError(f"{self.socket}: too long for a Unix socket")
        self.state.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._dbus: subprocess.Popen[bytes] | None = None
        self._abrmd: subprocess.Popen[bytes] | None = None
        self.bus_address: str | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process loading tpm2-pkcs11 needs (the module reads it at ``C_Initialize``)."""
        env = {"TPM2_PKCS11_STORE": str(self.store)}
        if self.resource_manager:
            assert self.bus_address is not None
            env["TPM2_PKCS11_TCTI"] = "tabrmd:bus_type=session"
            env["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address
        else:
            env["TPM2_PKCS11_TCTI"] = f"swtpm:path={self.socket}"
        return env

    def start(self) -> None:
        """Start swtpm (on the existing state, if any) and the resource manager."""
        self._start_swtpm()
        if self.resource_manager and self._abrmd is None:
            self._start_resource_manager()

    def _start_swtpm(self) -> None:
        for stale in (self.socket, Path(f"{self.socket}.ctrl")):
            stale.unlink(missing_ok=True)
        with (self.folder / "swtpm.log").open("ab") as log:
            self._swtpm = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
                    "--flags", "not-need-init,startup-clear",
                    "--server", f"type=unixio,path={self.socket}",
                    "--ctrl", f"type=unixio,path={self.socket}.ctrl",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        _wait_for(Path(f"{self.socket}.ctrl"), self._swtpm, "swtpm")
        _wait_for(self.socket, self._swtpm, "swtpm")

    def _start_resource_manager(self) -> None:
        bus = self.folder / "bus"
        self._dbus = subprocess.Popen(
            ["dbus-daemon", "--session", f"--address=unix:path={bus}", "--nofork", "--nopidfile"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for(bus, self._dbus, "dbus-daemon")
        self.bus_address = f"unix:path={bus}"
        args = ["tpm2-abrmd", "--session", "--flush-all", f"--tcti=swtpm:path={self.socket}"]
        if os.getuid() == 0:
            args.insert(2, "--allow-root")
        with (self.folder / "abrmd.log").open("ab") as log:
            self._abrmd = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.bus_address},
            )
        # Ready when the module finds its slot through the resource manager.
        deadline = time.monotonic() + 15.0
        while self.pkcs11_tool("--list-slots", check=False).returncode != 0:
            if self._abrmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tpm2-abrmd did not start:\n{(self.folder / 'abrmd.log').read_text()}")
            time.sleep(0.05)

    def pkcs11_tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """OpenSC's ``pkcs11-tool`` on tpm2-pkcs11 with this TPM's environment."""
        return subprocess.run(
            [shutil.which("pkcs11-tool") or "pkcs11-tool", "--module", TPM_MODULE, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def init_token(self, label: str, user_pin: str) -> None:
        """``C_InitToken`` on the empty slot, then ``C_InitPIN``: the token as an operator makes it."""
        self.pkcs11_tool("--init-token", "--label", label, "--so-pin", SO_PIN)
        self.pkcs11_tool("--token-label", label, "--login", "--login-type", "so", "--so-pin", SO_PIN,
                         "--init-pin", "--pin", user_pin)  # fmt: skip

    def stop_tpm(self) -> None:
        """Stop swtpm only (the TPM goes away); its state stays for ``start()``."""
        if self._swtpm is not None:
            procs.stop(self._swtpm)
            self._swtpm = None

    def stop(self) -> None:
        for proc in (self._abrmd, self._dbus):
            if proc is not None:
                procs.stop(proc)
        self._abrmd = self._dbus = None
        self.stop_tpm()
