"""`divingbell bootstrap validate|build`: designs checked with paths, scripts built shellcheck
clean with their files and modes in the embedded archive, strict templates."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from divingbell.core.engine.journal import find_owned_files
from divingbell.core.host import Host
from tests.aptrepo import build_repo
from tests.conftest import Cli

CATALOG = """\
certificate_authorities:
  kubernetes:
    certificates:
      - {document_name: kubelet-n0, common_name: "system:node:n0", groups: [system:nodes]}
      - {document_name: kubelet-n1, common_name: "system:node:n1", groups: [system:nodes]}
"""
DESIGN = """\
cluster:
  name: demo
  api_endpoints: [https://10.0.0.10:6443]
  pod_cidr: 10.97.0.0/16
  service_cidr: 10.96.0.0/16
  cluster_dns: 10.96.0.10
  kubernetes_version: 1.30.2
  genesis: n0
roles:
  control-plane:
    packages: [kubelet=1.30.2-1.1]
    files:
      - path: /etc/kubernetes/manifests/note.yaml
        content: "# static pods of {{ node.hostname }} talk to {{ api_server }}\\n"
        mode: "0600"
  worker:
    files:
      - path: /usr/local/bin/hello
        content: "#!/bin/sh\\necho {{ node.hostname }} {{ static_labels.rack }}\\n"
        mode: "0755"
    labels:
      static: {rack: r1}
      dynamic: {team: blue}
nodes:
  - {hostname: n0, ip: 10.0.0.10, role: control-plane}
  - {hostname: n1, ip: 10.0.0.11, role: worker}
"""


@pytest.fixture
def workspace(cli: Cli, tmp_path: Path) -> Path:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "design.yaml").write_text(DESIGN)
    result = cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki")
    assert result.returncode == 0, result.stderr
    return tmp_path


def embedded_archive(script: Path, into: Path) -> tarfile.TarFile:
    """The script's own unpack function, run by bash, writes the archive's files into `into`;
    the raw archive is returned for its modes."""
    into.mkdir()
    text = script.read_text()
    start = text.index("<<'DIVINGBELL_ARCHIVE'")
    body = text[text.index("\n", start) + 1:text.index("\nDIVINGBELL_ARCHIVE\n", start)]
    subprocess.run(["bash", "-c", f'source <(sed -n "/^unpack_archive() {{/,/^}}/p" {script}); '
                    f'unpack_archive {into}'], check=True)
    raw = subprocess.run(["base64", "-d"], input=body.encode(), capture_output=True,
                         check=True).stdout
    archive = into.parent / "archive.tar.gz"
    archive.write_bytes(raw)
    return tarfile.open(archive)


def test_build_writes_shellcheck_clean_scripts_with_their_files(cli: Cli,
                                                                workspace: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("needs shellcheck (installed by .ci/run)")
    out = workspace / "scripts"
    result = cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
                 "-o", out, "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["file"] for s in report["scripts"]] == ["genesis.sh", "join-n1.sh"]
    assert "PRIVATE KEY" not in result.stdout
    for name in ("genesis.sh", "join-n1.sh"):
        script = out / name
        assert stat.S_IMODE(script.stat().st_mode) == 0o700
        lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True,
                              check=False)
        assert lint.returncode == 0, lint.stdout
        assert script.read_text().startswith("#!/bin/bash\n")
        assert "set -euo pipefail" in script.read_text()

    archive = embedded_archive(out / "join-n1.sh", workspace / "unpacked")
    modes = {m.name: (stat.S_IMODE(m.mode), m.uid) for m in archive.getmembers()}
    assert modes["files/etc/kubernetes/pki/kubelet-key.pem"] == (0o600, 0)
    assert modes["files/etc/kubernetes/kubelet/kubeconfig"] == (0o600, 0)
    assert modes["files/usr/local/bin/hello"] == (0o755, 0)
    unpacked = workspace / "unpacked" / "files"
    assert (unpacked / "usr/local/bin/hello").read_text() == "#!/bin/sh\necho n1 r1\n"
    assert stat.S_IMODE((unpacked / "etc/kubernetes/pki/kubelet-key.pem").stat().st_mode) == 0o600
    assert (unpacked / "etc/kubernetes/pki/kubelet.pem").read_text() == (
        workspace / "pki/kubelet-n1.pem").read_text()
    dropin = (unpacked / "etc/systemd/system/kubelet.service.d/10-divingbell.conf").read_text()
    assert "--hostname-override=n1 --node-ip=10.0.0.11 --node-labels=rack=r1\n" in dropin
    manifest = (workspace / "unpacked/manifest").read_text().splitlines()
    assert "755 /usr/local/bin/hello" in manifest
    assert "600 /etc/kubernetes/pki/kubelet-key.pem" in manifest
    kubelet_config = (unpacked / "etc/kubernetes/kubelet/config.yaml").read_text()
    assert "  - 10.96.0.10\n" in kubelet_config
    genesis = (out / "genesis.sh").read_text()
    assert "readonly PACKAGES=(containerd kubelet=1.30.2-1.1 curl)" in genesis
    assert "# divingbell genesis script for node n0" in genesis

    # Builds are reproducible: the same design and PKI give the same bytes.
    first = (out / "join-n1.sh").read_bytes()
    again = cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
                "-o", out, "--node", "n1")
    assert again.returncode == 0
    assert (out / "join-n1.sh").read_bytes() == first


def test_design_problems_have_paths_and_lines(cli: Cli, workspace: Path) -> None:
    design = workspace / "design.yaml"
    design.write_text(DESIGN.replace("cluster_dns: 10.96.0.10", "cluster_dns: 10.99.0.10")
                      .replace("role: worker}", "role: wroker}")
                      .replace("ip: 10.0.0.11", "ip: 10.0.0.10")
                      .replace("static: {rack: r1}",
                               "static: {rack: r1, node-role.kubernetes.io/worker: ''}")
                      .replace("    packages: [kubelet=1.30.2-1.1]", "    package: [kubelet]"))
    result = cli("bootstrap", "validate", design)
    assert result.returncode == 2
    err = result.stderr
    assert (f"cluster: cluster_dns 10.99.0.10 is outside service_cidr 10.96.0.0/16 "
            f"({design}:1)") in err
    assert f"roles.control-plane.package: unknown key 'package'; did you mean 'packages'? " \
           f"({design}:11)" in err
    assert "roles.worker.labels.static: the kubelet may not set 'node-role.kubernetes.io/worker'" \
           " on its own Node: put it under labels.dynamic" in err
    assert "Traceback" not in err
    # Cross checks run once each field is valid on its own.
    design.write_text(DESIGN.replace("role: worker}", "role: wroker}")
                      .replace("ip: 10.0.0.11", "ip: 10.0.0.10"))
    as_json = cli("bootstrap", "validate", design, "--format", "json")
    assert as_json.returncode == 2
    problems = json.loads(as_json.stdout)["problems"]
    assert problems == [
        {"path": "nodes[1].role", "message": "unknown role 'wroker'; did you mean 'worker'?",
         "location": f"{design}:26"},
        {"path": "nodes[1].ip", "message": "10.0.0.10 is also the address of 'n0'",
         "location": f"{design}:26"},
    ]
    assert cli("bootstrap", "build", design, "--pki", workspace / "pki", "-o",
               workspace / "out").returncode == 2
    assert not (workspace / "out").exists()


def test_an_undefined_template_variable_or_missing_certificate_fails_the_build(
        cli: Cli, workspace: Path) -> None:
    design = workspace / "design.yaml"
    design.write_text(DESIGN.replace("{{ static_labels.rack }}", "{{ node.rack }}"))
    out = workspace / "scripts"
    result = cli("bootstrap", "build", design, "--pki", workspace / "pki", "-o", out)
    assert result.returncode == 2
    assert "roles.worker.files[0].content: 'divingbell.bootstrap.design.Node object' has no " \
           "attribute 'rack'" in result.stderr
    assert not out.exists()

    design.write_text(DESIGN.replace("hostname: n1", "hostname: n2"))
    missing = cli("bootstrap", "build", design, "--pki", workspace / "pki", "-o", out)
    assert missing.returncode == 2
    assert f"pki: {workspace}/pki/kubelet-n2.pem, {workspace}/pki/kubelet-n2-key.pem not found" \
        in missing.stderr
    assert "document_name: kubelet-n2" in missing.stderr
    assert not out.exists()


def test_build_from_the_pki_bundle_gives_the_same_scripts(cli: Cli, workspace: Path) -> None:
    from_dir, from_bundle = workspace / "a", workspace / "b"
    for pki, out in ((workspace / "pki", from_dir),
                     (workspace / "pki/certificates.yaml", from_bundle)):
        result = cli("bootstrap", "build", workspace / "design.yaml", "--pki", pki, "-o", out)
        assert result.returncode == 0, result.stderr
    for name in ("genesis.sh", "join-n1.sh"):
        assert (from_dir / name).read_bytes() == (from_bundle / name).read_bytes()
    (workspace / "design.yaml").write_text(DESIGN.replace("hostname: n1", "hostname: n2"))
    missing = cli("bootstrap", "build", workspace / "design.yaml", "--pki",
                  workspace / "pki/certificates.yaml", "-o", workspace / "c")
    assert missing.returncode == 2
    bundle = workspace / "pki/certificates.yaml"
    assert (f"kubelet-n2 (deckhand/Certificate/v1) in {bundle}, kubelet-n2 "
            f"(deckhand/CertificateKey/v1) in {bundle} not found") in missing.stderr


def test_the_wait_for_ready_is_bounded(cli: Cli, workspace: Path, tmp_path: Path) -> None:
    """The script's own wait, run against an API server that never answers: it gives up
    after the design's timeout with a hint, rather than hanging the unit forever."""
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    out = workspace / "scripts"
    assert cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
               "-o", out, "--node", "n1").returncode == 0
    script = out / "join-n1.sh"
    extract = "; ".join(f'source <(sed -n "/^{name}() {{/,/^}}/p" {script})'
                        for name in ("api", "node_json", "wait_until_ready"))
    program = (
        "set -euo pipefail; shopt -s inherit_errexit\n"
        "log() { printf 'divingbell-bootstrap: %s\\n' \"$*\" >&2; }\n"
        "fail() { log \"error: $*\"; exit 1; }\n"
        "NODE_NAME=n1 API_SERVER=https://127.0.0.1:9 READY_TIMEOUT=2 READY_POLL=1\n"
        f"CA_FILE={workspace}/pki/kubernetes.pem API_CERT_FILE={workspace}/pki/kubelet-n1.pem "
        f"API_KEY_FILE={workspace}/pki/kubelet-n1-key.pem\n{extract}\nwait_until_ready\n")
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 1
    assert "waiting up to 2s for node n1 to be Ready at https://127.0.0.1:9" in result.stderr
    assert "error: node n1 is not Ready after 2s (journalctl -u kubelet)" in result.stderr


def test_the_agent_does_not_take_a_scripts_files_for_its_own(cli: Cli, workspace: Path) -> None:
    """Found on booted machines (test_genesis_nspawn.py): the script's apt sources and keyring
    had the agent's apt module's names, so the agent DaemonSet on every bootstrapped node
    refused to converge (journal missing, divingbell's files present) and would have taken
    them for its own."""
    key = build_repo(workspace / "repo", packages=()).key
    design = workspace / "design.yaml"
    design.write_text(DESIGN + "apt_repositories:\n  - name: site\n    uris: [file:/srv/repo]\n"
                      "    suites: [./]\n    key: |\n"
                      + "".join(f"      {line}\n" for line in key.strip().splitlines()))
    out = workspace / "scripts"
    result = cli("bootstrap", "build", design, "--pki", workspace / "pki", "-o", out,
                 "--node", "n1")
    assert result.returncode == 0, result.stderr
    embedded_archive(out / "join-n1.sh", workspace / "unpacked").close()
    root = workspace / "unpacked" / "files"
    assert list(root.glob("etc/apt/sources.list.d/*.sources")), "the design's repository"
    assert find_owned_files(Host(root=root)) == []
