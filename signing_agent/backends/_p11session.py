"""Using PKCS#11 modules safely: path checks, PIN sources, finding tokens, sessions, error classes.

Owns everything the PKCS#11 backend (``pkcs11.py``) and the key tooling (``pkcs11_admin.py``) share below the
level of keys: the ssh-agent style module path check, reading a PIN from a file or an environment variable,
finding a token by label (and saying which tokens exist when none matches), opening a logged-in session,
sorting PKCS#11 errors into "the session went away" and "the module or its device went away", and the one map from
PKCS#11 errors to the agent's (``map_pkcs11_errors``). Loading and initialising a module thread-safely is
``_p11module``'s job.

Vendor imports (``pkcs11``) stay in ``signing_agent.backends``; nothing here may be imported outside it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signing_agent.backends._secrets import check_secret_file, read_secret_file, secret_env
from signing_agent.errors import (
    AgentError,
    BackendError,
    BackendUnavailableError,
    ConfigError,
    KeyNotFoundError,
    PinRejectedError,
    UnsupportedOperationError,
)


def _optional_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover -- the extra is installed in every test environment
        return None


# python-pkcs11 is an optional extra; typed as Any because its Cython objects are mostly untyped anyway.
pkcs11: Any = _optional_import("pkcs11")
p11exc: Any = pkcs11.exceptions if pkcs11 is not None else None

INSTALL_HINT = "pip install 'signing-agent[pkcs11]'"

DEFAULT_MODULE_DIRS: tuple[str, ...] = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/usr/local/lib64",
    "/opt",
)
"""Where a PKCS#11 module may live (after ``realpath``), like ssh-agent's default ``-P`` allowlist."""


def require_pkcs11() -> Any:
    """The ``pkcs11`` package, or a ``ConfigError`` naming the extra to install."""
    if pkcs11 is None:  # pragma: no cover -- the extra is installed in every test environment
        raise ConfigError("the PKCS#11 backend needs python-pkcs11 and asn1crypto", hint=INSTALL_HINT)
    return pkcs11


# --- module path --------------------------------------------------------------------------------------------


def check_module_path(path: str | os.PathLike[str], *, allowed_dirs: Sequence[str] | None = DEFAULT_MODULE_DIRS) -> str:
    """Return the realpath of a PKCS#11 module, or raise ``ConfigError`` if loading it would be unsafe.

    The checks follow ssh-agent: the resolved path must be a regular file inside an allowed folder, owned by
    root or by the current user, and not writable by group or others (a writable module is code execution for
    whoever can write).
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ConfigError(f"PKCS#11 module {path}: {exc.strerror}", hint="install the module or fix the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"PKCS#11 module {path}: {real} is not a regular file")
    if allowed_dirs is not None and not any(
        real.startswith(d.rstrip("/") + "/") for d in (os.path.realpath(a) for a in allowed_dirs)
    ):
        raise ConfigError(
            f"PKCS#11 module {path}: {real} is outside the allowed folders ({', '.join(allowed_dirs)})",
            hint="install the module under one of them (ssh-agent applies the same rule)",
        )
    if st.st_uid not in (0, os.getuid()):
        raise ConfigError(f"PKCS#11 module {path}: {real} is owned by uid {st.st_uid}, not by root or by us")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"PKCS#11 module {path}: {real} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod go-w {real}",
        )
    return real


# --- modules -----------------------------------------------------------------------------------------------


def load_module(path: str | os.PathLike[str], init_params: str | None = None, *, check: bool = True,
                allowed_dirs: Sequence[str] | None = DEFAULT_MODULE_DIRS) -> Any:  # fmt: skip
    """The python-pkcs11 ``lib`` of a module, initialised once per process (see ``_p11module.open_module``)."""
    from signing_agent.backends import _p11module  # imports this module: resolved at call time

    return _p11module.open_module(path, init_params, check=check, allowed_dirs=allowed_dirs).lib


# --- PINs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PinSource:
    """Where a token PIN comes from. Holds no secret itself; ``read()`` fetches it each time it is needed.

    A ``pin_env`` variable leaves the environment at its first use (``secret_env``): no child process inherits it.
    At most one of the two is set: ``parse_config`` and the keys CLI's exclusive options see to that.
    """

    pin_file: Path | None = None
    pin_env: str | None = None

    @property
    def logs_in(self) -> bool:
        """Whether a session with this source logs in (else it sees the token's public objects only)."""
        return self.pin_file is not None or self.pin_env is not None

    def describe(self) -> str:
        if self.pin_file is not None:
            return f"pin_file {self.pin_file}"
        if self.pin_env is not None:
            return f"pin_env ${self.pin_env}"
        return "no PIN"

    def check(self) -> None:
        """Fail early (``ConfigError``) if the source is unusable, without reading the secret."""
        if self.pin_file is not None:
            check_secret_file(self.pin_file, "pin_file")
        elif self.pin_env is not None and secret_env(self.pin_env) is None:
            raise ConfigError(f"pin_env: the environment variable {self.pin_env} is not set or empty")

    def read(self) -> str | None:
        """The PIN, or None when no source is configured. Never logged, never put into an exception."""
        self.check()
        if self.pin_file is not None:
            data = _read_pin_file(self.pin_file)
            text = data[:-1] if data.endswith("\n") else data
            if text.endswith("\r"):
                text = text[:-1]
            if not text:
                raise ConfigError(f"pin_file {self.pin_file} is empty")
            return text
        if self.pin_env is not None:
            return secret_env(self.pin_env)
        return None


def _read_pin_file(path: Path) -> str:
    raw = read_secret_file(path, "pin_file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"pin_file {path}: not UTF-8") from None


# --- sessions and errors ------------------------------------------------------------------------------------


def session_errors() -> tuple[type[BaseException], ...]:
    """PKCS#11 errors that mean this session (or its login, or a handle from it) is gone: open a fresh one."""
    require_pkcs11()
    return (
        p11exc.SessionHandleInvalid,
        p11exc.SessionClosed,
        p11exc.UserNotLoggedIn,
        p11exc.ObjectHandleInvalid,
        p11exc.KeyHandleInvalid,
        p11exc.OperationActive,
    )


def reconnectable_errors() -> tuple[type[BaseException], ...]:
    """PKCS#11 errors after which a fresh session, or else a re-initialised module, may succeed.

    Besides ``session_errors()``, these are what a module answers when its device went away (and maybe came
    back): tpm2-pkcs11 says ``CKR_GENERAL_ERROR`` for every signature once its TPM connection broke, and only
    ``C_Finalize``/``C_Initialize`` cures it. A module that is not initialised (python-pkcs11 raises the bare
    ``PKCS11Error`` for ``CKR_CRYPTOKI_NOT_INITIALIZED``) is caught by ``is_reconnectable``.
    """
    require_pkcs11()
    return (
        *session_errors(),
        p11exc.DeviceRemoved,
        p11exc.TokenNotPresent,
        p11exc.TokenNotRecognised,
        p11exc.DeviceError,
        p11exc.DeviceMemory,
        p11exc.GeneralError,
        p11exc.FunctionFailed,
        p11exc.SlotIDInvalid,
    )


def is_reconnectable(exc: BaseException) -> bool:
    """True for errors in ``reconnectable_errors()`` and for ``CKR_CRYPTOKI_NOT_INITIALIZED``."""
    if isinstance(exc, reconnectable_errors()):
        return True
    return type(exc) is p11exc.PKCS11Error and "not initialized" in str(exc)


def device_answers(session: Any) -> bool:
    """Whether a neutral call on ``session`` (``C_GenerateRandom`` of 16 bytes) works.

    Used before blaming the device for a ``CKR_GENERAL_ERROR``: SoftHSM2 answers that for a raw RSA input that is
    not below the modulus, so a request alone could otherwise make the agent re-initialise the module and
    declare the token unavailable (a hostile service could send such a ciphertext as a recovery share). A token
    that cannot say (no random number generator) counts as answering: a refused request is then reported as
    such, and the token stays in service.
    """
    try:
        session.generate_random(128)
    except p11exc.PKCS11Error as exc:
        return not is_reconnectable(exc)
    return True


def refused_by_a_working_device(session: Any, exc: BaseException) -> bool:
    """True when ``exc`` is a device-level error (not a lost session) but the device still answers: the request
    was refused, and reconnecting would not help."""
    return is_reconnectable(exc) and not isinstance(exc, session_errors()) and device_answers(session)


def describe_error(exc: BaseException) -> str:
    """A short name for a PKCS#11 error (``CKR_PIN_INCORRECT``-like class name), never any secret."""
    name = type(exc).__name__
    detail = str(exc).strip()
    # python-pkcs11 messages are fixed documentation strings, never caller data; keep them short.
    return f"{name} ({detail.splitlines()[0][:120]})" if detail else name


DECRYPTION_FAILED = "RSA-OAEP decryption failed"
"""The one message for every decryption failure (padding-oracle hygiene: nothing about where it failed)."""


class TokenLostError(BackendUnavailableError):
    """A PKCS#11 error after which a fresh session, or a re-initialised module, may succeed (``is_reconnectable``).

    ``map_pkcs11_errors`` raises it so that the token connection reconnects and tries again (``pkcs11``'s
    ``_TokenConnection``); ``reason`` names the PKCS#11 error. Should one ever reach a caller, it is what it says: the
    token is unavailable (503, retryable)."""

    def __init__(self, where: str, exc: BaseException) -> None:
        self.reason = describe_error(exc)
        super().__init__(f"{where}: the token failed: {self.reason}")


def pin_errors() -> tuple[type[BaseException], ...]:
    """PKCS#11 errors that are the token's refusal of a PIN: never retried, since repeated failures lock a token."""
    require_pkcs11()
    return (p11exc.PinIncorrect, p11exc.PinInvalid, p11exc.PinLenRange, p11exc.PinExpired, p11exc.PinLocked)


def pin_rejected(
    exc: BaseException, where: str, *, named: str = "the token", source: str | None = None
) -> PinRejectedError:
    """The ``PinRejectedError`` for a PIN error (``pin_errors``) of the token ``named`` (as messages name it), the PIN
    read from ``source``."""
    if isinstance(exc, p11exc.PinLocked):
        return PinRejectedError(f"{where}: the user PIN of {named} is locked", hint="unlock it with the SO PIN")
    from_source = f" from {source}" if source is not None else ""
    return PinRejectedError(
        f"{where}: {named} rejected the PIN{from_source} ({type(exc).__name__})",
        hint="fix the PIN source; the agent does not retry: repeated failures can lock the token",
    )


@contextlib.contextmanager
def map_pkcs11_errors(
    where: str,
    *,
    session: Any = None,
    unsupported: Callable[[BaseException], UnsupportedOperationError] | None = None,
    failed: Callable[[BaseException], BackendError] | None = None,
    mechanism_param: bool = False,
) -> Iterator[None]:
    """python-pkcs11's exceptions raised inside, as the agent's (in the style of httpx's ``map_httpcore_exceptions``):
    the one table for the PKCS#11 calls the backend makes on a token's worker thread. No vendor exception leaves it.

    ==========================================================  ====================================================
    PKCS#11 error                                               becomes
    ==========================================================  ====================================================
    a lost session, token or device (``is_reconnectable``:      ``TokenLostError``: the token connection opens a
    SessionHandleInvalid, SessionClosed, UserNotLoggedIn,       fresh session, then re-initialises the module, then
    KeyHandleInvalid, TokenNotPresent, TokenNotRecognised,      reports the retryable ``BackendUnavailableError``.
    DeviceRemoved, DeviceError, GeneralError, not initialised)  With ``session`` (a key operation), a device-level
                                                                error of a device that still answers
                                                                ``C_GenerateRandom`` was the request's own: the rows
                                                                below decide (``refused_by_a_working_device``)
    PinIncorrect, PinInvalid, PinLenRange, PinExpired,          ``PinRejectedError`` (``pin_rejected``)
    PinLocked
    NoSuchKey                                                   ``KeyNotFoundError``
    MechanismInvalid, MechanismParamInvalid,                    ``unsupported(exc)``: what the token lacks (by
    FunctionNotSupported; ArgumentsBad too when the call        default ``UnsupportedOperationError``)
    passes mechanism parameters (``mechanism_param``)
    EncryptedDataInvalid, EncryptedDataLenRange                 ``BackendError(DECRYPTION_FAILED)``: one uniform
                                                                error, nothing about the data (padding oracles)
    any other                                                   ``failed(exc)``: the operation's own error (by
                                                                default ``BackendError("the token failed")``)
    ==========================================================  ====================================================
    """
    require_pkcs11()
    try:
        yield
    except p11exc.PKCS11Error as exc:
        if is_reconnectable(exc) and not (session is not None and refused_by_a_working_device(session, exc)):
            raise TokenLostError(where, exc) from None
        raise _mapped(exc, where, unsupported, failed, mechanism_param) from None


def _mapped(
    exc: BaseException,
    where: str,
    unsupported: Callable[[BaseException], UnsupportedOperationError] | None,
    failed: Callable[[BaseException], BackendError] | None,
    mechanism_param: bool,
) -> AgentError:
    """The table's rows after the first (``map_pkcs11_errors``)."""
    lacking = (p11exc.MechanismInvalid, p11exc.MechanismParamInvalid, p11exc.FunctionNotSupported)
    if isinstance(exc, pin_errors()):
        return pin_rejected(exc, where)
    if isinstance(exc, p11exc.NoSuchKey):
        return KeyNotFoundError(f"{where}: the token has no such key ({describe_error(exc)})")
    if isinstance(exc, lacking) or (mechanism_param and isinstance(exc, p11exc.ArgumentsBad)):
        if unsupported is not None:
            return unsupported(exc)
        return UnsupportedOperationError(f"{where}: the token cannot do this: {describe_error(exc)}")
    if isinstance(exc, p11exc.EncryptedDataInvalid | p11exc.EncryptedDataLenRange):
        return BackendError(DECRYPTION_FAILED)
    if failed is not None:
        return failed(exc)
    return BackendError(f"{where}: the token failed: {describe_error(exc)}")


def _text(value: object) -> str:
    raw = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return raw.strip().strip("\0").strip()


MAX_SHOWN_LABEL = 64
"""At most this many characters of a label a token shows go into a message: the token's objects are not ours."""


def object_label(obj: Any) -> str:
    """An object's ``CKA_LABEL`` as text, whatever bytes it holds.

    python-pkcs11 decodes labels as strict UTF-8; a label that is not (anyone who can open a session can create a
    public object, without the PIN) would otherwise end a key search or ``keys list`` with a ``UnicodeDecodeError``.
    Such a label comes back with its bytes escaped (``\\xff``): shown for what it is, and never equal to a label
    a configuration names, which is UTF-8.
    """
    try:
        return str(obj[pkcs11.Attribute.LABEL] or "")
    except UnicodeDecodeError as exc:
        return bytes(exc.object).decode("utf-8", "backslashreplace")


def shown_label(label: str) -> str:
    """``label`` for a message: quoted, escaped, and cut at ``MAX_SHOWN_LABEL`` characters."""
    if len(label) <= MAX_SHOWN_LABEL:
        return repr(label)
    return f"{label[:MAX_SHOWN_LABEL]!r}... ({len(label)} characters)"


def shown_id(key_id: bytes) -> str:
    """A ``CKA_ID`` for a message: hex, cut at ``MAX_SHOWN_LABEL`` digits (``-`` when empty)."""
    text = key_id.hex() or "-"
    return text if len(text) <= MAX_SHOWN_LABEL else f"{text[:MAX_SHOWN_LABEL]}... ({len(key_id)} bytes)"


def _initialised(token: Any) -> bool:
    return bool(token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED)


def describe_tokens(lib: Any, *, limit: int = 12) -> str:
    """What the module shows: ``'agent-a' (serial 3a9c, slot 1868504089), ...``, for error messages."""
    shown = []
    try:
        slots = lib.get_slots(token_present=True)
    except p11exc.PKCS11Error as exc:
        return f"the module cannot list its slots ({describe_error(exc)})"
    for slot in slots:
        try:
            token = slot.get_token()
        except p11exc.PKCS11Error:  # pragma: no cover -- a slot that went away between the two calls
            continue
        if _initialised(token):
            shown.append(f"{token.label!r} (serial {_text(token.serial) or '-'}, slot {slot.slot_id})")
        else:
            shown.append(f"an uninitialised token (slot {slot.slot_id})")
    if not shown:
        return "the module shows no token"
    more = f", and {len(shown) - limit} more" if len(shown) > limit else ""
    return "the module shows " + ", ".join(shown[:limit]) + more


@dataclass(frozen=True, slots=True)
class TokenMatch:
    """What else a token must show to be the one, besides its label: the ``serial``, ``manufacturer``, ``model`` and
    ``slot-id`` of a key's RFC 7512 URI. Each one given restricts the match; none is ignored, so a look-alike token
    with the same label (plugged in while the real one is away) never gets the PIN when the URI names the serial."""

    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None

    def matches(self, slot: Any, token: Any) -> bool:
        shown = {"serial": _text(token.serial), "manufacturer": _text(token.manufacturer_id),
                 "model": _text(token.model)}  # fmt: skip
        wanted = {"serial": self.serial, "manufacturer": self.manufacturer, "model": self.model}
        if any(value is not None and shown[name] != value for name, value in wanted.items()):
            return False
        return self.slot_id is None or slot.slot_id == self.slot_id

    def describe(self) -> str:
        """`` with serial '3a9c'`` and the like, for messages; empty when nothing is asked."""
        parts = [f"{name} {value!r}" for name, value in (("serial", self.serial), ("manufacturer", self.manufacturer),
                 ("model", self.model), ("slot-id", self.slot_id)) if value is not None]  # fmt: skip
        return f" with {', '.join(parts)}" if parts else ""


def find_token(lib: Any, token_label: str | None, *, where: str, match: TokenMatch | None = None) -> Any:
    """The token with this label (or the only initialised one when no label is given) that shows what ``match``
    asks for.

    None found is ``BackendUnavailableError`` (a removable token may come back), and its message lists the
    tokens the module does show (label, serial, slot), so a typo or the wrong module is plain to see.
    """
    match = match or TokenMatch()
    tokens = []
    for slot in lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except p11exc.PKCS11Error:  # pragma: no cover -- a slot that went away between the two calls
            continue
        labelled = (token.label == token_label) if token_label is not None else _initialised(token)
        if labelled and match.matches(slot, token):
            tokens.append(token)
    if not tokens:
        what = f"no token labelled {token_label!r}" if token_label is not None else "no initialised token"
        what += match.describe()
        raise BackendUnavailableError(
            f"{where}: {what} in {lib.so}; {describe_tokens(lib)}",
            hint="check token_label (tokens are found by label, because slot ids change), that the token is "
            "plugged in or its device reachable, and that this is the module that serves it",
        )
    if len(tokens) > 1:
        raise ConfigError(
            f"{where}: {len(tokens)} tokens match in {lib.so}",
            hint="set token_label: " + ", ".join(repr(t.label) for t in tokens),
        )
    return tokens[0]


def open_session(token: Any, pin_source: PinSource, *, rw: bool, where: str) -> Any:
    """Open a session and log in with the PIN from ``pin_source``.

    Login state is per application: when another session of this process is already logged in to the token,
    the new session shares that login (``UserAlreadyLoggedIn`` is not an error). A PIN the token refuses
    (CKR_PIN_INCORRECT, CKR_PIN_INVALID, CKR_PIN_LEN_RANGE, CKR_PIN_EXPIRED, CKR_PIN_LOCKED) is a
    ``PinRejectedError`` whose message names the PIN source, never the PIN.
    """
    pin = pin_source.read()
    try:
        if pin is None:
            return token.open(rw=rw)
        try:
            return token.open(rw=rw, user_pin=pin)
        except p11exc.UserAlreadyLoggedIn:
            return token.open(rw=rw)
    except pin_errors() as exc:
        raise pin_rejected(exc, where, named=f"token {token.label!r}", source=pin_source.describe()) from None
    finally:
        del pin


def close_session(session: Any) -> None:
    """Close a session, ignoring errors: it is being dropped because it is broken or no longer needed.

    python-pkcs11 calls ``C_Logout`` first when this session performed the login; login state is per
    application, so that ends the login of every session of this process on the token, which then log in again
    when they next fail.
    """
    with contextlib.suppress(p11exc.PKCS11Error):
        session.close()
