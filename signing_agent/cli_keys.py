"""``signing-agent keys generate|import|list``: member keys in PKCS#11 tokens, from the command line.

Owns argument parsing, PIN prompting and printing for the key tooling; the work is done by
``signing_agent.backends.pkcs11_admin``, whose imports (cryptography, the backends) are made by the commands
themselves: ``cli.build_parser`` builds this parser for ``--help`` and completion. Errors go through the CLI's one
mapper (``cli_exit.report``): their diagnostics on stderr and the documented exit code (2 for a configuration error
or a refused PIN), never a traceback unless ``-v``. A PIN is read from ``--pin-file`` (mode 0600), ``--pin-env``,
or an interactive prompt.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from signing_agent.cli_exit import Exit, report
from signing_agent.errors import AgentError, ConfigError, IdentityError
from signing_agent.names import AZURE_CREDENTIALS

TYPE_CHECKING = False  # not typing's: --help builds this parser, and importing typing costs it 2 ms
if TYPE_CHECKING:
    from typing import Any, TextIO

    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from signing_agent.backends.pkcs11_admin import TokenKey, TokenTarget
    from signing_agent.config import AzureKeyVaultKeyConfig

EXIT_OK = Exit.OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys`` command with ``generate``, ``import`` and ``list`` subcommands."""
    keys = subparsers.add_parser(
        "keys", help="generate, import and list member keys in a PKCS#11 token (generate: also in Azure Key Vault)"
    )
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="{generate,import,list}")

    def token_args(p: argparse.ArgumentParser, *, module_required: bool = True) -> None:
        p.add_argument("--module", required=module_required, help="path of the PKCS#11 module (.so)")
        p.add_argument("--token-label", help="label of the token (required when the module has several)")
        pin = p.add_mutually_exclusive_group()
        pin.add_argument("--pin-file", type=Path, help="file holding the user PIN (mode 0600)")
        pin.add_argument("--pin-env", metavar="VAR", help="environment variable holding the user PIN")
        p.add_argument("--init-params", help="module init parameters (NSS softoken: \"configdir='sql:DIR' ...\")")

    gen = sub.add_parser(
        "generate",
        help="create a member key pair in a token or a vault, and its self-signed certificate",
        description="Create a member key pair where it will live (a PKCS#11 token, or Azure Key Vault / Managed "
        "HSM with --backend azure-keyvault), its self-signed member certificate signed there, and print the "
        "configuration that uses them.",
    )
    gen.add_argument("--backend", choices=("pkcs11", "azure-keyvault"), default="pkcs11")
    token_args(gen, module_required=False)
    gen.add_argument("--label", help="pkcs11: label of the new key (also the certificate CN by default)")
    gen.add_argument("--id", help="pkcs11: CKA_ID of the new key, hex (default: random 8 bytes)")
    gen.add_argument("--curve", choices=("P-256", "P-384", "P-521"), default="P-384")
    gen.add_argument("--common-name", help="certificate CN (default: the label or key name)")
    gen.add_argument("--cert-out", type=Path, help="where to write the certificate (default: <name>_cert.pem)")
    gen.add_argument("--encryption-key", action="store_true", help="also create an RSA encryption key")
    gen.add_argument("--rsa-bits", type=int, choices=(2048, 3072, 4096),
                     help="size of the encryption key (default: 2048 in a token, 3072 in a vault)")  # fmt: skip
    gen.add_argument("--enc-pub-out", type=Path, help="encryption public key PEM (default: <name>_enc_pubk.pem)")
    kv = gen.add_argument_group("azure-keyvault")
    kv.add_argument("--vault-url", help="https://<name>.vault.azure.net or https://<name>.managedhsm.azure.net")
    kv.add_argument("--key-name", help="name of the new member key (must not exist in the vault)")
    kv.add_argument("--encryption-key-name", help="name of the new encryption key (default: <key-name>-enc)")
    kv.add_argument("--protection", choices=("hsm", "software"),
                    help="hsm (default): EC-HSM/RSA-HSM, on Managed HSM and Premium vaults; software: a Standard "
                    "vault's software-protected keys")  # fmt: skip
    kv.add_argument("--credential", choices=AZURE_CREDENTIALS,
                    help="how to authenticate, as the config's credential (default: default)")  # fmt: skip
    kv.add_argument("--client-id", help="the app or user-assigned identity's client id")
    kv.add_argument("--tenant-id", help="the tenant of the app (client-secret, client-certificate, workload-identity)")
    kv.add_argument("--client-secret-env", metavar="VAR", help="client-secret: variable holding the secret")
    kv.add_argument("--client-certificate", type=Path, help="client-certificate: PEM with the app's key and cert")
    kv.add_argument("--ca-bundle", type=Path, help="extra CA certificates (PEM) to trust for the vault")
    kv.add_argument("--api-version", help="Key Vault REST API version (default: the SDK's)")
    gen.add_argument("--json", action="store_true", help="print what was made (and the configuration) as JSON")
    gen.set_defaults(func=run_generate)

    imp = sub.add_parser("import", help="move an existing PEM member key (and encryption key) into the token")
    token_args(imp)
    imp.add_argument("--label", required=True, help="label for the imported key")
    imp.add_argument("--id", help="CKA_ID for the imported key, hex (default: random 8 bytes)")
    imp.add_argument("--key", type=Path, required=True, help="PEM private key of the member (EC)")
    imp.add_argument("--cert", type=Path, help="the member certificate: checked against the key")
    imp.add_argument("--encryption-key", type=Path, metavar="FILE", help="PEM RSA encryption private key to import")
    imp.add_argument("--delete-pem", action="store_true", help="delete the PEM file(s) after a verified import")
    imp.add_argument("--json", action="store_true", help="print what was imported (and the configuration) as JSON")
    imp.set_defaults(func=run_import)

    lst = sub.add_parser("list", help="list the private keys in the token")
    token_args(lst)
    lst.add_argument("--cert", type=Path, action="append", default=[], help="certificate(s) to show member ids for")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)


def _target(args: argparse.Namespace) -> TokenTarget:
    from signing_agent.backends._p11session import PinSource
    from signing_agent.backends.pkcs11_admin import TokenTarget

    pin = PinSource(pin_file=args.pin_file, pin_env=args.pin_env)
    if args.pin_file is None and args.pin_env is None:
        if not sys.stdin.isatty():
            raise ConfigError("no PIN source: give --pin-file or --pin-env (no terminal to prompt on)")
        # An interactive PIN lives only in this process's environment, under a private name.
        var = "_SIGNING_AGENT_KEYS_PIN"
        import getpass

        os.environ[var] = getpass.getpass(f"User PIN for token {args.token_label or ''}: ")
        pin = PinSource(pin_env=var)
    return TokenTarget(module=args.module, token_label=args.token_label, pin=pin, init_params=args.init_params)


def _key_id(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"--id {text!r}: expected hex, e.g. 01a2") from None
    if not value:
        raise ConfigError("--id must not be empty")
    return value


def _write_new(path: Path, data: bytes) -> None:
    """Write a new file atomically; refuse to overwrite an existing one."""
    import tempfile

    if path.exists():
        raise ConfigError(f"{path} already exists; refusing to overwrite it")
    fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _q(value: object) -> str:
    return json.dumps(str(value))


def _snippet(args: argparse.Namespace, *, name: str, cert: Path | None, label: str, key_id: bytes,
             enc_label: str | None, enc_id: bytes | None, oaep: str = "token") -> str:  # fmt: skip
    pin = (
        f"pin_file = {_q(Path(args.pin_file).absolute())}"
        if args.pin_file
        else f"pin_env = {_q(args.pin_env or 'SIGNING_AGENT_PIN')}"
    )
    common = [f"module = {_q(args.module)}"]
    if args.token_label:
        common.append(f"token_label = {_q(args.token_label)}")
    common.append(pin)
    if args.init_params:
        common.append(f"init_params = {_q(args.init_params)}")
    lines = [f"[identities.{name}]"]
    lines.append(f"certificate = {_q(cert.absolute()) if cert else _q('PATH/TO/' + name + '_cert.pem')}")
    lines += ["", f"[identities.{name}.signing_key]", 'backend = "pkcs11"', *common]
    lines += [f"key_label = {_q(label)}", f"key_id = {_q(key_id.hex())}"]
    if enc_label is not None and enc_id is not None:
        lines += ["", f"[identities.{name}.encryption_key]", 'backend = "pkcs11"', *common]
        lines += [f"key_label = {_q(enc_label)}", f"key_id = {_q(enc_id.hex())}"]
        if oaep == "host":
            lines.append(
                'oaep = "host"                     # the token lacks RSA-OAEP-SHA256: raw RSA, OAEP on the host'
            )
    return "\n".join(lines)


def _report_oaep(target: TokenTarget, key: TokenKey, out: TextIO) -> str:
    """Prove how the token decrypts recovery shares with ``key`` (a test message) and say so."""
    from signing_agent.backends import pkcs11_admin

    mode = pkcs11_admin.oaep_mode(target, key)
    if mode == "token":
        print("the token decrypted a test message with RSA-OAEP-SHA256 itself", file=out)
    else:
        print(
            "the token lacks RSA-OAEP-SHA256 (as SoftHSM2 2.6 does): it decrypted a test message as raw RSA, so the "
            'configuration below sets oaep = "host" (OAEP decoded by the agent; see the README\'s "Recovery")',
            file=out,
        )
    return mode


def _printer(args: argparse.Namespace, out: TextIO) -> TextIO:
    """Where a command's lines go: ``out``, or nowhere with ``--json`` (its summary is printed instead)."""
    return io.StringIO() if getattr(args, "json", False) else out


def _summary(args: argparse.Namespace, out: TextIO, summary: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, sort_keys=True), file=out)


def _fail(exc: AgentError, args: argparse.Namespace, err: TextIO) -> int:
    return report(exc, verbose=getattr(args, "verbose", False), err=err)


def _config_name(label: str) -> str:
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in label)
    return name or "member0"


def run_generate(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``keys generate``: EC key pair + self-signed member certificate (+ optional RSA encryption key)."""
    if args.backend == "azure-keyvault":
        return run_generate_keyvault(args, out=out, err=err)
    out, err = out or sys.stdout, err or sys.stderr
    text = _printer(args, out)
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        from signing_agent.backends import pkcs11_admin

        _require_backend_args(args, "pkcs11", required=("module", "label"))
        target = _target(args)
        key_id = _key_id(args.id)
        cert_out = args.cert_out or Path(f"{args.label}_cert.pem")
        enc_out = args.enc_pub_out or Path(f"{args.label}_enc_pubk.pem")
        for path in (cert_out, *((enc_out,) if args.encryption_key else ())):
            if path.exists():
                raise ConfigError(f"{path} already exists; refusing to overwrite it")
        key = pkcs11_admin.generate_ec_key(
            target,
            label=args.label,
            key_id=key_id,
            curve=pkcs11_admin.CURVES[args.curve],
        )
        cert = pkcs11_admin.self_signed_certificate(
            target,
            key,
            common_name=args.common_name or args.label,
        )
        pkcs11_admin.store_certificate(target, key, cert)
        _write_new(cert_out, cert.public_bytes(serialization.Encoding.PEM))
        print(f"created {args.curve} key {key.label!r} (id {key.key_id.hex()}) in the token, with its certificate",
              file=text)  # fmt: skip
        print(f"wrote the member certificate to {cert_out}", file=text)
        enc_label = enc_id = None
        oaep = "token"
        if args.encryption_key:
            enc = pkcs11_admin.generate_rsa_key(target, label=f"{args.label}-enc", bits=args.rsa_bits or 2048)
            if not isinstance(enc.public_key, rsa.RSAPublicKey):  # pragma: no cover -- generate_rsa_key made it
                raise IdentityError("the generated encryption key is not RSA")
            pem = enc.public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _write_new(enc_out, pem)
            enc_label, enc_id = enc.label, enc.key_id
            print(
                f"created RSA-{enc.public_key.key_size} encryption key {enc.label!r} id {enc.key_id.hex()}, "
                f"public key {enc_out}",
                file=text,
            )
            oaep = _report_oaep(target, enc, text)
        print(f"member id: {pkcs11_admin.member_id(cert)}", file=text)
        print("\nconfiguration to paste:\n", file=text)
        name = _config_name(args.label)
        snippet = _snippet(
            args,
            name=name,
            cert=cert_out,
            label=key.label,
            key_id=key.key_id,
            enc_label=enc_label,
            enc_id=enc_id,
            oaep=oaep,
        )
        print(snippet, file=text)
        if args.encryption_key:
            print(f"\npropose the member with: signing-agent member add --cert {cert_out} --encryption-key {enc_out}",
                  file=text)  # fmt: skip
        _summary(args, out, {
            "backend": "pkcs11", "identity": name, "key_label": key.label, "key_id": key.key_id.hex(),
            "curve": args.curve, "certificate": str(cert_out), "member_id": pkcs11_admin.member_id(cert),
            "encryption_key": None if enc_label is None or enc_id is None else {
                "key_label": enc_label, "key_id": enc_id.hex(), "public_key": str(enc_out), "oaep": oaep},
            "configuration": snippet,
        })  # fmt: skip
    except AgentError as exc:
        return _fail(exc, args, err)
    return EXIT_OK


_BACKEND_ARGS: dict[str, tuple[str, ...]] = {
    "pkcs11": ("module", "token_label", "pin_file", "pin_env", "init_params", "label", "id"),
    "azure-keyvault": (
        "vault_url", "key_name", "encryption_key_name", "protection", "credential", "client_id", "tenant_id",
        "client_secret_env", "client_certificate", "ca_bundle", "api_version",
    ),
}  # fmt: skip


def _require_backend_args(args: argparse.Namespace, backend: str, *, required: tuple[str, ...]) -> None:
    """Options of the other backend are a mistake (which key store did the user mean?); this one's must be there."""
    for other, names in _BACKEND_ARGS.items():
        given = [n for n in names if other != backend and getattr(args, n, None) is not None]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise ConfigError(f"{flags}: for --backend {other}, not --backend {backend}")
    missing = [n for n in required if getattr(args, n, None) is None]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ConfigError(f"--backend {backend} needs {flags}")


def _keyvault_config(args: argparse.Namespace, key_name: str) -> AzureKeyVaultKeyConfig:
    """The key's configuration as the agent will read it (credential options as the config names them)."""
    from urllib.parse import urlsplit

    from signing_agent.config import AzureKeyVaultKeyConfig

    url = urlsplit(str(args.vault_url))
    if url.scheme != "https" or not url.hostname or url.path not in ("", "/") or url.query:
        raise ConfigError(f"--vault-url {args.vault_url!r}: expected https://<name>.vault.azure.net (no path)")

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else path.absolute()

    return AzureKeyVaultKeyConfig(
        vault_url=str(args.vault_url).rstrip("/"),
        key_name=key_name,
        credential=args.credential or "default",
        client_id=args.client_id,
        tenant_id=args.tenant_id,
        client_secret_env=args.client_secret_env,
        client_certificate=absolute(args.client_certificate),
        ca_bundle=absolute(args.ca_bundle),
        api_version=args.api_version,
    )


def _keyvault_table(cfg: AzureKeyVaultKeyConfig) -> list[str]:
    lines = ['backend = "azure-keyvault"', f"vault_url = {_q(cfg.vault_url)}", f"key_name = {_q(cfg.key_name)}"]
    lines += [f"key_version = {_q(cfg.key_version)}", f"credential = {_q(cfg.credential)}"]
    for name in ("client_id", "tenant_id", "client_secret_env", "client_certificate", "ca_bundle", "api_version"):
        value = getattr(cfg, name)
        if value is not None:
            lines.append(f"{name} = {_q(value)}")
    return lines


def run_generate_keyvault(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``keys generate --backend azure-keyvault``: the vault makes the keys and signs the member certificate."""
    out, err = out or sys.stdout, err or sys.stderr
    text = _printer(args, out)
    try:
        import asyncio
        import logging

        from cryptography.hazmat.primitives import serialization

        from signing_agent.backends import azure_keyvault_admin, member_cert

        logging.getLogger("azure").setLevel(logging.CRITICAL)  # its failures reach the user once, in our error

        _require_backend_args(args, "azure-keyvault", required=("vault_url", "key_name"))
        signing = _keyvault_config(args, args.key_name)
        encryption = None
        if args.encryption_key:
            encryption = _keyvault_config(args, args.encryption_key_name or f"{args.key_name}-enc")
        elif args.encryption_key_name is not None or args.enc_pub_out is not None:
            raise ConfigError("--encryption-key-name and --enc-pub-out go with --encryption-key")
        cert_out = args.cert_out or Path(f"{args.key_name}_cert.pem")
        enc_out = args.enc_pub_out or Path(f"{args.key_name}_enc_pubk.pem")
        for path in (cert_out, *((enc_out,) if encryption is not None else ())):
            if path.exists():
                raise ConfigError(f"{path} already exists; refusing to overwrite it")
        name = _config_name(args.key_name)
        made = asyncio.run(
            azure_keyvault_admin.generate_member(
                signing,
                name=name,
                curve=args.curve,
                common_name=args.common_name or args.key_name,
                hsm=args.protection != "software",
                encryption=encryption,
                rsa_bits=args.rsa_bits or 3072,
            )
        )
        _write_new(cert_out, made.certificate.public_bytes(serialization.Encoding.PEM))
        key = made.signing
        print(f"created {key.key_type} {args.curve} key {key.kid} (not exportable; sign, verify)", file=text)
        print(f"wrote the member certificate, signed in the vault, to {cert_out}", file=text)
        lines = [f"[identities.{name}]", f"certificate = {_q(cert_out.absolute())}", ""]
        lines += [f"[identities.{name}.signing_key]", *_keyvault_table(key.config)]
        if made.encryption is not None:
            enc = made.encryption
            pem = enc.public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _write_new(enc_out, pem)
            print(f"created {enc.key_type} {args.rsa_bits or 3072} encryption key {enc.kid} (not exportable; "
                  f"decrypt, unwrapKey), which decrypted a test message; public key {enc_out}", file=text)  # fmt: skip
            lines += ["", f"[identities.{name}.encryption_key]", *_keyvault_table(enc.config)]
        print(f"member id: {member_cert.member_id(made.certificate)}", file=text)
        print("\nconfiguration to paste:\n", file=text)
        print("\n".join(lines), file=text)
        _summary(args, out, {
            "backend": "azure-keyvault", "identity": name, "kid": key.kid, "key_type": key.key_type,
            "curve": args.curve, "certificate": str(cert_out), "member_id": member_cert.member_id(made.certificate),
            "encryption_key": None if made.encryption is None else {
                "kid": made.encryption.kid, "key_type": made.encryption.key_type, "public_key": str(enc_out)},
            "configuration": "\n".join(lines),
        })  # fmt: skip
    except AgentError as exc:
        return _fail(exc, args, err)
    return EXIT_OK


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the key is encrypted; decrypt it first (openssl pkey -in ... -out ...)") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def run_import(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``keys import``: copy a PEM member key (and encryption key) into the token, then check it signs."""
    out, err = out or sys.stdout, err or sys.stderr
    text = _printer(args, out)
    try:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        from signing_agent.backends import pkcs11_admin
        from signing_agent.certs import read_certificate

        target = _target(args)
        key = _load_pem_key(args.key)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{args.key}: a member key must be EC (P-256/P-384/P-521)")
        cert = None
        if args.cert is not None:
            cert = read_certificate(args.cert, "--cert")
            if cert.public_key() != key.public_key():
                raise IdentityError(f"{args.key} does not match the certificate {args.cert}")
        enc_key = None
        if args.encryption_key is not None:
            loaded = _load_pem_key(args.encryption_key)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise ConfigError(f"{args.encryption_key}: an encryption key must be RSA")
            enc_key = loaded
        imported = pkcs11_admin.import_ec_key(target, key, label=args.label, key_id=_key_id(args.id))
        pkcs11_admin.check_signs(target, imported)
        print(f"imported {args.key} as key {imported.label!r} (id {imported.key_id.hex()}); it signs", file=text)
        if cert is not None:
            pkcs11_admin.store_certificate(target, imported, cert)
            print(f"stored the certificate {args.cert} in the token with the key", file=text)
        enc_label = enc_id = None
        oaep = "token"
        if enc_key is not None:
            enc = pkcs11_admin.import_rsa_key(target, enc_key, label=f"{args.label}-enc")
            enc_label, enc_id = enc.label, enc.key_id
            print(f"imported {args.encryption_key} as key {enc.label!r} (id {enc.key_id.hex()})", file=text)
            oaep = _report_oaep(target, enc, text)
        if cert is not None:
            print(f"member id: {pkcs11_admin.member_id(cert)}", file=text)
        pems = [args.key, *((args.encryption_key,) if enc_key is not None else ())]
        if args.delete_pem:
            for pem in pems:
                pem.unlink()
                print(f"deleted {pem} (it may survive in backups and on disk blocks)", file=text)
        else:
            print(
                "the key is now in the token: delete " + " and ".join(str(p) for p in pems)
                + " (and its backups), e.g. with shred -u",
                file=text,
            )  # fmt: skip
        snippet = _snippet(args, name=_config_name(args.label), cert=args.cert, label=imported.label,
                           key_id=imported.key_id, enc_label=enc_label, enc_id=enc_id, oaep=oaep)  # fmt: skip
        print("\nconfiguration to paste:\n", file=text)
        print(snippet, file=text)
        _summary(args, out, {
            "backend": "pkcs11", "identity": _config_name(args.label), "key_label": imported.label,
            "key_id": imported.key_id.hex(), "member_id": pkcs11_admin.member_id(cert) if cert is not None else None,
            "encryption_key": None if enc_label is None or enc_id is None else {
                "key_label": enc_label, "key_id": enc_id.hex(), "oaep": oaep},
            "deleted": [str(p) for p in pems] if args.delete_pem else [], "configuration": snippet,
        })  # fmt: skip
    except AgentError as exc:
        return _fail(exc, args, err)
    return EXIT_OK


def run_list(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``keys list``: the token's private keys (label, id, type, curve/size, member id if a cert matches)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        from signing_agent.backends import pkcs11_admin
        from signing_agent.certs import read_certificate

        certs = [read_certificate(Path(path), "--cert") for path in args.cert]
        keys = pkcs11_admin.list_keys(_target(args), certificates=certs)
        if args.json:
            listed = [{"label": k.label, "id": k.key_id.hex(), "type": k.description, "member_id": k.member_id}
                      for k in keys]  # fmt: skip
            print(json.dumps(listed, indent=2, sort_keys=True), file=out)
            return EXIT_OK
        print(f"{'LABEL':<24} {'ID':<18} {'TYPE':<10} MEMBER ID", file=out)
        for k in keys:
            print(f"{k.label:<24} {k.key_id.hex():<18} {k.description:<10} {k.member_id or '-'}", file=out)
    except AgentError as exc:
        return _fail(exc, args, err)
    return EXIT_OK
