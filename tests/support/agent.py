"""Run the agent for tests: in-process on a real Unix socket, or as a real daemon subprocess."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from signing_agent.api.app import make_app
from signing_agent.config import AgentConfig, parse_config
from signing_agent.daemon import (
    api_settings,
    bind_unix_socket,
    crypto_workers_of,
    open_audit,
    open_generation,
    open_resources,
)
from signing_agent.metrics import METRICS
from tests.support import procs


def short_dir(prefix: str = "sa-") -> Path:
    """A private (0700) folder with a short path: Unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def private_dir(prefix: str = "sa-") -> Iterator[Path]:
    """A ``short_dir``, removed afterwards."""
    path = short_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_toml(path: Path, tables: Mapping[str, Any]) -> Path:
    """Write ``{"agent": {...}, "identities.m0": {...}, ...}`` as TOML; a list of dicts is an array of tables."""
    lines: list[str] = []
    for table, values in tables.items():
        entries = values if isinstance(values, list) else [values]
        for entry in entries:
            lines.append(f"[[{table}]]" if isinstance(values, list) else f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in entry.items())
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def file_identity(name: str, cert: Path, key: Path) -> dict[str, dict[str, Any]]:
    return {
        f"identities.{name}": {"certificate": cert},
        f"identities.{name}.signing_key": {"backend": "file", "path": key},
    }


@contextlib.asynccontextmanager
async def running_agent(config: AgentConfig) -> AsyncIterator[Path]:
    """The real API app on a real Unix socket, in this process, wired as the daemon wires it (``open_audit``,
    ``open_resources``, ``open_generation``): the configured policy, audit log and services (their clients open as
    in the daemon). Yields the socket path."""
    async with contextlib.AsyncExitStack() as stack:
        audit = await stack.enter_async_context(open_audit(config))
        resources = await stack.enter_async_context(
            open_resources(config, audit, metrics=METRICS, crypto_workers=crypto_workers_of(config))
        )
        gen = await stack.enter_async_context(open_generation(config, resources))
        app = make_app(resources.runtime(gen), api_settings(config))
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=config.agent.header_timeout
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        sock = bind_unix_socket(config.agent.socket, config.agent.socket_mode, config.agent.socket_group)
        stack.callback(_unlink, config.agent.socket)
        await web.SockSite(runner, sock).start()
        yield config.agent.socket


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def agent_config(folder: Path, tables: Mapping[str, Any]) -> AgentConfig:
    import tomllib

    path = write_toml(folder / "agent.toml", tables)
    return parse_config(tomllib.loads(path.read_text()), path=path)


class DaemonProcess:
    """``python -m signing_agent serve`` as a subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], socket: Path, stderr_path: Path) -> None:
        self.proc = proc
        self.socket = socket
        self.stderr_path = stderr_path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        return procs.stop(self.proc, timeout)


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNING_AGENT_")}
    env.update(extra or {})
    return env


@contextlib.contextmanager
def daemon(
    config_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    args: Sequence[str] = (),
    open_files: tuple[int, int] | None = None,
    wrapper: Sequence[str] = (),
    cwd: Path | None = None,
) -> Iterator[DaemonProcess]:
    """Start the daemon and wait until it listens (its --ready-file appears), or fail with its stderr.

    ``open_files``: the daemon's RLIMIT_NOFILE (soft, hard), e.g. the usual 1,024. ``wrapper`` prefixes the command
    (e.g. ``unshare --user ...`` for p11-kit's user configuration as root). ``cwd``: the folder it is started in
    (default: the test's).
    """

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    ready = config_path.parent / f"ready-{time.monotonic_ns()}"
    stderr_path = config_path.parent / f"daemon-{time.monotonic_ns()}.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "signing_agent",
                "serve",
                "--config",
                str(config_path),
                "--ready-file",
                str(ready),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=cli_env(env),
            preexec_fn=limit_open_files if open_files is not None else None,
            cwd=cwd,
        )
    deadline = time.monotonic() + timeout
    while not (ready.exists() and ready.read_text()):  # written, not only created (write_text is not atomic)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the daemon did not start (rc={proc.returncode}):\n{stderr_path.read_text()}")
        time.sleep(0.02)
    handle = DaemonProcess(proc, Path(ready.read_text()), stderr_path)
    try:
        yield handle
    finally:
        handle.stop()
