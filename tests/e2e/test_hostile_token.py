"""A token that holds hostile objects, through the real CLI and daemon on a real SoftHSM2 token.

Anyone who can open a session to a token can create *public* objects in it without the PIN, and PKCS#11 lets a
private-key object be public (``CKA_PRIVATE`` false): such objects show up in every key search the agent makes. A
label that is not UTF-8 (python-pkcs11 decodes labels strictly) ended ``keys list``, ``check-config`` and ``serve``
with a ``UnicodeDecodeError`` traceback; a label of tens of kilobytes went whole into the "no such key" error, which
the daemon logs and answers. Each token here is a SoftHSM2 token of the test's own, used only by subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import prereq
from tests.support.agent import cli_env, short_dir, write_toml
from tests.support.tokens import SO_PIN, SOFTHSM_MODULE, USER_PIN

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

TOKEN = "hostile"

# Run without the PIN: a public session creates public "private key" objects with raw-byte labels.
_PLANT = """
import sys
import pkcs11
import pkcs11.attributes as pa
from asn1crypto import keys
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute as A, KeyType, ObjectClass

pa.ATTRIBUTE_TYPES[A.LABEL] = pa.handle_bytes  # write the label's bytes as they are
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
d = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value.to_bytes(32, "big")
params = keys.ECDomainParameters(name="named", value="secp256r1").dump()
with token.open(rw=True) as session:
    for label_hex, id_hex in zip(sys.argv[3::2], sys.argv[4::2]):
        session.create_object({
            A.CLASS: ObjectClass.PRIVATE_KEY, A.KEY_TYPE: KeyType.EC, A.TOKEN: True, A.PRIVATE: False,
            A.SIGN: True, A.EC_PARAMS: params, A.VALUE: d, A.LABEL: bytes.fromhex(label_hex),
            A.ID: bytes.fromhex(id_hex),
        })
"""

HUGE = 40_000


@pytest.fixture
def token() -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh SoftHSM2 token with a member key made by ``keys generate``, and hostile objects planted without the
    PIN: a label that is not UTF-8, and a label of ``HUGE`` characters. Yields the folder and the environment."""
    util = prereq.require_executable("softhsm2-util")
    prereq.require_file(SOFTHSM_MODULE, "the SoftHSM2 PKCS#11 module")
    folder = short_dir("sa-hostile-tok-")
    try:
        (folder / "tokens").mkdir()
        conf = folder / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
        env = cli_env({"SOFTHSM2_CONF": str(conf)})
        subprocess.run([util, "--init-token", "--free", "--label", TOKEN, "--so-pin", SO_PIN, "--pin", USER_PIN],
                       env=env, check=True, capture_output=True)  # fmt: skip
        pin = folder / "user.pin"
        pin.write_text(USER_PIN + "\n")
        pin.chmod(0o600)
        made = _cli(env, "keys", "generate", "--module", SOFTHSM_MODULE, "--token-label", TOKEN, "--pin-file",
                    str(pin), "--label", "m0", "--cert-out", str(folder / "m0_cert.pem"))  # fmt: skip
        assert made.returncode == 0, made.stderr
        plant = [
            sys.executable,
            "-c",
            _PLANT,
            SOFTHSM_MODULE,
            TOKEN,
            "fffe41",
            "98",
            ("6d30" * (HUGE // 2)),
            "97",
            "6d30",
            "99",
        ]  # fmt: skip -- the last: a public look-alike of the member key, labelled "m0"
        subprocess.run(plant, env=env, check=True, capture_output=True, timeout=60)
        yield folder, env
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signing_agent", *argv], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def _config(folder: Path, key_label: str) -> Path:
    return write_toml(
        folder / "agent.toml",
        {
            "agent": {"socket": folder / "run" / "agent.sock"},
            "audit": {"path": folder / "audit" / "audit.jsonl"},
            "identities.m0": {"certificate": folder / "m0_cert.pem"},
            "identities.m0.signing_key": {
                "backend": "pkcs11",
                "module": SOFTHSM_MODULE,
                "token_label": TOKEN,
                "key_label": key_label,
                "pin_file": folder / "user.pin",
            },
        },
    )


def test_keys_list_shows_a_label_that_is_not_utf8_escaped(token: tuple[Path, dict[str, str]]) -> None:
    folder, env = token
    listed = _cli(env, "keys", "list", "--module", SOFTHSM_MODULE, "--token-label", TOKEN, "--pin-file",
                  str(folder / "user.pin"))  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert "\\xff\\xfeA" in listed.stdout  # the planted label, its bytes escaped
    assert "m0 " in listed.stdout  # and the member key, with the rest


def test_a_missing_key_is_reported_clearly_and_briefly_whatever_the_token_holds(
    token: tuple[Path, dict[str, str]],
) -> None:
    folder, env = token
    config = _config(folder, "m0x")  # a typo: the "no such key" message lists what the token holds

    checked = _cli(env, "check-config", "--config", str(config))
    assert checked.returncode != 0
    assert "Traceback" not in checked.stderr + checked.stdout
    [line] = [x for x in checked.stdout.splitlines() if x.startswith("FAIL  m0:")]
    assert "no EC private key with label 'm0x'" in line
    assert "'m0' (id " in line
    assert "\\\\xff\\\\xfeA" in line
    assert f"({HUGE} characters)" in line
    assert len(line) < 2_000

    served = subprocess.run(
        [sys.executable, "-m", "signing_agent", "serve", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert served.returncode != 0
    assert "Traceback" not in served.stderr
    assert "no EC private key with label 'm0x'" in served.stderr
    assert len(served.stderr) < 10_000


def _serial(env: dict[str, str]) -> str:
    shown = subprocess.run(["softhsm2-util", "--show-slots"], env=env, capture_output=True, text=True, check=True)
    serials = [line.split(":", 1)[1].strip() for line in shown.stdout.splitlines() if "Serial number" in line]
    return next(s for s in serials if s)


@pytest.mark.parametrize("attribute", ["serial", "manufacturer", "model", "slot-id"])
def test_every_token_attribute_of_a_uri_must_match_the_token(
    token: tuple[Path, dict[str, str]], attribute: str
) -> None:
    """An operator pins the token by serial (a URI from ``p11tool --list-all-privkeys``): a look-alike token with the
    same label (plugged in while the real one is away) must never get the PIN. Each token attribute the URI gives
    restricts the match; it was parsed, then ignored."""
    folder, env = token
    right = {"serial": _serial(env), "manufacturer": "SoftHSM project", "model": "SoftHSM v2"}
    wrong = {"serial": "0000000000000000", "manufacturer": "Nobody", "model": "None", "slot-id": "1"}
    config = _config(folder, "m0")
    for value, ok in ((wrong[attribute], False), (right.get(attribute), True)):
        if value is None:  # SoftHSM2's slot ids are not known beforehand: only a wrong one is tried
            continue
        uri = f"pkcs11:token={TOKEN};{attribute}={value.replace(' ', '%20')};object=m0;type=private"
        text = config.read_text().replace(f'token_label = "{TOKEN}"', f'uri = "{uri}"')
        (folder / "uri.toml").write_text(text.replace('key_label = "m0"\n', ""))
        checked = _cli(env, "check-config", "--config", str(folder / "uri.toml"))
        assert (checked.returncode == 0) is ok, checked.stdout + checked.stderr
        if not ok:
            assert f"no token labelled {TOKEN!r} with {attribute} " in checked.stdout


def test_a_public_object_labelled_as_the_member_key_is_no_candidate(token: tuple[Path, dict[str, str]]) -> None:
    """Planted without the PIN: a public "private key" labelled ``m0``, as the member key is. Selected by label, the
    identity stopped (two keys matched); the key the login protects is the only candidate."""
    folder, env = token
    checked = _cli(env, "check-config", "--config", str(_config(folder, "m0")))
    assert checked.returncode == 0, checked.stdout + checked.stderr
