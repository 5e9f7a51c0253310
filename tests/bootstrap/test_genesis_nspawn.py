"""Issue 25's proof, all real: three booted systemd-nspawn machines on one bridge (in a network
namespace of their own, never on this machine), a site's signed apt repository (kubelet,
kubectl, curl) in each, and a site registry on the bridge holding the control-plane and pause
images. `divingbell bootstrap build` makes the scripts from the design; genesis on machine 1
brings up etcd, the apiserver, the controller-manager and the scheduler as static pods under the
real kubelet, from that registry; join scripts make machines 2 and 3 nodes of it. Then the
agent DaemonSet `divingbell manifests` prints, its image from the same registry, converges a
net.* sysctl inside each machine, and `divingbell bootstrap teardown` (from the agent's image,
on machine 3) leaves two healthy nodes. Each step's time is printed, never asserted.

The machines are tests/kube/node.py's, started bare (no kubelet, no control plane of the
session): the design's containerd configuration replaces the built-in one with what this host
needs (`restrict_oom_score_adj`, the runc wrapper, cgroupfs), and `kubelet.extra_config` says
cgroup v1 (tests/kube/node.py says why each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.agent.manifests import build, to_yaml
from tests.aptrepo import build_repo
from tests.booted import extract
from tests.bootstrap import airgap
from tests.bootstrap.conftest import curl_debs
from tests.conftest import Cli
from tests.kube.node import Node, containerd_config, divingbell_image, node_tarball
from tests.kube.standin import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.kube, pytest.mark.kernel]

BRIDGE = "10.234.0"
REGISTRY = f"{BRIDGE}.1:5000"
SCRIPT = "/var/lib/divingbell/bootstrap.sh"
ADMIN = "/etc/kubernetes/admin.conf"
DEB = airgap.DEB_VERSION
MACHINES = ("m1", "m2", "m3")
KEY = "net.ipv4.tcp_fin_timeout"

# What this host needs from containerd (tests/kube/node.py): the design's override of the file
# divingbell renders, as a site with such hosts would write it.
CONTAINERD = containerd_config("{{ cluster.container_runtime.sandbox_image }}",
                               registry_config_path="/etc/containerd/certs.d")


def ip(machine: int) -> str:
    return f"{BRIDGE}.{10 + machine}"


def catalog() -> str:
    certificates = [
        {"document_name": "apiserver", "common_name": "kube-apiserver", "usages": ["server"],
         "hosts": [ip(1), "127.0.0.1", "localhost", "10.96.0.1"],
         "kubernetes_service_names": ["kubernetes.default.svc.cluster.local"]},
        {"document_name": "apiserver-kubelet-client",
         "common_name": "kube-apiserver-kubelet-client", "groups": ["system:masters"],
         "usages": ["client"]},
        {"document_name": "controller-manager", "common_name": "system:kube-controller-manager",
         "usages": ["client"]},
        {"document_name": "scheduler", "common_name": "system:kube-scheduler",
         "usages": ["client"]},
        {"document_name": "admin", "common_name": "admin", "groups": ["system:masters"],
         "usages": ["client"]},
        *({"document_name": f"kubelet-{name}", "common_name": f"system:node:{name}",
           "groups": ["system:nodes"], "hosts": [name, ip(index)]}
          for index, name in enumerate(MACHINES, start=1))]
    return json.dumps({"certificate_authorities": {"kubernetes": {"certificates": certificates}},
                       "keypairs": [{"name": "service-account"}]})


def design(key: str) -> str:
    containerd = [{"path": "/etc/containerd/config.toml", "mode": "0644", "content": CONTAINERD}]
    return yaml.safe_dump({
        "cluster": {
            "name": "proof", "api_endpoints": [f"https://{ip(1)}:6443"],
            "pod_cidr": "10.97.0.0/16", "service_cidr": "10.96.0.0/16",
            "cluster_dns": "10.96.0.10", "kubernetes_version": DEB.split("-")[0],
            "genesis": MACHINES[0], "ready_timeout_seconds": 600, "ready_poll_seconds": 2,
            "container_runtime": {
                "sandbox_image": f"{REGISTRY}/kube/pause:{airgap.PAUSE_TAG}",
                "cgroup_driver": "cgroupfs",
                "registries": [{"host": REGISTRY, "plain_http": True}]},
            "kubelet": {"extra_config": {
                "failCgroupV1": False, "protectKernelDefaults": False,
                "localStorageCapacityIsolation": False,
                "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                                 "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
                "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
                "shutdownGracePeriod": "0s"}},
            "control_plane": {"registry": f"{REGISTRY}/kube",
                              "etcd_version": airgap.ETCD_TAG.removeprefix("v")}},
        "host": {"os_release": ["debian 12"], "min_disk_mb": 1},
        "apt_repositories": [{"name": "site", "uris": ["file:/srv/repo"], "suites": ["./"],
                              "key": key}],
        "roles": {
            "control-plane": {
                "packages": [f"kubelet={DEB}", "kubectl"], "files": containerd,
                "labels": {"static": {"rack": "r1"},
                           "dynamic": {"team": "blue",
                                       "node-role.kubernetes.io/control-plane": ""}}},
            "worker": {
                "packages": [f"kubelet={DEB}"], "files": containerd,
                "labels": {"static": {"rack": "r2"}, "dynamic": {"team": "green"}}}},
        "nodes": [
            {"hostname": MACHINES[0], "ip": ip(1), "role": "control-plane"},
            {"hostname": MACHINES[1], "ip": ip(2), "role": "worker"},
            {"hostname": MACHINES[2], "ip": ip(3), "role": "worker",
             "labels": {"dynamic": {"topology.kubernetes.io/zone": "z3"}}}]})


class Lan:
    """A bridge in a network namespace of its own; machines join it with a veth each."""

    def __init__(self) -> None:
        self.netns = f"dblan-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        for argv in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                     ["addr", "add", f"{BRIDGE}.1/24", "dev", "br0"],
                     ["link", "set", "br0", "up"]):
            subprocess.run(["ip", "-n", self.netns, *argv], check=True)

    def attach(self, machine: Node, address: str) -> None:
        port = f"port{machine.index}"
        subprocess.run(["ip", "-n", self.netns, "link", "add", port, "type", "veth", "peer",
                        "name", "eth0", "netns", machine.netns], check=True)
        for argv in (["link", "set", port, "master", "br0"], ["link", "set", port, "up"]):
            subprocess.run(["ip", "-n", self.netns, *argv], check=True)
        for argv in (["addr", "add", f"{address}/24", "dev", "eth0"],
                     ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", machine.netns, *argv], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.netns], check=False)


@pytest.fixture
def lan() -> Iterator[Lan]:
    network = Lan()
    yield network
    network.close()


@pytest.fixture
def machines(tmp_path: Path, lan: Lan) -> Iterator[list[Node]]:
    """Three bare machines (prepared, not booted), on the lan."""
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    lower = tmp_path / "node-root"
    extract(node_tarball(), lower)
    made: list[Node] = []
    try:
        for index, name in enumerate(MACHINES, start=1):
            machine = Node(name, index, None, lower, tmp_path / f"machine-{index}", [], None)
            made.append(machine)
            machine.prepare()
            lan.attach(machine, ip(index))
        yield made
    finally:
        for machine in made:
            machine.stop()


def booted(machine: Node, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if machine.leader():
            state = machine.run("systemctl", "is-active", "containerd", check=False)
            if state.stdout.strip() == "active":
                return
        assert time.monotonic() < deadline, f"{machine.name} not up in {timeout:.0f} s"
        time.sleep(0.5)


def kubectl(machine: Node, *args: str) -> Any:
    result = machine.run("kubectl", f"--kubeconfig={ADMIN}", *args, "-o", "json")
    return json.loads(result.stdout)


def ready(node: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node["status"].get("conditions", []))


def kubernetes_service(machine: Node) -> None:
    """No kube-proxy here: the `kubernetes` Service (10.96.0.1:443, what in-cluster clients
    are told) DNATed to the apiserver in the machine's network namespace."""
    for argv in (["ip", "route", "add", "10.96.0.1/32", "dev", "eth0"],
                 ["iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.96.0.1/32", "-p", "tcp",
                  "--dport", "443", "-j", "DNAT", "--to-destination", f"{ip(1)}:6443"]):
        subprocess.run(["ip", "netns", "exec", machine.netns, *argv], check=True)


def sysctl(machine: Node) -> str:
    """The value inside the machine (its network namespace), not as any pod reports it."""
    return subprocess.run(["ip", "netns", "exec", machine.netns, "cat",
                           "/proc/sys/" + KEY.replace(".", "/")],
                          capture_output=True, text=True, check=True).stdout.strip()


def run_script(machine: Node, text: str) -> subprocess.CompletedProcess[str]:
    target = machine.root / SCRIPT.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(0o700)
    result = machine.run("bash", SCRIPT, check=False, timeout=900)
    assert result.returncode == 0, (
        f"{result.stderr[-4000:]}\n{machine.journal('containerd')}\n{machine.journal()}")
    return result


def test_genesis_and_joins_on_booted_machines(cli: Cli, tmp_path: Path, lan: Lan,
                                              machines: list[Node]) -> None:
    timings: dict[str, float] = {}

    def step(name: str, began: float) -> None:
        timings[name] = time.monotonic() - began
        print(f"\n{name}: {timings[name]:.1f} s", flush=True)

    began = time.monotonic()
    repo = build_repo(tmp_path / "apt", packages=(),
                      extra_debs=(*airgap.kube_debs(), *curl_debs()))
    step("apt repository built", began)

    (tmp_path / "catalog.yaml").write_text(catalog())
    (tmp_path / "design.yaml").write_text(design(repo.key))
    began = time.monotonic()
    generated = cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki")
    assert generated.returncode == 0, generated.stderr
    built = cli("bootstrap", "build", tmp_path / "design.yaml", "--pki", tmp_path / "pki",
                "-o", tmp_path / "scripts")
    assert built.returncode == 0, built.stdout + built.stderr
    step("pki and scripts built", began)

    with airgap.registry(tmp_path / "registry", netns=lan.netns, listen=f"{BRIDGE}.1",
                         port=5000) as site_registry:
        began = time.monotonic()
        pushed = airgap.push_control_plane(site_registry)
        step("images pushed to the site registry", began)

        began = time.monotonic()
        for machine in machines:
            repo.install_into(machine.root)
            # Offline: only the design's repository.
            (machine.root / "etc/apt/sources.list").write_text("")
            machine.boot()
        for machine in machines:
            booted(machine)
        step("three machines booted", began)

        # 1. Genesis on machine 1.
        first = machines[0]
        genesis = (tmp_path / "scripts/genesis.sh").read_text()
        began = time.monotonic()
        result = run_script(first, genesis)
        step("genesis", began)
        print(result.stderr[-3000:])
        status = first.run("dpkg-query", "-W", "-f=${Package} ${Version} ${db:Status-Abbrev}\\n",
                           "kubelet", "kubectl", "curl").stdout
        installed = {line.split()[0]: line.split()[1:] for line in status.splitlines()}
        assert installed["kubelet"] == installed["kubectl"] == [DEB, "ii"], installed
        assert installed["curl"][1] == "ii"
        images = first.run("ctr", "-n", "k8s.io", "images", "ls", "-q").stdout.split()
        for reference in pushed:
            assert reference in images, (reference, images)
        readyz = first.run("kubectl", f"--kubeconfig={ADMIN}", "get", "--raw", "/readyz")
        assert readyz.stdout.strip() == "ok"
        node = kubectl(first, "get", "node", MACHINES[0])
        assert ready(node)
        labels = node["metadata"]["labels"]
        assert (labels["rack"], labels["team"]) == ("r1", "blue")
        assert "node-role.kubernetes.io/control-plane" in labels
        pods = kubectl(first, "get", "pods", "-n", "kube-system")["items"]
        mirror = {p["metadata"]["name"]: p["status"].get("phase") for p in pods}
        for component in airgap.IMAGES:
            assert mirror.get(f"{component}-{MACHINES[0]}") == "Running", mirror

        # A second run changes nothing.
        dpkg_log = first.run("cat", "/var/log/dpkg.log").stdout
        kubelet_pid = first.run("systemctl", "show", "-p", "MainPID", "--value",
                                "kubelet.service").stdout
        began = time.monotonic()
        again = run_script(first, genesis)
        step("genesis again", began)
        assert f"node {MACHINES[0]}: nothing to change" in again.stderr, again.stderr[-2000:]
        assert first.run("cat", "/var/log/dpkg.log").stdout == dpkg_log
        assert first.run("systemctl", "show", "-p", "MainPID", "--value",
                         "kubelet.service").stdout == kubelet_pid

        # 2. Machines 2 and 3 join.
        for machine in machines[1:]:
            began = time.monotonic()
            run_script(machine, (tmp_path / f"scripts/join-{machine.name}.sh").read_text())
            step(f"join {machine.name}", began)
        nodes = {n["metadata"]["name"]: n for n in kubectl(first, "get", "nodes")["items"]}
        assert sorted(nodes) == sorted(MACHINES)
        for name in MACHINES[1:]:
            assert ready(nodes[name]), nodes[name]["status"]
            labels = nodes[name]["metadata"]["labels"]
            assert (labels["rack"], labels["team"]) == ("r2", "green")
        assert nodes[MACHINES[2]]["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z3"

        # 3. The agent DaemonSet as `divingbell manifests` prints it, its image from the site
        # registry, converges a net.* sysctl inside each machine.
        began = time.monotonic()
        archive = divingbell_image()
        reference = f"{REGISTRY}/kube/divingbell:{archive.stem.removeprefix('divingbell-')}"
        site_registry.copy(f"docker-archive:{archive}", reference.split("/", 1)[1])
        step("agent image built (or cached) and pushed", began)
        for machine in machines:
            kubernetes_service(machine)
        began = time.monotonic()
        objects = build({"site.yaml": f"conf:\n  sysctl:\n    {KEY}: 41\n"},
                        namespace="divingbell", image=reference)
        (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
        daemonset["spec"]["minReadySeconds"] = 1
        (first.root / "root/agent.yaml").write_text(to_yaml(objects))
        first.run("kubectl", f"--kubeconfig={ADMIN}", "apply", "--server-side", "-f",
                  "/root/agent.yaml")

        def rolled_out(count: int) -> bool:
            status = kubectl(first, "get", "daemonset", "-n", "divingbell", "divingbell"
                             ).get("status", {})
            return bool(status.get("desiredNumberScheduled") == count
                        and status.get("updatedNumberScheduled") == count
                        and status.get("numberAvailable") == count)

        def explain() -> str:
            pods = first.run("kubectl", f"--kubeconfig={ADMIN}", "get", "pods", "-A", "-o",
                             "wide", check=False).stdout
            logs = first.run("kubectl", f"--kubeconfig={ADMIN}", "logs", "-n", "divingbell",
                             "-l", "app.kubernetes.io/name=divingbell", "--tail=15",
                             "--prefix", check=False)
            previous = first.run("kubectl", f"--kubeconfig={ADMIN}", "logs", "-n",
                                 "divingbell", "-l", "app.kubernetes.io/name=divingbell",
                                 "--tail=15", "--prefix", "--previous", check=False)
            statuses = [p["status"].get("containerStatuses") for p in kubectl(
                first, "get", "pods", "-n", "divingbell")["items"]]
            errors = first.run("sh", "-c", "journalctl -u kubelet -u containerd --no-pager "
                               "| grep -i 'error\\|fail' | grep -v 'filesystem info' "
                               "| tail -n 12", check=False).stdout
            return "\n".join([pods, logs.stdout, logs.stderr, previous.stdout, previous.stderr,
                              json.dumps(statuses, indent=1), errors])

        wait_for("the agent's rollout", lambda: rolled_out(3) and all(
            sysctl(m) == "41" for m in machines), 180, explain)
        step("the agent converged net.ipv4.tcp_fin_timeout on three nodes", began)
        for name in MACHINES:
            annotations = kubectl(first, "get", "node", name)["metadata"]["annotations"]
            assert annotations.get("divingbell.io/state") == "Done", annotations

        # Teardown of machine 3, run on it from the agent's image with an operator's
        # kubeconfig (the host's root at /host, as the agent sees it).
        third = machines[2]
        admin_conf = third.root / "root/admin.conf"
        # admin.conf names its certificate files on machine 1: flattened, they travel in it.
        admin_conf.write_text(first.run("kubectl", f"--kubeconfig={ADMIN}", "config", "view",
                                        "--raw", "--flatten").stdout)
        admin_conf.chmod(0o600)
        began = time.monotonic()
        # In the machine's PID namespace, as the agent's hostPID pod is: systemd answers
        # systemctl only then.
        torn = third.run("ctr", "-n", "k8s.io", "run", "--rm", "--net-host", "--privileged",
                         "--with-ns", "pid:/proc/1/ns/pid",
                         "--runc-binary", "/usr/local/sbin/runc", "--mount",
                         "type=bind,src=/,dst=/host,options=rbind:rw", "--mount",
                         "type=bind,src=/root,dst=/operator,options=rbind:ro", reference,
                         "teardown", "divingbell", "bootstrap", "teardown", "--node",
                         third.name, "--root", "/host", "--kubeconfig", "/operator/admin.conf",
                         check=False, timeout=600)
        assert torn.returncode == 0, torn.stdout + torn.stderr
        step(f"teardown of {third.name}", began)
        print(torn.stdout)
        assert third.run("systemctl", "is-active", "kubelet", check=False
                         ).stdout.strip() == "inactive"
        wait_for("the DaemonSet on two nodes", lambda: rolled_out(2), 120, explain)
        nodes = {n["metadata"]["name"]: n for n in kubectl(first, "get", "nodes")["items"]}
        assert sorted(nodes) == sorted(MACHINES[:2])
        assert all(ready(node) for node in nodes.values())
    print("\ntimes: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
