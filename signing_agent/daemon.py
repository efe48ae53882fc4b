"""The composition root and lifecycle: open identities, bind the socket safely, serve, drain on SIGTERM.

The socket is created under umask 0177, so it is never wider than 0600 even for an instant, in a folder that is not
world-writable; a stale socket left by a crash is replaced, a live agent's socket is never stolen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import grp
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from signing_agent.api.app import IN_FLIGHT, APISettings, make_app
from signing_agent.api.peer import PeerAllowList
from signing_agent.backends.factory import KeyStores
from signing_agent.config import AgentConfig, FileKeyConfig
from signing_agent.errors import ConfigError
from signing_agent.governance import GovernanceService
from signing_agent.identity import Identity, open_identity
from signing_agent.service import SigningService

_logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


def harden_process() -> None:
    """No core dumps (they would hold PINs, tokens, decrypted shares) and no ptrace by same-uid processes."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_dumpable = 4
        libc.prctl(pr_set_dumpable, 0, 0, 0, 0)


def _check_folder(folder: Path) -> None:
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"agent.socket: {folder} is not a folder")
    if st.st_mode & stat.S_IWOTH:
        raise ConfigError(
            f"agent.socket: {folder} is world-writable; another user could replace the socket",
            hint="put the socket in a private folder, e.g. $XDG_RUNTIME_DIR/signing-agent/ or /run/signing-agent/",
        )


def _remove_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"agent.socket: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"agent.socket: cannot probe {path}: {exc.strerror}") from None
        _logger.info("replacing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        raise ConfigError(f"agent.socket: another agent is already listening on {path}")
    finally:
        probe.close()


def bind_unix_socket(path: Path, mode: int = 0o600, group: str | None = None) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``, never wider in between."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    _check_folder(folder)
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
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"agent.socket_group: no group named {group!r}") from None
            os.chown(path, -1, gid)
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


async def open_identities(config: AgentConfig, stores: KeyStores) -> dict[str, Identity]:
    """Open every identity, or none: on a failure the ones already open are closed again."""
    opened: dict[str, Identity] = {}
    try:
        for name, cfg in config.identities.items():
            if isinstance(cfg.signing_key, FileKeyConfig):
                _logger.warning(
                    "identity %s uses a private key file (%s): development only; use pkcs11 or azure-keyvault",
                    name,
                    cfg.signing_key.path,
                )
            ident = await open_identity(cfg, stores)
            opened[name] = ident
            for warning in ident.warnings:
                _logger.warning("identity %s: %s", name, warning)
            _logger.info(
                "identity %s: member %s, %s, %s key %s",
                name,
                ident.member_id,
                ident.alg.name,
                ident.backend,
                ident.location,
            )
    except BaseException:
        for ident in opened.values():
            await ident.signing_key.aclose()
            if ident.decryption_key is not None:
                await ident.decryption_key.aclose()
        raise
    return opened


async def serve(config: AgentConfig, *, on_ready: Callable[[Path], None] | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT, then drain in-flight requests and remove the socket."""
    stores = KeyStores()
    try:
        identities = await open_identities(config, stores)
        service = SigningService(identities)
        governance = GovernanceService(service, config.services)
        await governance.open_pinned()
        settings = APISettings(
            max_request_bytes=config.agent.max_request_bytes,
            request_timeout=config.agent.request_timeout,
            allow=PeerAllowList.default(config.agent.allowed_uids, config.agent.allowed_gids),
        )
        app = make_app(service, settings, governance)
        sock_path = config.agent.socket
        sock = bind_unix_socket(sock_path, config.agent.socket_mode, config.agent.socket_group)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None)
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: _logger.warning("SIGHUP: configuration reload is not supported yet")
        )
        try:
            site = web.SockSite(runner, sock)
            await site.start()
            _logger.info("listening on %s (%d identities)", sock_path, len(identities))
            if on_ready is not None:
                on_ready(sock_path)
            await stop.wait()
        finally:
            # Stop accepting, then let in-flight requests finish with their connections still open (aiohttp's own
            # shutdown would drop the rest of a body still being uploaded), then close everything.
            for listening in list(runner.sites):
                await listening.stop()
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            in_flight = app[IN_FLIGHT]
            _logger.info("shutting down: draining %d in-flight request(s)", in_flight.count)
            if not await in_flight.drain(SHUTDOWN_TIMEOUT):
                _logger.warning("%d request(s) still running after %.0f s; closing", in_flight.count, SHUTDOWN_TIMEOUT)
            await runner.cleanup()
            await governance.aclose()
            await service.aclose()
    finally:
        await stores.aclose()
