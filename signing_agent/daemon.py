"""The composition root and lifecycle: open identities, bind the socket safely, serve, reload on SIGHUP, drain on
SIGTERM, and tell systemd (sd_notify: READY, RELOADING, STOPPING, WATCHDOG) when it is listening.

The socket is created under umask 0177, so it is never wider than 0600 even for an instant, in a folder that is the
agent's own (owned by its uid or root, writable by the owner only, not a symlink: ``preflight``'s rules, which
``check-config`` applies too); a stale socket left by a crash is replaced, a live agent's socket is never stolen.
Connections are capped per peer uid and in total (``api/connections.py``).

The wiring, once, for the daemon, its reloads, ``check-config`` and the tests: ``open_audit`` (the locked log),
``open_resources`` (what the process keeps across reloads: key stores, auditor, denial budget, rate-limit buckets) and
``open_generation`` (what one configuration serves with), each an async context manager whose parts register their
close as they open (``contextlib.AsyncExitStack``), so nothing is closed by hand on a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from signing_agent.api.app import IN_FLIGHT, APISettings, make_app
from signing_agent.api.connections import (
    AcceptFailureLog,
    ConnectionLimiter,
    ConnectionLimits,
    GatedSockSite,
    ensure_fd_limit,
)
from signing_agent.api.runtime import Generation, ReloadResult, Runtime
from signing_agent.audit import Auditor, AuditSink, FileAuditSink, Started
from signing_agent.backends.keystores import KeyStores, take_configured_secrets
from signing_agent.config import AgentConfig, FileKeyConfig, load_config
from signing_agent.denials import DenialThrottle
from signing_agent.errors import AgentError, ConfigError
from signing_agent.files import make_private_folder
from signing_agent.governance import Governance
from signing_agent.health import HealthChecker
from signing_agent.identity import Identity, open_identity
from signing_agent.log import set_level
from signing_agent.metrics import METRICS, Metrics
from signing_agent.policy import Policy, RateLimiter
from signing_agent.preflight import check_services, check_socket_folder, check_socket_path, socket_gid, socket_state
from signing_agent.recovery import RecoveryMember
from signing_agent.signer import Signer
from signing_agent.systemd import Notifier, inherited_socket
from signing_agent.workers.pool import CryptoPool, default_workers
from signing_agent.workers.syncer import Syncer

_logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


def _remove_stale(path: Path) -> None:
    """Remove a socket nobody listens on (left by a crash); never a live agent's, a symlink or another file."""
    match socket_state(path):
        case "live":
            raise ConfigError(f"agent.socket: another agent is already listening on {path}")
        case "stale":
            _logger.info("replacing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        case "absent":
            pass


def bind_unix_socket(path: Path, mode: int = 0o600, group: str | None = None) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``, never wider in between, in a folder that is the agent's own
    (``preflight.check_socket_folder``)."""
    check_socket_path(path)
    folder = path.parent
    if not os.path.lexists(folder):
        make_private_folder(folder)
    warning = check_socket_folder(folder, group_access=group is not None)
    if warning is not None:
        _logger.warning("%s", warning)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"agent.socket: cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        if group is not None:
            os.chown(path, -1, socket_gid(group))
        if mode != 0o600:
            os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return sock


async def open_identities(
    config: AgentConfig, stores: KeyStores, opened: contextlib.AsyncExitStack, *, allow_degraded: bool = False
) -> tuple[dict[str, Identity], dict[str, AgentError]]:
    """Open and self-test every identity, each closed by ``opened``: the ones that passed, and (``allow_degraded``)
    why each of the others failed. Without ``allow_degraded`` the first failure is raised (``opened`` then closes
    the ones already open when it unwinds). An encryption key that fails its round trip does not fail its identity
    (which still signs): it is logged as an error, with its hint, and carried as ``Identity.encryption_error``."""
    take_configured_secrets(config)  # all of them, before the first identity can spawn a credential process
    if not config.identities:  # a slip (a file cut short, a table renamed) more often than a wish
        _logger.warning("the configuration (%s) has no identities: the agent signs nothing", config.path or "built in")
    expiry_warning = datetime.timedelta(days=config.agent.certificate_expiry_warning_days)
    identities: dict[str, Identity] = {}
    failed: dict[str, AgentError] = {}
    for name, cfg in config.identities.items():
        if isinstance(cfg.signing_key, FileKeyConfig):
            _logger.warning(
                "identity %s uses a private key file (%s): development only; use pkcs11 or azure-keyvault",
                name,
                cfg.signing_key.path,
            )
        try:
            ident = await open_identity(cfg, stores, expiry_warning=expiry_warning)
        except AgentError as exc:
            if not allow_degraded:
                raise
            _logger.error(  # noqa: TRY400 -- the message says it all; a traceback would only add noise
                "identity %s failed its self-test; serving without it (degraded): %s", name, exc.diagnostics()
            )
            failed[name] = exc
            continue
        opened.push_async_callback(ident.aclose)
        identities[name] = ident
        for warning in (*ident.warnings, ident.certificate_warning()):
            if warning is not None:
                _logger.warning("identity %s: %s", name, warning)
        if ident.encryption_error is not None:
            _logger.error(
                "identity %s: %s; it signs, but its recovery shares will fail",
                name,
                ident.encryption_error.diagnostics(),
            )
        _logger.info(
            "identity %s: member %s, %s, %s key %s",
            name,
            ident.member_id,
            ident.alg.name,
            ident.backend,
            ident.location,
        )
    return identities, failed


def make_policy(config: AgentConfig, limiter: RateLimiter) -> Policy:
    """The configured rules, then (unless disabled) the default rule: root, our uid, agent.allowed_uids/gids.

    ``limiter``: the process's rate-limit buckets, which every generation charges (a reload refills nobody's).
    """
    return Policy.from_config(
        config.policy,
        daemon_uid=os.getuid(),
        allowed_uids=config.agent.allowed_uids,
        allowed_gids=config.agent.allowed_gids,
        limiter=limiter,
    )


@contextlib.asynccontextmanager
async def open_audit(config: AgentConfig) -> AsyncIterator[FileAuditSink]:
    """Lock the audit log (``.<name>.lock`` beside it: a second agent on the same log stops here, having written
    nothing), open it and write a ``started`` record, so an unwritable log stops the agent at start-up. ``serve``
    enters this before it opens a key store or binds the socket; the lock is held until the agent exits."""
    async with contextlib.AsyncExitStack() as opened:
        syncer = None
        if crypto_workers_of(config) > 0:  # a machine with cores to spare: the group commit fsyncs in a helper
            syncer = await Syncer.start()
            opened.push_async_callback(syncer.aclose)
        sink = await FileAuditSink.open(
            config.audit.path, max_bytes=config.audit.max_bytes, keep_rotated=config.audit.keep_rotated, fsyncer=syncer
        )
        opened.push_async_callback(sink.aclose)
        await sink.record(Started(pid=os.getpid(), config=str(config.path) if config.path else None))
        yield sink


def api_settings(config: AgentConfig) -> APISettings:
    return APISettings(
        max_request_bytes=config.agent.max_request_bytes,
        request_timeout=config.agent.request_timeout,
        body_timeout=config.agent.body_timeout,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentResources:
    """What one process keeps across its configuration generations: the key stores (logins and sessions), the
    auditor around its one audit sink, the peers' denial budget and the policy's rate-limit buckets (a reload must
    refill neither), and the metrics."""

    stores: KeyStores
    auditor: Auditor
    denials: DenialThrottle
    limiter: RateLimiter
    metrics: Metrics
    crypto: CryptoPool | None = None
    """The crypto workers (``agent.crypto_workers``), or None: sign and verify on the event loop's thread."""

    def runtime(self, first: Generation) -> Runtime:
        """What the API serves with, starting with ``first``."""
        return Runtime(first, denials=self.denials, auditor=self.auditor, metrics=self.metrics)


@contextlib.asynccontextmanager
async def open_resources(
    config: AgentConfig, sink: AuditSink, *, metrics: Metrics, crypto_workers: int = 0
) -> AsyncIterator[AgentResources]:
    """The process's resources around ``sink`` (the locked audit log; for ``check-config``, a dry run), with
    ``crypto_workers`` crypto worker processes (``crypto_workers_of(config)`` for a daemon; none for a dry run); the
    key stores and the workers are closed on exit. ``[audit]``, ``[keyvault]``, the workers and the denial budget
    are fixed for the process."""
    async with contextlib.AsyncExitStack() as opened:
        crypto = None
        if crypto_workers > 0:
            crypto = CryptoPool(crypto_workers)
            crypto.on_restart = lambda _number: metrics.crypto_worker_restarts.inc()
            opened.push_async_callback(crypto.aclose)
            await crypto.start()
        stores = KeyStores(
            keyvault=config.keyvault,
            on_sign=metrics.observe_sign,
            on_throttle_wait=metrics.observe_throttle_wait,
            crypto=crypto,
        )
        opened.push_async_callback(stores.aclose)
        yield AgentResources(
            stores=stores,
            auditor=Auditor(sink, metrics=metrics),
            denials=DenialThrottle(config.agent.denial_rate_limit, config.agent.denial_rate_window),
            limiter=RateLimiter(),
            metrics=metrics,
            crypto=crypto,
        )


def crypto_workers_of(config: AgentConfig) -> int:
    """How many crypto workers the daemon runs: ``agent.crypto_workers``, or one per core beyond the loop's
    (``default_workers``)."""
    return config.agent.crypto_workers if config.agent.crypto_workers is not None else default_workers()


@contextlib.asynccontextmanager
async def open_generation(
    config: AgentConfig, resources: AgentResources, *, number: int = 1, allow_degraded: bool = False
) -> AsyncIterator[Generation]:
    """Everything one configuration serves with: identities (self-tested), policy, CCF clients (those pinned to a
    certificate file open now, so a bad path fails here), the recovery trust restored from the state files, health
    checks. The one wiring of the daemon, its reloads, ``check-config`` and the tests.

    Each part registers its close as it opens, and on exit (or a failure half-way) they close in reverse: the
    recovery watchers stop, the CCF clients close, then the identities' keys. The watchers are not started here:
    the caller starts them once the generation serves.
    """
    async with contextlib.AsyncExitStack() as opened:
        identities, failed = await open_identities(config, resources.stores, opened, allow_degraded=allow_degraded)
        service = Signer(
            identities,
            policy=make_policy(config, resources.limiter),
            auditor=resources.auditor,
            denials=resources.denials,
            max_created_at_skew=config.agent.max_created_at_skew,
            crypto=resources.crypto,
        )
        governance = Governance(service, config.services, auditor=resources.auditor)
        opened.push_async_callback(governance.aclose)
        recovery = RecoveryMember(
            service, governance, config.recovery, auditor=resources.auditor, metrics=resources.metrics
        )
        opened.push_async_callback(recovery.stop_watchers)
        await recovery.open()  # identities adopted after earlier recoveries are pinned before the clients open
        await governance.open_pinned()
        health = HealthChecker(
            service,
            governance,
            stores=resources.stores,
            unavailable={name: exc.message for name, exc in failed.items()},
            metrics=resources.metrics,
        )
        for name in identities:
            resources.metrics.identity_up.labels(name).set(1.0)
        for name in failed:
            resources.metrics.identity_up.labels(name).set(0.0)
        resources.metrics.set_certificate_expiries(
            {name: i.validity.not_after.timestamp() for name, i in identities.items() if i.validity is not None}
        )
        yield Generation(number, service, governance, health, recovery, failed=failed)


class Generations:
    """The open configuration generations of one process, each on its own exit stack: the first one, each reload's,
    closed when retired, and whatever is left when the process ends (``aclose``)."""

    def __init__(self, resources: AgentResources, *, allow_degraded: bool) -> None:
        self.resources = resources
        self._allow_degraded = allow_degraded
        self._open: dict[Generation, contextlib.AsyncExitStack] = {}

    async def open(self, config: AgentConfig, *, number: int) -> Generation:
        """``open_generation``, kept open until ``close``; a failure leaves nothing open."""
        stack = contextlib.AsyncExitStack()
        gen = await stack.enter_async_context(
            open_generation(config, self.resources, number=number, allow_degraded=self._allow_degraded)
        )
        self._open[gen] = stack
        return gen

    async def close(self, gen: Generation) -> None:
        stack = self._open.pop(gen, None)
        if stack is not None:
            await stack.aclose()

    async def aclose(self) -> None:
        for gen in reversed(list(self._open)):
            await self.close(gen)


# Settings the running listener and HTTP server were built with; a reload keeps them and says so.
_FIXED_AGENT_SETTINGS = ("socket", "socket_mode", "socket_group", "max_request_bytes", "request_timeout",
                         "header_timeout", "body_timeout", "max_connections", "max_connections_per_uid",
                         "denial_rate_limit", "denial_rate_window", "crypto_workers")  # fmt: skip


def _fixed_changes(old: AgentConfig, new: AgentConfig) -> list[str]:
    changed = [
        f"agent.{name}"
        for name in _FIXED_AGENT_SETTINGS
        if getattr(old.agent, name, None) != getattr(new.agent, name, None)
    ]
    changed += [f"[{s}]" for s in ("audit", "keyvault") if getattr(old, s, None) != getattr(new, s, None)]
    return changed


def connection_limiter(config: AgentConfig) -> ConnectionLimiter:
    """The caps on open connections; the open-file limit is raised to fit them (or a warning says why not)."""
    ensure_fd_limit(config.agent.max_connections)
    privileged = frozenset({0, os.geteuid()})
    return ConnectionLimiter(
        ConnectionLimits(config.agent.max_connections, config.agent.max_connections_per_uid, privileged)
    )


def listening_socket(config: AgentConfig) -> tuple[socket.socket, bool]:
    """The socket systemd passed (socket activation), else a freshly bound one. True when we bound it (and own
    its path): an inherited socket's path belongs to the ``.socket`` unit and is never unlinked by us."""
    inherited = inherited_socket()
    if inherited is None:
        return bind_unix_socket(config.agent.socket, config.agent.socket_mode, config.agent.socket_group), True
    name = inherited.getsockname()
    if isinstance(name, str) and name and Path(name) != config.agent.socket:
        _logger.warning(
            "serving the socket-activated %s; agent.socket (%s) is what clients are told by default: keep them equal",
            name,
            config.agent.socket,
        )
    _logger.info("using the socket passed by systemd (%s)", name or "unnamed")
    return inherited, False


class Reloader:
    """SIGHUP (or ``POST /v1/reload``): load and self-test the new configuration while the old one serves, swap, then
    retire the old one.

    A configuration that does not load, or whose identities or services fail to open, is rejected with a log line
    and the running one keeps serving. Reloads never overlap: a SIGHUP during a reload runs one more afterwards.
    Each outcome is kept in ``runtime.last_reload`` (health shows it); ``reload_now`` is what the socket's route
    runs.
    """

    def __init__(
        self,
        runtime: Runtime,
        config: AgentConfig,
        generations: Generations,
        audit: FileAuditSink,
        *,
        notifier: Notifier,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self._generations = generations
        self._stores = generations.resources.stores
        self._audit = audit
        self._metrics = generations.resources.metrics
        self._notifier = notifier
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._retiring: set[asyncio.Task[None]] = set()
        runtime.reload = self.reload_now

    def request(self) -> None:
        """Schedule a reload (the SIGHUP handler)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def reload_now(self) -> ReloadResult:
        """A reload asked for over the socket: run it, or (one is running) run one more after it, as for a SIGHUP
        then; its outcome. The reload goes on if the asker hangs up."""
        self.request()
        task = self._task
        if task is not None:
            await asyncio.shield(task)
        result = self.runtime.last_reload
        if result is None:  # pragma: no cover -- every reload records its outcome
            raise RuntimeError("the reload recorded no outcome")
        return result

    def _outcome(self, reloaded: bool, error: str | None = None) -> None:
        self.runtime.last_reload = ReloadResult(reloaded, self.runtime.current.number, time.time(), error)

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """One reload (and the audit log reopened if it is failing). True when the new configuration now serves."""
        await self._reopen_audit()
        path = self.config.path
        if path is None:
            _logger.error("configuration reload: the agent was started without a config file; nothing to reload")
            self._outcome(False, "the agent was started without a config file: nothing to reload")
            return False
        self._notifier.reloading()
        current = self.runtime.current
        try:
            new_config = await asyncio.to_thread(load_config, path)
            # New sessions and logins for every PKCS#11 token, and refused PINs forgotten: a replaced token or a
            # corrected PIN file takes effect now. The serving generation reconnects on its next operation.
            await self._stores.reset()
            gen = await self._generations.open(new_config, number=current.number + 1)
        except Exception as exc:  # noqa: BLE001 -- a bad new config must never take the serving agent down
            message = exc.diagnostics() if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            _logger.error(  # noqa: TRY400 -- an expected outcome, explained in one line
                "configuration reload rejected; still serving configuration generation %d: %s", current.number, message
            )
            self._metrics.reloads.labels("rejected").inc()
            self._notifier.ready(f"reload rejected; serving generation {current.number}")
            self._outcome(False, message)
            return False
        for setting in _fixed_changes(self.config, new_config):
            _logger.warning(
                "configuration reload: %s changed, which needs a restart; keeping the running value", setting
            )
        if new_config.agent.log_level != self.config.agent.log_level:
            set_level(new_config.agent.log_level)
        old = self.runtime.swap(gen)
        self.config = new_config
        # One set of watchers at a time: the old ones finish their current step before the new ones start.
        await old.recovery.stop_watchers()
        gen.recovery.start_watchers()
        self._metrics.reloads.labels("ok").inc()
        self._outcome(True)
        _logger.info(
            "configuration reloaded from %s: generation %d, %d identities, %d services",
            path,
            gen.number,
            len(gen.signer.identities),
            len(new_config.services),
        )
        self._notifier.ready(f"serving generation {gen.number}")
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _reopen_audit(self) -> None:
        """The 503s told the operator: look at the audit log, then SIGHUP. In any failing state (write errors, a full
        disk, a removed or replaced file, a broken record), reopen it; a reopen that fails is logged and the log
        stays closed to records (fail closed) while the configuration reload goes on."""
        problem = await self._audit.problem()
        if problem is None:
            return
        try:
            await self._audit.reopen()
        except AgentError as exc:
            _logger.error("audit log %s still cannot be written: %s", self._audit.path, exc.diagnostics())  # noqa: TRY400
            return
        after = await self._audit.problem()
        if after is None:
            _logger.warning("audit log %s reopened (it was failing: %s)", self._audit.path, problem)
        else:
            _logger.error("audit log %s reopened, but still failing: %s", self._audit.path, after)

    async def _retire(self, old: Generation) -> None:
        limit = self.config.agent.request_timeout + 1.0
        if not await old.in_flight.drain(limit):
            _logger.warning("generation %d: %d request(s) still running after %.0f s; closing it", old.number,
                            old.in_flight.count, limit)  # fmt: skip
        await self._generations.close(old)
        _logger.info("configuration generation %d closed", old.number)
        # A recovery approval (or adoption) its last requests made is in the state file, not yet in the generation
        # that serves: which restored the state files before those requests wrote them.
        try:
            await self.runtime.current.recovery.catch_up()
        except AgentError as exc:
            _logger.error("recovery trust after generation %d closed: %s", old.number, exc.diagnostics())  # noqa: TRY400

    async def aclose(self) -> None:
        """Wait for a running reload and for old generations to close."""
        if self._task is not None:
            await self._task
        while self._retiring:
            await asyncio.gather(*self._retiring)


async def _log_services(gen: Generation) -> None:
    """At start-up, once listening (a service that is down must not delay signing): the identity each service's
    endpoint presents in a TLS handshake, logged: info when trusted, a warning when unreachable, an error when the
    agent does not trust it (nothing is sent to it then; the agent still serves, because after a disaster recovery
    it must run to vote the new identity in and submit shares: see ``preflight.check_service``). A service pinned
    through ``identity_url`` is left out: its identity is fetched when the agent first talks to it, as before."""
    try:
        checks = await check_services(gen.governance.ccf, fetch_identities=False)
    except Exception:  # a log line at start-up must never take the serving agent down
        _logger.exception("the start-up check of the CCF services failed")
        return
    for check in checks:
        check.log()


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def serve(
    config: AgentConfig,
    *,
    on_ready: Callable[[Path], None] | None = None,
    allow_degraded: bool = False,
    metrics: Metrics | None = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT, then drain in-flight requests and remove the socket.

    Every identity self-tests at start-up (its certificate is valid now, its key matches it and a probe signature
    verifies; an encryption key's round trip is logged, not fatal); one that fails stops the start, unless
    ``allow_degraded`` (then it is left out and health says ``degraded``). Once listening, the identity each CCF
    service presents is logged (``preflight.check_service``), never a reason to stop.
    SIGHUP reloads the configuration (``Reloader``). systemd: sd_notify and socket activation when present.

    Everything opened registers its close on one exit stack, in order: the audit log (and its lock), the key
    stores, the generations, the reloader, the socket and the HTTP runner; so they close in reverse, whether the
    agent stops or fails to start.
    """
    metrics = metrics or METRICS
    notifier = Notifier()
    notifier.status("starting: opening identities")
    async with contextlib.AsyncExitStack() as stack:
        audit = await stack.enter_async_context(open_audit(config))
        resources = await stack.enter_async_context(
            open_resources(config, audit, metrics=metrics, crypto_workers=crypto_workers_of(config))
        )
        generations = Generations(resources, allow_degraded=allow_degraded)
        stack.push_async_callback(generations.aclose)
        first = await generations.open(config, number=1)
        runtime = resources.runtime(first)
        app = make_app(runtime, api_settings(config))
        reloader = Reloader(runtime, config, generations, audit, notifier=notifier)
        stack.push_async_callback(reloader.aclose)
        background: list[asyncio.Task[None]] = []
        stack.push_async_callback(_cancel, background)  # the last to stop: systemd hears from us until the end
        sock, owned = listening_socket(config)
        stack.callback(sock.close)
        sock_path = config.agent.socket
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log=None,
            keepalive_timeout=config.agent.header_timeout,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        loop.set_exception_handler(AcceptFailureLog())
        try:
            await GatedSockSite(runner, sock, connection_limiter(config)).start()
            failed = len(first.health.unavailable)
            state = f"{len(first.signer.identities)} identities" + (f", {failed} failed (degraded)" if failed else "")
            _logger.info("listening on %s (%s)", sock_path, state)
            if notifier.watchdog_interval is not None:
                background.append(loop.create_task(_watchdog(notifier, notifier.watchdog_interval)))
            background.append(loop.create_task(_log_services(first)))
            first.recovery.start_watchers()
            notifier.ready(f"serving: {state}")
            if on_ready is not None:
                on_ready(sock_path)
            await stop.wait()
        finally:
            # Stop accepting, then let in-flight requests finish with their connections still open (aiohttp's own
            # shutdown would drop the rest of a body still being uploaded); the stack then closes everything.
            notifier.stopping()
            loop.remove_signal_handler(signal.SIGHUP)
            await runtime.current.recovery.stop_watchers()
            for listening in list(runner.sites):
                await listening.stop()
            if owned:
                with contextlib.suppress(FileNotFoundError):
                    sock_path.unlink()
            in_flight = app[IN_FLIGHT]
            _logger.info("shutting down: draining %d in-flight request(s)", in_flight.count)
            if not await in_flight.drain(SHUTDOWN_TIMEOUT):
                _logger.warning("%d request(s) still running after %.0f s; closing", in_flight.count, SHUTDOWN_TIMEOUT)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
