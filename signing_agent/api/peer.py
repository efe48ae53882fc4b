"""Who is on the other end of the Unix socket: SO_PEERCRED, as the kernel reports it (it cannot be forged)."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

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


@dataclass(frozen=True, slots=True)
class PeerAllowList:
    """By default only the daemon's own uid and root may use the agent (ssh-agent's rule)."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def default(cls, extra_uids: tuple[int, ...] = (), extra_gids: tuple[int, ...] = ()) -> PeerAllowList:
        return cls(uids=frozenset({0, os.getuid(), *extra_uids}), gids=frozenset(extra_gids))

    def allows(self, peer: Peer) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids
