"""Loading PKCS#11 modules safely: path checks, a thread-safe ``C_Initialize``, PIN sources, sessions.

Owns everything the PKCS#11 backend (``pkcs11.py``) and the key tooling (``pkcs11_admin.py``) share below the
level of keys: the ssh-agent style module path check, the ctypes pre-initialisation with ``CKF_OS_LOCKING_OK``
(python-pkcs11 0.10.1 calls ``C_Initialize(NULL)``, which makes SoftHSM2 2.6.1 drop its mutexes and crash
under threads, and cannot pass NSS softoken its init parameters), reading a PIN from a file or an environment
variable, opening a logged-in session, and mapping PKCS#11 errors that mean "the session or the token went
away".

Vendor imports (``pkcs11``) stay in ``signing_agent.backends``; nothing here may be imported outside it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import os
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signing_agent.backends._secrets import check_secret_file, read_secret_file, secret_env
from signing_agent.errors import BackendUnavailableError, ConfigError, PinRejectedError


def _optional_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover -- the extra is installed in every test environment
        return None


# python-pkcs11 is an optional extra; typed as Any because its Cython objects are mostly untyped anyway.
pkcs11: Any = _optional_import("pkcs11")
_pkcs11_native: Any = _optional_import("pkcs11._pkcs11") if pkcs11 is not None else None
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

CKR_OK = 0x0
CKR_ARGUMENTS_BAD = 0x7
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKF_OS_LOCKING_OK = 0x2


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


# --- ctypes pre-initialisation ------------------------------------------------------------------------------


class _InitArgs(ctypes.Structure):
    """``CK_C_INITIALIZE_ARGS``, extended as NSS's ``CK_NSS_C_INITIALIZE_ARGS``.

    NSS reads its ``LibraryParameters`` string where standard PKCS#11 has ``pReserved`` (which p11-kit calls
    ``x-init-reserved``); the trailing pointer is NSS's own ``pReserved``, and other modules never read it.
    """

    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_char_p),
        ("pReservedNSS", ctypes.c_void_p),
    )


_C_Initialize = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.POINTER(_InitArgs))
_C_CloseAllSessions = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)


class _FunctionListPrefix(ctypes.Structure):
    """The first entries of ``CK_FUNCTION_LIST`` (PKCS#11 2.40 order) that we call via ctypes."""

    _fields_ = (
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", _C_Initialize),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "C_Finalize",
                "C_GetInfo",
                "C_GetFunctionList",
                "C_GetSlotList",
                "C_GetSlotInfo",
                "C_GetTokenInfo",
                "C_GetMechanismList",
                "C_GetMechanismInfo",
                "C_InitToken",
                "C_InitPIN",
                "C_SetPIN",
                "C_OpenSession",
                "C_CloseSession",
            )
        ),
        ("C_CloseAllSessions", _C_CloseAllSessions),
    )


@dataclass
class _Module:
    real_path: str
    init_params: str | None
    cdll: ctypes.CDLL
    functions: Any  # ctypes pointer to _FunctionListPrefix
    keepalive: list[Any] = field(default_factory=list)
    lib: Any = None


_modules: dict[str, _Module] = {}
_modules_lock = threading.Lock()


@atexit.register
def _release_modules() -> None:
    """Drop python-pkcs11's module objects while the interpreter is still whole.

    Left to interpreter teardown, their deallocation runs when half of Python is already gone and prints
    "Error in sys.excepthook" on the way out. (Worker threads are joined before atexit handlers run.)
    """
    p11 = sys.modules.get("pkcs11")
    with _modules_lock:
        for mod in _modules.values():
            if p11 is not None:
                p11._loaded.pop(mod.real_path, None)
            mod.lib = None
    gc.collect()


def _preinitialise(real_path: str, init_params: str | None) -> _Module:
    try:
        cdll = ctypes.CDLL(real_path)
    except OSError as exc:
        raise ConfigError(f"PKCS#11 module {real_path}: cannot load it: {exc}") from None
    try:
        get_function_list = cdll.C_GetFunctionList
    except AttributeError:
        raise ConfigError(f"PKCS#11 module {real_path}: no C_GetFunctionList: not a PKCS#11 module") from None
    get_function_list.restype = ctypes.c_ulong
    get_function_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_FunctionListPrefix)),)
    functions = ctypes.POINTER(_FunctionListPrefix)()
    rv = get_function_list(ctypes.byref(functions))
    if rv != CKR_OK:
        raise ConfigError(f"PKCS#11 module {real_path}: C_GetFunctionList failed (CKR 0x{rv:08x})")
    params = ctypes.create_string_buffer(init_params.encode()) if init_params is not None else None
    args = _InitArgs(flags=CKF_OS_LOCKING_OK)
    if params is not None:
        args.pReserved = ctypes.cast(params, ctypes.c_char_p)
    rv = functions.contents.C_Initialize(ctypes.byref(args))
    if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        hint = None
        if rv == CKR_ARGUMENTS_BAD and init_params is None:
            hint = (
                "this module needs init_params (NSS softoken: "
                "\"configdir='sql:/path/to/db' certPrefix='' keyPrefix='' secmod='secmod.db' flags=\")"
            )
        raise ConfigError(f"PKCS#11 module {real_path}: C_Initialize failed (CKR 0x{rv:08x})", hint=hint)
    # The module may keep pointers into the arguments; keep them alive as long as the process.
    return _Module(real_path, init_params, cdll, functions, keepalive=[params, args])


def load_module(path: str | os.PathLike[str], init_params: str | None = None, *, check: bool = True,
                allowed_dirs: Sequence[str] | None = DEFAULT_MODULE_DIRS) -> Any:  # fmt: skip
    """The python-pkcs11 ``lib`` for a module, initialised once per process with ``CKF_OS_LOCKING_OK``.

    Safe to call again for the same module (same init parameters); a different ``init_params`` for an already
    initialised module is a ``ConfigError``, because a module is initialised once per process.
    """
    p11 = require_pkcs11()
    real = check_module_path(path, allowed_dirs=allowed_dirs) if check else os.path.realpath(path)
    with _modules_lock:
        mod = _modules.get(real)
        if mod is None:
            mod = _preinitialise(real, init_params)
            _modules[real] = mod
        elif mod.init_params != init_params:
            raise ConfigError(
                f"PKCS#11 module {real} is already initialised with other init_params in this process",
                hint="every key on one module must use the same init_params",
            )
        if mod.lib is None:
            existing = p11._loaded.get(real)
            if existing is not None and not isinstance(existing, PreInitialisedLib):  # pragma: no cover
                raise ConfigError(f"PKCS#11 module {real} was loaded by other code without thread-safe locking")
            if existing is None:
                try:
                    existing = PreInitialisedLib(real)
                except p11exc.PKCS11Error as exc:
                    raise ConfigError(f"PKCS#11 module {real}: {describe_error(exc)}") from None
                # Anyone calling pkcs11.lib(path) later gets this instance instead of a C_Initialize(NULL).
                p11._loaded[real] = existing
            mod.lib = existing
        return mod.lib


if _pkcs11_native is not None:

    class PreInitialisedLib(_pkcs11_native.lib):  # type: ignore[misc]  # subclassing Any (a Cython class)
        """A python-pkcs11 ``lib`` whose module ctypes already initialised (thread-safe locking)."""

        def initialize(self) -> None:
            """Do nothing: ``_preinitialise`` called ``C_Initialize`` with ``CKF_OS_LOCKING_OK`` already."""

else:  # pragma: no cover -- the extra is installed in every test environment
    PreInitialisedLib = None  # type: ignore[misc,assignment]  # only without the extra


def close_all_sessions(path: str | os.PathLike[str], slot_id: int) -> None:
    """``C_CloseAllSessions`` on a slot of a loaded module. It also ends the login (tests, resets)."""
    real = os.path.realpath(path)
    mod = _modules.get(real)
    if mod is None:
        raise ConfigError(f"PKCS#11 module {real} is not loaded")
    rv = mod.functions.contents.C_CloseAllSessions(slot_id)
    if rv != CKR_OK:
        raise BackendUnavailableError(f"C_CloseAllSessions on slot {slot_id} failed (CKR 0x{rv:08x})")


# --- PINs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PinSource:
    """Where a token PIN comes from. Holds no secret itself; ``read()`` fetches it each time it is needed.

    A ``pin_env`` variable leaves the environment at its first use (``secret_env``): no child process inherits it.
    """

    pin_file: Path | None = None
    pin_env: str | None = None

    def describe(self) -> str:
        if self.pin_file is not None:
            return f"pin_file {self.pin_file}"
        if self.pin_env is not None:
            return f"pin_env ${self.pin_env}"
        return "no PIN"

    def check(self) -> None:
        """Fail early (``ConfigError``) if the source is unusable, without reading the secret."""
        if self.pin_file is not None and self.pin_env is not None:
            raise ConfigError("give pin_file or pin_env, not both")
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


def reconnectable_errors() -> tuple[type[BaseException], ...]:
    """PKCS#11 errors after which a fresh session (and login) may succeed."""
    require_pkcs11()
    return (
        p11exc.SessionHandleInvalid,
        p11exc.SessionClosed,
        p11exc.DeviceRemoved,
        p11exc.TokenNotPresent,
        p11exc.TokenNotRecognised,
        p11exc.DeviceError,
        p11exc.UserNotLoggedIn,
        p11exc.ObjectHandleInvalid,
        p11exc.KeyHandleInvalid,
        p11exc.SlotIDInvalid,
    )


def describe_error(exc: BaseException) -> str:
    """A short name for a PKCS#11 error (``CKR_PIN_INCORRECT``-like class name), never any secret."""
    name = type(exc).__name__
    detail = str(exc).strip()
    # python-pkcs11 messages are fixed documentation strings, never caller data; keep them short.
    return f"{name} ({detail.splitlines()[0][:120]})" if detail else name


def find_token(lib: Any, token_label: str | None, *, where: str) -> Any:
    """The token with this label (or the only initialised one when no label is given)."""
    tokens = []
    for slot in lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except p11exc.PKCS11Error:  # pragma: no cover -- a slot that went away between the two calls
            continue
        if token_label is None or token.label == token_label:
            tokens.append(token)
    if token_label is not None and not tokens:
        raise BackendUnavailableError(
            f"{where}: no token labelled {token_label!r} in {lib.so}",
            hint="check token_label (tokens are found by label: slot ids change) and that the token is in",
        )
    if not tokens:
        raise BackendUnavailableError(f"{where}: no token present in {lib.so}")
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
    except (p11exc.PinIncorrect, p11exc.PinInvalid, p11exc.PinLenRange, p11exc.PinExpired) as exc:
        raise PinRejectedError(
            f"{where}: token {token.label!r} rejected the PIN from {pin_source.describe()} ({type(exc).__name__})",
            hint="fix the PIN source; the agent does not retry: repeated failures can lock the token",
        ) from None
    except p11exc.PinLocked:
        raise PinRejectedError(
            f"{where}: the user PIN of token {token.label!r} is locked", hint="unlock it with the SO PIN"
        ) from None
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
