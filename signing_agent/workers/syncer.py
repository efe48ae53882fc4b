"""The audit log's fsync helper, daemon side: ``Syncer`` (the child is ``fsync_child``).

The audit log fsyncs each group of records before any of them is released. On a thread, the fsync itself waits on the
disk without the GIL, but handing the job to the thread and taking the answer back cost the event loop more than the
fsync (two GIL hand-overs and the executor's bookkeeping per group: about a tenth of the loop's time under load). Here
the event loop sends the file descriptor itself (``SCM_RIGHTS``) with one byte over a socketpair, the child fsyncs it
(the same open file: fsync acts on the file, whichever descriptor names it) and answers one byte; the loop waits for
that answer like any socket read, and no other thread ever wants its GIL.

The descriptor travels with every request, so the child can never sync a file the log has rotated away from. Should
the child fail in any way, ``Syncer.fsync`` raises ``SyncerUnavailableError`` and the audit log goes back to fsyncing
on a thread for good (and says so once): a helper process is a speed-up, never a condition for durability.
"""

from __future__ import annotations

import asyncio
import os
import socket

from signing_agent.workers.fsync_child import ANSWER as _ANSWER
from signing_agent.workers.hardening import child_command, child_environment
from signing_agent.workers.reaping import reap


class SyncerUnavailableError(RuntimeError):
    """The helper cannot fsync (it died, or answered nonsense): fsync some other way."""


class Syncer:
    """The daemon's side: one fsync at a time (the audit log's writer lock serialises them)."""

    def __init__(self, sock: socket.socket, proc: asyncio.subprocess.Process) -> None:
        self._sock = sock
        self._proc = proc
        self.gone = False

    @classmethod
    async def start(cls) -> Syncer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                *child_command("signing_agent.workers.fsync_child"), str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=child_environment(),
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(ours, proc)

    async def fsync(self, fd: int) -> None:
        """fsync ``fd`` in the child. Raises ``OSError`` with the child's errno when the fsync itself failed, and
        ``SyncerUnavailableError`` when the child cannot be asked."""
        if self.gone:
            raise SyncerUnavailableError("the fsync helper is gone")
        loop = asyncio.get_running_loop()
        answer = b""
        try:
            socket.send_fds(self._sock, [b"S"], [fd])
            while len(answer) < _ANSWER:
                more = await loop.sock_recv(self._sock, _ANSWER - len(answer))
                if not more:
                    break
                answer += more
        except OSError as exc:
            self.gone = True
            raise SyncerUnavailableError(f"the fsync helper failed: {exc}") from None
        except asyncio.CancelledError:
            self.gone = True  # its answer may still come: the stream cannot be trusted to pair answers any more
            raise
        if len(answer) < _ANSWER:
            self.gone = True
            raise SyncerUnavailableError("the fsync helper exited")
        code = int.from_bytes(answer[1:], "big")
        if answer[0] != 0:
            raise OSError(code, os.strerror(code))

    async def aclose(self) -> None:
        self.gone = True
        self._sock.close()  # the child sees EOF and exits
        await reap(self._proc)
