"""Shared helpers for the benchmarks: a private SoftHSM2 token, the daemon and sandbox as subprocesses, load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "1234"


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sa-bench-", dir="/tmp"))


def softhsm_token(folder: Path, label: str = "bench") -> dict[str, str]:
    """A SoftHSM2 token in ``folder``; returns the environment for processes that use it."""
    tokens = folder / "tokens"
    tokens.mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "5678", "--pin", PIN],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    (folder / "token.pin").write_text(PIN)
    (folder / "token.pin").chmod(0o600)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return env


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    start_seconds: float

    def tree(self) -> list[int]:
        """The daemon and its child processes (crypto workers, the fsync helper)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]

    def tree_rss_mib(self) -> float:
        """The resident size of the whole process tree now: the sum over its processes, so pages they share (the
        interpreter, libraries) count once per process: an upper bound of what the tree costs."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the whole process tree so far."""
        total = 0.0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


@contextlib.contextmanager
def daemon(config: Path, env: dict[str, str]) -> Iterator[Daemon]:
    ready = config.parent / "ready"
    ready.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "signing_agent", "serve", "--config", str(config), "--ready-file", str(ready),
         "--log-level", "warning"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(config.parent / "agent.log").open("wb"),
    )  # fmt: skip
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit((config.parent / "agent.log").read_text())
        time.sleep(0.005)
    handle = Daemon(proc, Path(ready.read_text()), time.monotonic() - started)
    try:
        yield handle
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


class PeakRSS:
    """Samples a daemon's process-tree RSS every 50 ms on a thread while a load runs; ``peak`` is the largest."""

    def __init__(self, agent: Daemon) -> None:
        self.agent = agent
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.agent.tree_rss_mib())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.agent.tree_rss_mib())


@dataclass
class LoadResult:
    count: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


def http_request(method: str, path: str, body: bytes) -> bytes:
    """One HTTP/1.1 keep-alive request, as bytes a load client sends again and again."""
    head = f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def raw_load(socket_path: Path, request: bytes, *, clients: int, seconds: float) -> LoadResult:
    """``clients`` keep-alive connections sending ``request`` until ``seconds`` have passed, each waiting for its
    answer before the next (a closed loop).

    A lean client (asyncio streams, the request's bytes built once, only the status line and Content-Length read)
    rather than aiohttp's: it runs on the same two cores as the agent, and aiohttp's client costs about as much per
    request as the agent's own HTTP handling, which would measure the load generator as much as the agent.
    """
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if head[9:12] != b"200":
                    errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return LoadResult(len(latencies), errors, time.monotonic() - started, latencies)
