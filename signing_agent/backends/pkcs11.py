"""The PKCS#11 backend: signing keys (EC) and decryption keys (RSA) in HSMs and tokens, through python-pkcs11.

Owns loaded modules and token connections (``PKCS11Registry``). Connections are keyed by (module realpath,
init_params, token label), so every identity whose keys live in one token shares one session and one login.
Each token has one dedicated worker thread (``ThreadPoolExecutor(max_workers=1)``) that makes every PKCS#11
call (yubikey-agent's mutex): the event loop never blocks on the token. Modules are initialised with
``CKF_OS_LOCKING_OK`` (and NSS-style init parameters) on the function list python-pkcs11 uses; see
``_p11module``.

Key selection, from ``PKCS11KeyConfig``:

- ``parse_config`` merged the optional RFC 7512 ``uri`` into the config's fields and checked the rules about them
  (fields and URI agree; the key is named; one PIN source); this backend trusts them, and checks only the
  module's real path and the PIN source at run time (``resolve_key_config``).
- Exactly one private key of the right type (EC to sign, RSA to decrypt) must match label and/or id: none is a
  ``KeyNotFoundError``, several is a ``KeyNotFoundError`` that says to add ``key_id``.

Signing is always CKM_ECDSA over the digest the host computed (SoftHSM2 has no CKM_ECDSA_SHA384), and the
result must be exactly ``alg.signature_size`` bytes of raw ``r||s``. Decryption is CKM_RSA_PKCS_OAEP with
SHA-256/MGF1-SHA-256 in the token; a token that refuses those parameters raises ``UnsupportedOperationError``
unless the key has ``oaep = "host"``, which uses raw RSA (CKM_RSA_X_509) in the token and decodes OAEP on the
host (opt-in, because a host-side decoder is a potential padding oracle: it reports one uniform error for
every failure).

Every PKCS#11 call runs inside ``_p11session.map_pkcs11_errors``, the one table from python-pkcs11's exceptions to
``signing_agent.errors`` (a refused PIN, a mechanism the token lacks, the one uniform decryption failure ...).

A lost session, token or device (``SessionHandleInvalid``, ``UserNotLoggedIn``, ``DeviceRemoved``,
``TokenNotPresent``, tpm2-pkcs11's ``GeneralError`` ...; the map's ``TokenLostError``) drops the session and its
cached handles; the operation is retried on a fresh session and login, then once more after the module was
finalised and initialised again, and then fails with the retryable ``BackendUnavailableError`` (503). A
device-level error during a signature or a decryption counts as lost only when the device also fails a neutral
``C_GenerateRandom``; otherwise the request itself was refused (SoftHSM2 answers ``CKR_GENERAL_ERROR`` to some
requests it merely refuses), and the token stays in service. An unavailable token fails calls at once without
touching the module until the next reconnection attempt, at most one per ``RETRY_SECONDS`` (one log line each),
and the first call that succeeds ends the outage. A rejected PIN is not retried (repeated failures can lock a
token) until ``reset()``.

``pkcs11`` and ``asn1crypto`` are imported in ``signing_agent.backends`` only (here, ``_p11session``, ``_p11module``
and ``pkcs11_admin``), and their exceptions never leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import difflib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.algorithms import SignatureAlgorithm, for_curve
from signing_agent.backends import _p11module, _p11session
from signing_agent.backends._p11session import (
    DECRYPTION_FAILED,
    DEFAULT_MODULE_DIRS,
    MAX_SHOWN_LABEL,
    PinSource,
    TokenLostError,
    TokenMatch,
    check_module_path,
    describe_error,
    map_pkcs11_errors,
    object_label,
    require_pkcs11,
    shown_id,
    shown_label,
)
from signing_agent.backends.base import DecryptionKey, KeyInfo, Priority, SigningKey
from signing_agent.config import PKCS11KeyConfig
from signing_agent.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    KeyNotFoundError,
    PinRejectedError,
    SigningFailedError,
    UnsupportedOperationError,
)
from signing_agent.pkcs11_uri import format_uri

__all__ = ["DECRYPTION_FAILED", "KeySelector", "PKCS11Registry", "TokenStatus", "resolve_key_config"]

_logger = logging.getLogger("signing_agent.backend")

T = TypeVar("T")

# --- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeySelector:
    """A fully resolved key selection: which module, token and key, and where the PIN comes from."""

    module: str
    """The module's realpath (already checked)."""
    init_params: str | None
    token_label: str | None
    token: TokenMatch
    """What else the token must show (the URI's serial, manufacturer, model, slot-id)."""
    key_label: str | None
    key_id: bytes | None
    pin: PinSource
    oaep: Literal["token", "host"]

    def uri(self) -> str:
        """A ``pkcs11:`` URI for logs and ``KeyInfo.location`` (no PIN, ever)."""
        return format_uri(
            token=self.token_label,
            serial=self.token.serial,
            object=self.key_label,
            id=self.key_id,
            type="private",
            module_path=self.module,
        )


def resolve_key_config(
    cfg: PKCS11KeyConfig, *, name: str, allowed_module_dirs: tuple[str, ...] | None = DEFAULT_MODULE_DIRS
) -> KeySelector:
    """Check what only the host can tell about a key selection ``parse_config`` validated: the module's real path
    is in an allowed folder, and the PIN source is usable (without reading the PIN)."""
    pin = PinSource(pin_file=cfg.pin_file, pin_env=cfg.pin_env)
    try:
        real = check_module_path(cfg.module, allowed_dirs=allowed_module_dirs)
        pin.check()
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc.message}", hint=exc.hint) from None
    return KeySelector(
        module=real,
        init_params=cfg.init_params,
        token_label=cfg.token_label,
        token=TokenMatch(cfg.token_serial, cfg.token_manufacturer, cfg.token_model, cfg.slot_id),
        key_label=cfg.key_label,
        key_id=cfg.key_id,
        pin=pin,
        oaep=cfg.oaep,
    )


# --- token connections --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """What the registry knows about one token connection (for health checks and tests). No secrets."""

    module: str
    token_label: str | None
    connected: bool
    logins: int
    """How many times a session was opened and logged in (1 plus one per reconnect)."""
    reconnects: int
    available: bool = True
    """False from a failed reconnection until a call succeeds again."""
    unavailable_since: float | None = None
    """Wall-clock time (``time.time()``) the outage began."""
    error: str | None = None
    """Why the token is unavailable (a PKCS#11 error name or the missing token), never a secret."""


RETRY_SECONDS = 5.0
"""While a token is unavailable, calls fail at once and the agent tries to reconnect at most this often."""


@dataclass
class _Outage:
    since: float
    """Wall clock, for people."""
    reason: str
    retry_at: float
    """Monotonic clock: no call touches the module before this."""
    attempts: int = 1


class _RetryableError(Exception):
    """A call failed in a way a fresh session or a re-initialised module may cure (internal to the connection)."""

    def __init__(self, reason: str, generation: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.generation = generation


class _TokenDownError(_RetryableError):
    """Neither a fresh session nor a re-initialised module helped (internal to the connection)."""


class _TokenConnection:
    """One token: one worker thread, one session and login, cached key handles.

    The single-thread executor is the mutex (yubikey-agent's): every PKCS#11 call for the token runs on it, in
    submission order. No asyncio lock on top: calls queue inside the executor, so the token is never idle while the
    event loop is busy with other requests (a lock would stall that pipeline between calls).

    A failing call is retried on a fresh session and then, if that fails too, once more after the module was
    finalised and initialised again (``_p11module.LoadedModule.reinitialise``): a TPM that restarted under
    tpm2-pkcs11, or a token p11-kit lost, comes back that way without restarting the agent. If all three fail,
    the token is *unavailable*: calls fail at once with ``BackendUnavailableError`` (503) without touching the
    module, one call per ``retry_seconds`` tries again, and each try logs one line, not each request.
    """

    def __init__(self, module: str, init_params: str | None, token_label: str | None, pin: PinSource,
                 allowed_module_dirs: tuple[str, ...] | None, *, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic, match: TokenMatch | None = None) -> None:  # fmt: skip
        self.module = module
        self.init_params = init_params
        self.token_label = token_label
        self.match = match or TokenMatch()
        self.pin = pin
        self._allowed = allowed_module_dirs
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pkcs11-{token_label or 'token'}")
        self._module: _p11module.LoadedModule | None = None
        self._session: Any = None
        self._generation = 0
        self._seen = False
        self._outage: _Outage | None = None
        self.slot_id: int | None = None
        self.handles: dict[tuple[object, ...], Any] = {}
        self._refused: PinRejectedError | None = None
        self._closed = False
        self.logins = 0
        self.reconnects = 0

    def status(self) -> TokenStatus:
        outage = self._outage
        return TokenStatus(
            self.module,
            self.token_label,
            self._session is not None,
            self.logins,
            self.reconnects,
            available=outage is None,
            unavailable_since=outage.since if outage is not None else None,
            error=outage.reason if outage is not None else None,
        )

    async def run(self, fn: Callable[[Any], T], *, where: str) -> T:
        """Run ``fn(session)`` on the token's thread, reconnecting if the session, token or module was lost."""
        if self._closed:
            raise BackendUnavailableError(f"{where}: the PKCS#11 backend is closed")
        loop = asyncio.get_running_loop()
        # NOTE: a PKCS#11 call cannot be cancelled; if the caller is cancelled the call still finishes on the
        # worker thread, and the next call queues behind it on the same thread.
        return await loop.run_in_executor(self._executor, self._run_sync, fn, where)

    def _run_sync(self, fn: Callable[[Any], T], where: str) -> T:
        outage = self._outage
        if outage is not None and self._clock() < outage.retry_at:
            raise self._unavailable(where, outage)
        try:
            result = self._attempts(fn, where, recovering=outage is not None)
        except _TokenDownError as down:
            error = BackendUnavailableError(
                f"{where}: token {self.token_label!r} is unavailable ({down.reason})",
                hint="check that the token is present and its HSM or TPM reachable; the agent reconnects by itself",
            )
            self._record_outage(where, down.reason, error.message)
            raise error from None
        if outage is not None:
            self._outage = None
            _logger.warning(
                "%s: token %r is available again after %.0f s", where, self.token_label, time.time() - outage.since
            )
        return result

    def _attempts(self, fn: Callable[[Any], T], where: str, *, recovering: bool) -> T:
        """``fn`` on the current session; else on a fresh session; else after re-initialising the module."""
        reason = ""
        failed_generation = self._generation
        for step in range(3):
            module = self._load()
            if step == 2:
                try:
                    module.reinitialise(failed_generation, where=where)
                except BackendUnavailableError as exc:
                    reason = _without_prefix(exc.message, where)
                    break
            try:
                return self._try(module, fn, where)
            except _RetryableError as retry:
                reason, failed_generation = retry.reason, retry.generation
            except BackendUnavailableError as exc:  # the token is not there, or the module is not initialised
                if not self._seen:
                    raise
                reason, failed_generation = _without_prefix(exc.message, where), module.generation
            if step == 0:
                self.reconnects += 1
                if not recovering:
                    _logger.warning("%s: PKCS#11 session lost (%s); reopening and retrying", where, reason)
        raise _TokenDownError(reason, failed_generation)

    def _load(self) -> _p11module.LoadedModule:
        if self._module is None:
            self._module = _p11module.open_module(self.module, self.init_params, allowed_dirs=self._allowed)
        return self._module

    def _try(self, module: _p11module.LoadedModule, fn: Callable[[Any], T], where: str) -> T:
        with module.use(where) as generation:
            if generation != self._generation:
                self._forget()  # the module was initialised again: these handles belong to its former life
                self._generation = generation
            try:
                with map_pkcs11_errors(where):
                    return fn(self._ensure(module, where))
            except TokenLostError as lost:
                self._drop()
                raise _RetryableError(lost.reason, generation) from None

    def _unavailable(self, where: str, outage: _Outage) -> BackendUnavailableError:
        since = datetime.datetime.fromtimestamp(outage.since, datetime.UTC).strftime("%H:%M:%SZ")
        wait = max(0.0, outage.retry_at - self._clock())
        return BackendUnavailableError(
            f"{where}: token {self.token_label!r} is unavailable since {since} ({outage.reason}); the agent "
            f"tries to reconnect in {wait:.0f} s",
            hint="check that the token is present and its HSM or TPM reachable; SIGHUP makes the agent try at once",
        )

    def _record_outage(self, where: str, reason: str, message: str) -> None:
        outage = self._outage
        retry_at = self._clock() + self._retry_seconds
        if outage is None:
            self._outage = _Outage(since=time.time(), reason=reason, retry_at=retry_at)
            _logger.warning("%s; calls fail at once, and the agent tries to reconnect every %g s", message,
                            self._retry_seconds)  # fmt: skip
            return
        outage.reason, outage.retry_at = reason, retry_at
        outage.attempts += 1
        _logger.warning(
            "%s: token %r is still unavailable after %d attempts in %.0f s (%s)",
            where,
            self.token_label,
            outage.attempts,
            time.time() - outage.since,
            reason,
        )

    def _ensure(self, module: _p11module.LoadedModule, where: str) -> Any:
        if self._session is not None:
            return self._session
        if self._refused is not None:
            raise PinRejectedError(self._refused.message, hint=self._refused.hint)
        token = _p11session.find_token(module.lib, self.token_label, where=where, match=self.match)
        try:
            session = _p11session.open_session(token, self.pin, rw=False, where=where)
        except PinRejectedError as exc:
            self._refused = exc
            raise
        self._session = session
        self._seen = True
        self.slot_id = token.slot.slot_id
        self.logins += 1
        return session

    def _forget(self) -> None:
        """Drop the session and handles without closing them (their module instance is gone)."""
        self.handles.clear()
        self._session = None

    def _drop(self) -> None:
        """Close the session (python-pkcs11 logs out first if it logged in) and drop the cached handles."""
        self.handles.clear()
        session, self._session = self._session, None
        if session is not None:
            _p11session.close_session(session)

    def _drop_now(self) -> None:
        module = self._module
        if module is None or self._session is None:
            self._forget()
            return
        with module.lock.shared():
            if module.generation != self._generation or not module.initialised:
                self._forget()
            else:
                self._drop()

    async def reset(self) -> None:
        """Drop the session (the next call reconnects), forget a refused PIN, and let an unavailable token be
        tried at once (SIGHUP)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drop_now)
        self._refused = None
        if self._outage is not None:
            self._outage.retry_at = 0.0

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drop_now)
        self._executor.shutdown(wait=False)


def _without_prefix(message: str, where: str) -> str:
    return message.removeprefix(f"{where}: ")


# --- keys ---------------------------------------------------------------------------------------------------


def _ec_public_key(params: bytes, point: bytes, *, where: str) -> ec.EllipticCurvePublicKey:
    from asn1crypto import core, keys

    try:
        domain = keys.ECDomainParameters.load(params)
        if domain.name != "named":
            raise KeyNotFoundError(f"{where}: the key uses explicit EC parameters; only named curves are supported")
        curve_name = domain.chosen.native
    except ValueError as exc:
        raise KeyNotFoundError(f"{where}: unreadable CKA_EC_PARAMS: {exc}") from None
    alg = for_curve(curve_name)
    raw = point
    # CKA_EC_POINT is a DER OCTET STRING around the X9.62 point (SoftHSM, NSS, tpm2-pkcs11); some tokens
    # return it bare.
    if not (len(point) == 1 + 2 * alg.field_bytes and point[0] == 4):
        try:
            raw = core.OctetString.load(point).native
        except ValueError as exc:
            raise KeyNotFoundError(f"{where}: unreadable CKA_EC_POINT: {exc}") from None
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(alg.curve(), raw)
    except ValueError as exc:
        raise KeyNotFoundError(f"{where}: CKA_EC_POINT is not a point on {curve_name}: {exc}") from None


def describe_private_keys(session: Any, *, near: str | None = None, limit: int = 12) -> str:
    """What the token holds, for error messages: ``'m0' (id 01a2, EC), 'm0-enc' (id 01a3, RSA)``.

    With ``near`` (the label asked for), the closest labels come first, so a typo shows next to its key even in
    a token with hundreds of keys.
    """
    p11 = require_pkcs11()
    a = p11.Attribute
    names = {p11.KeyType.EC: "EC", p11.KeyType.RSA: "RSA"}
    keys: list[tuple[str, str]] = []
    try:
        for obj in session.get_objects({a.CLASS: p11.ObjectClass.PRIVATE_KEY}):
            label, key_id = object_label(obj), bytes(obj[a.ID] or b"")
            kind = names.get(obj[a.KEY_TYPE], "other")
            keys.append((label[:MAX_SHOWN_LABEL], f"{shown_label(label)} (id {shown_id(key_id)}, {kind})"))
    except p11.exceptions.PKCS11Error as exc:
        return f"its private keys cannot be listed ({describe_error(exc)})"
    if not keys:
        return "the token shows no private key to this login"
    if near is not None:
        keys.sort(key=lambda k: (-difflib.SequenceMatcher(None, near, k[0]).ratio(), k[1]))
    else:
        keys.sort()
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return "its private keys: " + ", ".join(text for _, text in keys[:limit]) + more


def find_private_key(
    session: Any, *, label: str | None, key_id: bytes | None, key_type: Any, where: str, logged_in: bool = False
) -> Any:
    """The one private key of ``key_type`` with this label and/or id, else ``KeyNotFoundError``.

    ``logged_in``: only an object the login protects (``CKA_PRIVATE`` true) is a candidate. Anyone who may open a
    session to the token can create public objects in it without the PIN, a "private key" among them, with the
    member key's label and id: it would make the selection ambiguous (the identity stops) or, where the real key is
    absent, be used."""
    p11 = require_pkcs11()
    template: dict[Any, Any] = {
        p11.Attribute.CLASS: p11.ObjectClass.PRIVATE_KEY,
        p11.Attribute.KEY_TYPE: key_type,
    }
    if logged_in:
        template[p11.Attribute.PRIVATE] = True
    if label is not None:
        template[p11.Attribute.LABEL] = label
    if key_id is not None:
        template[p11.Attribute.ID] = key_id
    found = list(session.get_objects(template))
    what = " and ".join(
        x for x in (f"label {label!r}" if label is not None else "", f"id {key_id.hex()}" if key_id else "") if x
    )
    kind = "EC" if key_type == p11.KeyType.EC else "RSA"
    if not found:
        raise KeyNotFoundError(
            f"{where}: no {kind} private key with {what} in the token; {describe_private_keys(session, near=label)}",
            hint="check key_label and key_id (`signing-agent keys list` shows them), and that the PIN is for the "
            "token that holds the key",
        )
    if len(found) > 1:
        raise KeyNotFoundError(
            f"{where}: {len(found)} {kind} private keys match {what}",
            hint="select the key by key_id as well (see `signing-agent keys list`)"
            if key_id is None
            else "the token holds several keys with this id: remove the copies (`signing-agent keys list`)",
        )
    return found[0]


def read_public_key(session: Any, key: Any, *, where: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public half of a private key object: from its public key object (same id, else label), or itself
    (RSA)."""
    p11 = require_pkcs11()
    attr = p11.Attribute
    key_type = key[attr.KEY_TYPE]
    key_id = bytes(key[attr.ID] or b"")
    template: dict[Any, Any] = {attr.CLASS: p11.ObjectClass.PUBLIC_KEY, attr.KEY_TYPE: key_type}
    if key_id:
        template[attr.ID] = key_id
    else:
        try:
            template[attr.LABEL] = key[attr.LABEL]
        except UnicodeDecodeError:
            raise KeyNotFoundError(
                f"{where}: the key has no CKA_ID and its label is not UTF-8: its public key cannot be found"
            ) from None
    publics = list(session.get_objects(template))
    if key_type == p11.KeyType.RSA:
        source = publics[0] if len(publics) == 1 else key
        try:
            n = int.from_bytes(source[attr.MODULUS], "big")
            e = int.from_bytes(source[attr.PUBLIC_EXPONENT], "big")
        except p11.exceptions.PKCS11Error as exc:
            raise KeyNotFoundError(f"{where}: cannot read the RSA public key ({describe_error(exc)})") from None
        return rsa.RSAPublicNumbers(e, n).public_key()
    if len(publics) != 1:
        raise KeyNotFoundError(
            f"{where}: found {len(publics)} public key objects for the private key; need exactly one to read "
            "the public key",
            hint="import or generate keys with `signing-agent keys`, which creates the public object",
        )
    return _ec_public_key(bytes(publics[0][attr.EC_PARAMS]), bytes(publics[0][attr.EC_POINT]), where=where)


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def oaep_sha256_decode(em: bytes, k: int) -> bytes:
    """EME-OAEP decoding (RFC 8017 §7.1.2 step 3) with SHA-256, MGF1-SHA-256 and an empty label.

    Written in constant-time style: every byte is examined whatever it holds, checks are combined without
    early exits, and every failure raises the same ``BackendError(DECRYPTION_FAILED)``. (Python cannot promise
    true constant time; the opt-in ``oaep = "host"`` exists for tokens without OAEP-SHA256 such as SoftHSM2.)
    """
    h_len = 32
    if k < 2 * h_len + 2 or len(em) != k:
        raise BackendError(DECRYPTION_FAILED)
    y = em[0]
    masked_seed = em[1 : 1 + h_len]
    masked_db = em[1 + h_len :]
    seed = bytes(a ^ b for a, b in zip(masked_seed, _mgf1_sha256(masked_db, h_len), strict=True))
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1_sha256(seed, k - h_len - 1), strict=True))
    good = hmac.compare_digest(db[:h_len], hashlib.sha256(b"").digest()) & (y == 0)
    looking = 1
    index = 0
    invalid = 0
    for i, b in enumerate(db[h_len:]):
        is_zero = int(b == 0)
        is_one = int(b == 1)
        # The first 0x01 after the zero run marks the message; any other byte before it is a padding error.
        index |= (looking & is_one) * i
        invalid |= looking & (1 - is_zero) & (1 - is_one)
        looking &= 1 - is_one
    if not good or invalid or looking:
        raise BackendError(DECRYPTION_FAILED)
    return db[h_len + index + 1 :]


class _PKCS11Key:
    """One private key in a token; shares the token connection with every other key in the same token."""

    def __init__(self, conn: _TokenConnection, sel: KeySelector, *, name: str, kind: Literal["ec", "rsa"]) -> None:
        self._conn = conn
        self._sel = sel
        self._name = name
        self._kind = kind
        self._info: KeyInfo | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} {self._sel.uri()}>"

    def _handle(self, session: Any) -> Any:
        p11 = require_pkcs11()
        cache_key = (self._kind, self._sel.key_label, self._sel.key_id)
        key = self._conn.handles.get(cache_key)
        if key is None:
            key_type = p11.KeyType.EC if self._kind == "ec" else p11.KeyType.RSA
            key = find_private_key(
                session,
                label=self._sel.key_label,
                key_id=self._sel.key_id,
                key_type=key_type,
                where=self._name,
                logged_in=self._sel.pin.logs_in,
            )
            self._conn.handles[cache_key] = key
        return key

    async def describe(self) -> KeyInfo:
        if self._info is None:
            public = await self._conn.run(lambda s: read_public_key(s, self._handle(s), where=self._name),
                                          where=self._name)  # fmt: skip
            self._info = KeyInfo(backend="pkcs11", location=self._sel.uri(), public_key=public)
        return self._info

    async def aclose(self) -> None:
        """Nothing to do: the registry owns the token connection (``PKCS11Registry.aclose``)."""


class PKCS11SigningKey(_PKCS11Key):
    """An EC key in a token that signs digests with CKM_ECDSA."""

    async def sign_digest(
        self, alg: SignatureAlgorithm, digest: bytes, *, priority: Priority = Priority.NORMAL
    ) -> bytes:
        """Raw ``r||s`` over ``digest``. ``priority`` is unused: a local token has no quota."""
        if len(digest) != alg.digest_size:
            raise SigningFailedError(
                f"{self._name}: {alg.name} needs a {alg.digest_size}-byte digest, got {len(digest)}"
            )
        info = await self.describe()
        public = info.public_key
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != alg.curve_name:
            raise SigningFailedError(f"{self._name}: {alg.name} does not match the key in the token")
        raw = await self._conn.run(lambda s: self._sign_sync(s, digest), where=self._name)
        if len(raw) != alg.signature_size:
            raise SigningFailedError(
                f"{self._name}: the token returned a {len(raw)}-byte signature; {alg.name} needs {alg.signature_size}"
            )
        return raw

    def _sign_sync(self, session: Any, digest: bytes) -> bytes:
        p11 = require_pkcs11()
        key = self._handle(session)
        with map_pkcs11_errors(
            self._name,
            session=session,
            unsupported=lambda _: UnsupportedOperationError(f"{self._name}: the token cannot sign with CKM_ECDSA"),
            failed=lambda exc: SigningFailedError(f"{self._name}: the token refused to sign: {describe_error(exc)}"),
        ):
            return bytes(key.sign(digest, mechanism=p11.Mechanism.ECDSA))


class PKCS11DecryptionKey(_PKCS11Key):
    """An RSA key in a token that decrypts RSA-OAEP-SHA256 (in the token, or raw RSA plus host decoding)."""

    async def decrypt_oaep_sha256(self, ciphertext: bytes, *, priority: Priority = Priority.HIGH) -> bytes:
        info = await self.describe()
        if not isinstance(info.public_key, rsa.RSAPublicKey):  # pragma: no cover -- the key type is filtered on
            raise UnsupportedOperationError(f"{self._name}: not an RSA key")
        k = (info.public_key.key_size + 7) // 8
        # Not a ciphertext for this key: refused here, so the token never sees it (SoftHSM2 answers a raw RSA
        # input above the modulus with CKR_GENERAL_ERROR, which looks like a failing device).
        if len(ciphertext) != k or int.from_bytes(ciphertext, "big") >= info.public_key.public_numbers().n:
            raise BackendError(DECRYPTION_FAILED)
        if self._sel.oaep == "host":
            em = await self._conn.run(lambda s: self._raw_rsa_sync(s, ciphertext), where=self._name)
            # Some tokens strip leading zero bytes from a raw RSA result; restore the fixed width.
            return oaep_sha256_decode(em.rjust(k, b"\0"), k)
        return await self._conn.run(lambda s: self._oaep_sync(s, ciphertext), where=self._name)

    def _oaep_sync(self, session: Any, ciphertext: bytes) -> bytes:
        p11 = require_pkcs11()
        key = self._handle(session)
        with self._decryption_errors(session, self._lacks_oaep, mechanism_param=True):
            return bytes(
                key.decrypt(
                    ciphertext,
                    mechanism=p11.Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(p11.Mechanism.SHA256, p11.MGF.SHA256, None),
                )
            )

    def _raw_rsa_sync(self, session: Any, ciphertext: bytes) -> bytes:
        p11 = require_pkcs11()
        key = self._handle(session)
        with self._decryption_errors(session, self._lacks_raw_rsa):
            return bytes(key.decrypt(ciphertext, mechanism=p11.Mechanism.RSA_X_509))

    def _decryption_errors(
        self,
        session: Any,
        unsupported: Callable[[BaseException], UnsupportedOperationError],
        *,
        mechanism_param: bool = False,
    ) -> contextlib.AbstractContextManager[None]:
        """``map_pkcs11_errors`` for a decryption: a token that cannot is ``unsupported``, and every other failure
        the one uniform ``DECRYPTION_FAILED``."""
        return map_pkcs11_errors(
            self._name,
            session=session,
            unsupported=unsupported,
            failed=lambda _: BackendError(DECRYPTION_FAILED),
            mechanism_param=mechanism_param,
        )

    def _lacks_oaep(self, exc: BaseException) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{self._name}: token {self._conn.token_label!r} lacks RSA-OAEP with SHA-256 "
            f"({type(exc).__name__}); SoftHSM2 2.6 only does OAEP with SHA-1",
            hint='set oaep = "host" on this key to opt in to raw RSA in the token and OAEP decoding '
            "on the host, or use a token that supports OAEP-SHA256 (NSS softoken, most HSMs)",
        )

    def _lacks_raw_rsa(self, exc: BaseException) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{self._name}: token {self._conn.token_label!r} does not allow raw RSA (CKM_RSA_X_509), which "
            'oaep = "host" needs'
        )


# --- the registry -------------------------------------------------------------------------------------------


class PKCS11Registry:
    """Owns PKCS#11 modules and token connections; hands out ``SigningKey``/``DecryptionKey`` objects.

    ``signing_key``/``decryption_key`` only validate (module path, PIN source, URI) and never touch the token;
    the first ``describe()`` or operation connects. Keys in one token share one connection (one session, one
    login).
    """

    def __init__(self, *, allowed_module_dirs: tuple[str, ...] | None = DEFAULT_MODULE_DIRS,
                 retry_seconds: float = RETRY_SECONDS) -> None:  # fmt: skip
        require_pkcs11()
        self._allowed = allowed_module_dirs
        self._retry_seconds = retry_seconds
        self._tokens: dict[tuple[str, str | None, str | None, TokenMatch], _TokenConnection] = {}

    def _connection(self, sel: KeySelector, *, name: str) -> _TokenConnection:
        key = (sel.module, sel.init_params, sel.token_label, sel.token)
        conn = self._tokens.get(key)
        for other in self._tokens.values():
            if other.module == sel.module and other.init_params != sel.init_params:
                raise ConfigError(
                    f"{name}.init_params: differs from another key on module {sel.module}",
                    hint="a module is initialised once per process: give all its keys the same init_params",
                )
        if conn is None:
            conn = _TokenConnection(sel.module, sel.init_params, sel.token_label, sel.pin, self._allowed,
                                    retry_seconds=self._retry_seconds, match=sel.token)  # fmt: skip
            self._tokens[key] = conn
        elif conn.pin != sel.pin:
            raise ConfigError(
                f"{name}: token {sel.token_label!r} is already used with {conn.pin.describe()}, "
                f"this key names {sel.pin.describe()}",
                hint="keys in one token share one login: give them the same PIN source",
            )
        return conn

    def signing_key(self, cfg: PKCS11KeyConfig, *, name: str) -> SigningKey:
        """A signing key (EC private key) as configured under the dotted config path ``name``."""
        sel = resolve_key_config(cfg, name=name, allowed_module_dirs=self._allowed)
        return PKCS11SigningKey(self._connection(sel, name=name), sel, name=name, kind="ec")

    def decryption_key(self, cfg: PKCS11KeyConfig, *, name: str) -> DecryptionKey:
        """A decryption key (RSA private key) as configured under the dotted config path ``name``."""
        sel = resolve_key_config(cfg, name=name, allowed_module_dirs=self._allowed)
        return PKCS11DecryptionKey(self._connection(sel, name=name), sel, name=name, kind="rsa")

    def status(self) -> tuple[TokenStatus, ...]:
        """One entry per token connection."""
        return tuple(c.status() for c in self._tokens.values())

    async def reset(self) -> None:
        """Drop every session (reconnect on next use) and forget refused PINs. For SIGHUP."""
        for conn in self._tokens.values():
            await conn.reset()

    async def aclose(self) -> None:
        """Close every session (this logs out) and stop the worker threads. Modules stay initialised."""
        for conn in self._tokens.values():
            await conn.aclose()
