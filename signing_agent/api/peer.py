"""Who is on the other end of the Unix socket: SO_PEERCRED, as the kernel reports it (it cannot be forged).

What a peer may do is decided by ``signing_agent.policy``; this module only finds out who it is.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

from aiohttp import web

from signing_agent.policy import Caller

_UCRED = struct.Struct("3i")


def credentials(transport: asyncio.BaseTransport | None) -> tuple[int, int, int] | None:
    """The peer's (pid, uid, gid) from the kernel, or None when the transport is not a Unix socket (never the case
    in the daemon)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def peer_uid(transport: asyncio.BaseTransport) -> int:
    """The peer's uid, or -1 when it cannot be known (then it is nobody privileged)."""
    try:
        creds = credentials(transport)
    except OSError:
        return -1
    return -1 if creds is None else creds[1]


def peer_of(request: web.Request) -> Caller | None:
    """The peer's credentials and executable, or None when the transport is not a Unix socket."""
    creds = credentials(request.transport)
    if creds is None:
        return None
    pid, uid, gid = creds
    return Caller(uid=uid, gid=gid, pid=pid, exe=executable_of(pid))


def executable_of(pid: int) -> str | None:
    """The peer's executable from ``/proc/<pid>/exe``, or None when it cannot be read.

    Reading another user's link needs the daemon to be root (or ptrace-capable); when it fails, rules that name
    executables simply do not match (fail closed). The pid is the one at connect time: a same-uid process could
    exec something else afterwards, so an executable match is a guard against mistakes, not against that uid.
    """
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
