"""The agent as shipped, on real nodes (tests/kube/node.py): the image deploy/build-image builds,
imported into each node's containerd, run by the real kubelet as the DaemonSet `divingbell
manifests` prints (applied with `kubectl apply --server-side`), with the service-account token
the kubelet projects. It converges a net.* sysctl inside each node and annotates the Node; a
document that fails halts the rolling update at the first node; and its maintenance sequence
really reboots a node (`systemctl reboot` inside it, nspawn boots it again), which comes back
Ready and is uncordoned, the slot released.

The session's DaemonSet (tests/kube/agents.py) is pointed at the real nodes for each test and
put back afterwards. Figures (rollout, reboot) are printed, never asserted."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from divingbell.agent.manifests import build, to_yaml
from divingbell.maintenance.decide import CORDONED_BY, lease_name
from tests.kube.agents import Agents, put_back, revisions
from tests.kube.controlplane import ControlPlane
from tests.kube.node import Node, RealNodes, ready, wait_ready
from tests.kube.standin import wait_for

pytestmark = [pytest.mark.kube, pytest.mark.kernel, pytest.mark.slow]
REAL_NODES = {"divingbell.test/real-node": "yes"}
KEY = "net.ipv4.tcp_fin_timeout"
MAINTENANCE = """\
  maintenance:
    reboot:
      when: [reboot-required]
      drain: {timeout: 5m, grace_period: 5s}
      health: {timeout: 5m}
      slot_ttl: 10m
"""


def document(value: str, maintenance: bool = False) -> dict[str, str]:
    return {"site.yaml": f"conf:\n  sysctl:\n    {KEY}: {value}\n"
            + (MAINTENANCE if maintenance else "")}


@dataclass
class Deployment:
    agents: Agents
    real: RealNodes
    plane: ControlPlane

    @property
    def nodes(self) -> list[Node]:
        return self.real.nodes

    def apply(self, files: dict[str, str]) -> None:
        objects = build(files, namespace=self.agents.namespace,
                        image=self.real.divingbell_image)
        (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
        daemonset["spec"]["minReadySeconds"] = 1
        pod = daemonset["spec"]["template"]["spec"]
        pod["nodeSelector"] = dict(REAL_NODES)
        for container in pod["containers"]:
            container["imagePullPolicy"] = "Never"  # imported at boot; there is no registry
        self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                           input_text=to_yaml(objects))

    def sysctl(self, node: Node) -> str:
        """The value inside the node (its network namespace), not as any pod reports it."""
        return subprocess.run(["ip", "netns", "exec", node.netns, "cat",
                               "/proc/sys/" + KEY.replace(".", "/")],
                              capture_output=True, text=True, check=True).stdout.strip()

    def daemonset(self) -> dict[str, Any]:
        found: dict[str, Any] = self.agents.admin.get(
            f"/apis/apps/v1/namespaces/{self.agents.namespace}/daemonsets/divingbell")
        return found

    def rolled_out(self) -> bool:
        found = self.daemonset()
        status, meta = found.get("status", {}), found["metadata"]
        return bool(status.get("observedGeneration") == meta["generation"]
                    and status.get("desiredNumberScheduled") == len(self.nodes)
                    and status.get("updatedNumberScheduled") == len(self.nodes)
                    and status.get("numberAvailable") == len(self.nodes))

    def annotations(self, node: Node) -> dict[str, str]:
        found: dict[str, str] = self.agents.admin.get(f"/api/v1/nodes/{node.name}")[
            "metadata"].get("annotations", {})
        return found

    def pods(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.agents.admin.get(
            f"/api/v1/namespaces/{self.agents.namespace}/pods",
            labelSelector="app.kubernetes.io/name=divingbell")["items"]
        return [p for p in found if p["spec"].get("nodeName") in
                {n.name for n in self.nodes}]

    def explain(self) -> str:
        pods = "\n".join(f"{p['metadata']['name']} on {p['spec'].get('nodeName')}: "
                         f"{p.get('status', {}).get('containerStatuses')}" for p in self.pods())
        return (f"{self.daemonset().get('status')}\n{pods}\n" + "\n".join(
            f"{n.name}: {self.annotations(n)}\n{n.journal(lines=15)}\n{n.pod_logs('agent')}"
            for n in self.nodes))


@pytest.fixture
def deployment(agents: Agents, real_nodes: RealNodes, kube_cluster: ControlPlane
               ) -> Iterator[Deployment]:
    for node in real_nodes.nodes:
        agents.admin.patch(f"/api/v1/nodes/{node.name}", {"metadata": {"labels": REAL_NODES}})
    found = Deployment(agents, real_nodes, kube_cluster)
    before = set(revisions(agents))
    try:
        yield found
    finally:
        # The session's DaemonSet as the other tests expect it; its pods leave the real nodes.
        put_back(agents, before)
        for node in real_nodes.nodes:
            agents.admin.patch(f"/api/v1/nodes/{node.name}", {
                "metadata": {"labels": {k: None for k in REAL_NODES}},
                "spec": {"unschedulable": None}})
        wait_for("the agent pods to leave the real nodes", lambda: not found.pods(), 120,
                 found.explain)


def test_the_daemonset_converges_real_nodes_and_halts_on_a_failing_document(
        deployment: Deployment) -> None:
    started = time.monotonic()
    deployment.apply(document("41"))
    wait_for("the rollout", lambda: deployment.rolled_out() and all(
        deployment.sysctl(n) == "41" for n in deployment.nodes), 240, deployment.explain)
    print(f"\nfirst rollout on {len(deployment.nodes)} real nodes: "
          f"{time.monotonic() - started:.1f} s")
    for node in deployment.nodes:
        assert deployment.annotations(node).get("divingbell.io/state") == "Done", (
            deployment.annotations(node))

    # The kernel refuses the value: the first replaced pod never becomes ready, so the
    # rolling update stops there and the other node keeps its value.
    deployment.apply(document("nonsense"))
    wait_for("one node on the failing document", lambda: deployment.daemonset().get(
        "status", {}).get("updatedNumberScheduled") == 1, 120, deployment.explain)
    wait_for("its pod to stay unready", lambda: deployment.daemonset()["status"].get(
        "numberUnavailable") == 1, 120, deployment.explain)
    status = deployment.daemonset()["status"]
    assert status["updatedNumberScheduled"] == 1 and status["numberAvailable"] == 1, status
    assert [deployment.sysctl(n) for n in deployment.nodes] == ["41", "41"]

    def states() -> list[str]:
        return sorted(deployment.annotations(n).get("divingbell.io/state", "")
                      for n in deployment.nodes)

    # The node that got the document says why it refuses it; the other is still Done.
    wait_for("the failing node to say so", lambda: states() != ["Done", "Done"], 60,
             deployment.explain)
    assert "Done" in states() and len(set(states())) == 2, [
        deployment.annotations(n) for n in deployment.nodes]

    started = time.monotonic()
    deployment.apply(document("42"))
    wait_for("the fixed document", lambda: deployment.rolled_out() and all(
        deployment.sysctl(n) == "42" for n in deployment.nodes), 240, deployment.explain)
    print(f"rollout of the fixed document: {time.monotonic() - started:.1f} s")


def test_the_agent_reboots_a_real_node_through_its_maintenance_sequence(
        deployment: Deployment, agents: Agents) -> None:
    deployment.apply(document("43", maintenance=True))
    wait_for("the rollout", lambda: deployment.rolled_out() and all(
        deployment.sysctl(n) == "43" for n in deployment.nodes), 240, deployment.explain)
    node, other = deployment.nodes
    boot_id = node.run("cat", "/proc/sys/kernel/random/boot_id").stdout.strip()
    leader = node.leader()

    # What a package upgrade leaves behind.
    node.run("touch", "/run/reboot-required")
    started = time.monotonic()
    wait_for("the reboot", lambda: node.leader() not in (0, leader), 180, deployment.explain)
    rebooted_at = time.monotonic()
    wait_ready(deployment.plane, node)
    wait_for("the maintenance to finish", lambda: deployment.annotations(node).get(
        "divingbell.io/maintenance") == "idle", 300, deployment.explain)
    finished = time.monotonic()
    annotations = deployment.annotations(node)
    outcome = annotations["divingbell.io/maintenance-outcome"]
    print(f"\nreal reboot: requested -> node rebooting {rebooted_at - started:.1f} s, "
          f"-> maintenance done {finished - started:.1f} s; the agent says: {outcome}")
    assert outcome.startswith("rebooted (reboot)"), annotations
    assert node.run("cat", "/proc/sys/kernel/random/boot_id").stdout.strip() != boot_id
    assert node.run("test", "-e", "/run/reboot-required", check=False).returncode == 1
    assert ready(deployment.plane, node.name)
    spec = agents.admin.get(f"/api/v1/nodes/{node.name}")["spec"]
    assert not spec.get("unschedulable") and CORDONED_BY not in annotations, (spec, annotations)
    lease = agents.admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{agents.namespace}/"
                             f"leases/{lease_name('default', 0)}")
    assert not lease["spec"].get("holderIdentity"), lease
    events = agents.admin.get("/api/v1/namespaces/default/events",
                              fieldSelector=f"involvedObject.name={node.name}")["items"]
    reasons = {e["reason"] for e in events}
    for reason in ("SlotClaimed", "Cordoned", "Rebooting", "Booted", "Uncordoned",
                   "SlotReleased", "MaintenanceDone"):
        assert reason in reasons, reasons
    # The other node never needed a reboot.
    assert deployment.annotations(other).get("divingbell.io/maintenance", "idle") == "idle"
    assert deployment.sysctl(node) == "43"
