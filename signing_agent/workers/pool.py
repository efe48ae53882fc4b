"""The daemon's side of the crypto workers: ``CryptoPool`` sends signing and verification jobs to child processes.

Batching is what makes a process hop pay: every job submitted during one turn of the event loop waits for the end of
that turn (``loop.call_soon``), then each worker gets its share as one frame and answers with one frame. Under load a
frame carries several jobs, so the pipe costs a fraction of a signature; with one client it costs a few tens of
microseconds.

A worker that dies (or answers nonsense) is replaced; the jobs it held are sent once more to another worker, or done
on the event loop's thread when no worker is alive. Signing and verifying are pure, so doing one twice is harmless,
and no signature leaves the agent before the verification and the audit record that the signer awaits. The pool
keeps each file key it was handed, to hand it to a replacement and to sign inline when it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.algorithms import SignatureAlgorithm, verify_digest
from signing_agent.errors import AgentError, BackendError, error_class
from signing_agent.workers import frames
from signing_agent.workers.child import Worker
from signing_agent.workers.hardening import child_command, child_environment
from signing_agent.workers.reaping import reap

_logger = logging.getLogger(__name__)

RESTART_DELAYS = (0.05, 0.5, 2.0, 10.0)
"""Seconds before a dead worker's replacement starts: the first at once, then slower while replacements keep dying."""
DEATHS_FORGOTTEN_AFTER = 60.0
"""Seconds without a death after which the next one is a first one again (its replacement starts at once)."""
STALLED_AFTER = 10.0
"""Seconds a worker may hold jobs without answering any before it is taken for stuck: replaced, its jobs re-sent.
Its jobs take milliseconds; a worker this slow is stopped, or stuck."""


MAX_DEFAULT_WORKERS = 4
"""Workers by default on a machine with more cores: four already sign faster than any consortium governs, and each
costs the process tree about 25 MiB."""


def default_workers() -> int:
    """One worker per core this process may use beyond the one the event loop keeps busy (at most
    ``MAX_DEFAULT_WORKERS``); none (everything on the event loop) on one core. The cores are the CPU affinity, bounded
    by a cgroup CPU quota (a container's CPU limit).

    Not one per core: the event loop is a busy process too (HTTP, policy, audit: about a third of each signature's
    CPU), and the one stage every request passes through. A worker per core preempts it whenever a job comes back, and
    on two cores one worker signs 7% faster than two, with a lower p99 (``make bench``; README, "Benchmarks")."""
    cores = min(len(os.sched_getaffinity(0)), cgroup_cpu_limit() or 1024)
    return min(cores - 1, MAX_DEFAULT_WORKERS)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs the cgroup quota allows (rounded down, at least 1), or None without a quota: ``cpu.max`` (cgroup
    v2, ``"50000 100000"`` or ``"max 100000"``) or ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (v1)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, int(quota) // int(period))


@dataclass(eq=False)
class _Job:
    op: str
    args: tuple[object, ...]
    future: asyncio.Future[object] | None
    """None for the jobs that register and drop keys: nobody awaits them."""
    tries: int = 0


@dataclass(eq=False)
class _Worker:
    number: int
    proc: asyncio.subprocess.Process
    queued: list[tuple[int, _Job]] = field(default_factory=list)
    """Jobs submitted in this turn of the loop, sent together by the pool's flush."""
    sent: dict[int, _Job] = field(default_factory=dict)
    """Jobs sent and not yet answered, by job id."""
    reader: asyncio.Task[None] | None = None
    alive: bool = True
    waiting_since: float | None = None
    """Since when (loop time) the worker has held jobs without answering any, or None when it holds none."""

    @property
    def load(self) -> int:
        return len(self.queued) + len(self.sent)


class CryptoPool:
    """Crypto worker processes for ECDSA signing with file keys and for verifying every signature.

    ``size`` workers run ``python -P -m signing_agent.workers.child`` (``hardening.child_command``). ``start`` spawns
    them without waiting for them to import anything (jobs queue in the pipe), so the daemon is ready as early as
    before. ``aclose`` closes their pipes, which ends them, and waits for them.
    """

    def __init__(
        self, size: int, *, command: tuple[str, ...] | None = None, stalled_after: float = STALLED_AFTER
    ) -> None:
        if size < 1:
            raise ValueError("a crypto pool needs at least one worker")
        self.size = size
        self.stalled_after = stalled_after
        self._watchdog: asyncio.Task[None] | None = None
        self._command = command or child_command("signing_agent.workers.child")
        self._workers: dict[int, _Worker] = {}
        self._here = Worker()
        """The jobs done on the event loop's thread while no worker is alive (the workers' own code), and the keys
        each replacement worker is handed."""
        self._handles = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._flush_scheduled = False
        self._closing = False
        self._deaths = 0
        self._last_death = float("-inf")
        self._restarts: set[asyncio.Task[None]] = set()
        self.on_restart: Callable[[int], None] | None = None
        """Called with the worker's number each time a dead worker is replaced (metrics)."""

    @property
    def alive(self) -> int:
        return len(self._live())

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(w.proc.pid for w in self._live())

    async def start(self) -> None:
        for number in range(self.size):
            await self._spawn(number)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), context=contextvars.Context())

    async def _watch(self) -> None:
        """Take a worker that holds jobs and answers none for ``stalled_after`` seconds for stuck, as if it died."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(min(1.0, self.stalled_after / 2))
            for worker in self._live():
                if worker.waiting_since is not None and loop.time() - worker.waiting_since > self.stalled_after:
                    _logger.warning("crypto worker %d (pid %d) answered nothing for %g s; starting another",
                                    worker.number, worker.proc.pid, self.stalled_after)  # fmt: skip
                    self._died(worker)

    async def aclose(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._restarts):
            task.cancel()
        workers = list(self._workers.values())
        for worker in workers:
            worker.alive = False
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        for worker in workers:
            await reap(worker.proc)
            if worker.reader is not None:
                worker.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.reader
            self._fail_sent(worker)
        self._workers.clear()
        self._here.keys.clear()

    # -- keys ------------------------------------------------------------------------------------------------------

    def add_key(self, key: ec.EllipticCurvePrivateKey) -> int:
        """Hand a file key to every worker; returns its handle for ``sign``."""
        handle = next(self._handles)
        self._here.hold(handle, key)
        for worker in self._live():
            self._queue(worker, _Job("key", (handle, _pkcs8(key)), None))
        return handle

    def drop_key(self, handle: int) -> None:
        if self._here.keys.pop(handle, None) is not None:
            for worker in self._live():
                self._queue(worker, _Job("drop", (handle,), None))

    # -- jobs ------------------------------------------------------------------------------------------------------

    async def sign(self, handle: int, alg: SignatureAlgorithm, digest: bytes) -> bytes:
        """The raw ``r||s`` signature of ``digest`` with the file key ``handle``, verified against the key's public
        key in the same job (``SigningFailedError`` when it does not verify)."""
        if handle not in self._here.keys:
            raise BackendError("the file key was closed")
        result = await self._submit("sign", (handle, alg.name, digest))
        if not isinstance(result, bytes) or len(result) != alg.signature_size:
            raise BackendError("a crypto worker answered a signing job with something else than a signature")
        return result

    async def verify(
        self, public_key: ec.EllipticCurvePublicKey, alg: SignatureAlgorithm, digest: bytes, signature: bytes
    ) -> None:
        """``algorithms.verify_digest`` in a worker: raises ``SigningFailedError`` when the signature does not
        verify against ``public_key``."""
        if public_key.curve.name != alg.curve_name or len(signature) != alg.signature_size:
            verify_digest(public_key, alg, digest, signature)  # raises the inline error, with its message
        spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if await self._submit("verify", (spki, alg.name, digest, signature)) is not True:
            raise BackendError("a crypto worker answered a verification job with something else than True")

    async def _submit(self, op: str, args: tuple[object, ...]) -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._dispatch(_Job(op, args, future))
        return await future

    def _dispatch(self, job: _Job) -> None:
        """Queue ``job`` on the least loaded live worker, or do it here when none is alive."""
        job.tries += 1
        live = self._live()
        if not live:
            self._inline(job)
            return
        self._queue(min(live, key=lambda w: w.load), job)

    def _inline(self, job: _Job) -> None:
        """The job on the event loop's thread, as the agent did before it had workers, by the workers' own code."""
        if job.future is None:  # a key's registration: the pool holds the key already
            return
        _, ok, value = self._here.run((0, job.op, *job.args))
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(_error(value))

    def _queue(self, worker: _Worker, job: _Job) -> None:
        worker.queued.append((next(self._job_ids), job))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send each worker the jobs this turn of the loop queued for it, as one frame."""
        self._flush_scheduled = False
        for worker in self._live():
            if not worker.queued:
                continue
            batch, worker.queued = worker.queued, []
            try:
                _pipe(worker.proc.stdin).write(frames.encode([(job_id, job.op, *job.args) for job_id, job in batch]))
            except (OSError, RuntimeError, ValueError) as exc:  # a closed pipe: the reader sees the death too
                _logger.warning("crypto worker %d: cannot send jobs: %s", worker.number, exc)
                worker.queued = batch + worker.queued
                self._died(worker)
                continue
            worker.sent.update(batch)
            if worker.waiting_since is None:
                worker.waiting_since = asyncio.get_running_loop().time()

    async def _read(self, worker: _Worker) -> None:
        """Answer the futures of ``worker``'s jobs as its frames come, until it dies."""
        stdout = _pipe(worker.proc.stdout)
        try:
            while True:
                body = await stdout.readexactly(frames.body_length(await stdout.readexactly(frames.HEADER)))
                for item in frames.decode(body):
                    self._answer(worker, item)
                worker.waiting_since = asyncio.get_running_loop().time() if worker.sent else None
        except (asyncio.IncompleteReadError, ValueError, OSError) as exc:
            if worker.alive and not self._closing:
                reason = "exited" if isinstance(exc, asyncio.IncompleteReadError) else f"broke ({exc})"
                _logger.warning("crypto worker %d (pid %d) %s; starting another", worker.number, worker.proc.pid,
                                reason)  # fmt: skip
                self._died(worker)

    def _answer(self, worker: _Worker, item: tuple[object, ...]) -> None:
        if len(item) != 3:
            raise ValueError("a reply that is not [id, ok, value]")
        job_id, ok, value = item
        job = worker.sent.pop(job_id, None) if isinstance(job_id, int) else None
        if job is None:
            raise ValueError(f"a reply to no job ({job_id!r})")
        if job.future is None:
            if not ok:
                _logger.warning("crypto worker %d: %s job failed: %s", worker.number, job.op, value)
            return
        if job.future.done():
            return
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(_error(value))

    def _died(self, worker: _Worker) -> None:
        """Take ``worker`` out, send its jobs elsewhere (once more each), and start its replacement."""
        if not worker.alive:
            return
        worker.alive = False
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        pending = [job for _, job in worker.queued] + list(worker.sent.values())
        worker.queued, worker.sent = [], {}
        for job in pending:
            if job.future is None or job.future.done():
                continue
            if job.tries >= 2:
                job.future.set_exception(BackendError(f"a {job.op} job ended two crypto workers"))
            else:
                self._dispatch(job)
        now = asyncio.get_running_loop().time()
        self._deaths = 1 if now - self._last_death > DEATHS_FORGOTTEN_AFTER else self._deaths + 1
        self._last_death = now
        delay = RESTART_DELAYS[min(self._deaths, len(RESTART_DELAYS)) - 1]
        task = asyncio.get_running_loop().create_task(self._replace(worker.number, delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _replace(self, number: int, delay: float) -> None:
        old = self._workers.get(number)
        if old is not None:
            with contextlib.suppress(ProcessLookupError):
                await old.proc.wait()
        await asyncio.sleep(delay)
        if self._closing:
            return
        try:
            await self._spawn(number)
        except OSError as exc:
            _logger.warning("crypto worker %d: cannot start another: %s", number, exc)
            return
        if self.on_restart is not None:
            self.on_restart(number)

    async def _spawn(self, number: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, close_fds=True,
            env=child_environment(),
        )  # fmt: skip
        worker = _Worker(number, proc)
        self._workers[number] = worker
        for handle, (key, _) in self._here.keys.items():
            self._queue(worker, _Job("key", (handle, _pkcs8(key)), None))
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker))

    def _fail_sent(self, worker: _Worker) -> None:
        for _, job in worker.queued:
            if job.future is not None and not job.future.done():
                job.future.set_exception(BackendError("the crypto workers were closed"))
        for job in worker.sent.values():
            if job.future is not None and not job.future.done():
                job.future.set_exception(BackendError("the crypto workers were closed"))
        worker.queued, worker.sent = [], {}

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers.values() if w.alive]


_P = TypeVar("_P")


def _pipe(pipe: _P | None) -> _P:
    if pipe is None:
        raise OSError("a crypto worker without its pipes")
    return pipe


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _error(value: object) -> AgentError:
    """The agent error a worker reported as ``[code, message, hint]``: a key store's (``BackendError`` and its
    subclasses). A worker's job cannot fail with any other (a policy denial, a throttle, whose class may not even be
    built from a message alone), so any other code is a plain ``BackendError``."""
    if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, str | None) for v in value):
        code, message, hint = value
        cls = error_class(str(code))
        if cls is None or not issubclass(cls, BackendError):
            cls = BackendError
        return cls(str(message), hint=hint if isinstance(hint, str) else None)
    return BackendError("a crypto worker reported an error the agent cannot read")
