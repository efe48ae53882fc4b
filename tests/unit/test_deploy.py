"""The deployment files: systemd units (parsed, and verified by ``systemd-analyze`` where it exists), the
Kubernetes sidecar manifest and the Dockerfile. They are data the project ships, so they are tested like code."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from signing_agent.api.connections import FD_HEADROOM
from signing_agent.config import AgentSection
from tests.support.prereq import missing, require_executable

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values...]}} (keys repeat, e.g. SystemCallFilter)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: cannot parse {raw!r}"
        assert current is not None, f"{name}: {raw!r} is outside a section"
        current.setdefault(key, []).append(value)
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values is not None, f"{key} is missing"
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def test_the_service_unit_is_notify_hardened_and_reloadable() -> None:
    svc = unit("signing-agent.service")["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "signing-agent",
        "RuntimeDirectory": "signing-agent",
        "StateDirectory": "signing-agent",
        "UMask": "0177",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LimitCORE": "0",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet": "",
    }
    assert {k: one(svc, k) for k in expected} == expected
    assert "@system-service" in svc["SystemCallFilter"]
    # harden_process() calls setrlimit (in @resources): the filter must not deny it.
    assert not any("@resources" in v for v in svc["SystemCallFilter"])
    assert int(one(svc, "WatchdogSec")) > 0
    # Room for every connection the agent admits (agent.max_connections) and its own files: accept() never fails.
    assert int(one(svc, "LimitNOFILE")) >= AgentSection().max_connections + FD_HEADROOM
    assert "serve" in one(svc, "ExecStart").split()
    assert unit("signing-agent.service")["Unit"]["Requires"] == ["signing-agent.socket"]


def test_the_socket_unit_passes_one_private_unix_stream_socket() -> None:
    sock = unit("signing-agent.socket")["Socket"]
    assert one(sock, "ListenStream") == "/run/signing-agent/agent.sock"
    assert one(sock, "Accept") == "no"
    mode = int(one(sock, "SocketMode"), 8)
    assert mode & 0o007 == 0, "other users must get nothing"
    assert [k for k in sock if k.startswith("Listen")] == ["ListenStream"]


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    require_executable("systemd-analyze")  # make test installs systemd as root; CI fails rather than skips
    # verify insists that ExecStart= exists: point it at this environment's entry point.
    exe = Path(sys.executable).parent / "signing-agent"
    for name in ("signing-agent.service", "signing-agent.socket"):
        text = (DEPLOY / "systemd" / name).read_text().replace("/usr/bin/signing-agent", str(exe))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "signing-agent.service", "signing-agent.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # It exits 0 on unknown keys and bad values, and only warns: any output is a finding.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_sysusers_and_tmpfiles_make_the_folders_the_units_and_the_agent_expect(tmp_path: Path) -> None:
    """Applied to an empty root, as on a fresh host: the user, and each folder owned and moded as the units set them
    (``check-config`` runs before the first start, as the agent's user) and writable by no one but the agent, which
    refuses a socket or audit folder others may write."""
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        require_executable(tool)
    if os.geteuid() != 0:
        missing("systemd-tmpfiles --root gives folders to another user: it needs root")
    conf = DEPLOY / "systemd"
    (tmp_path / "etc").mkdir()
    for command in (
        ["systemd-sysusers", f"--root={tmp_path}", str(conf / "signing-agent.sysusers.conf")],
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(conf / "signing-agent.tmpfiles.conf")],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
    (entry,) = [
        line for line in (tmp_path / "etc" / "passwd").read_text().splitlines() if line.startswith("signing-agent:")
    ]
    uid, gid = (int(n) for n in entry.split(":")[2:4])
    service = unit("signing-agent.service")["Service"]
    socket_folder = Path(one(unit("signing-agent.socket")["Socket"], "ListenStream")).parent
    expected = {
        "/etc/" + one(service, "ConfigurationDirectory"): (0, gid, int(one(service, "ConfigurationDirectoryMode"), 8)),
        "/var/lib/" + one(service, "StateDirectory"): (uid, gid, int(one(service, "StateDirectoryMode"), 8)),
        "/run/" + one(service, "RuntimeDirectory"): (uid, gid, int(one(service, "RuntimeDirectoryMode"), 8)),
    }
    assert "/run/" + one(service, "RuntimeDirectory") == str(socket_folder)
    for folder, (owner, group, mode) in expected.items():
        st = (tmp_path / folder.lstrip("/")).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner, group, mode), folder
        assert not mode & 0o022, folder


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def test_the_kubernetes_sidecar_shares_its_socket_and_uses_workload_identity() -> None:
    docs = {d["kind"]: d for d in manifests()}
    assert set(docs) >= {"Deployment", "ServiceAccount", "ConfigMap"}
    account = docs["ServiceAccount"]
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    pod = docs["Deployment"]["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    spec = pod["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    containers = {c["name"]: c for c in spec["containers"]}
    agent = containers.pop("signing-agent")
    (client,) = containers.values()

    def socket_volume(container: dict[str, Any]) -> str:
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/signing-agent"]
        return str(mount["name"])

    shared = socket_volume(agent)
    assert shared == socket_volume(client)
    assert "emptyDir" in volumes[shared]
    for probe, live in (("readinessProbe", False), ("livenessProbe", True)):
        command = agent[probe]["exec"]["command"]
        assert command[:2] == ["signing-agent", "health"]
        assert command[command.index("--socket") + 1] == "/run/signing-agent/sock/agent.sock"
        assert ("--live" in command) is live
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False
    config = docs["ConfigMap"]["data"]["agent.toml"]
    assert 'credential = "workload-identity"' in config
    # The socket lives in a folder the agent creates inside the shared volume, never in the volume's root (0777).
    socket = Path(tomllib.loads(config)["agent"]["socket"])
    assert socket.parent != Path("/run/signing-agent")
    assert socket.parent.is_relative_to("/run/signing-agent")
    for container in (agent, client):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env["SIGNING_AGENT_SOCK"] == str(socket)
    assert spec["securityContext"]["runAsUser"] == 10001  # both containers: the same uid reaches the 0700 folder
    assert all("runAsUser" not in c.get("securityContext", {}) for c in (agent, client))
    # The audit log lives in a folder the agent creates inside a volume only it mounts, never in a volume's root.
    audit_folder = Path(tomllib.loads(config)["audit"]["path"]).parent
    (state,) = [m for m in agent["volumeMounts"] if audit_folder.is_relative_to(m["mountPath"])]
    assert audit_folder != Path(state["mountPath"])
    assert all(m["name"] != state["name"] for m in client["volumeMounts"])
    assert not re.search(r"(?i)(secret|pin)\s*=", config)


def test_only_the_agent_container_gets_the_workload_identity_token() -> None:
    """The workload identity webhook mounts the federated token (and so the managed identity's vault rights) into
    every container of the pod unless ``azure.workload.identity/skip-containers`` names it: a client holding it could
    sign with the member key in the vault itself, past the agent's policy and audit log. No container needs a
    Kubernetes API token either (the webhook projects its own for the agent)."""
    docs = {d["kind"]: d for d in manifests()}
    pod = docs["Deployment"]["spec"]["template"]
    names = {c["name"] for c in pod["spec"]["containers"]}
    skipped = set(pod["metadata"].get("annotations", {}).get("azure.workload.identity/skip-containers", "").split(";"))
    assert skipped == names - {"signing-agent"}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_the_dockerfile_runs_unprivileged_without_secrets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]
    assert final.startswith("python:3.11-slim")
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user, "the final stage sets no USER"
    assert user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^HEALTHCHECK [^\n]*\\\n\s*CMD \["signing-agent", "health"', text, re.M)
    for line in re.findall(r"^(?:ENV|ARG)\b.*$", text, re.M):
        assert not re.search(r"(?i)secret|password|pin\b|token", line), line
