"""The two systemd protocols a service speaks, without a dependency: sd_notify and socket activation.

``Notifier`` sends ``READY=1``, ``STATUS=...``, ``RELOADING=1``, ``STOPPING=1`` and ``WATCHDOG=1`` datagrams to
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace); without that variable every call is a no-op, so
the daemon runs the same under systemd, in a container or in a terminal. ``inherited_socket()`` adopts the socket
passed by a ``.socket`` unit (``LISTEN_PID``/``LISTEN_FDS``, fd 3) as described in sd_listen_fds(3).

Must not import aiohttp or asyncio: the daemon drives the watchdog timer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from signing_agent.errors import ConfigError

_logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Talks to the service manager through ``$NOTIFY_SOCKET``; silent when there is none."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            _logger.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract socket name", raw)
        self._watchdog = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None if no watchdog is armed."""
        return self._watchdog

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram. False (and a log line) if it could not be delivered."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            _logger.warning("sd_notify failed (%s): %s", ", ".join(f.split("=", 1)[0] for f in fields), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match the reload; older versions ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining in-flight requests")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # armed for another process (e.g. our parent)
    try:
        value = int(usec)
    except ValueError:
        _logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[int]:
    """The file descriptors passed by socket activation, if they are meant for this process.

    Like ``sd_listen_fds(unset_environment=1)``: the variables are removed so that children do not adopt them.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not pid or not count:
        return []
    if pid != str(os.getpid()):
        _logger.warning("ignoring LISTEN_FDS: LISTEN_PID=%s is not this process (%d)", pid, os.getpid())
        return []
    try:
        n = int(count)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS={count!r} is not a number") from None
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, n)))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise ConfigError(f"socket activation: LISTEN_FDS={n} but fd {fd} is not open") from None
    return fds


def inherited_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening Unix stream socket systemd passed us, or None when not socket-activated."""
    fds = listen_fds(environ)
    if not fds:
        return None
    if len(fds) != 1:
        raise ConfigError(
            f"socket activation passed {len(fds)} file descriptors; the agent serves exactly one socket",
            hint="give signing-agent.socket a single ListenStream=",
        )
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError as exc:
        raise ConfigError(f"socket activation: fd {fds[0]} is not a socket ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        family, kind = sock.family, sock.type
        sock.close()
        raise ConfigError(f"socket activation: fd 3 is {family.name}/{kind.name}, the agent needs AF_UNIX/SOCK_STREAM")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise ConfigError("socket activation: fd 3 is not a listening socket")
    sock.setblocking(False)
    return sock
