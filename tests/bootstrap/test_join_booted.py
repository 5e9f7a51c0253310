"""A built join script run for real on a booted Debian node (systemd in systemd-nspawn): stand-in
kubelet and container runtime from a signed local apt repository, the Kubernetes API stand-in
over mutual TLS with the PKI's certificates, in the node's own network namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.aptrepo import Repo
from tests.booted import BootedHost, overlay
from tests.conftest import REPO, Cli, NetNs

pytestmark = pytest.mark.kernel
NODE_IP = "10.250.0.11"

CATALOG = """\
certificate_authorities:
  kubernetes:
    certificates:
      - document_name: apiserver
        common_name: apiserver
        hosts: [127.0.0.1, localhost]
      - document_name: kubelet-{node}
        common_name: system:node:{node}
        groups: [system:nodes]
        hosts: [{node}, {ip}]
      - document_name: kubelet-wrong-name
        common_name: system:node:wrong-name
        groups: [system:nodes]
"""

DESIGN = """\
cluster:
  name: test
  api_endpoints: [https://127.0.0.1:{port}]
  pod_cidr: 10.97.0.0/16
  service_cidr: 10.96.0.0/16
  cluster_dns: 10.96.0.10
  kubernetes_version: 1.30.2
  ready_timeout_seconds: 60
  ready_poll_seconds: 1
host:
  os_release: [debian 12]
  min_disk_mb: 1
apt_repositories:
  - name: standins
    uris: [file:/srv/repo]
    suites: [./]
    key: |
{key}
roles:
  worker:
    packages: [containerd, kubelet]
    files:
      - path: /etc/divingbell/role
        content: "{{{{ node.hostname }}}} is a {{{{ role_name }}}} of {{{{ cluster.name }}}}\\n"
        mode: "0640"
    units:
      - name: node-note.service
        content: |
          [Unit]
          Description=a unit from the design
          [Service]
          Type=oneshot
          RemainAfterExit=yes
          ExecStart=/bin/true
          [Install]
          WantedBy=multi-user.target
    labels:
      static: {{rack: r1, node.kubernetes.io/exclude-from-external-load-balancers: "true"}}
      dynamic: {{team: blue}}
nodes:
  - hostname: {node}
    ip: {ip}
    role: worker
    labels:
      dynamic: {{zone: a, topology.kubernetes.io/zone: z1}}
  - hostname: wrong-name
    ip: 10.250.0.99
    role: worker
"""


@dataclass
class ApiProcess:
    process: subprocess.Popen[bytes]
    state_file: Path
    port: int

    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))


@pytest.fixture
def node_netns(netns: NetNs) -> NetNs:
    for argv in (["link", "add", "va", "type", "veth", "peer", "name", "vb"],
                 ["addr", "add", f"{NODE_IP}/24", "dev", "va"],
                 ["link", "set", "va", "up"], ["link", "set", "vb", "up"]):
        subprocess.run(["ip", "-n", netns.name, *argv], check=True)
    return netns


@pytest.fixture
def pki(cli: Cli, tmp_path: Path, node_netns: NetNs) -> tuple[Path, str]:
    name = f"dbt-{node_netns.name[-8:]}"
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.format(node=name, ip=NODE_IP))
    out = tmp_path / "pki"
    result = cli("pki", "generate", catalog, "-o", out)
    assert result.returncode == 0, result.stderr
    return out, name


@pytest.fixture
def api(pki: tuple[Path, str], node_netns: NetNs, tmp_path: Path) -> Iterator[ApiProcess]:
    """The API stand-in inside the node's network namespace: the node reaches it on its own
    loopback, as a genesis node reaches its local API server."""
    out, _ = pki
    state, port_file = tmp_path / "api-state.json", tmp_path / "api-port"
    process = subprocess.Popen(
        ["ip", "netns", "exec", node_netns.name, sys.executable, "-m", "tests.bootstrap.kubeapi",
         "--state", str(state), "--port-file", str(port_file), "--cert", str(out / "apiserver.pem"),
         "--key", str(out / "apiserver-key.pem"), "--ca", str(out / "kubernetes.pem")],
        cwd=REPO)
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            assert process.poll() is None, "API stand-in exited"
            time.sleep(0.05)
        yield ApiProcess(process, state, int(port_file.read_text()))
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def node(debian_root: Path, node_netns: NetNs, pki: tuple[Path, str], standin_repo: Repo,
         tmp_path: Path) -> Iterator[BootedHost]:
    _, name = pki
    root = overlay(debian_root, tmp_path / "node")
    standin_repo.install_into(root)
    (root / "etc/hostname").write_text(name + "\n")
    # An offline node: only the design's repository (Debian's own containerd would win).
    (root / "etc/apt/sources.list").write_text("")
    host = BootedHost(root, name, node_netns.name)
    host.boot()
    try:
        yield host
    finally:
        host.poweroff()
        subprocess.run(["umount", "-R", "-l", str(tmp_path / "node")], check=False)


def build(cli: Cli, tmp_path: Path, pki_dir: Path, name: str, port: int, key: str,
          only: str) -> str:
    design = tmp_path / "design.yaml"
    indented = "\n".join("      " + line for line in key.strip().splitlines())
    design.write_text(DESIGN.format(port=port, key=indented, node=name, ip=NODE_IP))
    out = tmp_path / "scripts"
    result = cli("bootstrap", "build", design, "--pki", pki_dir, "-o", out, "--node", only)
    assert result.returncode == 0, result.stdout + result.stderr
    script = out / f"join-{only}.sh"
    lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True,
                          check=False)
    assert lint.returncode == 0, lint.stdout
    return script.read_text()


def changed_files(root_upper: Path) -> set[str]:
    """What the node has written since boot, outside logs and systemd's own bookkeeping."""
    skip = ("var/log/", "var/lib/systemd/", "var/cache/", "etc/machine-id", "tmp/", "var/tmp/")
    return {str(p.relative_to(root_upper)) for p in root_upper.rglob("*")
            if not str(p.relative_to(root_upper)).startswith(skip)}


def stat(node: BootedHost, path: str) -> str:
    return node.run("stat", "-c", "%a %U %Y", path).stdout.strip()


SCRIPT = "/var/lib/divingbell/bootstrap.sh"
UNIT = "divingbell-bootstrap.service"


def test_join_script_on_a_booted_node(cli: Cli, node: BootedHost, api: ApiProcess,
                                      pki: tuple[Path, str], standin_repo: Repo,
                                      tmp_path: Path) -> None:
    pki_dir, name = pki
    upper = tmp_path / "node" / "upper"

    # A script built for another host stops at the host checks and changes nothing.
    wrong = build(cli, tmp_path, pki_dir, name, api.port, standin_repo.key, "wrong-name")
    (node.root / "root/wrong.sh").write_text(wrong)
    before = changed_files(upper)
    refused = node.run("bash", "/root/wrong.sh", check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"host check failed: hostname is '{name}', the design says 'wrong-name'" in (
        refused.stderr)
    assert "host check failed: no interface has the address 10.250.0.99" in refused.stderr
    assert "nothing was changed on this host" in refused.stderr
    assert changed_files(upper) == before
    assert node.run("test", "-e", "/etc/kubernetes", check=False).returncode == 1
    assert node.run("dpkg-query", "-W", "kubelet", check=False).returncode != 0
    assert api.state()["requests"] == []

    # The node's own script, run the way it is delivered: by a oneshot unit.
    script = build(cli, tmp_path, pki_dir, name, api.port, standin_repo.key, name)
    target = node.root / SCRIPT.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_text(script)
    target.chmod(0o700)
    unit_file = (tmp_path / "scripts" / UNIT).read_text()
    (node.root / "etc/systemd/system" / UNIT).write_text(unit_file)
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "enable", "--quiet", UNIT)
    started = node.run("systemctl", "start", UNIT, check=False)
    log = node.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False).stdout
    assert started.returncode == 0, log + started.stderr
    assert node.run("systemctl", "show", "-p", "Result", "--value", UNIT).stdout.strip() == (
        "success")
    assert f"divingbell-bootstrap: disabled {UNIT}: this node has joined" in log
    assert node.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"

    # Files and modes.
    expected = {
        "/etc/kubernetes/pki/ca.pem": "644", "/etc/kubernetes/pki/kubelet.pem": "644",
        "/etc/kubernetes/pki/kubelet-key.pem": "600", "/etc/kubernetes/kubelet/kubeconfig": "600",
        "/etc/kubernetes/kubelet/config.yaml": "644", "/etc/containerd/config.toml": "644",
        "/etc/systemd/system/kubelet.service.d/10-divingbell.conf": "644",
        "/etc/apt/sources.list.d/bootstrap-standins.sources": "644",
        "/etc/apt/keyrings/bootstrap-standins.asc": "644",
        "/etc/divingbell/role": "640", "/etc/systemd/system/node-note.service": "644",
    }
    for path, mode in expected.items():
        assert stat(node, path).split()[:2] == [mode, "root"], path
    assert (node.root / "etc/divingbell/role").read_text() == f"{name} is a worker of test\n"
    assert (node.root / "etc/kubernetes/pki/kubelet-key.pem").read_bytes() == (
        pki_dir / f"kubelet-{name}-key.pem").read_bytes()
    # Packages from the signed repository, and curl for the API steps.
    for package in ("kubelet", "containerd", "curl"):
        status = node.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", package).stdout
        assert status.strip() == "ii", package
    # Units enabled and running.
    for unit in ("containerd.service", "kubelet.service", "node-note.service"):
        assert node.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled", unit
        assert node.run("systemctl", "is-active", unit).stdout.strip() == "active", unit
    # Static labels in the kubelet's arguments.
    args = node.run("cat", "/run/kubelet-standin/args").stdout.splitlines()
    assert args == [
        "--config=/etc/kubernetes/kubelet/config.yaml",
        "--kubeconfig=/etc/kubernetes/kubelet/kubeconfig", f"--hostname-override={name}",
        f"--node-ip={NODE_IP}",
        "--node-labels=node.kubernetes.io/exclude-from-external-load-balancers=true,rack=r1"]
    # The Node registered by the kubelet with its static labels; dynamic labels by the script,
    # both as the node's own identity over mutual TLS.
    state = api.state()
    assert state["nodes"][name]["labels"] == {
        "node.kubernetes.io/exclude-from-external-load-balancers": "true", "rack": "r1",
        "team": "blue", "zone": "a", "topology.kubernetes.io/zone": "z1"}
    assert state["nodes"][name]["annotations"] == {
        "divingbell.io/bootstrap-labels": "node.kubernetes.io/exclude-from-external-load-"
        "balancers,rack,team,topology.kubernetes.io/zone,zone"}
    assert {r["client"] for r in state["requests"]} == {f"system:node:{name}"}
    assert [r["method"] for r in state["requests"]].count("PATCH") == 1

    # A second run changes nothing: no file rewritten, no package installed, no unit
    # restarted, no label patch.
    stamps = {path: stat(node, path) for path in expected}
    dpkg_log = node.run("cat", "/var/log/dpkg.log").stdout
    kubelet_pid = node.run("systemctl", "show", "-p", "MainPID", "--value",
                           "kubelet.service").stdout.strip()
    requests = len(state["requests"])
    time.sleep(1.1)  # so a rewritten file would show a different mtime
    again = node.run("bash", SCRIPT, check=False)
    assert again.returncode == 0, again.stderr
    assert f"divingbell-bootstrap: node {name}: nothing to change" in again.stderr
    assert {path: stat(node, path) for path in expected} == stamps
    assert node.run("cat", "/var/log/dpkg.log").stdout == dpkg_log
    assert node.run("systemctl", "show", "-p", "MainPID", "--value",
                    "kubelet.service").stdout.strip() == kubelet_pid
    after = api.state()["requests"][requests:]
    assert [r["method"] for r in after] == ["GET", "GET"], "Ready check and label check only"
