"""Two agents on a real API server, as `divingbell manifests` deploys them: the manifests
applied server-side into a namespace of the session's own (one per session: the policies and
RBAC are cluster-wide objects naming that namespace's ServiceAccount), Nodes A and B, an agent pod bound to
each and its token (a TokenRequest bound to that pod, as the kubelet projects it), and a
tenant namespace with two pods on each node."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from divingbell.agent.manifests import build, to_yaml
from tests.kube.controlplane import ApiError, ControlPlane, Rest, kubeconfig
from tests.kube.kubelet import add_node, add_pod, pod_token

DOCUMENT = {"site.yaml": "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n"}
# The DaemonSet runs only on the Nodes test_rollout.py makes (a stand-in kubelet runs their
# pods); every other test Node has no kubelet, and DaemonSet pods there would show up in
# other tests' pod listings.
ROLLOUT_NODES = {"divingbell.test/rollout": "yes"}


def on_rollout_nodes(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    daemonset["spec"]["template"]["spec"]["nodeSelector"] = dict(ROLLOUT_NODES)
    return objects


@dataclass
class Agents:
    namespace: str  # the agent's
    workloads: str  # a tenant's
    node_a: str
    node_b: str
    a: Rest  # as node A's agent
    b: Rest
    admin: Rest
    manifests: str
    tokens: dict[str, str]  # node name -> its agent's token
    plane: ControlPlane

    def kubeconfig(self, node: str) -> str:
        """A kubeconfig with `node`'s agent token, for the product's own clients."""
        path = self.plane.directory / f"{self.namespace}-{node}.kubeconfig"
        return str(kubeconfig(path, self.plane.server, self.plane.ca_path,
                              token=self.tokens[node]))


@pytest.fixture(scope="session")
def agents(kube_cluster: ControlPlane) -> Iterator[Agents]:
    admin = kube_cluster.admin()
    namespace = f"dbagent-{os.getpid()}"
    workloads = f"{namespace}-shop"
    manifests = to_yaml(on_rollout_nodes(build(DOCUMENT, namespace=namespace,
                                               image="registry.example/db:1")))
    kube_cluster.kubectl("apply", "--server-side", "-f", "-", input_text=manifests)
    admin.post("/api/v1/namespaces", {"metadata": {"name": workloads}})
    node_a, node_b = f"{namespace}-a", f"{namespace}-b"
    tokens = {}
    for node in (node_a, node_b):
        add_node(admin, node)
        pod = add_pod(admin, namespace, f"agent-{node[-1]}", node, service_account="divingbell")
        tokens[node] = pod_token(admin, namespace, "divingbell", pod)
        for index in (1, 2):
            add_pod(admin, workloads, f"web-{node[-1]}{index}", node, labels={"app": "web"})
    found = Agents(namespace, workloads, node_a, node_b, kube_cluster.as_token(tokens[node_a]),
                   kube_cluster.as_token(tokens[node_b]), admin, manifests, tokens,
                   kube_cluster)
    _wait_for_policies(found)
    yield found
    for client in (found.a, found.b):
        client.close()
    for name in (namespace, workloads):
        admin.request("DELETE", f"/api/v1/namespaces/{name}")
    for node in (node_a, node_b):
        admin.request("DELETE", f"/api/v1/nodes/{node}")
    admin.close()


def policies(admin: Rest) -> list[dict[str, Any]]:
    items = admin.get("/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
                      labelSelector="app.kubernetes.io/name=divingbell")["items"]
    return list(items)


def _wait_for_policies(agents: Agents) -> None:
    """Until the status controller type-checked every policy (observedGeneration), and the
    admission plugin enforces each of them (they arrive one by one; the eviction policy also
    waits for its informer of Pods): a dry run of what each must refuse is refused."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = policies(agents.admin)
        if found and all(p.get("status", {}).get("observedGeneration") ==
                         p["metadata"]["generation"] for p in found):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"policies not type-checked in 60 s: {policies(agents.admin)}")
    other = agents.node_b
    pod = f"/api/v1/namespaces/{agents.workloads}/pods/web-b1"
    probes: list[tuple[str, str, Any]] = [
        ("PATCH", f"/api/v1/nodes/{other}",
         {"metadata": {"annotations": {"divingbell.io/probe": "1"}}}),
        ("DELETE", pod, None),
        ("POST", f"{pod}/eviction", {"apiVersion": "policy/v1", "kind": "Eviction",
                                     "metadata": {"name": "web-b1",
                                                  "namespace": agents.workloads}}),
        ("POST", "/api/v1/namespaces/default/events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{other}.probe", "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": other, "apiVersion": "v1"},
            "reason": "Probe", "message": "probe", "type": "Normal"}),
        ("POST", f"/apis/coordination.k8s.io/v1/namespaces/{agents.namespace}/leases", {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "probe", "namespace": agents.namespace},
            "spec": {"holderIdentity": other, "leaseDurationSeconds": 60}}),
    ]
    for method, path, body in probes:
        while True:
            try:
                agents.a.request(method, path, body,
                                 content_type="application/merge-patch+json"
                                 if method == "PATCH" else "application/json",
                                 params={"dryRun": "All"})
            except ApiError as error:
                if error.code == 403:
                    break
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path} by node A's agent still allowed "
                                     "after 60 s: the policy is not enforced")
            time.sleep(0.5)


def revisions(agents: Agents) -> dict[str, int]:
    """The session DaemonSet's ControllerRevisions: name -> revision number."""
    found = agents.admin.get(f"/apis/apps/v1/namespaces/{agents.namespace}/controllerrevisions")
    return {r["metadata"]["name"]: int(r["revision"]) for r in found["items"]}


def put_back(agents: Agents, before: set[str]) -> None:
    """The session's DaemonSet as a test found it, after the test applied documents of its own
    (`before`: the revision names then): the original manifests applied again, the revisions
    the test added deleted and the document Secrets only they mounted pruned (by `divingbell
    documents --prune`), so that later tests see the history they would have seen alone."""
    from tests.conftest import Cli
    from tests.kube.standin import wait_for

    agents.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                         input_text=agents.manifests)
    path = f"/apis/apps/v1/namespaces/{agents.namespace}/daemonsets/divingbell"

    def settled() -> bool:
        daemonset = agents.admin.get(path)
        return bool(daemonset.get("status", {}).get("observedGeneration")
                    == daemonset["metadata"]["generation"])

    wait_for("the DaemonSet controller to see the original manifests", settled, 60)
    found = revisions(agents)
    current = max(found, key=lambda name: found[name])
    for name in set(found) - before - {current}:
        agents.admin.request(
            "DELETE", f"/apis/apps/v1/namespaces/{agents.namespace}/controllerrevisions/{name}")
    pruned = Cli()("documents", "--prune", "--namespace", agents.namespace, "--kubeconfig",
                   str(agents.plane.admin_kubeconfig))
    assert pruned.returncode == 0, pruned.stderr
