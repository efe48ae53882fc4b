"""Throwaway PKCS#11 tokens for tests: SoftHSM2, NSS softoken, a software TPM, and each through p11-kit's proxy.

Import the fixtures into a conftest (``from tests.support.tokens import softhsm, nss_token, p11_token  # noqa:
F401``) or use the plain functions. Nothing here touches the system token folders: SoftHSM2 gets its own
``SOFTHSM2_CONF`` (set in ``os.environ`` before the module is first loaded, because SoftHSM reads it once, at
``C_Initialize``), NSS gets its own ``sql:`` database whose path is passed as init parameters, tpm2-pkcs11 its
own ``swtpm``, resource manager and store (``tests.support.swtpm``), and p11-kit a user configuration of the
test's own (``tests.support.p11kit``).

Fixtures (all session-scoped; a missing tool or module calls ``prereq.missing``, which skips locally and fails
in CI):

- ``softhsm`` -> ``SoftHSMSetup``: one ``SOFTHSM2_CONF`` with tokens ``agent-a``, ``agent-b`` and
  ``agent-pin`` (the last one for wrong-PIN tests), each a ``TokenInfo``.
- ``nss_token`` -> ``TokenInfo`` for the NSS DB's "NSS Certificate DB" token.
- ``tpm_token`` -> ``TokenInfo`` for token ``tpm`` in tpm2-pkcs11 on swtpm behind tpm2-abrmd.
- ``p11kit_tokens`` -> ``{"softhsm": ..., "nss": ..., "tpm": ...}``: the same tokens through p11-kit-proxy.so.
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
from tests.support import p11kit, prereq, swtpm

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
NSS_MODULE = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"
NSS_TOKEN_LABEL = "NSS Certificate DB"
USER_PIN = "1234"
SO_PIN = "5678"
SOFTHSM_LABELS = ("agent-a", "agent-b", "agent-pin")
TPM_TOKEN_LABEL = "tpm"


@dataclass(frozen=True)
class TokenInfo:
    """Everything a test (or a daemon subprocess) needs to reach one token."""

    kind: Literal["softhsm", "nss", "tpm"]
    module: Path
    token_label: str
    pin: str
    pin_file: Path
    init_params: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables a subprocess needs (SoftHSM: ``SOFTHSM2_CONF``)."""
    via: Literal["direct", "p11-kit"] = "direct"
    wrapper: tuple[str, ...] = ()
    """The command prefix a daemon subprocess needs (p11-kit as root: a user namespace)."""

    @property
    def name(self) -> str:
        """``softhsm``, ``nss-p11kit``: for test ids and messages."""
        return self.kind if self.via == "direct" else f"{self.kind}-p11kit"

    @property
    def imports_private_keys(self) -> bool:
        """Whether ``C_CreateObject`` of a private key works (tpm2-pkcs11 refuses it: keys are made in the TPM)."""
        return self.kind != "tpm"

    @property
    def oaep(self) -> Literal["token", "host"]:
        """How this token decrypts RSA-OAEP-SHA256: SoftHSM2 2.6 only with ``oaep = "host"``."""
        return "host" if self.kind == "softhsm" else "token"

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
        from signing_agent.backends._p11session import PinSource
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
    from signing_agent.backends import _p11module

    return _p11module.loaded(SOFTHSM_MODULE) is not None


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
    from signing_agent.backends import _p11module, _p11session

    module = _p11module.open_module(token.module, token.init_params)
    slot = _p11session.find_token(module.lib, token.token_label, where="test").slot
    module.close_all_sessions(slot.slot_id)


def make_tpm(folder: Path) -> tuple[TokenInfo, swtpm.SoftwareTPM]:
    """swtpm + tpm2-abrmd with a token ``tpm`` made by ``C_InitToken``/``C_InitPIN``; sets the module's environment
    in ``os.environ`` and initialises the module in this process (tpm2-pkcs11 reads it once, at ``C_Initialize``)."""
    from signing_agent.backends import _p11module

    tpm = swtpm.SoftwareTPM(folder, resource_manager=True)
    tpm.start()
    try:
        tpm.init_token(TPM_TOKEN_LABEL, USER_PIN)
        if _p11module.loaded(swtpm.TPM_MODULE) is not None:
            pytest.fail("tpm2-pkcs11 was already loaded with another environment in this process", pytrace=False)
        os.environ.update(tpm.env)
        # Initialised here, as root: p11-kit, loaded later with a user configuration (tests.support.p11kit),
        # then finds it initialised and shares it instead of connecting to the resource manager as another uid.
        _p11module.open_module(swtpm.TPM_MODULE)
    except BaseException:
        tpm.stop()
        raise
    pin_file = _write_pin(folder, USER_PIN)
    return TokenInfo("tpm", Path(swtpm.TPM_MODULE), TPM_TOKEN_LABEL, USER_PIN, pin_file, env=tpm.env), tpm


def through_p11kit(token: TokenInfo, home: Path, env: dict[str, str]) -> TokenInfo:
    """``token`` reached through p11-kit-proxy.so, whose user configuration is in ``home``."""
    return replace(
        token,
        module=Path(p11kit.P11KIT_PROXY),
        init_params=None,
        env={**env, **p11kit.user_env(home)},
        via="p11-kit",
        wrapper=tuple(p11kit.userns_wrapper()),
    )


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


@pytest.fixture(scope="session")
def tpm_token(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> TokenInfo:
    if "tpm" not in _made:
        token, tpm = make_tpm(tmp_path_factory.mktemp("tpm"))
        request.session.addfinalizer(tpm.stop)
        _made["tpm"] = token
    made: TokenInfo = _made["tpm"]
    return made


@pytest.fixture(scope="session")
def p11kit_tokens(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, TokenInfo]:
    """The direct tokens that exist (a missing one is skipped locally, an error in CI), through p11-kit."""
    if "p11kit" not in _made:
        direct: dict[str, TokenInfo] = {}
        for kind, fixture in (("softhsm", "softhsm"), ("nss", "nss_token"), ("tpm", "tpm_token")):
            try:
                value = request.getfixturevalue(fixture)
            except pytest.skip.Exception:
                continue
            direct[kind] = value.tokens["agent-a"] if kind == "softhsm" else value
        if not direct:
            prereq.missing("no PKCS#11 module to put behind p11-kit")
        home = tmp_path_factory.mktemp("p11kit-home")
        modules = {
            "softhsm": (SOFTHSM_MODULE, None),
            "nss": (NSS_MODULE, direct["nss"].init_params if "nss" in direct else None),
            "tpm": (swtpm.TPM_MODULE, None),
        }
        p11kit.write_user_config(home, {k: v for k, v in modules.items() if k in direct})
        env: dict[str, str] = {}
        for token in direct.values():
            env.update(token.env)
        p11kit.load_proxy(home)
        _made["p11kit"] = {kind: through_p11kit(token, home, env) for kind, token in direct.items()}
    tokens: dict[str, TokenInfo] = _made["p11kit"]
    return tokens


@pytest.fixture(
    scope="session",
    params=[pytest.param("softhsm", marks=pytest.mark.softhsm), pytest.param("nss", marks=pytest.mark.nss)],
)
def p11_token(request: pytest.FixtureRequest) -> Iterator[TokenInfo]:
    if request.param == "softhsm":
        yield request.getfixturevalue("softhsm").tokens["agent-a"]
    else:
        yield request.getfixturevalue("nss_token")
