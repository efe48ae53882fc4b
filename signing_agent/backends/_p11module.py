"""A PKCS#11 module in this process: initialised thread-safely on the function list python-pkcs11 uses.

python-pkcs11 0.10 calls ``C_Initialize(NULL)``: SoftHSM2 2.6.1 then drops its mutexes and crashes under threads,
and NSS softoken gets no init parameters. So the agent initialises every module itself, with
``CKF_OS_LOCKING_OK`` (and NSS-style parameters in ``pReserved``). It must do so on **the very function list that
python-pkcs11 then calls through**: a PKCS#11 module may hand out a new list, with state of its own, from every
``C_GetFunctionList`` call. p11-kit's proxy (``p11-kit-proxy.so``) does exactly that, so initialising a list
from a ctypes call of our own left python-pkcs11's list uninitialised ("Initialisation error (not
initialized)"). SoftHSM2, NSS and tpm2-pkcs11 return one static list, where either way works.

How: ``_Lib`` subclasses python-pkcs11's ``lib`` and overrides ``initialize()``, which python-pkcs11's constructor
calls right after its own ``C_GetFunctionList``. The override reads that list's address from the Cython object
(python-pkcs11 keeps it in a C field with no Python accessor), checks the object layout before trusting it (the
fields around it must be exactly what python-pkcs11 0.10 puts there, or loading fails closed with a
``ConfigError``), and calls ``C_Initialize`` through it with ctypes. (python-pkcs11 also asks a PKCS#11 3.x module
for 3.x interfaces; those may be separate lists again, but the agent calls none of their functions.)

A module can be finalised and initialised again (``LoadedModule.reinitialise``): tpm2-pkcs11 answers
``CKR_GENERAL_ERROR`` for good once its TPM connection broke, until that happens. Every call into a module
holds its shared lock and re-initialisation holds it exclusively, so it never runs under another thread's
call; ``generation`` tells sessions opened before it that their handles are gone (they are forgotten, never
closed: a new session may have the same handle).

Vendor imports (``pkcs11``) stay in ``signing_agent.backends``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib.metadata
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from signing_agent.backends._p11session import (
    DEFAULT_MODULE_DIRS,
    check_module_path,
    p11exc,
    require_pkcs11,
)
from signing_agent.errors import BackendUnavailableError, ConfigError

_pkcs11_native: Any
try:
    _pkcs11_native = importlib.import_module("pkcs11._pkcs11")
except ImportError:  # pragma: no cover -- the extra is installed in every test environment
    _pkcs11_native = None

CKR_OK = 0x0
CKR_ARGUMENTS_BAD = 0x7
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKF_OS_LOCKING_OK = 0x2

CKR_NAMES = {
    0x0: "CKR_OK",
    0x1: "CKR_CANCEL",
    0x2: "CKR_HOST_MEMORY",
    0x3: "CKR_SLOT_ID_INVALID",
    0x5: "CKR_GENERAL_ERROR",
    0x6: "CKR_FUNCTION_FAILED",
    0x7: "CKR_ARGUMENTS_BAD",
    0x30: "CKR_DEVICE_ERROR",
    0x31: "CKR_DEVICE_MEMORY",
    0x32: "CKR_DEVICE_REMOVED",
    0xB3: "CKR_SESSION_HANDLE_INVALID",
    0xE0: "CKR_TOKEN_NOT_PRESENT",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    0x1A0: "CKR_MUTEX_BAD",
}


def ckr_name(rv: int) -> str:
    """``CKR_GENERAL_ERROR (0x00000005)``: a return value as people search for it."""
    return f"{CKR_NAMES.get(rv, 'CKR')} (0x{rv:08x})"


# --- ctypes view of the module ------------------------------------------------------------------------------


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
_C_Finalize = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)
_C_CloseAllSessions = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)


class _FunctionListPrefix(ctypes.Structure):
    """The first entries of ``CK_FUNCTION_LIST`` (PKCS#11 2.40 order) that we call via ctypes."""

    _fields_ = (
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", _C_Initialize),
        ("C_Finalize", _C_Finalize),
        *(
            (name, ctypes.c_void_p)
            for name in (
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


def _function_list_of(lib: Any) -> Any:
    """The ``CK_FUNCTION_LIST*`` python-pkcs11 got from its own ``C_GetFunctionList``, as a ctypes pointer.

    python-pkcs11 0.10's ``lib`` object is ``PyObject_HEAD`` followed by ``funclist, funclist30, funclist32``
    (``HasFuncList``), the Cython vtable, then ``so``, ``manufacturer_id``, ``library_description``. This runs
    inside its constructor, between ``self.so = so`` and the first call through the list, when the 3.x lists are
    still NULL and the two strings still None: that fingerprint must match exactly, or we refuse to guess.
    """
    word = ctypes.sizeof(ctypes.c_void_p)
    start = object.__basicsize__  # PyObject_HEAD
    if type(lib).__basicsize__ < start + 7 * word:
        raise _layout_error()
    words = [ctypes.c_void_p.from_address(id(lib) + start + i * word).value or 0 for i in range(7)]
    funclist, list30, list32, vtable, so, manufacturer, description = words
    if not (
        funclist
        and vtable
        and list30 == 0
        and list32 == 0
        and so == id(lib.so)
        and manufacturer == id(None)
        and description == id(None)
    ):
        raise _layout_error()
    functions = ctypes.cast(ctypes.c_void_p(funclist), ctypes.POINTER(_FunctionListPrefix))
    if functions.contents.major not in (2, 3):
        raise _layout_error()
    return functions


def _layout_error() -> ConfigError:
    try:
        version = importlib.metadata.version("python-pkcs11")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover -- installed in every test environment
        version = "?"
    return ConfigError(
        f"python-pkcs11 {version} keeps its PKCS#11 function list where this agent does not expect it, so the "
        "module cannot be initialised thread-safely",
        hint="install python-pkcs11 0.10.x, the version this agent is built and tested against",
    )


# --- readers-writer lock ------------------------------------------------------------------------------------


class SharedLock:
    """Many holders of ``shared()`` at once, or one of ``exclusive()``; a waiting writer stops new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --- the loaded module --------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedModule:
    """One PKCS#11 module in this process, initialised by us on python-pkcs11's function list."""

    path: str
    """The path as configured (for messages and module-specific hints)."""
    real_path: str
    init_params: str | None
    lib: Any = None
    functions: Any = None
    initialised: bool = False
    owned: bool = False
    """Our ``C_Initialize`` is the one that took (not ``CKR_CRYPTOKI_ALREADY_INITIALIZED``): ours to finalise."""
    generation: int = 0
    """Bumped by every successful re-initialisation: sessions and handles of older generations are gone."""
    lock: SharedLock = field(default_factory=SharedLock)
    _args: Any = None
    _params: Any = None

    def _initialize(self, functions: Any) -> int:
        """``C_Initialize`` with ``CKF_OS_LOCKING_OK`` (and ``init_params``) on ``functions``; the return value."""
        if self._args is None:
            # The module may keep pointers into the arguments: they live as long as this object (the process).
            self._params = ctypes.create_string_buffer(self.init_params.encode()) if self.init_params else None
            self._args = _InitArgs(flags=CKF_OS_LOCKING_OK)
            if self._params is not None:
                self._args.pReserved = ctypes.cast(self._params, ctypes.c_char_p)
        rv: int = functions.contents.C_Initialize(ctypes.byref(self._args))
        return rv

    def attach(self, lib: Any) -> None:
        """Initialise python-pkcs11's own function list (called from ``_Lib.initialize``); ``ConfigError`` if
        the module refuses."""
        functions = _function_list_of(lib)
        rv = self._initialize(functions)
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise ConfigError(
                f"PKCS#11 module {self.real_path}: C_Initialize failed: {ckr_name(rv)}",
                hint=init_failure_hint(self.path, self.real_path, self.init_params, rv),
            )
        self.functions = functions
        self.initialised = True
        self.owned = rv == CKR_OK

    @contextlib.contextmanager
    def use(self, where: str) -> Iterator[int]:
        """Hold the module for PKCS#11 calls; yields the current ``generation``."""
        with self.lock.shared():
            if not self.initialised:
                raise BackendUnavailableError(
                    f"{where}: PKCS#11 module {self.real_path} is not initialised (its last re-initialisation failed)",
                    hint=init_failure_hint(self.path, self.real_path, self.init_params, None),
                )
            yield self.generation

    def reinitialise(self, seen_generation: int, *, where: str) -> None:
        """``C_Finalize`` and ``C_Initialize`` again, unless someone already did since ``seen_generation``.

        Every session of every token on the module ends; their owners notice through ``generation``. Raises
        ``BackendUnavailableError`` when the module does not initialise (the next attempt tries again). A module
        that other code in this process initialised first (p11-kit, which loads the modules it proxies into this
        process too) is not ours to finalise under it: then this does nothing.
        """
        with self.lock.exclusive():
            if self.generation != seen_generation and self.initialised:
                return
            if self.initialised:
                if not self.owned:
                    return
                self.functions.contents.C_Finalize(None)
                self.initialised = False
            rv = self._initialize(self.functions)
            if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise BackendUnavailableError(
                    f"{where}: PKCS#11 module {self.real_path} did not initialise again: {ckr_name(rv)}",
                    hint=init_failure_hint(self.path, self.real_path, self.init_params, rv),
                )
            self.initialised, self.owned = True, rv == CKR_OK
            self.generation += 1

    def close_all_sessions(self, slot_id: int) -> None:
        """``C_CloseAllSessions`` on a slot. It also ends the login (tests, resets)."""
        with self.lock.shared():
            rv = self.functions.contents.C_CloseAllSessions(slot_id)
        if rv != CKR_OK:
            raise BackendUnavailableError(f"C_CloseAllSessions on slot {slot_id} failed: {ckr_name(rv)}")


_modules: dict[str, LoadedModule] = {}
_modules_lock = threading.Lock()
_attaching: dict[str, LoadedModule] = {}
"""The module whose python-pkcs11 ``lib`` is being constructed (under ``_modules_lock``), by path."""


if _pkcs11_native is not None:

    class _Lib(_pkcs11_native.lib):  # type: ignore[misc]  # subclassing Any (a Cython class)
        """python-pkcs11's ``lib``, initialised by ``LoadedModule.attach`` instead of ``C_Initialize(NULL)``."""

        def initialize(self) -> None:
            """Initialise python-pkcs11's function list thread-safely; a no-op when called again.

            python-pkcs11's constructor calls this after ``self.so = so`` and before any other call.
            ``pkcs11.lib(path)`` calls it again for a loaded module (its read-only ``initialized`` flag stays
            False, because the base class never ran): the module is initialised already, or on purpose not.
            """
            mod = _attaching.get(self.so)
            if mod is not None and mod.lib is None:
                mod.attach(self)

else:  # pragma: no cover -- the extra is installed in every test environment
    _Lib = None  # type: ignore[misc,assignment]  # only without the extra


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


def open_module(path: str | os.PathLike[str], init_params: str | None = None, *, check: bool = True,
                allowed_dirs: Sequence[str] | None = DEFAULT_MODULE_DIRS) -> LoadedModule:  # fmt: skip
    """The module at ``path``, loaded and initialised once per process with ``CKF_OS_LOCKING_OK``.

    Safe to call again for the same module (same init parameters); a different ``init_params`` for an already
    initialised module is a ``ConfigError``, because a module is initialised once per process.
    """
    p11 = require_pkcs11()
    real = check_module_path(path, allowed_dirs=allowed_dirs) if check else os.path.realpath(path)
    with _modules_lock:
        mod = _modules.get(real)
        if mod is not None:
            if mod.init_params != init_params:
                raise ConfigError(
                    f"PKCS#11 module {real} is already initialised with other init_params in this process",
                    hint="every key on one module must use the same init_params",
                )
            if mod.lib is not None:
                return mod
        existing = p11._loaded.get(real)
        if existing is not None and not isinstance(existing, _Lib):  # pragma: no cover
            raise ConfigError(f"PKCS#11 module {real} was loaded by other code without thread-safe locking")
        mod = LoadedModule(str(path), real, init_params)
        _attaching[real] = mod
        try:
            lib = _Lib(real)
        except p11exc.PKCS11Error as exc:
            raise ConfigError(f"PKCS#11 module {real}: {_load_failure(exc)}",
                              hint=init_failure_hint(str(path), real, init_params, None)) from None  # fmt: skip
        finally:
            del _attaching[real]
        if mod.functions is None:  # pragma: no cover -- python-pkcs11 always calls initialize()
            raise _layout_error()
        mod.lib = lib
        _modules[real] = mod
        # Anyone calling pkcs11.lib(path) later gets this instance instead of a C_Initialize(NULL).
        p11._loaded[real] = lib
        return mod


def _load_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "while loading" in text:
        return f"cannot load it: {text}"
    return f"{type(exc).__name__}: {text[:200]}"


def loaded(path: str | os.PathLike[str]) -> LoadedModule | None:
    """The module at ``path`` if this process loaded it."""
    return _modules.get(os.path.realpath(path))


# --- what usually went wrong --------------------------------------------------------------------------------


def module_family(path: str, real_path: str) -> str | None:
    """``softhsm``, ``nss``, ``tpm2``, ``p11-kit`` or None: which well-known module this is, by file name."""
    names = (os.path.basename(path), os.path.basename(real_path))
    for family, marker in (("softhsm", "softhsm"), ("nss", "softokn"), ("tpm2", "tpm2_pkcs11"), ("p11-kit", "p11-kit")):
        if any(marker in n for n in names):
            return family
    return None


def init_failure_hint(path: str, real_path: str, init_params: str | None, rv: int | None) -> str:
    """The usual causes when a module does not initialise, for the modules people use."""
    family = module_family(path, real_path)
    env = os.environ.get
    match family:
        case "softhsm":
            conf = env("SOFTHSM2_CONF")
            if conf is None:
                where = "SOFTHSM2_CONF is not set, so it reads /etc/softhsm/softhsm2.conf"
            elif not os.path.isfile(conf):
                where = f"SOFTHSM2_CONF={conf}, which does not exist"
            else:
                where = f"SOFTHSM2_CONF={conf}"
            return (
                f"SoftHSM2 reads its configuration from SOFTHSM2_CONF ({where}): it must be set in the agent's "
                "own environment (systemd: Environment=), readable by the agent's user, and its "
                "directories.tokendir must exist and be writable by that user"
            )
        case "nss":
            if init_params is None:
                return (
                    "NSS softoken needs init_params naming its database, e.g. "
                    "\"configdir='sql:/path/to/db' certPrefix='' keyPrefix='' secmod='secmod.db' flags=\""
                )
            return (
                "check init_params: configdir must name an NSS database (cert9.db and key4.db, made with "
                "`certutil -N -d sql:DIR`) that the agent's user can read and write"
            )
        case "tpm2":
            return (
                "tpm2-pkcs11 could not reach the TPM or its store: check TPM2_PKCS11_TCTI (now "
                f"{env('TPM2_PKCS11_TCTI') or 'unset: the default TCTI'}; e.g. device:/dev/tpmrm0 or "
                "tabrmd:) and TPM2_PKCS11_STORE (now "
                f"{env('TPM2_PKCS11_STORE') or 'unset: ~/.tpm2_pkcs11 or /etc/tpm2_pkcs11'}), and that the "
                "agent's user may open the TPM device; the module writes its own reasons to stderr"
            )
        case "p11-kit":
            return (
                "p11-kit's proxy loads the modules registered in /etc/pkcs11/modules and "
                "/usr/share/p11-kit/modules (and in ~/.config/pkcs11/modules, except for root); run "
                "`p11-kit list-modules` as the agent's user to see which one fails"
            )
    if rv == CKR_ARGUMENTS_BAD and init_params is None:
        return "this module may need init_params (its documentation says which)"
    return "the module writes its own reasons to stderr or its log; check its documentation for its environment"
