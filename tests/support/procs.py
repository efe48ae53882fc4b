"""Child processes of the tests (the daemon, the sandbox, the Key Vault double), and the processes they start."""

from __future__ import annotations

import array
import fcntl
import os
import subprocess
import termios
from pathlib import Path


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def children(pid: int) -> dict[int, list[str]]:
    """The live (not zombie) child processes of ``pid`` with their command lines, read from ``/proc/*/stat`` (not
    every kernel has ``/proc/<pid>/task/<tid>/children``)."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # it exited while we looked
            continue
        # The command name, in parentheses, may hold anything: the fields after the last ")" are state, ppid, ...
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = [arg.decode(errors="replace") for arg in cmdline.split(b"\0")[:-1]]
    return found


def running_modules(pid: int, package: str) -> dict[int, str]:
    """The children of ``pid`` that run ``python -m <a module of package>``, with the module each runs."""
    found = {}
    for child, argv in children(pid).items():
        options = argv[1 : argv.index("-m")] if "-m" in argv[:-1] else None  # e.g. ``python -P -m module``
        module = argv[len(options) + 2] if options is not None else ""
        if options is not None and all(o.startswith("-") for o in options) and module.startswith(f"{package}."):
            found[child] = module
    return found


def private_proc_files(pid: int) -> None:
    """Fail (or skip locally) unless this process may read ``pid``'s private files in /proc (``environ``, ``fd/``):
    the agent's processes make themselves non-dumpable, and then only a process with CAP_SYS_PTRACE (root) may."""
    try:
        Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # it has exited: nothing to read
        return
    except PermissionError:
        from tests.support.prereq import missing

        missing(f"reading /proc/{pid}/environ of the agent's non-dumpable processes needs root")


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores (``SigIgn`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def core_limit(pid: int) -> tuple[str, str]:
    """``pid``'s core file size limit (soft, hard), as ``/proc/<pid>/limits`` shows it (``"0"``, ``"unlimited"``)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError(f"no core file size in /proc/{pid}/limits")


def unread_stdin(pid: int) -> int:
    """Bytes waiting in the pipe that is ``pid``'s stdin (sent to it, not yet read)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        pending = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, pending)
        return pending[0]
    finally:
        os.close(fd)


def gone(pid: int) -> bool:
    """``pid`` has exited and been reaped (or is a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"
