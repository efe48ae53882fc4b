"""Keys the agent makes are usable by standard tools: OpenSC's ``pkcs11-tool`` finds, uses and pairs them.

``signing-agent keys generate`` must leave what every PKCS#11 tool expects: the private key, its public key and its
certificate under one ``CKA_ID`` and the label asked for; the private key sensitive and never extractable. Checked on
SoftHSM2 and the software TPM directly, and on NSS softoken through p11-kit's proxy (``pkcs11-tool`` cannot pass NSS
its init parameters; p11-kit can).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.algorithms import ES384, verify_digest
from signing_agent.cli_keys import register
from tests.support import prereq, tokens
from tests.support.tokens import TokenInfo, unique_label

softhsm = tokens.softhsm
nss_token = tokens.nss_token
tpm_token = tokens.tpm_token
p11kit_tokens = tokens.p11kit_tokens


@pytest.fixture(
    params=[
        pytest.param("softhsm", marks=pytest.mark.softhsm),
        pytest.param("tpm", marks=pytest.mark.tpm),
        pytest.param("nss-p11kit", marks=[pytest.mark.nss, pytest.mark.p11kit]),
    ]
)
def tool_token(request: pytest.FixtureRequest) -> TokenInfo:
    prereq.require_executable("pkcs11-tool")
    match request.param:
        case "softhsm":
            token: TokenInfo = request.getfixturevalue("softhsm").tokens["agent-a"]
        case "tpm":
            token = request.getfixturevalue("tpm_token")
        case _:
            request.getfixturevalue("nss_token")
            token = request.getfixturevalue("p11kit_tokens")["nss"]
    return token


def pkcs11_tool(token: TokenInfo, *args: str) -> str:
    """``pkcs11-tool`` on the token, as a separate process with the token's environment; its stdout."""
    result = subprocess.run(
        [*token.wrapper, shutil.which("pkcs11-tool") or "pkcs11-tool", "--module", str(token.module),
         "--token-label", token.token_label, "--login", "--pin", token.pin, *args],
        env={**os.environ, **token.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def keys_generate(token: TokenInfo, *args: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="signing-agent")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["keys", "generate", "--module", str(token.module), "--token-label", token.token_label,
            "--pin-file", str(token.pin_file), *args]  # fmt: skip
    if token.init_params:
        argv += ["--init-params", token.init_params]
    parsed = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    return parsed.func(parsed, out=out, err=err), out.getvalue(), err.getvalue()


def _objects(token: TokenInfo, key_id: bytes) -> dict[str, list[dict[str, Any]]]:
    """The token's objects with ``key_id``, by class, with the attributes the tools look at."""
    from signing_agent.backends import pkcs11_admin
    from signing_agent.backends._p11session import require_pkcs11

    p11 = require_pkcs11()
    a, oc = p11.Attribute, p11.ObjectClass
    found: dict[str, list[dict[str, Any]]] = {}
    with pkcs11_admin.admin_session(token.target(), rw=False) as session:
        for name, cls in (("private", oc.PRIVATE_KEY), ("public", oc.PUBLIC_KEY), ("certificate", oc.CERTIFICATE)):
            attrs = [a.LABEL, a.ID]
            if cls == oc.PRIVATE_KEY:
                attrs += [a.SENSITIVE, a.EXTRACTABLE, a.ALWAYS_SENSITIVE, a.NEVER_EXTRACTABLE, a.SIGN, a.PRIVATE]
            found[name] = [
                {attr: obj[attr] for attr in attrs} for obj in session.get_objects({a.CLASS: cls, a.ID: key_id})
            ]
    return found


def test_pkcs11_tool_lists_signs_with_and_pairs_a_generated_key(tool_token: TokenInfo, tmp_path: Path) -> None:
    from signing_agent.backends._p11session import require_pkcs11

    a = require_pkcs11().Attribute
    label, key_id = unique_label("member"), secrets.token_bytes(6)
    cert_out = tmp_path / "member_cert.pem"
    rc, _, err = keys_generate(tool_token, "--label", label, "--id", key_id.hex(), "--cert-out", str(cert_out))
    assert rc == 0, err
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())

    # In the token: one private key, one public key, one certificate, all with the id and the label asked for.
    objects = _objects(tool_token, key_id)
    assert {name: len(objs) for name, objs in objects.items()} == {"private": 1, "public": 1, "certificate": 1}
    assert {obj[a.LABEL] for objs in objects.values() for obj in objs} == {label}
    [private] = objects["private"]
    assert (private[a.SENSITIVE], private[a.ALWAYS_SENSITIVE], private[a.PRIVATE], private[a.SIGN]) == (True,) * 4
    assert (private[a.EXTRACTABLE], private[a.NEVER_EXTRACTABLE]) == (False, True)

    # pkcs11-tool sees the same three objects.
    listing = pkcs11_tool(tool_token, "--list-objects", "--id", key_id.hex())
    for kind in ("Private Key Object; EC", "Public Key Object; EC", "Certificate Object; type = X.509 cert"):
        assert kind in listing, listing
    assert listing.count(f"label:      {label}") >= 3
    assert "never extractable" in listing

    # pkcs11-tool signs with the key (raw r||s over a digest the host made) ...
    digest = ES384.digest(b"a proposal")
    (tmp_path / "digest.bin").write_bytes(digest)
    pkcs11_tool(tool_token, "--sign", "--mechanism", "ECDSA", "--id", key_id.hex(),
                "--input-file", str(tmp_path / "digest.bin"), "--output-file", str(tmp_path / "sig.bin"))  # fmt: skip
    # ... and reads the certificate stored with it, which is the member certificate and verifies the signature.
    pkcs11_tool(tool_token, "--read-object", "--type", "cert", "--id", key_id.hex(),
                "--output-file", str(tmp_path / "cert.der"))  # fmt: skip
    stored = x509.load_der_x509_certificate((tmp_path / "cert.der").read_bytes())
    assert stored == cert
    public = stored.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verify_digest(public, ES384, digest, (tmp_path / "sig.bin").read_bytes())
