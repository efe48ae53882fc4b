"""What every process of the agent does first: no core dumps, and no ptrace by processes of the same uid.

The daemon holds PINs, tokens and decrypted shares; a crypto worker holds the file keys it was handed. ``execve``
makes a process dumpable again, so each worker calls this itself, before it reads anything from its pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource

_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """No core dumps (they would hold secrets) and no ptrace by same-uid processes (``PR_SET_DUMPABLE=0``)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
