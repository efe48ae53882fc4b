"""What every process of the agent does first: no core dumps, and no ptrace by processes of the same uid.

The daemon holds PINs, tokens and decrypted shares; a crypto worker holds the file keys it was handed. ``execve``
makes a process dumpable again, so each worker calls this itself, before it reads anything from its pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
from collections.abc import Callable

_PR_SET_DUMPABLE = 4


_CHILD_ENVIRONMENT = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
_CHILD_ENVIRONMENT_PREFIXES = ("LC_", "COVERAGE_")


def child_environment() -> dict[str, str]:
    """The environment a helper process starts with: what Python needs to find its modules (and a coverage run its
    configuration), nothing else. Not the daemon's: a PIN or client secret a later reload names may still be there."""
    return {
        name: value
        for name, value in os.environ.items()
        if name in _CHILD_ENVIRONMENT or name.startswith(_CHILD_ENVIRONMENT_PREFIXES)
    }


def child_command(module: str) -> tuple[str, ...]:
    """The command line that runs ``module`` in a helper process: this interpreter with ``-P``.

    ``python -m`` puts the working folder first on ``sys.path``, and the daemon's is wherever its user started it:
    ``/tmp``, a shared checkout. A ``signing_agent`` package (or a ``socket.py``) another user put there would run as
    the agent's user, in the very process the file keys are handed to. ``-P`` leaves the working folder out."""
    return (sys.executable, "-P", "-m", module)


def ignore_stop_signals() -> None:
    """A helper process ignores SIGINT, SIGTERM and SIGHUP: the daemon ends it by closing its pipe, after draining,
    so a ``systemctl stop`` (which signals every process of the unit) or a Ctrl-C cannot cut its work short."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def child_main(name: str, serve: Callable[[], None]) -> int:
    """A helper process's ``main``: hardened, deaf to stop signals, serving until the daemon hangs up; 2 when its
    pipe broke or carried something it cannot read (the daemon then starts another)."""
    harden_process()
    ignore_stop_signals()
    try:
        serve()
    except (ValueError, OSError) as exc:
        print(f"signing-agent {name}: {exc}", file=sys.stderr)
        return 2
    return 0


def harden_process() -> None:
    """No core dumps (they would hold secrets) and no ptrace by same-uid processes (``PR_SET_DUMPABLE=0``)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
