"""Secret files (a PEM private key, a PIN file) and secret environment variables: the one place that decides
whether one may be used.

The rule for files is ssh's for private keys: a regular file owned by the agent's user (or root) that neither group
nor others may read or write. The checks run on the opened file, so a swap between the check and the read cannot slip
through. Messages name the file and the fix, never its content.

A secret environment variable (``pin_env``, ``client_secret_env``) is taken out of ``os.environ`` when it is first
read and kept here, in memory, under its name: every child process the agent spawns (the Azure CLI that
``AzureCliCredential`` runs, anything a PKCS#11 module starts) inherits ``os.environ``, and must not see it. A reload
re-reads the configuration and finds the value here. ``/proc/<pid>/environ`` still shows the environment the process
was started with (only to its uid and root): no process can scrub that.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from signing_agent.errors import ConfigError

MAX_SECRET_BYTES = 1 << 20


def _check(st: os.stat_result, path: Path, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others read or write it",
            hint=f"chmod 600 {path} (ssh refuses private keys with such modes too)",
        )
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{what} {path}: owned by uid {st.st_uid}, not by the agent's user or root")


def check_secret_file(path: Path, what: str) -> None:
    """Refuse (``ConfigError``) a secret file that is missing or not private, without reading it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    _check(st, path, what)


def read_secret_file(path: Path, what: str) -> bytes:
    """The content of a private secret file (at most 1 MiB), checked as it is opened. Opened without blocking: a FIFO
    or a device is refused, never waited on."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            _check(os.fstat(f.fileno()), path, what)
            return f.read(MAX_SECRET_BYTES)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None


_TAKEN: dict[str, str] = {}
"""Secret variables already removed from ``os.environ``, by name. Never logged, never in an error message."""


def secret_env(name: str) -> str | None:
    """The secret in environment variable ``name`` (None when unset or empty), removed from ``os.environ``.

    The first read takes the variable out of the environment, later reads (a reload, a re-login) get the kept value.
    A variable that is set again (in-process tooling such as ``keys``' PIN prompt) replaces the kept value.
    """
    value = os.environ.pop(name, None)
    if value is not None:
        _TAKEN[name] = value
    return _TAKEN.get(name) or None


def take_secret_env(names: Iterable[str]) -> None:
    """Take every one of ``names`` out of the environment now, before anything can spawn a child that inherits it."""
    for name in names:
        secret_env(name)
