"""The fsync helper (``python -m signing_agent.workers.fsync_child FD``): the child side of ``workers.syncer``.

It imports little beyond the standard library's ``os``, ``socket`` and ``sys`` (no asyncio: it costs the process tree
10 MiB). Each request is one byte with one descriptor (``SCM_RIGHTS``); the answer is three bytes: ``0 0 0`` after a
good fsync, ``1`` and the errno (big-endian) after a failed one. It ignores SIGINT, SIGTERM and SIGHUP and ends when the
daemon hangs up.
"""

from __future__ import annotations

import os
import socket
import sys

from signing_agent.workers.hardening import child_main

ANSWER = 3
"""Bytes in an answer: 0 and two zero bytes after a good fsync, 1 and the errno (big-endian) after a failed one."""


def serve(sock: socket.socket) -> None:
    """Answer each request (one byte and a descriptor) with the fsync's outcome, until the daemon hangs up."""
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 1, 4)
        if not data:
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError("a request without exactly one descriptor")
        try:
            os.fsync(fds[0])
        except OSError as exc:
            sock.sendall(b"\x01" + min(exc.errno or 5, 0xFFFF).to_bytes(2, "big"))
        else:
            sock.sendall(bytes(ANSWER))
        finally:
            os.close(fds[0])


def main() -> int:
    return child_main("fsync helper", lambda: serve(socket.socket(fileno=int(sys.argv[1]))))


if __name__ == "__main__":
    sys.exit(main())
