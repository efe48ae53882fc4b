"""``signing-agent keys generate --backend azure-keyvault`` end to end, and every credential kind against real token
flows.

Subprocesses only, no fakes in the agent: the Key Vault double (``python -m tests.doubles.keyvault``, with its
managed-identity endpoint and its Entra ID token endpoint), the CCF sandbox, the CLI and the daemon. The CLI makes the
keys in the vault with the real Azure SDK; the configuration it prints is used verbatim: the daemon signs with it
(verified by CCF's ``ccf.cose.validate_cose_sign1`` and by the sandbox, which accepts the new member's proposal) and
decrypts a recovery share with the RSA key the vault made.

Credentials: client secret, client certificate and workload identity (a federated token file), directly and through
``default`` (``DefaultAzureCredential`` reading the environment), each getting its tokens from the Entra ID double at
``AZURE_AUTHORITY_HOST``, which checks the secret, the certificate's assertion signature and the federated token's
issuer signature, subject and lifetime; ``azure-cli`` through an ``az`` logged in as a service principal
(``tests/support/az_cli.py``) that gets its token from the same double. Managed identity is the vault double's own
endpoint (the daemon test below, and ``test_keyvault_e2e.py``). Each kind runs through ``keys generate`` (the CLI's
flags) and then ``check-config`` (the printed configuration); each kind's refusal is shown too, with no secret in the
error.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ccf.cose import validate_cose_sign1
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.client import AgentClient
from signing_agent.sandbox.identity import ServiceIdentity
from tests.doubles.entra_id import FederatedIssuer, new_client_id, new_secret
from tests.doubles.keyvault import OTHER_AZURE_ENV, TENANT_ID
from tests.support.agent import cli_env, daemon, short_dir
from tests.support.az_cli import calls as az_calls
from tests.support.az_cli import install_az, path_with
from tests.support.keyvault_proc import KeyVaultProcess, keyvault
from tests.support.pki import make_rsa_key, pem_private, self_signed_cert
from tests.support.sandbox_client import YES
from tests.support.sandbox_proc import sandbox

pytestmark = pytest.mark.e2e

SUBJECT = "system:serviceaccount:governance:signing-agent"


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = short_dir("sa-kvk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def vault(folder: Path) -> Iterator[KeyVaultProcess]:
    with keyvault(folder / "vault", {}) as kv:
        yield kv


def azure_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI or daemon that sees only what the test gives it (no Azure variables of its own)."""
    env = cli_env()
    for name in (*OTHER_AZURE_ENV, "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        env.pop(name, None)
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def entra_env(vault: KeyVaultProcess, **extra: str) -> dict[str, str]:
    """Tokens from the Entra ID double: its authority host, and its CA trusted by azure-identity's aiohttp."""
    return azure_env(AZURE_AUTHORITY_HOST=vault.authority_host, SSL_CERT_FILE=str(vault.ca_bundle), **extra)


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def generate(
    vault: KeyVaultProcess, workdir: Path, name: str, env: dict[str, str], *flags: str
) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["keys", "generate", "--backend", "azure-keyvault", "--vault-url", vault.vault_url, "--key-name", name]
    return run([*args, "--ca-bundle", str(vault.ca_bundle), *flags], env, workdir)


def snippet(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.split("configuration to paste:\n", 1)[1]


def config_with(snippet_text: str, workdir: Path, **tables: dict[str, Any]) -> Path:
    """An agent config: the printed snippet verbatim, an [agent] table and ``tables`` (TOML inline values)."""
    lines = ["[agent]", f'socket = "{workdir / "run" / "agent.sock"}"', "", snippet_text]
    for table, values in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {v}" for k, v in values.items())]
    path = workdir / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def grants_for(vault: KeyVaultProcess, client_id: str) -> list[dict[str, Any]]:
    return [g for g in vault.grants() if g["client_id"] == client_id]


# ----- keys generate, then the daemon uses what it printed -----


@dataclass
class Generated:
    workdir: Path
    result: subprocess.CompletedProcess[str]
    cert: x509.Certificate
    enc_public: rsa.RSAPublicKey
    config: dict[str, Any]
    requests: list[dict[str, Any]]
    """What the vault saw up to the end of ``keys generate``."""


@pytest.fixture(scope="module")
def generated(vault: KeyVaultProcess, folder: Path) -> Generated:
    workdir = folder / "gen"
    env = azure_env(**vault.env)
    result = generate(vault, workdir, "m0", env, "--credential", "managed-identity", "--encryption-key")
    text = snippet(result)
    cert = x509.load_pem_x509_certificate((workdir / "m0_cert.pem").read_bytes())
    enc = serialization.load_pem_public_key((workdir / "m0_enc_pubk.pem").read_bytes())
    assert isinstance(enc, rsa.RSAPublicKey)
    return Generated(workdir, result, cert, enc, tomllib.loads(text), vault.requests())


def test_the_vault_makes_non_exportable_hsm_keys_as_asked(vault: KeyVaultProcess, generated: Generated) -> None:
    created = {c["name"]: c for c in vault.created()}
    assert created["m0"] == {
        "name": "m0",
        "kty": "EC-HSM",
        "crv": "P-384",
        "key_ops": ["sign", "verify"],
        "attributes": {"exportable": False},
    }
    assert created["m0-enc"] == {
        "name": "m0-enc",
        "kty": "RSA-HSM",
        "key_size": 3072,
        "key_ops": ["decrypt", "unwrapKey"],
        "attributes": {"exportable": False},
    }
    assert generated.enc_public.key_size == 3072
    # The certificate's signature was made in the vault: one sign request on the new version, nothing imported.
    signing = generated.config["identities"]["m0"]["signing_key"]
    version = signing["key_version"]
    requests = generated.requests
    assert [r["path"] for r in requests if r["op"] == "sign"] == [f"/keys/m0/{version}/sign"]
    assert not [r for r in requests if r["op"] == "import"]
    enc_version = generated.config["identities"]["m0"]["encryption_key"]["key_version"]
    assert [r["path"] for r in requests if r["op"] == "decrypt"] == [f"/keys/m0-enc/{enc_version}/decrypt"]


def test_the_certificate_is_a_member_certificate_signed_by_the_vault_key(generated: Generated) -> None:
    cert = generated.cert
    cert.verify_directly_issued_by(cert)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    assert cert.subject.rfc4514_string() == "CN=m0"
    assert f"member id: {_member_id(cert)}" in generated.result.stdout
    assert generated.config["identities"]["m0"]["certificate"] == str(generated.workdir / "m0_cert.pem")


def _member_id(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_the_printed_config_signs_governance_and_decrypts_a_share(
    vault: KeyVaultProcess, generated: Generated, folder: Path
) -> None:
    workdir = generated.workdir
    with sandbox(folder / "sandbox") as sb:
        sb.add_member(
            generated.cert.public_bytes(serialization.Encoding.PEM),
            encryption_pub_key=(workdir / "m0_enc_pubk.pem").read_text(),
        )
        pinned = workdir / "service_cert.pem"
        shutil.copyfile(sb.service_cert, pinned)
        nxt = ServiceIdentity.generate()
        (workdir / "next_cert.pem").write_bytes(nxt.cert_pem)
        service = {
            "url": f'"{sb.url}"',
            "service_certificate": f'"{pinned}"',
            "accepted_service_certificates": f'["{workdir / "next_cert.pem"}"]',
            "request_timeout": "5.0",
            "max_attempts": "3",
        }
        config = config_with(snippet(generated.result), workdir, **{"services.default": service})
        env = azure_env(**vault.env)
        with daemon(config, env=env) as agent:
            client = AgentClient(agent.socket, timeout=60)
            # (1) A signature CCF's own code accepts, by the certificate keys generate wrote.
            body = {"identity": "m0", "msg_type": "state_digest", "payload_base64": ""}
            cose = client.call("POST", "/v1/sign", body).body
            validate_cose_sign1(generated.cert.public_key(), cose)
            # (2) The service accepts the new member's governance: a proposal and its ballot.
            previous = pinned.read_text()
            assert sb.recover(nxt.key_pem, nxt.cert_pem)["status"] == "Recovering"
            actions = [{"name": "transition_service_to_open",
                        "args": {"previous_service_identity": previous,
                                 "next_service_identity": nxt.cert_pem.decode()}}]  # fmt: skip
            created = client.call(
                "POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": {"actions": actions}}
            ).json()
            assert created["proposerId"] == _member_id(generated.cert)
            voted = client.call(
                "POST",
                f"/v1/services/default/proposals/{created['proposalId']}/ballots",
                {"identity": "m0", "ballot": YES},
            ).json()
            assert voted["proposalState"] == "Accepted", voted
            sb.wait_for_status("WaitingForRecoveryShares")
            # (3) The share is decrypted by the RSA key the vault made, and recovery completes.
            before = len(vault.requests())
            share = run(["recovery", "submit-share", "--identity", "m0"],
                        cli_env({"SIGNING_AGENT_SOCK": str(agent.socket)}), workdir)  # fmt: skip
            assert share.returncode == 0, share.stderr
            assert "1/1 recovery shares successfully submitted" in share.stdout
            sb.wait_for_status("Open")
            enc_version = generated.config["identities"]["m0"]["encryption_key"]["key_version"]
            decrypts = [r for r in vault.requests()[before:] if r["op"] == "decrypt"]
            assert [(r["path"], r["status"]) for r in decrypts] == [(f"/keys/m0-enc/{enc_version}/decrypt", 200)]


# ----- refusals -----


def test_a_name_in_use_is_refused_before_anything_is_made(vault: KeyVaultProcess, folder: Path) -> None:
    env = azure_env(**vault.env)
    first = generate(vault, folder / "dup1", "dup", env, "--credential", "managed-identity")
    assert first.returncode == 0, first.stderr
    before = len(vault.created())
    again = generate(vault, folder / "dup2", "dup", env, "--credential", "managed-identity")
    assert again.returncode == 2  # a configuration error: choose another name
    assert "already has a key named 'dup'" in again.stderr
    assert "never adds a version to an existing key" in again.stderr
    # Also when only the encryption key's name is taken: nothing is made at all.
    enc_taken = generate(vault, folder / "dup3", "fresh", env, "--credential", "managed-identity",
                         "--encryption-key", "--encryption-key-name", "dup")  # fmt: skip
    assert enc_taken.returncode == 2
    assert "identities.fresh.encryption_key" in enc_taken.stderr
    assert len(vault.created()) == before
    assert not (folder / "dup2" / "dup_cert.pem").exists()


def test_a_soft_deleted_name_says_so(vault: KeyVaultProcess, folder: Path) -> None:
    env = azure_env(**vault.env)
    assert generate(vault, folder / "del1", "gone", env, "--credential", "managed-identity").returncode == 0
    vault.soft_delete("gone")
    result = generate(vault, folder / "del2", "gone", env, "--credential", "managed-identity")
    assert result.returncode == 1
    assert "HTTP 409" in result.stderr
    assert "recover or purge it, or choose another name" in result.stderr


def test_a_standard_vault_makes_software_keys_only_when_asked(folder: Path) -> None:
    with keyvault(folder / "standard", {}, tier="standard") as std:
        env = azure_env(**std.env)
        refused = generate(std, folder / "std1", "s0", env, "--credential", "managed-identity")
        assert refused.returncode == 1
        assert "Hardware key operation not allowed on standard vault" in refused.stderr
        assert "--protection software" in refused.stderr
        assert "Crypto Officer" not in refused.stderr  # a 403 here is the vault's tier, not a missing role
        flags = ["--protection", "software", "--curve", "P-256", "--encryption-key", "--rsa-bits", "2048"]
        made = generate(std, folder / "std2", "s0", env, "--credential", "managed-identity", *flags)
        assert made.returncode == 0, made.stderr
        assert [(c["kty"], c.get("crv"), c.get("key_size")) for c in std.created()[-2:]] == [
            ("EC", "P-256", None),
            ("RSA", None, 2048),
        ]


def test_option_mistakes_are_refused_without_a_request(vault: KeyVaultProcess, folder: Path) -> None:
    env = azure_env(**vault.env)
    before = len(vault.requests())
    cases = [
        (["--label", "x"], "--label: for --backend pkcs11"),
        (["--protection", "software", "--vault-url", "https://hsm1.managedhsm.azure.net"],
         "a Managed HSM makes HSM keys only"),
        (["--key-name", "bad_name"], "is not a Key Vault key name"),
    ]  # fmt: skip
    for flags, expected in cases:
        result = generate(vault, folder / "opts", "ok-name", env, *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    pkcs11 = run(["keys", "generate", "--vault-url", vault.vault_url, "--label", "x", "--module", "m.so"], env, folder)
    assert pkcs11.returncode == 2
    assert "--vault-url: for --backend azure-keyvault" in pkcs11.stderr
    assert len(vault.requests()) == before


# ----- every credential kind: real token flows against the Entra ID double -----


@dataclass
class Credential:
    """A credential kind as a test sets it up: the CLI flags, the environment and what Entra ID should see."""

    flags: list[str]
    env: dict[str, str]
    client_id: str
    method: str
    secret: str = ""


def client_secret(
    vault: KeyVaultProcess, folder: Path, *, registered: bool = True, via_default: bool = False
) -> Credential:
    client_id, secret = new_client_id(), new_secret()
    vault.register_app(client_id, {"secret": secret if registered else new_secret()})
    if via_default:
        env = entra_env(vault, AZURE_TENANT_ID=TENANT_ID, AZURE_CLIENT_ID=client_id, AZURE_CLIENT_SECRET=secret)
        return Credential(["--credential", "default"], env, client_id, "client_secret", secret)
    flags = ["--credential", "client-secret", "--client-id", client_id, "--tenant-id", TENANT_ID,
             "--client-secret-env", "KV_APP_SECRET"]  # fmt: skip
    return Credential(flags, entra_env(vault, KV_APP_SECRET=secret), client_id, "client_secret", secret)


def client_certificate(
    vault: KeyVaultProcess, folder: Path, *, registered: bool = True, wrong_key: bool = False
) -> Credential:
    """``registered=False``: Entra ID knows another certificate; ``wrong_key``: the registered certificate, but the
    assertion is signed with another key."""
    client_id = new_client_id()
    key = make_rsa_key()  # Entra ID takes RSA certificates; azure-identity signs the assertion with PS256
    cert = self_signed_cert(key, "signing-agent")
    known = cert if registered else self_signed_cert(make_rsa_key(), "another")
    vault.register_app(client_id, {"certificate_pem": known.public_bytes(serialization.Encoding.PEM).decode()})
    pem = folder / f"{client_id}.pem"
    pem.write_bytes(pem_private(make_rsa_key() if wrong_key else key) + cert.public_bytes(serialization.Encoding.PEM))
    pem.chmod(0o600)
    flags = ["--credential", "client-certificate", "--client-id", client_id, "--tenant-id", TENANT_ID,
             "--client-certificate", str(pem)]  # fmt: skip
    return Credential(flags, entra_env(vault), client_id, "client_certificate")


def workload_identity(
    vault: KeyVaultProcess,
    folder: Path,
    *,
    subject: str = SUBJECT,
    lifetime: int = 3600,
    forged: bool = False,
    via_default: bool = False,
) -> Credential:
    client_id, issuer = new_client_id(), FederatedIssuer()
    public_pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    federated = {"issuer": issuer.url, "subject": SUBJECT, "issuer_key_pem": public_pem.decode()}
    vault.register_app(client_id, {"federated": federated})
    signer = FederatedIssuer(url=issuer.url) if forged else issuer  # right issuer name, another key
    token_file = folder / f"{client_id}.token"
    token = signer.token(subject, lifetime=lifetime)
    token_file.write_text(token)
    env = entra_env(vault, AZURE_FEDERATED_TOKEN_FILE=str(token_file))
    if via_default:
        env.update(AZURE_CLIENT_ID=client_id, AZURE_TENANT_ID=TENANT_ID)
        return Credential(["--credential", "default"], env, client_id, "federated", token)
    flags = ["--credential", "workload-identity", "--client-id", client_id, "--tenant-id", TENANT_ID]
    return Credential(flags, env, client_id, "federated", token)


def azure_cli(vault: KeyVaultProcess, folder: Path, *, logged_in: bool = True) -> Credential:
    """The Azure CLI logged in as a service principal (``tests.support.az_cli``), which gets the tokens."""
    client_id, secret = new_client_id(), new_secret()
    vault.register_app(client_id, {"secret": secret})
    az = install_az(folder / "az", authority=vault.authority_host, tenant=TENANT_ID, client_id=client_id,
                    secret=secret, ca_bundle=vault.ca_bundle, logged_in=logged_in)  # fmt: skip
    flags = ["--credential", "azure-cli", "--tenant-id", TENANT_ID]
    return Credential(flags, azure_env(PATH=path_with(az)), client_id, "client_secret", secret)


def prepared(
    vault: KeyVaultProcess, workdir: Path, make: Callable[[KeyVaultProcess, Path], Credential]
) -> tuple[Path, Credential]:
    workdir.mkdir()
    return workdir, make(vault, workdir)


KINDS: dict[str, Callable[[KeyVaultProcess, Path], Credential]] = {
    "client-secret": lambda v, f: client_secret(v, f),
    "client-certificate": lambda v, f: client_certificate(v, f),
    "workload-identity": lambda v, f: workload_identity(v, f),
    "default-environment-secret": lambda v, f: client_secret(v, f, via_default=True),
    "default-workload-identity": lambda v, f: workload_identity(v, f, via_default=True),
    "azure-cli": lambda v, f: azure_cli(v, f),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_credential_kind_gets_real_tokens_for_keys_generate_and_for_the_agent(
    vault: KeyVaultProcess, folder: Path, kind: str
) -> None:
    workdir, cred = prepared(vault, folder / f"cred-{kind}", KINDS[kind])
    name = kind.replace("-", "")
    result = generate(vault, workdir, name, cred.env, *cred.flags)
    text = snippet(result)
    assert f'credential = "{cred.flags[1]}"' in text
    # The printed configuration, as the agent reads it: check-config opens the key and has it sign a probe.
    config = config_with(text, workdir)
    checked = run(["check-config", "--config", str(config)], cred.env, workdir)
    assert checked.returncode == 0, checked.stderr
    assert _member_id(x509.load_pem_x509_certificate((workdir / f"{name}_cert.pem").read_bytes())) in checked.stdout
    grants = grants_for(vault, cred.client_id)
    assert len(grants) >= 2  # one per process: keys generate and check-config
    assert {(g["method"], g["ok"]) for g in grants} == {(cred.method, True)}
    assert {g["scope"] for g in grants} == {"https://0.0.1:" + vault.vault_url.rsplit(":", 1)[1] + "/.default"}
    if kind == "azure-cli":  # the agent asked the CLI for the vault's resource in the configured tenant
        resource = "https://0.0.1:" + vault.vault_url.rsplit(":", 1)[1]
        expected = ["account", "get-access-token", "--output", "json", "--resource", resource, "--tenant", TENANT_ID]
        assert az_calls(workdir / "az")[:2] == [expected, expected]


REFUSALS: dict[str, tuple[Callable[[KeyVaultProcess, Path], Credential], str]] = {
    "client-secret-wrong": (lambda v, f: client_secret(v, f, registered=False), "AADSTS7000215"),
    "client-certificate-unregistered": (lambda v, f: client_certificate(v, f, registered=False), "AADSTS700027"),
    "client-certificate-wrong-key": (lambda v, f: client_certificate(v, f, wrong_key=True), "AADSTS700027"),
    "workload-identity-other-subject": (
        lambda v, f: workload_identity(v, f, subject="system:serviceaccount:default:intruder"),
        "AADSTS70021",
    ),
    "workload-identity-expired": (lambda v, f: workload_identity(v, f, lifetime=-3600), "AADSTS700024"),
    "workload-identity-forged": (lambda v, f: workload_identity(v, f, forged=True), "AADSTS50013"),
    "azure-cli-logged-out": (lambda v, f: azure_cli(v, f, logged_in=False), "Please run 'az login'"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_each_credential_kind_is_refused_when_its_proof_is_wrong(
    vault: KeyVaultProcess, folder: Path, kind: str
) -> None:
    make, code = REFUSALS[kind]
    workdir, cred = prepared(vault, folder / f"refused-{kind}", make)
    before = len(vault.created())
    result = generate(vault, workdir, "never", cred.env, *cred.flags)
    assert result.returncode == 1
    assert result.stderr.startswith("signing-agent: BackendError: Azure Key Vault authentication failed for get key"), (
        result.stderr
    )
    assert code in result.stderr, result.stderr
    assert f"credential {cred.flags[1]!r}" in result.stderr
    assert "Traceback" not in result.stderr
    if cred.secret:
        for form in (cred.secret, base64.b64encode(cred.secret.encode()).decode()):
            assert form not in result.stderr
            assert form not in result.stdout
    expected = [] if kind == "azure-cli-logged-out" else [(False, code)]
    assert [(g["ok"], g["error"]) for g in grants_for(vault, cred.client_id)] == expected
    assert len(vault.created()) == before
    assert not (workdir / "never_cert.pem").exists()


def test_a_client_certificate_others_may_read_or_own_is_refused(vault: KeyVaultProcess, folder: Path) -> None:
    """The client certificate file holds the private key that gets the vault's tokens: one that group or others may
    read (anyone on the host could use the vault key past the agent's policy and audit log), or that another user
    owns (and may swap for a certificate of their own), is refused like a ``pin_file``, before any token is asked
    for."""
    workdir, cred = prepared(vault, folder / "cred-cert-mode", lambda v, f: client_certificate(v, f))
    pem = Path(cred.flags[cred.flags.index("--client-certificate") + 1])
    config = config_with(snippet(generate(vault, workdir, "certmode", cred.env, *cred.flags)), workdir)
    granted = len(grants_for(vault, cred.client_id))
    before = len(vault.created())
    pem.chmod(0o644)
    refused = generate(vault, workdir, "certmode2", cred.env, *cred.flags)
    assert refused.returncode == 2, refused.stderr
    assert f"client_certificate: {pem}: mode 0644 lets group or others read or write it" in refused.stderr
    assert "Traceback" not in refused.stderr
    checked = run(["check-config", "--config", str(config)], cred.env, workdir)
    assert checked.returncode != 0, checked.stdout
    assert "mode 0644 lets group or others read or write it" in checked.stdout + checked.stderr
    pem.chmod(0o600)
    shutil.chown(pem, user=65534, group=65534)
    checked = run(["check-config", "--config", str(config)], cred.env, workdir)
    assert checked.returncode != 0, checked.stdout
    assert "owned by uid 65534, not by the agent's user or root" in checked.stdout + checked.stderr
    assert len(grants_for(vault, cred.client_id)) == granted  # no token was asked for with either file
    assert len(vault.created()) == before
