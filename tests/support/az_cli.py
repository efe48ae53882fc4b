"""An ``az`` command for the ``azure-cli`` credential: the Azure CLI logged in as a service principal, talking to the
Entra ID double.

The real Azure CLI is a large install; what azure-identity's ``AzureCliCredential`` needs from it is one command,
``az account get-access-token --output json --resource <resource> [--tenant <tenant>]``, whose JSON it parses. This
executable answers that command the way a CLI logged in with ``az login --service-principal`` does: a client-credentials
token request to the authority (the Entra ID double, which checks the secret), printed in the CLI's output format.
Logged out, or asked for another tenant, it fails with the CLI's messages. Every invocation's arguments are appended
to ``calls.jsonl`` next to it, so a test sees what the agent asked for.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

_SCRIPT = """#!{python}
import datetime, json, ssl, sys, urllib.error, urllib.parse, urllib.request
HERE = {here!r}
with open(HERE + "/login.json") as f:
    login = json.load(f)
with open(HERE + "/calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] != ["account", "get-access-token"] or "--resource" not in args:
    sys.stderr.write("ERROR: this test az knows only 'account get-access-token --resource'\\n")
    sys.exit(2)
if not login.get("logged_in"):
    sys.stderr.write("ERROR: Please run 'az login' to setup account.\\n")
    sys.exit(1)
resource = args[args.index("--resource") + 1]
tenant = args[args.index("--tenant") + 1] if "--tenant" in args else login["tenant"]
if tenant != login["tenant"]:
    sys.stderr.write(f"ERROR: AADSTS50020: the account is not in tenant '{{tenant}}'. Run az login --tenant\\n")
    sys.exit(1)
form = urllib.parse.urlencode({{"grant_type": "client_credentials", "client_id": login["client_id"],
                               "client_secret": login["secret"], "scope": resource + "/.default"}}).encode()
request = urllib.request.Request(f"{{login['authority']}}/{{tenant}}/oauth2/v2.0/token", data=form, method="POST")
try:
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=login["ca"]), timeout=30) as r:
        answer = json.load(r)
except urllib.error.HTTPError as exc:
    body = json.load(exc)
    sys.stderr.write(f"ERROR: {{body.get('error_description', exc)}}\\n")
    sys.exit(1)
expires = datetime.datetime.now() + datetime.timedelta(seconds=int(answer["expires_in"]))
print(json.dumps({{"accessToken": answer["access_token"], "expiresOn": expires.strftime("%Y-%m-%d %H:%M:%S.%f"),
                  "expires_on": int(expires.timestamp()), "subscription": "00000000-0000-0000-0000-00000000abcd",
                  "tenant": tenant, "tokenType": "Bearer"}}, indent=2))
"""


def install_az(
    folder: Path, *, authority: str, tenant: str, client_id: str, secret: str, ca_bundle: Path, logged_in: bool = True
) -> Path:
    """Write ``folder/az`` (executable) and its login state; returns ``folder`` (put it first on ``PATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    login = {"logged_in": logged_in, "authority": authority, "tenant": tenant, "client_id": client_id,
             "secret": secret, "ca": str(ca_bundle)}  # fmt: skip
    (folder / "login.json").write_text(json.dumps(login))
    (folder / "login.json").chmod(0o600)
    script = folder / "az"
    script.write_text(_SCRIPT.format(python=sys.executable, here=str(folder.absolute())))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def calls(folder: Path) -> list[list[str]]:
    """The argument lists ``az`` was run with, in order."""
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def path_with(folder: Path) -> str:
    return str(folder.absolute()) + os.pathsep + os.environ.get("PATH", "")
