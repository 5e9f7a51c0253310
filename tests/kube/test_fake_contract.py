"""FakeKube's contract, on a real API server: the maintenance scenario the fake's own tests
use (tests/maintenance/conftest.py `cluster`) is built on the session's control plane (the
test is the kubelet: pods are patched Running/Ready, so the disruption controller counts
them), then the same calls go to both; every answer must match, except what only a real
server has (resourceVersions are etcd revisions)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from divingbell.kube import EVENTS_PATH, FakeKube, LeaseView, LightkubeApi
from divingbell.kube.api import BudgetView, NodeState
from tests.kube.controlplane import ApiError, ControlPlane, Rest
from tests.kube.kubelet import now_rfc3339
from tests.maintenance.conftest import Clock, cluster
from tests.maintenance.test_kube_contract import exercise as maintenance_exercise
from tests.test_kube import NODES, exercise_labels
from tests.test_kube import exercise as events_exercise

pytestmark = pytest.mark.kube
NAMESPACES = ("shop", "batch", "divingbell")


def _ensure_namespace(admin: Rest, name: str) -> None:
    try:
        admin.post("/api/v1/namespaces", {"metadata": {"name": name}})
    except ApiError as error:
        if error.code != 409:
            raise


def build_on_server(fake: FakeKube, admin: Rest) -> None:
    """The fake's nodes, pods and budgets as real objects, status included."""
    state = fake._maint()
    for name, view in fake.node_objects.items():
        admin.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": dict(view.labels), "annotations": dict(view.annotations)}})
        body = fake._node_body(name)
        admin.patch(f"/api/v1/nodes/{name}/status", {"status": body["status"]})
    for name in NAMESPACES:
        _ensure_namespace(admin, name)
    for pod in state.pods.values():
        body = pod.body(fake.clock())
        body["metadata"]["ownerReferences"] = [
            {**ref, "uid": f"00000000-0000-0000-0000-{index:012d}"}
            for index, ref in enumerate(body["metadata"].get("ownerReferences", []))]
        if pod.mirror:  # a mirror pod's owner is its Node, as the kubelet makes it
            body["metadata"]["ownerReferences"] = [{
                "apiVersion": "v1", "kind": "Node", "name": pod.node, "controller": True,
                "uid": admin.get(f"/api/v1/nodes/{pod.node}")["metadata"]["uid"]}]
        status = body.pop("status")
        body["spec"]["terminationGracePeriodSeconds"] = 30
        admin.post(f"/api/v1/namespaces/{pod.namespace}/pods", body)
        stamp = now_rfc3339()
        status["conditions"] = [{**c, "lastTransitionTime": stamp} for c in status["conditions"]]
        admin.patch(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status",
                    {"status": status})
    for (namespace, name), spec in state.budgets.items():
        admin.post(f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets", {
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {k: v for k, v in spec.items() if v is not None}})
        _wait_for_budget(admin, namespace, name, fake._allowed(namespace, name))


def _wait_for_budget(admin: Rest, namespace: str, name: str, allowed: int) -> None:
    path = f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/{name}"
    deadline = time.monotonic() + 30
    while True:
        status = admin.get(path).get("status", {})
        if status.get("observedGeneration") and status.get("disruptionsAllowed") == allowed:
            return
        assert time.monotonic() < deadline, f"budget {name}: {status}"
        time.sleep(0.2)


@pytest.fixture
def real_cluster(kube_cluster: ControlPlane) -> Iterator[Rest]:
    admin = kube_cluster.admin()
    yield admin
    paths = [*(f"/api/v1/nodes/{node}" for node in ("n1", "n2")),
             *(f"/api/v1/namespaces/{name}" for name in NAMESPACES),
             *(f"/api/v1/namespaces/kube-system/pods/{pod}" for pod in ("proxy-n1", "etcd-n1"))]
    for path in paths:
        try:
            admin.request("DELETE", path, {"gracePeriodSeconds": 0})
        except ApiError as error:
            assert error.code == 404, error
    admin.close()


def _comparable(value: Any) -> Any:
    """Answers with what only a real server has taken out: resourceVersions, and the Nodes
    and budgets other tests of the session made."""
    if isinstance(value, LeaseView):
        return dataclasses.replace(value, resource_version="")
    if isinstance(value, list):
        return [_comparable(v) for v in value
                if not (isinstance(v, NodeState) and v.name not in ("n1", "n2"))
                and not (isinstance(v, BudgetView) and v.namespace not in NAMESPACES)]
    return value


def test_fake_and_real_server_agree_on_maintenance(kube_cluster: ControlPlane,
                                                   real_cluster: Rest) -> None:
    clock = Clock(time.time())
    fake = cluster(clock)
    build_on_server(cluster(clock), real_cluster)
    real = LightkubeApi(str(kube_cluster.admin_kubeconfig), clock=clock)
    from_server = maintenance_exercise(real, clock)
    from_fake = maintenance_exercise(fake, clock)
    for index, (got, want) in enumerate(zip(_comparable(from_server), _comparable(from_fake), strict=True)):
        assert got == want, f"call {index}:\n real: {got}\n fake: {want}"


def test_fake_and_real_server_agree_on_events_and_annotations(
        kube_cluster: ControlPlane, real_cluster: Rest, tmp_path: Path) -> None:
    now = [time.time()]

    def clock() -> float:
        now[0] += 60
        return now[0]

    fake = FakeKube(clock=clock)
    for name in ("n1", "n2"):
        fake.add_node(name, {"role": "storage"} if name == "n1" else {})
        real_cluster.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"role": "storage"} if name == "n1" else {}}})
    start = now[0]
    from_server = events_exercise(LightkubeApi(str(kube_cluster.admin_kubeconfig), clock=clock))
    now[0] = start
    from_fake = events_exercise(fake)
    nodes = [n for n in from_server[-1] if n[0] in ("n1", "n2")]
    assert [*from_server[:-1], nodes] == from_fake
    stored = [e for e in real_cluster.get(EVENTS_PATH)["items"]
              if e["involvedObject"]["name"] == "n1"]
    assert sorted((e["reason"], e["count"]) for e in stored) == sorted(
        (e["reason"], e["count"]) for e in fake.events("n1"))
    for event in stored:
        real_cluster.delete(f"{EVENTS_PATH}/{event['metadata']['name']}")


def test_fake_and_real_server_agree_on_label_patches(kube_cluster: ControlPlane,
                                                     real_cluster: Rest) -> None:
    fake = FakeKube()
    for name, labels in NODES.items():
        fake.add_node(name, labels)
        real_cluster.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                            "metadata": {"name": name, "labels": labels}})
    from_server = exercise_labels(LightkubeApi(str(kube_cluster.admin_kubeconfig)))
    assert from_server == exercise_labels(fake)
    assert from_server[1].labels == {"rack": "r1"}

