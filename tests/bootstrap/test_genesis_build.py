"""`cluster.control_plane`: genesis gets divingbell's static pod manifests, the components'
kubeconfigs and credentials, a kubelet that runs them and a script that waits for the API;
design problems name their path; a role file overrides any rendered file; join scripts carry
none of it."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.bootstrap.test_build import embedded_archive
from tests.bootstrap.test_control_plane_templates import CATALOG
from tests.conftest import Cli

DESIGN = """\
cluster:
  name: demo
  api_endpoints: [https://10.0.0.10:6443]
  pod_cidr: 10.97.0.0/16
  service_cidr: 10.96.0.0/16
  cluster_dns: 10.96.0.10
  kubernetes_version: 1.36.2
  genesis: g0
  control_plane:
    registry: 10.0.0.1:5000
    extra_args:
      kube-apiserver: {audit-log-maxage: "7"}
roles:
  control-plane:
    labels:
      dynamic: {node-role.kubernetes.io/control-plane: "", team: core}
  worker: {}
nodes:
  - {hostname: g0, ip: 10.0.0.10, role: control-plane}
  - {hostname: n1, ip: 10.0.0.11, role: worker}
"""
CATALOG_WITH_N1 = CATALOG.replace(
    "    certificates:\n",
    "    certificates:\n      - {document_name: kubelet-n1, common_name: \"system:node:n1\", "
    "groups: [system:nodes]}\n", 1)


@pytest.fixture
def workspace(cli: Cli, tmp_path: Path) -> Path:
    (tmp_path / "catalog.yaml").write_text(CATALOG_WITH_N1)
    (tmp_path / "design.yaml").write_text(DESIGN)
    result = cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki")
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_genesis_carries_the_control_plane_and_joins_do_not(cli: Cli, workspace: Path) -> None:
    out = workspace / "scripts"
    result = cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
                 "-o", out)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(out / "genesis.sh")], capture_output=True,
                              text=True, check=False)
        assert lint.returncode == 0, lint.stdout
    archive = embedded_archive(out / "genesis.sh", workspace / "genesis")
    modes = {m.name.removeprefix("files"): stat.S_IMODE(m.mode) for m in archive.getmembers()}
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert modes[f"/etc/kubernetes/manifests/{component}.yaml"] == 0o600
    assert modes["/etc/kubernetes/pki/ca-key.pem"] == 0o600
    assert modes["/etc/kubernetes/pki/service-account-key.pem"] == 0o600
    assert modes["/etc/kubernetes/admin.conf"] == 0o600
    files = workspace / "genesis/files"
    assert (files / "etc/kubernetes/pki/ca-key.pem").read_text() == (
        workspace / "pki/kubernetes-key.pem").read_text()
    apiserver = yaml.safe_load((files / "etc/kubernetes/manifests/kube-apiserver.yaml")
                               .read_text())["spec"]["containers"][0]
    assert apiserver["image"] == "10.0.0.1:5000/kube-apiserver:v1.36.2"
    flags = apiserver["command"][1:]
    for flag in ("--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                 "--kubelet-preferred-address-types=InternalIP,Hostname",
                 "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                 "--service-cluster-ip-range=10.96.0.0/16", "--advertise-address=10.0.0.10",
                 "--audit-log-maxage=7"):
        assert flag in flags
    config = yaml.safe_load((files / "etc/kubernetes/kubelet/config.yaml").read_text())
    assert config["staticPodPath"] == "/etc/kubernetes/manifests"

    genesis = (out / "genesis.sh").read_text()
    assert "readonly LOCAL_API_SERVER=https://10.0.0.10:6443" in genesis
    assert "readonly API_CERT_FILE=/etc/kubernetes/pki/admin.pem" in genesis
    # With the admin credential genesis applies the labels a node may not set on itself too.
    assert '"node-role.kubernetes.io/control-plane":""' in genesis
    assert "readonly MIRROR_PODS=(etcd-g0 kube-apiserver-g0 kube-controller-manager-g0 " \
           "kube-scheduler-g0)" in genesis

    join = (out / "join-n1.sh").read_text()
    embedded_archive(out / "join-n1.sh", workspace / "join").close()
    joined = workspace / "join/files/etc/kubernetes"
    assert not (joined / "manifests").exists()
    assert sorted(p.name for p in (joined / "pki").iterdir()) == [
        "ca.pem", "kubelet-key.pem", "kubelet.pem"]
    assert "staticPodPath" not in (joined / "kubelet/config.yaml").read_text()
    assert "LOCAL_API_SERVER" not in join


def test_a_role_file_overrides_a_rendered_manifest(cli: Cli, workspace: Path) -> None:
    (workspace / "design.yaml").write_text(DESIGN.replace("  control-plane:\n", """\
  control-plane:
    files:
      - path: /etc/kubernetes/manifests/kube-scheduler.yaml
        mode: "0600"
        content: "# the operator's scheduler for {{ node.hostname }}\\n"
""", 1))
    out = workspace / "scripts"
    assert cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki", "-o",
               out, "--node", "g0").returncode == 0
    embedded_archive(out / "genesis.sh", workspace / "genesis").close()
    manifests = workspace / "genesis/files/etc/kubernetes/manifests"
    assert (manifests / "kube-scheduler.yaml").read_text() == "# the operator's scheduler for g0\n"
    assert "kind: Pod" in (manifests / "kube-apiserver.yaml").read_text()


def test_control_plane_problems_name_their_path(cli: Cli, workspace: Path) -> None:
    design = workspace / "design.yaml"
    design.write_text(DESIGN.replace("registry: 10.0.0.1:5000", """\
registry: "http://10.0.0.1:5000"
    images: {kube-apiservr: 10.0.0.1:5000/apiserver:v1}
    ports: {apiserver: 2379}""").replace("kube-apiserver: {audit", "kube-proxy: {audit"))
    result = cli("bootstrap", "validate", design)
    assert result.returncode == 2
    err = result.stderr
    assert "cluster.control_plane.registry: 'http://10.0.0.1:5000' is not a registry" in err
    assert "cluster.control_plane.images: unknown component 'kube-apiservr'" in err
    assert "cluster.control_plane.ports: etcd_client and apiserver are both port 2379" in err
    assert "cluster.control_plane.extra_args: unknown component 'kube-proxy'" in err
    assert "Traceback" not in err
    design.write_text(DESIGN.replace("service_cidr: 10.96.0.0/16", "service_cidr: 10.0.0.0/8")
                      .replace("cluster_dns: 10.96.0.10", "cluster_dns: 10.0.0.10")
                      .replace("registry: 10.0.0.1:5000", "registry: 10.0.0.1:5000\n"
                               "    ports: {apiserver: 7443}"))
    result = cli("bootstrap", "validate", design)
    assert result.returncode == 2
    assert "cluster.service_cidr: 10.0.0.0/8 is too large for the apiserver's " \
           "--service-cluster-ip-range" in result.stderr
    assert "cluster.api_endpoints[0]: https://10.0.0.10:6443 is the genesis node, whose " \
           "apiserver listens on cluster.control_plane.ports.apiserver 7443" in result.stderr
    design.write_text(DESIGN.replace("  genesis: g0\n", ""))
    result = cli("bootstrap", "validate", design)
    assert result.returncode == 2
    assert "cluster.control_plane: needs cluster.genesis: the node that runs it" in result.stderr


def test_missing_control_plane_credentials_say_what_to_add(cli: Cli, workspace: Path) -> None:
    (workspace / "catalog.yaml").write_text(
        CATALOG_WITH_N1.replace('      - {document_name: scheduler, common_name: '
                                '"system:kube-scheduler", usages: [client]}\n', ""))
    assert cli("pki", "generate", workspace / "catalog.yaml", "-o",
               workspace / "pki2").returncode == 0
    result = cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki2",
                 "-o", workspace / "out")
    assert result.returncode == 2
    assert f"{workspace}/pki2/scheduler.pem" in result.stderr
    assert "scheduler (common_name: system:kube-scheduler, usages: [client])" in result.stderr
    assert "apiserver (" not in result.stderr  # only what is missing
    assert not (workspace / "out").exists()


def test_the_wait_for_the_api_is_bounded_and_names_the_last_answer(
        cli: Cli, workspace: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    out = workspace / "scripts"
    assert cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
               "-o", out, "--node", "g0").returncode == 0
    script = out / "genesis.sh"
    extract = "; ".join(f'source <(sed -n "/^{name}() {{/,/^}}/p" {script})'
                        for name in ("api", "wait_for_api"))
    program = (
        "set -euo pipefail; shopt -s inherit_errexit\n"
        "log() { printf 'divingbell-bootstrap: %s\\n' \"$*\" >&2; }\n"
        "fail() { log \"error: $*\"; exit 1; }\n"
        "LOCAL_API_SERVER=https://127.0.0.1:9 READY_TIMEOUT=2 READY_POLL=1\n"
        f"CA_FILE={workspace}/pki/kubernetes.pem API_CERT_FILE={workspace}/pki/admin.pem "
        f"API_KEY_FILE={workspace}/pki/admin-key.pem\n{extract}\nwait_for_api\n")
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 1
    assert "error: the API at https://127.0.0.1:9 is not ready after 2s" in result.stderr
    assert "its last answer: curl: (7)" in result.stderr


def test_the_runtime_reaches_the_sites_registry_and_the_kubelet_takes_extra_config(
        cli: Cli, workspace: Path) -> None:
    ca = (workspace / "pki/kubernetes.pem").read_text()
    runtime = """\
  container_runtime:
    cgroup_driver: cgroupfs
    sandbox_image: 10.0.0.1:5000/pause:3.10
    registries:
      - {host: "10.0.0.1:5000", plain_http: true}
      - host: registry.site
        ca: |
""" + "".join(f"          {line}\n" for line in ca.splitlines()) + """\
  kubelet:
    extra_config: {failCgroupV1: false, maxPods: 50}
"""
    (workspace / "design.yaml").write_text(DESIGN.replace("  control_plane:\n",
                                                          runtime + "  control_plane:\n", 1))
    out = workspace / "scripts"
    result = cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
                 "-o", out, "--node", "n1")
    assert result.returncode == 0, result.stderr
    embedded_archive(out / "join-n1.sh", workspace / "join").close()
    files = workspace / "join/files/etc"
    containerd = (files / "containerd/config.toml").read_text()
    assert "SystemdCgroup = false" in containerd
    assert 'config_path = "/etc/containerd/certs.d"' in containerd
    assert 'sandbox_image = "10.0.0.1:5000/pause:3.10"' in containerd
    assert (files / "containerd/certs.d/10.0.0.1:5000/hosts.toml").read_text().splitlines()[1:] \
        == ['server = "http://10.0.0.1:5000"', "", '[host."http://10.0.0.1:5000"]',
            '  capabilities = ["pull", "resolve"]']
    site = (files / "containerd/certs.d/registry.site/hosts.toml").read_text()
    assert 'ca = "/etc/containerd/certs.d/registry.site/ca.pem"' in site
    assert (files / "containerd/certs.d/registry.site/ca.pem").read_text() == ca
    config = yaml.safe_load((files / "kubernetes/kubelet/config.yaml").read_text())
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["failCgroupV1"] is False and config["maxPods"] == 50

    (workspace / "design.yaml").write_text(DESIGN.replace("  control_plane:\n", """\
  kubelet: {extra_config: {cgroupDriver: systemd}}
  container_runtime: {cgroup_driver: cgroups, registries: [{host: "http://r"}]}
  control_plane:
""", 1))
    refused = cli("bootstrap", "validate", workspace / "design.yaml")
    assert refused.returncode == 2
    assert "cluster.kubelet.extra_config: 'cgroupDriver' is set by divingbell" in refused.stderr
    assert "cluster.container_runtime.cgroup_driver: " in refused.stderr
    assert "cluster.container_runtime.registries[0].host: 'http://r' is not a registry host" \
        in refused.stderr
