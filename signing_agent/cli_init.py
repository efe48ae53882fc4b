"""``signing-agent init``: a minimal configuration to start from.

One key store, one identity, one CCF service and the audit log beside the config; nothing else unless asked (an
Azure Key Vault key with ``--backend azure-keyvault``, NSS softoken's ``--init-params``, a ``[[policy.rules]]``
table with ``--policy``). Every value it writes is one the user gave or the agent's default made explicit, and the
text is checked by ``config.parse_config`` before it is written, so ``serve`` takes it as it is.

Paths are written relative to the config's folder (the agent resolves them from there) when they are under it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from signing_agent.cli_exit import Exit
from signing_agent.client_config import SOCKET_ENV
from signing_agent.errors import ConfigError
from signing_agent.names import AZURE_CREDENTIALS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``init`` (registered by ``cli.build_parser``)."""
    p.add_argument("--out", type=Path, help="write the configuration here (default: stdout); never overwritten")
    p.add_argument("--identity", default="member0", help="the identity's name (default: %(default)s)")
    p.add_argument("--certificate", type=Path, help="the member certificate (default: <identity>_cert.pem)")
    p.add_argument("--backend", choices=("pkcs11", "azure-keyvault", "file"), default="pkcs11")
    tok = p.add_argument_group("pkcs11")
    tok.add_argument("--module", help="the PKCS#11 module (.so), e.g. /usr/lib/softhsm/libsofthsm2.so")
    tok.add_argument("--token-label", help="the token's label")
    tok.add_argument("--key-label", help="the key's label (default: the identity's name)")
    pin = tok.add_mutually_exclusive_group()
    pin.add_argument("--pin-file", type=Path, help="file holding the user PIN (mode 0600)")
    pin.add_argument("--pin-env", metavar="VAR", help="environment variable holding the user PIN")
    tok.add_argument("--init-params", help="module init parameters (NSS softoken)")
    kv = p.add_argument_group("azure-keyvault")
    kv.add_argument("--vault-url", help="https://<name>.vault.azure.net or https://<name>.managedhsm.azure.net")
    kv.add_argument("--key-name", help="the key's name in the vault (default: the identity's name)")
    kv.add_argument("--credential", choices=AZURE_CREDENTIALS, help="how to authenticate (default: default)")
    dev = p.add_argument_group("file (development only)")
    dev.add_argument("--key", type=Path, help="a PEM private key file")
    svc = p.add_argument_group("service")
    svc.add_argument("--service", default="default", help="the service's name (default: %(default)s)")
    svc.add_argument("--service-url", help="the CCF service, https://host:port (none: no [services] table)")
    svc.add_argument("--service-certificate", type=Path, help="the service certificate to pin (service_cert.pem)")
    svc.add_argument("--identity-url", help="instead: where Azure Managed CCF publishes the service identity")
    p.add_argument(
        "--socket", type=Path, help=f"the agent's socket (default: ${SOCKET_ENV} when set, else the default)"
    )
    p.add_argument("--audit", type=Path, default=Path("audit.jsonl"), help="the audit log (default: %(default)s)")
    p.add_argument("--policy", action="store_true", help="add a [[policy.rules]] table to edit (root and you)")


def _q(value: object) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(str(value))


def _path(path: Path, base: Path) -> str:
    """``path`` as the config should name it: relative to the config's folder when it lies under it."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(base))
    except ValueError:
        return str(absolute)


def _key_table(args: argparse.Namespace, base: Path) -> list[str]:
    lines = [f"[identities.{args.identity}.signing_key]", f"backend = {_q(args.backend)}"]
    if args.backend == "pkcs11":
        if not args.module:
            raise ConfigError("--module: required for --backend pkcs11 (e.g. /usr/lib/softhsm/libsofthsm2.so)")
        lines.append(f"module = {_q(args.module)}")
        if args.token_label:
            lines.append(f"token_label = {_q(args.token_label)}")
        lines.append(f"key_label = {_q(args.key_label or args.identity)}")
        if args.pin_file:
            lines.append(f"pin_file = {_q(_path(args.pin_file, base))}")
        elif args.pin_env:
            lines.append(f"pin_env = {_q(args.pin_env)}")
        if args.init_params:
            lines.append(f"init_params = {_q(args.init_params)}")
    elif args.backend == "azure-keyvault":
        if not args.vault_url:
            raise ConfigError("--vault-url: required for --backend azure-keyvault")
        lines += [f"vault_url = {_q(args.vault_url)}", f"key_name = {_q(args.key_name or args.identity)}"]
        if args.credential:
            lines.append(f"credential = {_q(args.credential)}")
    else:
        if not args.key:
            raise ConfigError("--key: required for --backend file (a PEM private key; development only)")
        lines.append(f"path = {_q(_path(args.key, base))}")
    return lines


def render(args: argparse.Namespace, base: Path) -> str:
    """The configuration's text; paths relative to ``base``, the config's folder."""
    if not args.identity.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"--identity {args.identity!r}: use letters, digits, '_', '.' and '-'")
    lines = ["# Written by 'signing-agent init'. Every key is documented in config.example.toml.", ""]
    socket = args.socket or os.environ.get(SOCKET_ENV)
    lines.append("[agent]")
    if socket:
        lines.append(f"socket = {_q(_path(Path(socket), base))}")
    else:
        lines.append("# socket: $XDG_RUNTIME_DIR/signing-agent/agent.sock, root's /run/signing-agent/agent.sock")
    lines += ["", "[audit]", f"path = {_q(_path(args.audit, base))}", ""]
    certificate = args.certificate or Path(f"{args.identity}_cert.pem")
    lines += [f"[identities.{args.identity}]", f"certificate = {_q(_path(certificate, base))}", ""]
    lines += [*_key_table(args, base), ""]
    if args.service_url:
        lines += [f"[services.{args.service}]", f"url = {_q(args.service_url)}"]
        if args.service_certificate:
            lines.append(f"service_certificate = {_q(_path(args.service_certificate, base))}")
        elif args.identity_url:
            lines.append(f"identity_url = {_q(args.identity_url)}")
        else:
            raise ConfigError("--service-certificate (or --identity-url): the agent only talks to a pinned service")
        lines.append("")
    if args.policy:
        lines += [
            "[[policy.rules]]",
            'name = "operators"',
            f"uids = [0, {os.getuid()}]",
            "# identities = [...], msg_types = [...], actions_allow = [...]: see config.example.toml",
            "",
        ]
    return "\n".join(lines)


def run_init(args: argparse.Namespace) -> int:
    import tomllib

    from signing_agent.config import parse_config

    out: Path | None = args.out
    base = Path(os.path.abspath(out.parent if out is not None else "."))
    text = render(args, base)
    parse_config(tomllib.loads(text), path=base / "agent.toml")  # what serve will read, checked now
    if out is None:
        sys.stdout.write(text)
        return Exit.OK
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"{out} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"wrote {out}: check it with 'signing-agent check-config --config {out}'", file=sys.stderr)
    return Exit.OK
