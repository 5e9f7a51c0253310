"""The DaemonSet from `divingbell manifests`, rolled out by the real DaemonSet controller onto
two test nodes whose pods a stand-in kubelet runs (tests/kube/standin.py): the real agent
process converges a net.* sysctl in each node's network namespace with its pod-bound token,
a new document rolls node by node, a failing one halts at the first node while the other
keeps its value, and `kubectl rollout undo` brings the previous document back.

The DaemonSet is given a nodeSelector for these nodes (other tests' Nodes in the same control
plane have no kubelet at all): tests/kube/agents.py, `on_rollout_nodes`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from divingbell.agent.manifests import build, document_digest, to_yaml
from tests.conftest import Cli
from tests.kube.agents import ROLLOUT_NODES, Agents, on_rollout_nodes
from tests.kube.controlplane import ControlPlane
from tests.kube.kubelet import add_node
from tests.kube.standin import StandInKubelet, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.kernel]
KEY = "net.ipv4.tcp_fin_timeout"


def document(value: str) -> dict[str, str]:
    return {"site.yaml": f"conf:\n  sysctl:\n    {KEY}: {value}\n"}


@dataclass
class Rollout:
    agents: Agents
    plane: ControlPlane
    kubelet: StandInKubelet
    nodes: dict[str, str]  # node -> network namespace

    def apply(self, files: dict[str, str]) -> None:
        objects = on_rollout_nodes(build(files, namespace=self.agents.namespace,
                                         image="registry.example/db:1"))
        objects[-1]["spec"]["minReadySeconds"] = 1
        self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                           input_text=to_yaml(objects))

    def sysctl(self, node: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.nodes[node], "cat",
                               "/proc/sys/" + KEY.replace(".", "/")],
                              capture_output=True, text=True, check=True).stdout.strip()

    def daemonset(self) -> dict[str, Any]:
        found: dict[str, Any] = self.agents.admin.get(
            f"/apis/apps/v1/namespaces/{self.agents.namespace}/daemonsets/divingbell")
        return found

    def rolled_out(self) -> bool:
        status, meta = self.daemonset().get("status", {}), self.daemonset()["metadata"]
        return bool(status.get("observedGeneration") == meta["generation"]
                and status.get("desiredNumberScheduled") == len(self.nodes)
                and status.get("updatedNumberScheduled") == len(self.nodes)
                and status.get("numberAvailable") == len(self.nodes))

    def explain(self) -> str:
        return f"{self.daemonset().get('status')}\n" + "\n".join(
            f"{node}: {self.kubelet.log(node)[-2000:]}" for node in self.nodes)


@pytest.fixture
def rollout(agents: Agents, kube_cluster: ControlPlane, tmp_path: Path) -> Iterator[Rollout]:
    nodes = {f"{agents.namespace}-r{i}": f"dbr-{os.getpid()}-{i}" for i in (1, 2)}
    for node, netns in nodes.items():
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        add_node(agents.admin, node, labels=ROLLOUT_NODES)
        (tmp_path / "nodes" / node).mkdir(parents=True)
    kubelet = StandInKubelet(kube_cluster, agents.admin, agents.namespace, nodes, tmp_path)
    kubelet.start()
    try:
        yield Rollout(agents, kube_cluster, kubelet, nodes)
    finally:
        kubelet.close()
        for node, netns in nodes.items():
            agents.admin.request("DELETE", f"/api/v1/nodes/{node}")
            subprocess.run(["ip", "netns", "del", netns], check=False)


def test_a_document_rolls_out_node_by_node_halts_on_failure_and_is_undone(
        rollout: Rollout) -> None:
    rollout.apply(document("21"))
    wait_for("the first rollout", rollout.rolled_out, 120, rollout.explain)
    assert {rollout.sysctl(node) for node in rollout.nodes} == {"21"}
    for node in rollout.nodes:
        annotations = rollout.agents.admin.get(f"/api/v1/nodes/{node}")["metadata"][
            "annotations"]
        assert annotations.get("divingbell.io/state") == "Done", annotations

    rollout.apply(document("22"))
    wait_for("the second rollout", lambda: rollout.rolled_out() and all(
        rollout.sysctl(node) == "22" for node in rollout.nodes), 120, rollout.explain)

    # A document the kernel refuses: the first replaced pod never becomes ready, so the
    # DaemonSet stops there and the other node keeps its value.
    rollout.apply(document("nonsense"))
    wait_for("one node on the failing document", lambda: rollout.daemonset().get(
        "status", {}).get("updatedNumberScheduled") == 1, 60, rollout.explain)
    wait_for("its pod to stay unready", lambda: rollout.daemonset()["status"].get(
        "numberUnavailable") == 1, 60, rollout.explain)
    status = rollout.daemonset()["status"]
    assert status["updatedNumberScheduled"] == 1 and status["numberAvailable"] == 1, status
    assert sorted(rollout.sysctl(node) for node in rollout.nodes) == ["22", "22"]

    rollout.plane.kubectl("-n", rollout.agents.namespace, "rollout", "undo",
                          "daemonset/divingbell")
    wait_for("the undo", lambda: rollout.rolled_out() and all(
        rollout.sysctl(node) == "22" for node in rollout.nodes), 120, rollout.explain)

    # What an operator sees afterwards: every node's state, and which document each kept
    # revision mounts.
    admin_config = str(rollout.plane.admin_kubeconfig)
    status = Cli()("status", "--kube", "--kubeconfig", admin_config)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:-1]}
    assert all(rows[node][2] == "Done" for node in rollout.nodes), status.stdout
    documents = Cli()("documents", "--namespace", rollout.agents.namespace,
                      "--kubeconfig", admin_config)
    assert documents.returncode == 0, documents.stderr
    usage = {line.split()[1]: line for line in documents.stdout.splitlines()[1:-1]}
    assert "current" in usage[document_digest(document("22"))], documents.stdout
    for value in ("21", "nonsense"):
        assert "revision" in usage[document_digest(document(value))], documents.stdout
    assert documents.stdout.splitlines()[-1].endswith("0 unused."), documents.stdout



def test_a_label_change_reconverges_the_node_without_a_rollout(rollout: Rollout) -> None:
    first = next(iter(rollout.nodes))
    rollout.apply({"site.yaml": (
        f"conf:\n  sysctl:\n    {KEY}: 30\n  overrides:\n    divingbell_sysctl:\n"
        "      labels:\n        - label:\n            key: dbtest-tier\n"
        f"            values: [fast]\n          conf:\n            sysctl:\n"
        f"              {KEY}: 31\n")})
    wait_for("the rollout", lambda: rollout.rolled_out() and all(
        rollout.sysctl(node) == "30" for node in rollout.nodes), 120, rollout.explain)
    generation = rollout.daemonset()["metadata"]["generation"]
    rollout.agents.admin.patch(f"/api/v1/nodes/{first}",
                               {"metadata": {"labels": {"dbtest-tier": "fast"}}})
    wait_for("the relabelled node to converge", lambda: rollout.sysctl(first) == "31", 60,
             rollout.explain)
    assert [rollout.sysctl(node) for node in rollout.nodes if node != first] == ["30"]
    assert rollout.daemonset()["metadata"]["generation"] == generation
