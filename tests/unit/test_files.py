"""Files of the agent's own (``signing_agent.files``): what is refused, and an atomic replace that leaves nothing
behind.

How the audit log and the recovery state word these refusals is tested with them (test_audit.py,
test_recovery_config.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from signing_agent.files import NotOursError, open_in_folder, open_own_folder, replace_file
from tests.support.prereq import missing


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "own"
    path.mkdir(mode=0o700)
    fd = open_own_folder(path)
    yield path, fd
    os.close(fd)


def test_a_symlink_a_file_or_a_writable_folder_is_not_ours(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    for path, problem in ((tmp_path / "link", "link"), (tmp_path / "file", "link"), (shared, "writable")):
        with pytest.raises(NotOursError) as caught:
            open_own_folder(path)
        assert (caught.value.path, caught.value.problem) == (path, problem)
        assert (caught.value.st is None) == (problem == "link")
    with pytest.raises(FileNotFoundError):
        open_own_folder(tmp_path / "missing")


def test_a_folder_of_another_user_is_not_ours(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("chown to another uid needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(NotOursError) as caught:
        open_own_folder(theirs)
    assert caught.value.problem == "owner"
    assert caught.value.st is not None
    assert caught.value.st.st_uid == 65534


def test_files_in_the_folder_open_without_following_a_symlink(folder: tuple[Path, int], tmp_path: Path) -> None:
    path, fd = folder
    (tmp_path / "target").write_text("theirs")
    (path / "linked").symlink_to(tmp_path / "target")
    with pytest.raises(NotOursError) as caught:
        open_in_folder(fd, path / "linked", os.O_RDONLY)
    assert caught.value.problem == "link"
    made = open_in_folder(fd, path / "made", os.O_WRONLY | os.O_CREAT)
    os.close(made)
    assert stat.S_IMODE((path / "made").stat().st_mode) == 0o600


def test_replace_file_puts_the_new_content_in_place_atomically(folder: tuple[Path, int]) -> None:
    path, fd = folder
    (path / "state.json").write_text("old")
    replace_file(fd, "state.json", b"new")
    assert (path / "state.json").read_bytes() == b"new"
    assert stat.S_IMODE((path / "state.json").stat().st_mode) == 0o600
    assert [p.name for p in path.iterdir()] == ["state.json"]


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temporary_one(
    folder: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = folder
    (path / "state.json").write_text("old")

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        replace_file(fd, "state.json", b"new")
    monkeypatch.undo()
    assert (path / "state.json").read_text() == "old"
    assert [p.name for p in path.iterdir()] == ["state.json"]
