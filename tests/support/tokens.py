"""Throwaway PKCS#11 tokens for tests: SoftHSM2 tokens and an NSS softoken database, in temporary folders.

Import the fixtures into a conftest (``from tests.support.tokens import softhsm, nss_token, p11_token  # noqa:
F401``) or use the plain functions. Nothing here touches the system token folders: SoftHSM2 gets its own
``SOFTHSM2_CONF`` (set in ``os.environ`` before the module is first loaded, because SoftHSM reads it once, at
``C_Initialize``), and NSS gets its own ``sql:`` database whose path is passed as init parameters.

Fixtures (all session-scoped; a missing tool or module calls ``prereq.missing``, which skips locally and fails
in CI):

- ``softhsm`` -> ``SoftHSMSetup``: one ``SOFTHSM2_CONF`` with tokens ``agent-a``, ``agent-b`` and
  ``agent-pin`` (the last one for wrong-PIN tests), each a ``TokenInfo``.
- ``nss_token`` -> ``TokenInfo`` for the NSS DB's "NSS Certificate DB" token.
- ``p11_token`` -> ``TokenInfo``, parametrised over ``softhsm`` (token ``agent-a``) and ``nss``.

Helpers: ``TokenInfo.key_config(...)`` builds a ``PKCS11KeyConfig``; ``generate_ec``, ``import_member``,
``generate_rsa``, ``import_rsa`` put keys into a token with unique labels; ``close_all_sessions`` simulates a
lost session behind the backend's back.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.config import PKCS11KeyConfig
from tests.support import prereq

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
NSS_MODULE = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"
NSS_TOKEN_LABEL = "NSS Certificate DB"
USER_PIN = "1234"
SO_PIN = "5678"
SOFTHSM_LABELS = ("agent-a", "agent-b", "agent-pin")


@dataclass(frozen=True)
class TokenInfo:
    """Everything a test (or a daemon subprocess) needs to reach one token."""

    kind: Literal["softhsm", "nss"]
    module: Path
    token_label: str
    pin: str
    pin_file: Path
    init_params: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables a subprocess needs (SoftHSM: ``SOFTHSM2_CONF``)."""

    def key_config(self, key_label: str | None = None, key_id: bytes | None = None, **kw: Any) -> PKCS11KeyConfig:
        """A ``PKCS11KeyConfig`` for a key in this token (``kw`` overrides fields, e.g. ``oaep="host"``)."""
        cfg = PKCS11KeyConfig(
            module=self.module,
            token_label=self.token_label,
            key_label=key_label,
            key_id=key_id,
            pin_file=self.pin_file,
            init_params=self.init_params,
        )
        return replace(cfg, **kw) if kw else cfg

    def target(self) -> Any:
        """A ``pkcs11_admin.TokenTarget`` for this token."""
        from signing_agent.backends._p11init import PinSource
        from signing_agent.backends.pkcs11_admin import TokenTarget

        return TokenTarget(
            module=str(self.module),
            token_label=self.token_label,
            pin=PinSource(pin_file=self.pin_file),
            init_params=self.init_params,
        )


@dataclass(frozen=True)
class SoftHSMSetup:
    conf: Path
    tokens: dict[str, TokenInfo]

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def _write_pin(folder: Path, pin: str) -> Path:
    path = folder / "user.pin"
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


def make_softhsm(folder: Path, labels: tuple[str, ...] = SOFTHSM_LABELS) -> SoftHSMSetup:
    """A private SoftHSM2 config with tokens ``labels`` in ``folder``; sets ``SOFTHSM2_CONF``."""
    util = prereq.require_executable("softhsm2-util")
    prereq.require_file(SOFTHSM_MODULE, "the SoftHSM2 PKCS#11 module")
    tokens_dir = folder / "tokens"
    tokens_dir.mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens_dir}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    if previous is not None and previous != str(conf) and _softhsm_loaded():
        pytest.fail("SoftHSM2 was already loaded with another SOFTHSM2_CONF in this process", pytrace=False)
    # SoftHSM reads SOFTHSM2_CONF once, at C_Initialize: it must be set before the module is first loaded.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in labels:
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", USER_PIN],
            env=env,
            check=True,
            capture_output=True,
        )
    pin_file = _write_pin(folder, USER_PIN)
    infos = {
        label: TokenInfo("softhsm", Path(SOFTHSM_MODULE), label, USER_PIN, pin_file, env={"SOFTHSM2_CONF": str(conf)})
        for label in labels
    }
    return SoftHSMSetup(conf=conf, tokens=infos)


def _softhsm_loaded() -> bool:
    from signing_agent.backends import _p11init

    return os.path.realpath(SOFTHSM_MODULE) in _p11init._modules


def nss_init_params(db: Path) -> str:
    return f"configdir='sql:{db}' certPrefix='' keyPrefix='' secmod='secmod.db' flags="


def make_nss(folder: Path) -> TokenInfo:
    """Create an NSS softoken database (``certutil -N``) with the user PIN in a pwfile."""
    certutil = prereq.require_executable("certutil")
    prereq.require_file(NSS_MODULE, "the NSS softoken module (libsoftokn3.so)")
    db = folder / "nssdb"
    db.mkdir(parents=True)
    pwfile = _write_pin(folder, USER_PIN)
    subprocess.run([certutil, "-N", "-d", f"sql:{db}", "-f", str(pwfile)], check=True, capture_output=True)
    return TokenInfo("nss", Path(NSS_MODULE), NSS_TOKEN_LABEL, USER_PIN, pwfile, init_params=nss_init_params(db))


def unique_label(prefix: str = "k") -> str:
    """Labels unique per call, so tests sharing a session-scoped token never collide."""
    return f"{prefix}-{secrets.token_hex(4)}"


def generate_ec(token: TokenInfo, curve: str = "secp384r1", label: str | None = None) -> Any:
    """Generate an EC key pair in the token; returns the ``pkcs11_admin.TokenKey``."""
    from signing_agent.backends import pkcs11_admin

    return pkcs11_admin.generate_ec_key(token.target(), label=label or unique_label("ec"), curve=curve)


def import_member(token: TokenInfo, key: ec.EllipticCurvePrivateKey, label: str | None = None) -> Any:
    from signing_agent.backends import pkcs11_admin

    return pkcs11_admin.import_ec_key(token.target(), key, label=label or unique_label("member"))


def generate_rsa(token: TokenInfo, label: str | None = None) -> Any:
    from signing_agent.backends import pkcs11_admin

    return pkcs11_admin.generate_rsa_key(token.target(), label=label or unique_label("rsa"))


def import_rsa(token: TokenInfo, key: rsa.RSAPrivateKey, label: str | None = None) -> Any:
    from signing_agent.backends import pkcs11_admin

    return pkcs11_admin.import_rsa_key(token.target(), key, label=label or unique_label("rsa"))


def close_all_sessions(token: TokenInfo) -> None:
    """``C_CloseAllSessions`` on the token's slot: every session of this process, and the login, are gone."""
    from signing_agent.backends import _p11init

    lib = _p11init.load_module(token.module, token.init_params)
    slot = _p11init.find_token(lib, token.token_label, where="test").slot
    _p11init.close_all_sessions(token.module, slot.slot_id)


# A module is initialised once per process (SoftHSM reads SOFTHSM2_CONF once; NSS keeps its first configdir), so
# the tokens are made once per process too, even when several test modules bind these fixtures.
_made: dict[str, Any] = {}


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMSetup:
    if "softhsm" not in _made:
        _made["softhsm"] = make_softhsm(tmp_path_factory.mktemp("softhsm"))
    setup: SoftHSMSetup = _made["softhsm"]
    return setup


@pytest.fixture(scope="session")
def nss_token(tmp_path_factory: pytest.TempPathFactory) -> TokenInfo:
    if "nss" not in _made:
        _made["nss"] = make_nss(tmp_path_factory.mktemp("nss"))
    token: TokenInfo = _made["nss"]
    return token


@pytest.fixture(
    scope="session",
    params=[pytest.param("softhsm", marks=pytest.mark.softhsm), pytest.param("nss", marks=pytest.mark.nss)],
)
def p11_token(request: pytest.FixtureRequest) -> Iterator[TokenInfo]:
    if request.param == "softhsm":
        yield request.getfixturevalue("softhsm").tokens["agent-a"]
    else:
        yield request.getfixturevalue("nss_token")
