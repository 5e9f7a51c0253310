"""The genesis node's static pod manifests are real: built from a design and a generated PKI,
each pod's container command line runs as a plain process on loopback (the binaries the kube
tests use, the manifests' paths mapped into the test directory) and the four components make a
working cluster: `/readyz` answers the admin certificate, a CSR gets signed by the
controller-manager, the scheduler holds its lease. No kubelet: that proof needs a booted node.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.bootstrap.test_build import embedded_archive
from tests.conftest import Cli
from tests.kube.controlplane import ApiError, AssetsMissing, Rest, assets, free_port

pytestmark = pytest.mark.kube

CATALOG = """\
certificate_authorities:
  kubernetes:
    certificates:
      - {document_name: kubelet-g0, common_name: "system:node:g0", groups: [system:nodes]}
      - document_name: apiserver
        common_name: kube-apiserver
        hosts: [127.0.0.1, localhost, 10.96.0.1]
        kubernetes_service_names: [kubernetes.default.svc.cluster.local]
        usages: [server]
      - {document_name: apiserver-kubelet-client, common_name: kube-apiserver-kubelet-client,
         groups: [system:masters], usages: [client]}
      - {document_name: controller-manager, common_name: "system:kube-controller-manager",
         usages: [client]}
      - {document_name: scheduler, common_name: "system:kube-scheduler", usages: [client]}
      - {document_name: admin, common_name: admin, groups: [system:masters], usages: [client]}
keypairs:
  - name: service-account
"""


def design(ports: dict[str, int]) -> str:
    return f"""\
cluster:
  name: proof
  api_endpoints: [https://127.0.0.1:{ports['apiserver']}]
  pod_cidr: 10.97.0.0/16
  service_cidr: 10.96.0.0/16
  cluster_dns: 10.96.0.10
  kubernetes_version: 1.36.2
  genesis: g0
  control_plane:
    registry: registry.test:5000/kube
    ports: {yaml.safe_dump(ports, default_flow_style=True).strip()}
roles:
  control-plane:
    labels:
      dynamic: {{node-role.kubernetes.io/control-plane: "", team: core}}
nodes:
  - {{hostname: g0, ip: 127.0.0.1, role: control-plane}}
"""


def build(cli: Cli, workspace: Path, name: str) -> tuple[Path, float]:
    began = time.monotonic()
    result = cli("bootstrap", "build", workspace / "design.yaml", "--pki", workspace / "pki",
                 "-o", workspace / name)
    assert result.returncode == 0, result.stderr
    embedded_archive(workspace / name / "genesis.sh", workspace / f"{name}-root").close()
    return workspace / f"{name}-root" / "files", time.monotonic() - began


def mapped(argument: str, root: Path) -> str:
    """An absolute path of the node, inside the test directory."""
    for prefix in ("/etc/kubernetes", "/var/lib/etcd"):
        argument = argument.replace(f"={prefix}", f"={root}{prefix}")
    return argument


@pytest.fixture
def binaries() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        return assets()
    except AssetsMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Kubernetes tests: {missing}")
        pytest.skip(str(missing))


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    running: dict[str, subprocess.Popen[bytes]] = {}
    yield running
    for process in reversed(list(running.values())):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(list(running.values())):
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rewrite_kubeconfig(path: Path, root: Path) -> None:
    config = yaml.safe_load(path.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["certificate-authority"] = mapped(
            "=" + cluster["cluster"]["certificate-authority"], root)[1:]
    for user in config["users"]:
        for key in ("client-certificate", "client-key"):
            user["user"][key] = mapped("=" + user["user"][key], root)[1:]
    path.write_text(yaml.safe_dump(config))


def run_genesis_steps(script: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """The script's steps after the kubelet starts (wait for /readyz, for the Node, label,
    validate), as the script defines them, with the node's paths mapped under `root`."""
    functions = "\n".join(f'source <(sed -n "/^{name}() {{/,/^}}/p" {script})' for name in (
        "api", "node_json", "wait_for_api", "wait_until_ready", "apply_labels",
        "validate_control_plane"))
    pki = root / "etc/kubernetes/pki"
    program = (
        "set -euo pipefail; shopt -s inherit_errexit\n"
        "log() { printf 'divingbell-bootstrap: %s\\n' \"$*\" >&2; }\n"
        "fail() { log \"error: $*\"; exit 1; }\n"
        f'eval "$(sed -n "/^readonly NODE_NAME=/,/^changes=0$/p" {script} | '
        'sed "s/^readonly //")"\n'
        f"CA_FILE={pki}/ca.pem API_CERT_FILE={pki}/admin.pem API_KEY_FILE={pki}/admin-key.pem\n"
        "READY_TIMEOUT=3 READY_POLL=1 changes=0\n"
        f"{functions}\n"
        "wait_for_api; wait_until_ready; apply_labels; validate_control_plane\n"
        "echo changes=$changes\n")
    return subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_static_pods_bring_up_a_control_plane_that_signs_csrs(
        cli: Cli, tmp_path: Path, binaries: Path,
        processes: dict[str, subprocess.Popen[bytes]]) -> None:
    ports = {"apiserver": free_port(), "etcd_client": free_port(), "etcd_peer": free_port(),
             "controller_manager": free_port(), "scheduler": free_port()}
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "design.yaml").write_text(design(ports))
    assert cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki").returncode == 0
    root, build_time = build(cli, tmp_path, "first")
    manifests = {path.stem: yaml.safe_load(path.read_text())
                 for path in sorted((root / "etc/kubernetes/manifests").glob("*.yaml"))}
    assert sorted(manifests) == ["etcd", "kube-apiserver", "kube-controller-manager",
                                 "kube-scheduler"]
    kubelet_config = yaml.safe_load((root / "etc/kubernetes/kubelet/config.yaml").read_text())
    assert kubelet_config["staticPodPath"] == "/etc/kubernetes/manifests"

    # Each pod's file paths live on the node; here they live under `root`. The kubeconfigs
    # name files too, so they are rewritten the same way.
    for name in ("controller-manager.conf", "scheduler.conf", "admin.conf"):
        rewrite_kubeconfig(root / "etc/kubernetes" / name, root)
    timings: dict[str, float] = {"build": build_time}
    commands: dict[str, list[str]] = {}
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        (container,) = manifests[component]["spec"]["containers"]
        assert container["image"] == f"registry.test:5000/kube/{component}:v" + (
            "3.6.0" if component == "etcd" else "1.36.2")
        commands[component] = [str(binaries / container["command"][0]),
                               *(mapped(arg, root) for arg in container["command"][1:])]
    restarts = dict.fromkeys(commands, 0)
    restart_after: dict[str, float] = {}

    def run(component: str) -> None:
        """Start (or, as the kubelet does for a static pod, restart) a component."""
        with (tmp_path / f"{component}.log").open("ab") as log:
            processes[component] = subprocess.Popen(
                commands[component], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def keep_running() -> None:
        # The controller-manager exits when it starts before the apiserver has made RBAC's
        # bootstrap roles; the kubelet restarts a static pod's container, and so does this,
        # after a back-off doubling from 0.5 s as the kubelet's does (restarted at once, five
        # exits came within a second, before the roles existed: a CI failure).
        for name, process in list(processes.items()):
            if process.poll() is None:
                continue
            if name not in restart_after:
                restarts[name] += 1
                assert restarts[name] <= 5, (
                    f"{name} exited ({process.returncode}) {restarts[name]} times:\n"
                    + (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
                restart_after[name] = time.monotonic() + 0.5 * 2 ** (restarts[name] - 1)
            elif time.monotonic() >= restart_after[name]:
                del restart_after[name]
                run(name)

    began = time.monotonic()
    for component in commands:
        run(component)

    pki = root / "etc/kubernetes/pki"
    admin = Rest(f"https://127.0.0.1:{ports['apiserver']}", pki / "ca.pem",
                 cert=(pki / "admin.pem", pki / "admin-key.pem"))
    deadline = time.monotonic() + 120
    last = ""
    while True:
        keep_running()
        try:
            response = admin.client.get("/readyz")
            last = f"{response.status_code} {response.text[-200:]}"
            if response.status_code == 200:
                break
        except httpx.HTTPError as exc:
            last = str(exc)
        assert time.monotonic() < deadline, f"no /readyz in 120 s: {last}"
        time.sleep(0.25)
    timings["readyz"] = time.monotonic() - began

    # The controller-manager signs an approved CSR with the cluster CA from the PKI.
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")]))
               .sign(key, hashes.SHA256()))
    pem = request.public_bytes(serialization.Encoding.PEM)
    admin.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", {
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "proof"},
        "spec": {"request": base64.b64encode(pem).decode(), "usages": ["client auth"],
                 "signerName": "kubernetes.io/kube-apiserver-client"}})
    csr = admin.get("/apis/certificates.k8s.io/v1/certificatesigningrequests/proof")
    csr["status"] = {"conditions": [{"type": "Approved", "status": "True",
                                     "reason": "Test", "message": "approved by the test"}]}
    admin.put("/apis/certificates.k8s.io/v1/certificatesigningrequests/proof/approval", csr)
    signed = None
    while signed is None:
        keep_running()
        assert time.monotonic() < deadline + 60, "the CSR was approved but never signed"
        signed = admin.get("/apis/certificates.k8s.io/v1/certificatesigningrequests/proof"
                           ).get("status", {}).get("certificate")
        time.sleep(0.25)
    certificate = x509.load_pem_x509_certificate(base64.b64decode(signed))
    ca = x509.load_pem_x509_certificate((tmp_path / "pki/kubernetes.pem").read_bytes())
    assert certificate.issuer == ca.subject
    certificate.verify_directly_issued_by(ca)
    timings["csr signed"] = time.monotonic() - began

    # The scheduler and the controller-manager are up with their own certificates: each
    # holds its leader lease in kube-system.
    for lease in ("kube-scheduler", "kube-controller-manager"):
        while True:
            keep_running()
            try:
                holder = admin.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/"
                                   f"{lease}")["spec"].get("holderIdentity")
                if holder:
                    break
            except ApiError as error:
                assert error.code == 404, error
            assert time.monotonic() < deadline + 60, f"{lease} never took its lease"
            time.sleep(0.25)
    timings["leases held"] = time.monotonic() - began

    # The genesis script's own API steps against this control plane, the test acting as the
    # kubelet (it registers the Node and reports the static pods' mirror pods Ready).
    script = tmp_path / "first/genesis.sh"
    admin.post("/api/v1/nodes", {"metadata": {"name": "g0"}})
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "kubelet is posting ready status"}
    admin.patch("/api/v1/nodes/g0/status", {"status": {"conditions": [ready]}},
                "strategic-merge")
    for component, manifest in manifests.items():
        pod = {**manifest, "metadata": {
            **manifest["metadata"], "name": f"{component}-g0",
            "annotations": {"kubernetes.io/config.mirror": "test",
                            "kubernetes.io/config.source": "file"}},
            "spec": {**manifest["spec"], "nodeName": "g0"}}
        admin.post("/api/v1/namespaces/kube-system/pods", pod)
    steps = run_genesis_steps(script, root)
    assert steps.returncode == 1, steps.stderr
    assert "control-plane pods not Ready after 3s: etcd-g0 kube-apiserver-g0 " \
           "kube-controller-manager-g0 kube-scheduler-g0" in steps.stderr
    assert "labelled node g0" in steps.stderr  # before the validation that failed
    for component in manifests:
        admin.patch(f"/api/v1/namespaces/kube-system/pods/{component}-g0/status", {
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "observedGeneration": 1, "status": "True"}]}},
            "strategic-merge")
    began = time.monotonic()
    steps = run_genesis_steps(script, root)
    assert steps.returncode == 0, steps.stderr
    timings["genesis API steps"] = time.monotonic() - began
    assert "control plane healthy: etcd-g0 kube-apiserver-g0 kube-controller-manager-g0 " \
           "kube-scheduler-g0 Ready, node g0 Ready" in steps.stderr
    node = admin.get("/api/v1/nodes/g0")["metadata"]
    assert node["labels"]["node-role.kubernetes.io/control-plane"] == ""
    assert node["labels"]["team"] == "core"
    assert node["annotations"]["divingbell.io/bootstrap-labels"] == (
        "node-role.kubernetes.io/control-plane,team")
    assert steps.stdout == "changes=0\n"  # the labels were there: no patch
    assert "labelled" not in steps.stderr
    admin.close()

    # A second build changes nothing: the same bytes, script and every file.
    again, _ = build(cli, tmp_path, "second")
    assert (tmp_path / "second/genesis.sh").read_bytes() == (
        tmp_path / "first/genesis.sh").read_bytes()
    for path in (root / "etc/kubernetes/manifests").iterdir():
        assert (again / "etc/kubernetes/manifests" / path.name).read_bytes() == path.read_bytes()
    print("\n" + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items())
          + f"; restarts {restarts}")
    shutil.rmtree(root / "var", ignore_errors=True)
