"""The recovery state file: one small JSON file per CCF service, the agent's memory across restarts.

It holds the recoveries a share was submitted for (per identity, keyed by ``RecoveryKey``), and the service
identities adopted provisionally or approved after a recovery (``APPROVED``, ``ADOPTED``). Never a share.

The file decides where shares may go, so only the agent's own is used (``signing_agent.files``): the folder is opened
without following a symlink and must belong to the agent's uid or root and be writable by no group or other; the file
is opened without following a symlink and must be a regular file of the agent's uid, mode 0600 at most. Anything else
is refused with a ``ConfigError`` on every read and write (nothing from it is used, nothing is written over it, its
mode is never changed), until an operator moves it aside.

Imports nothing above ``signing_agent.files``, ``config`` and ``errors``.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signing_agent.errors import ConfigError
from signing_agent.files import NotOursError, make_private_folder, open_in_folder, open_own_folder, replace_file

STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 20

APPROVED = "approved_identity"
"""The state file's record of the service identity approved for shares after a recovery (pinned)."""
ADOPTED = "adopted_identity"
"""The state file's record of the service identity adopted provisionally (reads and ballots only)."""


@dataclass(frozen=True, slots=True)
class RecoveryKey:
    """Which recovery a share belongs to."""

    recovery_count: int | None
    creation_txid: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"recoveryCount": self.recovery_count, "creationTransactionId": self.creation_txid}

    def matches(self, record: Mapping[str, Any] | None) -> bool:
        return (
            record is not None
            and record.get("recoveryCount") == self.recovery_count
            and record.get("creationTransactionId") == self.creation_txid
        )


class RecoveryStateStore:
    """One JSON file per service (mode 0600, replaced atomically): submitted recoveries per identity, and the service
    identities adopted (provisionally) or approved after a recovery. Never a share. One store object per file per
    process (``for_path``). Refuses a file or folder that is not the agent's own (see the module docstring).
    """

    _stores: dict[Path, RecoveryStateStore] = {}  # noqa: RUF012 -- a process-wide registry, on purpose

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()
        self._data: dict[str, Any] | None = None
        self._share_locks: dict[str, asyncio.Lock] = {}

    def share_lock(self, identity: str) -> asyncio.Lock:
        """Held while ``identity``'s share for this service is fetched, decrypted and submitted: one at a time in
        the process, whichever configuration generation asks (a watcher of the new one, a request still running in
        the old one), since the store, like the file, is one per process."""
        return self._share_locks.setdefault(identity, asyncio.Lock())

    @classmethod
    def for_path(cls, path: Path) -> RecoveryStateStore:
        store = cls._stores.get(path)
        if store is None:
            store = cls._stores[path] = cls(path)
        return store

    @staticmethod
    def _refused(path: Path, why: str) -> ConfigError:
        return ConfigError(
            f"recovery.state_dir: refused {path}: {why}",
            hint="the agent writes its recovery state itself (mode 0600, its own uid, in a folder only it may "
            "write); if you did not put this there, investigate, then move it aside",
        )

    def _open_folder(self, folder: Path) -> int:
        """The state folder as an fd, checked (``FileNotFoundError`` when it does not exist)."""
        try:
            return open_own_folder(folder)
        except NotOursError as exc:
            st = exc.st
            if st is None:
                raise self._refused(folder, "not a folder (a symbolic link?)") from None
            if exc.problem == "owner":
                why = f"the folder is owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()} or root"
            else:
                why = f"the folder's mode {stat.S_IMODE(st.st_mode):04o} lets group or others write in it"
            raise self._refused(folder, why) from None

    def _read_sync(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"version": STATE_VERSION, "submissions": {}}
        try:
            folder = self._open_folder(self.path.parent)
        except FileNotFoundError:
            return empty
        except OSError as exc:
            raise ConfigError(f"recovery.state_dir: cannot read {self.path}: {exc.strerror}") from None
        try:
            raw = self._read_file(folder, self.path)
        except OSError as exc:
            raise ConfigError(f"recovery.state_dir: cannot read {self.path}: {exc.strerror}") from None
        if raw is None:
            return empty
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise ConfigError(f"recovery.state_dir: {self.path} is not JSON; move it aside") from None
        if not isinstance(data, dict) or not isinstance(data.get("submissions"), dict):
            raise ConfigError(f"recovery.state_dir: {self.path} is not a recovery state file; move it aside")
        return data

    def _read_file(self, folder: int, path: Path) -> bytes | None:
        """The file's content, checked on the opened file (None when there is none); closes ``folder``."""
        try:
            fd = open_in_folder(folder, path, os.O_RDONLY | os.O_NONBLOCK)  # NONBLOCK: a planted FIFO cannot hang us
        except FileNotFoundError:
            return None
        except NotOursError:
            raise self._refused(path, "it is a symbolic link") from None
        finally:
            os.close(folder)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refused(path, "not a regular file")
            if st.st_uid != os.geteuid():
                raise self._refused(path, f"owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()}")
            if stat.S_IMODE(st.st_mode) & ~0o600:
                raise self._refused(path, f"mode {stat.S_IMODE(st.st_mode):04o} is wider than 0600")
            chunks = []
            size = 0
            while chunk := os.read(fd, 65536):
                size += len(chunk)
                if size > MAX_STATE_BYTES:
                    raise self._refused(path, f"larger than {MAX_STATE_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _write_sync(self, data: Mapping[str, Any]) -> None:
        encoded = json.dumps(data, sort_keys=True, indent=1).encode() + b"\n"
        make_private_folder(self.path.parent)
        folder = self._open_folder(self.path.parent)
        try:
            replace_file(folder, self.path.name, encoded)
        finally:
            os.close(folder)

    async def load(self) -> dict[str, Any]:
        async with self._lock:
            if self._data is None:
                self._data = await asyncio.to_thread(self._read_sync)
            copy: dict[str, Any] = json.loads(json.dumps(self._data))
            return copy

    async def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        async with self._lock:
            data = self._data if self._data is not None else await asyncio.to_thread(self._read_sync)
            data = json.loads(json.dumps(data))
            change(data)
            try:
                await asyncio.to_thread(self._write_sync, data)
            except OSError as exc:
                raise ConfigError(f"recovery.state_dir: cannot write {self.path}: {exc.strerror}") from None
            self._data = data
