"""Who is on the other end of the Unix socket: SO_PEERCRED, as the kernel reports it (it cannot be forged).

What a peer may do is decided by ``signing_agent.policy``; this module only finds out who it is.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

from signing_agent.policy import Caller

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def as_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid}


def peer_of(request: web.Request) -> Peer | None:
    """The peer's credentials, or None when the transport is not a Unix socket (never the case in the daemon)."""
    transport = request.transport
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid=pid, uid=uid, gid=gid)


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


def caller_of(peer: Peer) -> Caller:
    return Caller(uid=peer.uid, gid=peer.gid, pid=peer.pid, exe=executable_of(peer.pid))
