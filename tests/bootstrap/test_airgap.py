"""The air-gapped artefacts genesis and joins use: control-plane images in a local registry
(pulled back by digest, byte for byte the binaries), and kubelet/kubectl from a signed local
apt repository installed into a Debian root through the sources file a join script writes,
with apt checking the signature."""

from __future__ import annotations

import hashlib
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from divingbell.bootstrap.controlplane import image
from divingbell.bootstrap.design import parse_design
from divingbell.core.host import Host
from tests.aptrepo import REPO_PATH, build_repo
from tests.bootstrap import airgap
from tests.bootstrap.test_build import embedded_archive
from tests.conftest import Cli
from tests.kube import controlplane


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def has_interpreter(path: Path) -> bool:
    """Whether an ELF64 executable names a dynamic loader (a PT_INTERP program header)."""
    data = path.read_bytes()
    assert data[:5] == b"\x7fELF\x02"
    offset = int.from_bytes(data[32:40], "little")
    size, count = (int.from_bytes(data[54:56], "little"), int.from_bytes(data[56:58], "little"))
    return any(int.from_bytes(data[offset + i * size:offset + i * size + 4], "little") == 3
               for i in range(count))


def test_control_plane_images_pull_back_from_the_registry_by_digest(tmp_path: Path) -> None:
    began = time.monotonic()
    airgap.image_layouts()
    built = time.monotonic() - began
    with airgap.registry(tmp_path / "registry") as running:
        began = time.monotonic()
        pushed = airgap.push_control_plane(running)
        push_time = time.monotonic() - began
        # The design names the same references the registry holds.
        design = parse_design(textwrap.dedent(f"""\
            cluster:
              name: c
              api_endpoints: [https://127.0.0.1:6443]
              pod_cidr: 10.97.0.0/16
              service_cidr: 10.96.0.0/16
              cluster_dns: 10.96.0.10
              kubernetes_version: {controlplane.VERSION.removeprefix("v")}
              genesis: g0
              control_plane: {{registry: "{running.address}/kube"}}
            roles: {{cp: {{}}}}
            nodes: [{{hostname: g0, ip: 127.0.0.1, role: cp}}]
            """))
        plane = design.cluster.control_plane
        assert plane is not None
        assert sorted(pushed) == sorted(
            [image(plane, name, design.cluster.kubernetes_version) for name in airgap.IMAGES]
            + [f"{running.address}/kube/pause:{airgap.PAUSE_TAG}"])
        for reference, digest in pushed.items():
            by_digest = reference.rpartition(":")[0] + "@" + digest
            inspected = subprocess.run(
                ["skopeo", "inspect", "--tls-verify=false", f"docker://{by_digest}"],
                capture_output=True, text=True, check=True).stdout
            assert f'"Digest": "{digest}"' in inspected
        apiserver = next(r for r in pushed if "/kube-apiserver:" in r)
        pulled = tmp_path / "pulled"
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{apiserver.rpartition(':')[0]}@{pushed[apiserver]}",
                        f"oci:{pulled}:apiserver"], check=True, capture_output=True)
        subprocess.run(["umoci", "unpack", "--image", f"{pulled}:apiserver", tmp_path / "b"],
                       check=True, capture_output=True)
        unpacked = tmp_path / "b/rootfs/usr/local/bin/kube-apiserver"
        assert sha256(unpacked) == sha256(airgap.binary("kube-apiserver"))
        # The pause image's process: static, and it refuses to run but as a container's init.
        pause = next(r for r in pushed if "/pause:" in r)
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{pause.rpartition(':')[0]}@{pushed[pause]}",
                        f"oci:{pulled}:pause"], check=True, capture_output=True)
        subprocess.run(["umoci", "unpack", "--image", f"{pulled}:pause", tmp_path / "p"],
                       check=True, capture_output=True)
        assert not has_interpreter(tmp_path / "p/rootfs/pause")  # static: runs in any image
        # Outside a PID namespace of its own (a hostPID pod) it warns and still runs, as
        # Kubernetes' pause does; it stops on SIGTERM.
        pause_process = subprocess.Popen([tmp_path / "p/rootfs/pause"], stderr=subprocess.PIPE)
        assert pause_process.stderr is not None
        # Warned once its handlers are in place; still running.
        warning = pause_process.stderr.readline()
        assert b"pause should be the first process" in warning
        assert pause_process.poll() is None
        pause_process.terminate()
        assert pause_process.wait(timeout=10) == 0
    assert running.process.poll() is not None  # stopped with the test
    print(f"\nimages built (or cached) in {built:.1f} s, pushed in {push_time:.1f} s")


CATALOG = """\
certificate_authorities:
  kubernetes:
    certificates:
      - {document_name: kubelet-g0, common_name: "system:node:g0", groups: [system:nodes]}
"""


def join_files(cli: Cli, tmp_path: Path, key: str) -> Path:
    """The files a join script for g0 writes, from a design whose apt repository is the
    local one, signed with `key`."""
    tmp_path.mkdir()
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    assert cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki"
               ).returncode == 0
    (tmp_path / "design.yaml").write_text(textwrap.dedent("""\
        cluster:
          name: c
          api_endpoints: [https://127.0.0.1:6443]
          pod_cidr: 10.97.0.0/16
          service_cidr: 10.96.0.0/16
          cluster_dns: 10.96.0.10
          kubernetes_version: 1.36.2
        apt_repositories:
          - name: kube
            uris: [file:/srv/repo]
            suites: [./]
            key: |
        """) + textwrap.indent(key, " " * 8) + textwrap.dedent("""\
        roles: {worker: {packages: [kubelet=1.36.2-1, kubectl]}}
        nodes: [{hostname: g0, ip: 127.0.0.1, role: worker}]
        """))
    result = cli("bootstrap", "build", tmp_path / "design.yaml", "--pki", tmp_path / "pki",
                 "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    embedded_archive(tmp_path / "out/join-g0.sh", tmp_path / "unpacked").close()
    return tmp_path / "unpacked/files"


def install_apt_files(files: Path, host: Host) -> None:
    host.path("/etc/apt/sources.list").write_text("")
    for relative in ("etc/apt/sources.list.d/bootstrap-kube.sources",
                     "etc/apt/keyrings/bootstrap-kube.asc"):
        target = host.path("/" + relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((files / relative).read_bytes())


@pytest.mark.kernel
def test_the_signed_apt_repository_installs_the_kubelet(cli: Cli, tmp_path: Path,
                                                        debian_host: Host) -> None:
    began = time.monotonic()
    repo = airgap.kube_apt_repo(tmp_path / "repo")
    repo_time = time.monotonic() - began
    repo.install_into(debian_host.root)
    files = join_files(cli, tmp_path / "design", repo.key)
    install_apt_files(files, debian_host)
    root = str(debian_host.root)

    # A key the repository was not signed with: apt refuses it.
    other = build_repo(tmp_path / "other", packages=())
    debian_host.path("/etc/apt/keyrings/bootstrap-kube.asc").write_text(other.key)
    refused = subprocess.run(["chroot", root, "apt-get", "update"], capture_output=True,
                             text=True, check=False)
    assert "NO_PUBKEY" in refused.stderr + refused.stdout or "not signed" in refused.stderr
    install_apt_files(files, debian_host)

    began = time.monotonic()
    subprocess.run(["chroot", root, "apt-get", "update", "-q"], capture_output=True, check=True)
    installed = subprocess.run(
        ["chroot", root, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
         "-q", "--no-install-recommends", "kubelet=1.36.2-1", "kubectl"],
        capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    install_time = time.monotonic() - began
    version = subprocess.run(["chroot", root, "/usr/bin/kubelet", "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"Kubernetes {controlplane.VERSION}"
    assert debian_host.path("/lib/systemd/system/kubelet.service").is_file()
    status = subprocess.run(["chroot", root, "dpkg-query", "-W", "-f", "${Version}", "kubelet"],
                            capture_output=True, text=True, check=True).stdout
    assert status == "1.36.2-1"
    assert REPO_PATH == "/srv/repo"
    print(f"\nrepository built in {repo_time:.1f} s, kubelet+kubectl installed in "
          f"{install_time:.1f} s")
