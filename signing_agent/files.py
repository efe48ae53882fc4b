"""Small file-system helpers shared by the modules that keep files of their own (the audit log, the recovery state).

Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import os


def fsync_folder(folder_fd: int) -> None:
    """Make the entries of the open folder ``folder_fd`` durable (a new file, a rename, a removal) by fsyncing the
    folder itself. Best effort: the data is already synced, and some file systems refuse to fsync a folder."""
    with contextlib.suppress(OSError):
        os.fsync(folder_fd)
