"""What ``check-config`` proves about a configuration before ``serve`` is trusted with it, with the checks ``serve``
makes at start-up: the socket (its folder, its path, a bind), the audit log (its folder, its file, its lock), each
identity (opened and self-tested by ``daemon.open_generation``; reported here), and each CCF service (the identity its
endpoint presents in a TLS handshake).

Owns ``Check`` (one finding: a name, a status ``ok``, ``warn`` or ``fail``, a message and maybe a hint) and the
socket's rules, which ``daemon.bind_unix_socket`` enforces with the same functions. Everything here is safe next to
a running agent: nothing is written to its audit log and its lock is never taken from it (a lock held is reported,
not a failure), its socket is probed with a connect and never replaced, the bind test uses a name of its own, and a
service is sent nothing but a TLS handshake (``check-config`` also asks an endpoint it does not trust which identity
it claims, as the recovery watchers do).

Must not import aiohttp or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import grp
import logging
import os
import secrets
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signing_agent.audit import AuditLock, lock_path, open_own_file, open_own_folder
from signing_agent.ccf.connections import CCFConnections
from signing_agent.ccf.handshake import Presented, endorsing, handshake, load_identities
from signing_agent.certs import der_sha256
from signing_agent.config import AgentSection, AuditConfig
from signing_agent.errors import AgentError, CCFTimeoutError, CCFUnavailableError, ConfigError
from signing_agent.identity import RENEWAL_HINT, Identity

_logger = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail"]

MAX_SOCKET_PATH_BYTES = 107
"""The longest path a Unix socket can be bound at on Linux (``sun_path`` holds 108 bytes with the final NUL)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One finding of ``check-config``: what was checked (``name``), how it went, and what to do about it."""

    name: str
    status: Status
    message: str
    hint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The check in ``check-config --json``: ``name``, ``status``, ``message``, ``hint`` (null when none)."""
        return {"name": self.name, "status": self.status, "message": self.message, "hint": self.hint}

    @classmethod
    def failed(cls, name: str, exc: AgentError) -> Check:
        return cls(name, "fail", exc.message, exc.hint)

    def log(self) -> None:
        """Log it as ``serve`` does at start-up: info, warning or error."""
        level = {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}[self.status]
        _logger.log(level, "%s: %s%s", self.name, self.message, f" (hint: {self.hint})" if self.hint else "")


# -- the socket ----------------------------------------------------------------------------------------------------

_FOLDER_HINT = "put the socket in a private folder, e.g. $XDG_RUNTIME_DIR/signing-agent/ or /run/signing-agent/"


def check_socket_path(path: Path) -> None:
    """A Unix socket path fits in ``sun_path`` (``MAX_SOCKET_PATH_BYTES``), or ConfigError."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"agent.socket: {path} is {size} bytes long; a Unix socket path has at most {MAX_SOCKET_PATH_BYTES}",
            hint=_FOLDER_HINT,
        )


def check_socket_folder(folder: Path, *, group_access: bool) -> str | None:
    """The socket's folder must be the agent's own: whoever can write to it can replace the socket, and a symlink
    can be pointed elsewhere. So: a real folder (not a symlink), owned by the agent's uid or root, and writable by
    its owner only. A ``socket_group`` needs group *search* on the folder to reach the socket, never group write:
    without it, a warning is returned (the agent works, its group cannot reach it)."""
    try:
        st = folder.lstat()
    except OSError as exc:
        raise ConfigError(f"agent.socket: cannot inspect the folder {folder}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"agent.socket: the folder {folder} is a symlink; name the real folder", hint=_FOLDER_HINT)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"agent.socket: {folder} is not a folder")
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise ConfigError(
            f"agent.socket: the folder {folder} is owned by uid {st.st_uid}, not by the agent (uid {me}) or root; "
            "its owner could replace the socket",
            hint=_FOLDER_HINT,
        )
    for bit, who in ((stat.S_IWOTH, "world"), (stat.S_IWGRP, "group")):
        if st.st_mode & bit:
            raise ConfigError(
                f"agent.socket: the folder {folder} is {who}-writable (mode {stat.S_IMODE(st.st_mode):04o}); "
                "another user could replace the socket",
                hint=f"chmod {'0750' if group_access else '0700'} {folder} (agent.socket_group needs group search "
                "on the folder, never group write)",
            )
    if group_access and not st.st_mode & stat.S_IXGRP:
        return (
            f"agent.socket_group is set, and the folder {folder} has no group search permission: the group cannot "
            "reach the socket (chmod g+x)"
        )
    return None


def socket_gid(group: str) -> int:
    """The id of ``agent.socket_group``, or ConfigError."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"agent.socket_group: no group named {group!r}") from None


SocketState = Literal["absent", "stale", "live"]


def socket_state(path: Path) -> SocketState:
    """What is at the socket's path: nothing, a socket nobody listens on (left by a crash), or a live agent's
    socket (a connect succeeds). ConfigError for a symlink or a file that is not a socket: never replaced."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"agent.socket: {path} is a symlink; refusing to follow or replace it")
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"agent.socket: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"agent.socket: cannot probe {path}: {exc.strerror}") from None
        return "stale"
    finally:
        probe.close()
    return "live"


def _creatable(folder: Path, setting: str) -> str:
    """What ``serve`` will do about a missing ``folder``: create it, mode 0700; ConfigError when it cannot."""
    parent = folder.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting}: the folder {folder} does not exist, and {parent} is not writable to create it")
    return f"the folder {folder} does not exist yet; serve creates it (mode 0700)"


def _bind_probe(folder: Path) -> None:
    """Bind (under umask 0177) and remove a socket of its own in ``folder``: sockets can be made there."""
    probe = folder / f".check-{secrets.token_hex(4)}"
    if len(os.fsencode(probe)) > MAX_SOCKET_PATH_BYTES:
        return  # the path itself passed check_socket_path: only the probe's longer name does not fit
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(probe))
    except OSError as exc:
        raise ConfigError(f"agent.socket: cannot bind a socket in {folder}: {exc.strerror}") from None
    finally:
        os.umask(old)
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


def _socket_check(agent: AgentSection) -> Check:
    path = agent.socket
    check_socket_path(path)
    if agent.socket_group is not None:
        socket_gid(agent.socket_group)
    folder = path.parent
    if not os.path.lexists(folder):
        return Check("socket", "ok", f"{path}: {_creatable(folder, 'agent.socket')}")
    warning = check_socket_folder(folder, group_access=agent.socket_group is not None)
    _bind_probe(folder)
    found = {
        "live": f"{path}: a running agent listens on it (serve would refuse to start beside it)",
        "stale": f"{path}: a socket nobody listens on (left by an earlier run); serve replaces it",
        "absent": f"{path} can be bound (the folder is the agent's own)",
    }[socket_state(path)]
    if warning is not None:
        return Check("socket", "warn", f"{found}; but {warning}", f"chmod g+x {folder}")
    return Check("socket", "ok", found)


def check_socket(agent: AgentSection) -> Check:
    """The socket: its path fits, its folder is the agent's own (or can be made), a socket can be bound there, and
    whatever is at the path now is a socket serve may replace, or a running agent's."""
    try:
        return _socket_check(agent)
    except AgentError as exc:
        return Check.failed("socket", exc)
    except OSError as exc:  # anything the checks above do not word themselves
        return Check("socket", "fail", f"agent.socket: {agent.socket}: {exc.strerror or exc}")


# -- the audit log -------------------------------------------------------------------------------------------------


def _writable_folder(folder_fd: int, folder: Path) -> None:
    """Create and remove a file of its own in the folder: the agent can make its files there."""
    name = f".check-{secrets.token_hex(4)}"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder_fd)
    except OSError as exc:
        raise ConfigError(
            f"audit.path: cannot create files in {folder}: {exc.strerror}",
            hint="the agent's user must be able to write the audit log's folder (run check-config as that user)",
        ) from None
    os.close(fd)
    os.unlink(name, dir_fd=folder_fd)


def _audit_findings(audit: AuditConfig) -> str:
    path = audit.path
    folder = path.parent
    if not os.path.lexists(folder):
        return f"{path}: {_creatable(folder, 'audit.path')}"
    folder_fd = open_own_folder(folder, error=ConfigError)
    try:
        _writable_folder(folder_fd, folder)
        try:
            os.stat(path.name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            found = f"{path} can be created"
        else:
            os.close(open_own_file(folder_fd, path, os.O_WRONLY | os.O_APPEND, error=ConfigError))
            found = f"{path} is writable"
        lock = lock_path(path)
        holder = AuditLock.probe(folder_fd, lock)
    finally:
        os.close(folder_fd)
    if holder is not None:
        return f"{found}; in use by a running signing-agent ({holder} holds {lock}), so serve would stop beside it"
    return f"{found} and lockable"


def check_audit(audit: AuditConfig) -> Check:
    """The audit log: its folder is the agent's own (or can be made) and writable, the file (if there is one) is a
    regular file of the agent's, and the lock can be taken, or is held by a running agent (said, not failed)."""
    try:
        return Check("audit", "ok", _audit_findings(audit))
    except AgentError as exc:
        return Check.failed("audit", exc)
    except OSError as exc:  # anything the checks above do not word themselves
        return Check("audit", "fail", f"audit.path: {audit.path}: {exc.strerror or exc}")


# -- identities ----------------------------------------------------------------------------------------------------


def identity_checks(
    identities: Mapping[str, Identity], failed: Mapping[str, AgentError], *, now: datetime.datetime | None = None
) -> list[Check]:
    """The identities as opened: each one's key and member id (ok), each warning about it (the key store's, a
    certificate about to expire), an encryption key that failed its round trip, and each identity that failed."""
    checks: list[Check] = []
    for ident in identities.values():
        checks.append(
            Check(ident.name, "ok", f"member {ident.member_id} {ident.alg.name} {ident.backend} {ident.location}")
        )
        checks += [Check(ident.name, "warn", warning) for warning in ident.warnings]
        certificate = ident.certificate_warning(now)
        if certificate is not None:
            checks.append(Check(ident.name, "warn", certificate, RENEWAL_HINT))
        if ident.encryption_error is not None:
            checks.append(Check.failed(ident.name, ident.encryption_error))
    checks += [Check.failed(name, exc) for name, exc in sorted(failed.items())]
    return checks


# -- CCF services --------------------------------------------------------------------------------------------------

_RECOVERED_HINT = (
    "if the service was recovered it has a new service identity: compare its fingerprint with the one announced out "
    "of band, then set service_certificate to it (or list it in accepted_service_certificates); otherwise url does "
    "not point at the service"
)


def _fingerprint(cert: x509.Certificate) -> str:
    return der_sha256(cert.public_bytes(serialization.Encoding.DER))


def _origin(identity: x509.Certificate, pinned: Sequence[bytes], provisional: bytes | None) -> str:
    """How the agent came to trust ``identity``: pinned, accepted, or provisionally after a recovery."""
    fingerprint = _fingerprint(identity)
    first, *accepted = pinned
    if fingerprint in map(_fingerprint, load_identities([first])):
        return "pinned"
    if fingerprint in map(_fingerprint, load_identities(accepted)):
        return "in accepted_service_certificates"
    if provisional is not None and fingerprint in map(_fingerprint, load_identities([provisional])):
        return "trusted provisionally after a recovery: reads and ballots only, until a member approves it"
    return "trusted"


async def _claimed(connections: CCFConnections, name: str, presented: Presented) -> str:
    """What an endpoint the agent does not trust claims to be (``GET /node/network``), and whether it endorses the
    certificate the endpoint presented."""
    try:
        pem = await connections.presented_identity(name)
    except AgentError as exc:
        return f"; it names no service identity ({exc.message})"
    claimed = load_identities([pem])
    if not claimed:
        return "; it names no service identity"
    proof = presented.certificate is not None and endorsing(presented.certificate, claimed) is not None
    return f"; it claims service identity sha256 {_fingerprint(claimed[0])}" + (
        ", which does endorse its certificate" if proof else ", which does not endorse its certificate"
    )


async def check_service(
    connections: CCFConnections, name: str, *, require_reachable: bool = False, ask_claimed: bool = False
) -> Check:
    """Connect to the service ``name`` with the trust its clients have (TLS handshake only) and say which service
    identity its endpoint presents (sha256), pinned, accepted or provisional; fail when the agent does not trust it.
    Unreachable is a warning, or a failure with ``require_reachable``. ``ask_claimed``: for an endpoint the agent does
    not trust, also ask it which identity it claims (``GET /node/network``, the one request such an endpoint gets)."""
    label = f"service {name}"
    cfg = connections.config(name)
    unreachable: Status = "fail" if require_reachable else "warn"
    unreachable_hint = None if require_reachable else "is the service up? (--require-services makes this a failure)"
    try:
        client = await connections.client(name)
        provisional = connections.provisional_identity(name)
        trusted = (*client.trusted_pems, *((provisional,) if provisional is not None else ()))
        presented = await handshake(cfg, trusted)
    except (CCFUnavailableError, CCFTimeoutError) as exc:
        return Check(label, unreachable, f"{cfg.url} is unreachable: {exc.message}", unreachable_hint)
    except AgentError as exc:
        return Check.failed(label, exc)
    leaf = presented.certificate
    node = f"node certificate sha256 {_fingerprint(leaf)}" if leaf is not None else "no certificate"
    if presented.trusted:
        identity = presented.endorsed_by
        if identity is None:
            return Check(label, "ok", f"{cfg.url} presents a certificate chain to a trusted service identity ({node})")
        origin = _origin(identity, client.trusted_pems, provisional)
        status: Status = "warn" if origin.startswith("trusted provisionally") else "ok"
        message = f"{cfg.url} presents service identity sha256 {_fingerprint(identity)} ({origin}; {node})"
        return Check(label, status, message)
    trusted_fingerprints = ", ".join(_fingerprint(c) for c in load_identities(trusted)) or "none"
    message = f"{cfg.url} presents a certificate the agent does not trust ({presented.refusal}): {node}"
    if leaf is not None:
        message += f", issued by {leaf.issuer.rfc4514_string() or 'an unnamed issuer'}"
    if ask_claimed:
        message += await _claimed(connections, name, presented)
    message += f"; trusted service identities: sha256 {trusted_fingerprints}"
    return Check(label, "fail", message, _RECOVERED_HINT)


async def check_services(
    connections: CCFConnections,
    *,
    require_reachable: bool = False,
    ask_claimed: bool = False,
    fetch_identities: bool = True,
) -> list[Check]:
    """``check_service`` for every configured service, at once, in the order of their names. ``fetch_identities``
    False: leave out the services pinned through ``identity_url`` (``serve``, which fetches that identity when it
    first talks to the service, and only then)."""
    names = sorted(n for n, cfg in connections.services.items() if fetch_identities or cfg.service_certificate)
    return list(
        await asyncio.gather(
            *(
                check_service(connections, n, require_reachable=require_reachable, ask_claimed=ask_claimed)
                for n in names
            )
        )
    )
