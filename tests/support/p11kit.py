"""p11-kit's proxy module with a module configuration of the test's own, never the system's.

p11-kit-proxy.so exposes every module registered in its configuration, which is how Debian and Fedora hosts hand
TPMs, smart cards and HSM client libraries to applications. A user configuration lives in
``$HOME/.config/pkcs11/`` (``pkcs11.conf`` with ``user-config: only`` keeps the system's modules out, and one
``modules/<name>.module`` file per module). p11-kit 0.24 reads it only when the real uid is not 0: as root it
reads ``/etc/pkcs11`` alone, and there is no environment variable to point it elsewhere. So, when the tests run
as root:

- in this process, ``load_proxy`` switches the *real* uid to 65534 (the effective uid stays 0, so nothing loses
  a privilege) for the moment p11-kit reads its configuration, which it does once, when the proxy is
  initialised;
- a daemon subprocess runs in a user namespace as uid 65534 (``userns_wrapper``), where root's files, the
  test's included, appear as its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.support import prereq

P11KIT_PROXY = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"
USER = 65534


def write_user_config(home: Path, modules: Mapping[str, tuple[str, str | None]]) -> Path:
    """Write ``home/.config/pkcs11``: ``user-config: only``, and per ``name -> (module, x-init-reserved)`` a
    ``<name>.module``."""
    prereq.require_file(P11KIT_PROXY, "p11-kit's proxy module (p11-kit-modules)")
    conf = home / ".config" / "pkcs11"
    (conf / "modules").mkdir(parents=True, exist_ok=True)
    (conf / "pkcs11.conf").write_text("user-config: only\n")
    for name, (module, init_reserved) in modules.items():
        text = f"module: {module}\ncritical: no\n"
        if init_reserved is not None:
            text += f"x-init-reserved: {init_reserved}\n"
        (conf / "modules" / f"{name}.module").write_text(text)
    return conf


def user_env(home: Path) -> dict[str, str]:
    """The variables that point p11-kit at ``home``'s user configuration: it expands ``~/.config`` through
    ``$XDG_CONFIG_HOME`` when that is set (as the tests set it, away from the developer's own), else ``$HOME``."""
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


@contextlib.contextmanager
def user_config(home: Path) -> Iterator[None]:
    """While inside: p11-kit, when it initialises in this process, reads ``home``'s user configuration."""
    previous = {name: os.environ.get(name) for name in user_env(home)}
    os.environ.update(user_env(home))
    uids = os.getresuid()
    try:
        if uids[0] == 0:
            os.setresuid(USER, 0, 0)
        yield
    finally:
        if uids[0] == 0:
            os.setresuid(*uids)
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def load_proxy(home: Path) -> None:
    """Load and initialise p11-kit's proxy in this process with ``home``'s user configuration."""
    from signing_agent.backends import _p11module

    if _p11module.loaded(P11KIT_PROXY) is not None:
        return
    with user_config(home):
        _p11module.open_module(P11KIT_PROXY)


def userns_wrapper() -> list[str]:
    """The command prefix that makes a root subprocess read a user configuration (empty when not root)."""
    if os.getuid() != 0:
        return []
    unshare = prereq.require_executable("unshare")
    probe = subprocess.run([unshare, "--user", f"--map-user={USER}", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        prereq.missing(f"user namespaces are unavailable ({probe.stderr.decode().strip()})")
    return [unshare, "--user", f"--map-user={USER}", "--"]


def list_modules(home: Path, env: Mapping[str, str]) -> str:
    """``p11-kit list-modules`` as the agent would see it with ``home``'s configuration (for diagnostics)."""
    tool = shutil.which("p11-kit") or "p11-kit"
    result = subprocess.run(
        [*userns_wrapper(), tool, "list-modules"],
        env={**os.environ, **env, **user_env(home)},
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr
