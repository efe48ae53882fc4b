"""Files the agent keeps of its own (the audit log, the recovery state) and files it takes its trust from (its
configuration, a pinned service certificate, a CA bundle): the one way they are opened and checked.

The rule is ``foreign``'s: the agent's uid or root owns it, and no group or other may write it. A folder the agent
keeps files in is opened without following a symlink, and used only if it passes (others could swap its files or
plant their own). Files in it are opened relative to that folder's descriptor, again without following a symlink, and
checked on the opened descriptor, so a swap between a check and a use cannot slip through. A trust file is only read
(``read_own_file``): a symlink to it is followed, and the file it reaches is checked as opened.

Two stricter rules live beside what they guard: a secret file (a key, a PIN) must not be readable by others either
(``backends._secrets``, ssh's rule), and the recovery state file must be the agent's uid's alone, mode 0600 at most
(``recovery.store``).

What is wrong is raised as a ``NotOursError`` naming the problem; each caller words the refusal in its own terms (its
setting's name, its hint), because its messages are part of what it promises. Other ``OSError`` pass through.

Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Literal

Problem = Literal["link", "owner", "writable", "special"]
"""``link``: a symbolic link (or, for a folder, not a folder); ``owner``: owned by neither the agent's uid nor
root; ``writable``: group or others may write it; ``special``: a file that is no regular file (a FIFO, a device)."""


class NotOursError(Exception):
    """A file or folder the agent will not take for its own. ``st`` is its ``fstat`` when it could be opened (for
    ``owner`` and ``writable``; None for ``link``)."""

    def __init__(self, path: Path, problem: Problem, st: os.stat_result | None = None) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.st = st


def foreign(st: os.stat_result) -> Problem | None:
    """Why a file or folder with this ``stat`` is not the agent's to trust (``owner`` or ``writable``), or None."""
    if st.st_uid not in (os.geteuid(), 0):
        return "owner"
    if st.st_mode & 0o022:
        return "writable"
    return None


def open_own_folder(folder: Path) -> int:
    """The folder as a descriptor, if it is the agent's own; else ``NotOursError`` (``link``, ``owner`` or
    ``writable``). A missing folder is ``FileNotFoundError``."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotOursError(folder, "link") from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    problem = foreign(st)
    if problem is not None:
        os.close(fd)
        raise NotOursError(folder, problem, st)
    return fd


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each mode 0700 whatever the umask; one that exists is left as it
    is (the caller checks it). ``mkdir``'s mode is cut by the umask, and the systemd unit's ``UMask=0177`` would
    leave 0600 folders that their own user cannot enter: the agent could then neither make nor open its files
    there. Each folder made is set to 0700 through a descriptor opened without following a symlink."""
    missing: list[Path] = []
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made meanwhile, by someone else: not ours to change
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def read_own_file(path: Path) -> bytes:
    """The content of a file the agent takes its trust from (its configuration, a pinned service certificate), if it
    is the agent's own: owned by its uid or root, and no group or other may write it; else ``NotOursError``
    (``owner`` or ``writable``). Checked on the opened file, so a swap between the check and the read cannot slip
    through. A symlink is followed (a Kubernetes ConfigMap's files are links): the file read is the one checked. It
    must be a regular file (else ``special``), opened without blocking: a FIFO at the path would hang whoever reads
    it (the event loop, for a service certificate read again), a device would be read without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        problem = foreign(st) if stat.S_ISREG(st.st_mode) else "special"
        if problem is not None:
            raise NotOursError(path, problem, st)
        return f.read()


def open_in_folder(folder_fd: int, path: Path, flags: int, mode: int = 0o600) -> int:
    """``path``'s entry in the open folder ``folder_fd``, opened with ``flags`` without following a symlink
    (``NotOursError("link")``); the caller checks what it opened."""
    try:
        return os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotOursError(path, "link") from None
        raise


def replace_file(folder_fd: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Put ``data`` at ``name`` in the open folder atomically: a fresh hidden file (``mode``, never through a
    symlink), written and fsynced, renamed over ``name``, then the folder fsynced. On failure ``name`` keeps what it
    had, and the hidden file is removed."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder_fd)
        raise
    fsync_folder(folder_fd)


def replace_at(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``replace_file`` at ``path``, in a folder that need not be the agent's (a ready file, wherever it is asked
    for): the file is written under a fresh random name, never through a symlink or a file someone put at a name
    they could guess, then renamed over ``path``. ``mode`` (less the umask): public by default."""
    folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_file(folder_fd, path.name, data, mode)
    finally:
        os.close(folder_fd)


def fsync_folder(folder_fd: int) -> None:
    """Make the entries of the open folder ``folder_fd`` durable (a new file, a rename, a removal) by fsyncing the
    folder itself. Best effort: the data is already synced, and some file systems refuse to fsync a folder."""
    with contextlib.suppress(OSError):
        os.fsync(folder_fd)
