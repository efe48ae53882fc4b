"""``signing-agent keys generate|import|list`` against real tokens (SoftHSM2 and NSS softoken)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signing_agent.algorithms import ES384, verify_digest
from signing_agent.backends.pkcs11 import PKCS11Registry
from signing_agent.cli_keys import register
from tests.support import pki, prereq, swtpm, tokens
from tests.support.tokens import TokenInfo, unique_label

# The token fixtures live in tests.support.tokens (session-scoped); bind them here so pytest finds them.
softhsm = tokens.softhsm
nss_token = tokens.nss_token
p11_token = tokens.p11_token


def _run(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="signing-agent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    rc = args.func(args, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def _token_argv(token: TokenInfo) -> list[str]:
    argv = ["--module", str(token.module), "--token-label", token.token_label, "--pin-file", str(token.pin_file)]
    if token.init_params:
        argv += ["--init-params", token.init_params]
    return argv


def _argv_with_pin_file(token: TokenInfo, path: Path, pin: str, mode: int) -> list[str]:
    """The token's options, with the PIN read from a file of our own (a wrong PIN, a wrong mode)."""
    path.write_text(pin + "\n")
    path.chmod(mode)
    argv = _token_argv(token)
    argv[argv.index("--pin-file") + 1] = str(path)
    return argv


async def test_generate_writes_a_token_signed_member_cert(p11_token: TokenInfo, tmp_path: Path) -> None:
    label = unique_label("member")
    cert_out, enc_out = tmp_path / "m_cert.pem", tmp_path / "m_enc_pubk.pem"
    rc, out, err = _run(
        ["keys", "generate", *_token_argv(p11_token), "--label", label, "--common-name", "member0",
         "--cert-out", str(cert_out), "--encryption-key", "--enc-pub-out", str(enc_out)]
    )  # fmt: skip
    assert rc == 0, err
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    cert.verify_directly_issued_by(cert)  # the self-signature, made in the token, verifies
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha384"
    assert cert.subject.rfc4514_string() == "CN=member0" == cert.issuer.rfc4514_string()
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    member_id = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert f"member id: {member_id}" in out
    assert f'key_label = "{label}"' in out
    assert "[identities." in out

    reg = PKCS11Registry()
    try:
        signer = reg.signing_key(p11_token.key_config(label), name="m0.signing_key")
        assert (await signer.describe()).public_key == public  # the cert's key is the token's key
        digest = ES384.digest(b"proposal")
        verify_digest(public, ES384, digest, await signer.sign_digest(ES384, digest))
        enc_pub = serialization.load_pem_public_key(enc_out.read_bytes())
        assert isinstance(enc_pub, rsa.RSAPublicKey)
        assert enc_pub.key_size == 2048
        # The configuration printed works on this token: SoftHSM2 has no OAEP-SHA256, so it says oaep = "host".
        host = 'oaep = "host"' in out
        assert host == (p11_token.kind == "softhsm"), out
        assert ("it decrypted a test message as raw RSA" in out) == host
        enc_config = p11_token.key_config(f"{label}-enc", oaep="host" if host else "token")
        dec = reg.decryption_key(enc_config, name="m0.encryption_key")
        assert (await dec.describe()).public_key == enc_pub
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        assert await dec.decrypt_oaep_sha256(enc_pub.encrypt(b"share", oaep)) == b"share"
        assert f"signing-agent member add --cert {cert_out} --encryption-key {enc_out}" in out
    finally:
        await reg.aclose()

    # The same label again is refused, and nothing is overwritten.
    rc, _, err = _run(["keys", "generate", *_token_argv(p11_token), "--label", label,
                       "--cert-out", str(tmp_path / "other.pem")])  # fmt: skip
    assert rc == 2  # a configuration error (ConfigError), as in every other command
    assert "already has a private key" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("curve", "hash_name"), [("P-256", "sha256"), ("P-521", "sha512")])
def test_generate_other_curves(p11_token: TokenInfo, tmp_path: Path, curve: str, hash_name: str) -> None:
    cert_out = tmp_path / "c.pem"
    rc, _, err = _run(["keys", "generate", *_token_argv(p11_token), "--label", unique_label(), "--curve", curve,
                       "--cert-out", str(cert_out)])  # fmt: skip
    assert rc == 0, err
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    cert.verify_directly_issued_by(cert)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == hash_name


async def test_import_then_list(p11_token: TokenInfo, tmp_path: Path) -> None:
    member = pki.make_member(unique_label("m"))
    key_path, cert_path = member.write(tmp_path)
    enc_path = tmp_path / "enc.pem"
    enc_path.write_bytes(pki.pem_private(pki.make_rsa_key()))
    label = member.name
    rc, out, err = _run(["keys", "import", *_token_argv(p11_token), "--label", label, "--id", "c0ffee",
                         "--key", str(key_path), "--cert", str(cert_path),
                         "--encryption-key", str(enc_path)])  # fmt: skip
    assert rc == 0, err
    assert "it signs" in out
    assert ('oaep = "host"' in out) == (p11_token.kind == "softhsm")
    assert f"member id: {member.member_id}" in out
    assert re.search(r"delete .*_privk\.pem", out)
    assert key_path.exists()

    reg = PKCS11Registry()
    try:
        signer = reg.signing_key(p11_token.key_config(key_id=bytes.fromhex("c0ffee")), name="m.signing_key")
        digest = ES384.digest(b"vote")
        cert_key = member.cert.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        verify_digest(cert_key, ES384, digest, await signer.sign_digest(ES384, digest))
    finally:
        await reg.aclose()

    rc, out, err = _run(["keys", "list", *_token_argv(p11_token), "--cert", str(cert_path)])
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith(label + " "))
    assert "c0ffee" in row
    assert "P-384" in row
    assert member.member_id in row
    assert any(line.startswith(f"{label}-enc ") and "RSA-2048" in line for line in out.splitlines())
    rc, out, err = _run(["keys", "list", *_token_argv(p11_token), "--cert", str(cert_path), "--json"])
    assert rc == 0, err
    listed = {k["label"]: k for k in json.loads(out)}
    assert listed[label] == {"label": label, "id": "c0ffee", "type": "P-384", "member_id": member.member_id}
    assert listed[f"{label}-enc"]["type"] == "RSA-2048"


def test_generate_and_import_print_json(p11_token: TokenInfo, tmp_path: Path) -> None:
    label = unique_label("member")
    rc, out, err = _run(["keys", "generate", *_token_argv(p11_token), "--label", label, "--curve", "P-256",
                         "--cert-out", str(tmp_path / "c.pem"), "--encryption-key", "--enc-pub-out",
                         str(tmp_path / "enc.pem"), "--json"])  # fmt: skip
    assert rc == 0, err
    made = json.loads(out)  # JSON only: the lines for a person are not printed
    assert (made["backend"], made["key_label"], made["curve"], made["certificate"]) == (
        "pkcs11", label, "P-256", str(tmp_path / "c.pem"),
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate((tmp_path / "c.pem").read_bytes())
    assert made["member_id"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert made["encryption_key"]["key_label"] == f"{label}-enc"
    assert f'key_id = "{made["key_id"]}"' in made["configuration"]
    member = pki.make_member(unique_label("m"))
    key_path, cert_path = member.write(tmp_path)
    rc, out, err = _run(["keys", "import", *_token_argv(p11_token), "--label", member.name, "--key", str(key_path),
                         "--cert", str(cert_path), "--json"])  # fmt: skip
    assert rc == 0, err
    imported = json.loads(out)
    assert (imported["key_label"], imported["member_id"], imported["deleted"]) == (member.name, member.member_id, [])


def test_import_checks_the_certificate_and_can_delete_the_pem(p11_token: TokenInfo, tmp_path: Path) -> None:
    member, other = pki.make_member(unique_label("m")), pki.make_member("other")
    key_path, _ = member.write(tmp_path)
    _, other_cert = other.write(tmp_path)
    rc, _, err = _run(["keys", "import", *_token_argv(p11_token), "--label", member.name, "--key", str(key_path),
                       "--cert", str(other_cert)])  # fmt: skip
    assert rc == 2  # IdentityError, a configuration error
    assert "does not match the certificate" in err
    rc, out, err = _run(["keys", "import", *_token_argv(p11_token), "--label", member.name, "--key", str(key_path),
                         "--delete-pem"])  # fmt: skip
    assert rc == 0, err
    assert not key_path.exists()
    assert "deleted" in out


def test_cli_errors_are_diagnostics_not_tracebacks(p11_token: TokenInfo, tmp_path: Path) -> None:
    argv = _argv_with_pin_file(p11_token, tmp_path / "bad.pin", "0000", 0o644)
    rc, _, err = _run(["keys", "list", *argv])
    assert rc == 2  # ConfigError: exit 2, as every command (it was 1 here only)
    assert err.startswith("signing-agent: ConfigError: ")
    assert "chmod 600" in err
    assert "Traceback" not in err
    argv = _token_argv(p11_token)
    argv[argv.index("--token-label") + 1] = "no-such-token"
    rc, _, err = _run(["keys", "list", *argv])
    assert rc == 1  # BackendUnavailable: another failure
    assert "no token labelled 'no-such-token'" in err


@pytest.mark.parametrize("module", ["softhsm", "nss", "tpm"])
def test_a_module_that_cannot_initialise_names_the_usual_causes(module: str, tmp_path: Path) -> None:
    """A fresh process (a module initialises once per process), as the CLI and the daemon start."""
    pin = tmp_path / "user.pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOFTHSM2_", "TPM2_PKCS11_"))}
    match module:
        case "softhsm":
            path = prereq.require_file(tokens.SOFTHSM_MODULE, "SoftHSM2")
            env["SOFTHSM2_CONF"] = str(tmp_path / "missing.conf")
            expected = f"SOFTHSM2_CONF={tmp_path / 'missing.conf'}, which does not exist"
        case "nss":
            path = prereq.require_file(tokens.NSS_MODULE, "NSS softoken")
            expected = "NSS softoken needs init_params naming its database, e.g. \"configdir='sql:"
        case _:
            path = prereq.require_file(swtpm.TPM_MODULE, "tpm2-pkcs11")
            env["TPM2_PKCS11_TCTI"] = f"swtpm:path={tmp_path / 'no-tpm.sock'}"
            env["TPM2_PKCS11_STORE"] = str(tmp_path)
            expected = f"check TPM2_PKCS11_TCTI (now swtpm:path={tmp_path / 'no-tpm.sock'};"
    result = subprocess.run(
        [sys.executable, "-m", "signing_agent", "keys", "list", "--module", path, "--token-label", "t",
         "--pin-file", str(pin)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr  # a configuration error, as for every command
    assert "C_Initialize failed: CKR_" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.softhsm
def test_a_refused_pin_is_a_configuration_error(softhsm: tokens.SoftHSMSetup, tmp_path: Path) -> None:
    token = softhsm.tokens["agent-pin"]  # the token kept for wrong PINs: a lockout could spoil no other test
    argv = _argv_with_pin_file(token, tmp_path / "wrong.pin", "987654", 0o600)
    rc, _, err = _run(["keys", "list", *argv])
    assert rc == 2  # PinRejected is a ConfigError: exit 2 like every configuration error
    assert err.startswith("signing-agent: PinRejected: ")
    assert "rejected the PIN" in err
    assert "987654" not in err
    assert "Traceback" not in err
