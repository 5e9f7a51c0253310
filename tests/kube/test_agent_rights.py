"""What the agent's token may do on a real API server, with RBAC and the
ValidatingAdmissionPolicies exactly as `divingbell manifests` prints them: each agent's token is
a TokenRequest bound to its pod on node A or B (as the kubelet projects it), so it carries the
node-name claim the policies check. Own node allowed; everything about the other node refused."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tests.kube.agents import Agents, policies
from tests.kube.controlplane import ApiError, ControlPlane, Rest

pytestmark = pytest.mark.kube



def _microtime(seconds_from_now: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def refused(call: Any, *args: Any) -> ApiError:
    """The API's answer to a call that must be refused (403 from RBAC or a policy)."""
    with pytest.raises(ApiError) as caught:
        call(*args)
    assert caught.value.code in (403, 422), caught.value
    return caught.value


def test_every_policy_type_checks_without_errors(agents: Agents) -> None:
    for policy in policies(agents.admin):
        status = policy.get("status", {})
        warnings = status.get("typeChecking", {}).get("expressionWarnings", [])
        assert warnings == [], f"{policy['metadata']['name']}: {warnings}"
        assert not [c for c in status.get("conditions", []) if c.get("status") != "True"
                    and c.get("type") != "TypeChecked"], status


def test_own_node_annotations_and_cordon_allowed_others_refused(agents: Agents) -> None:
    mine = {"metadata": {"annotations": {"divingbell.io/state": "Converged"}}}
    agents.a.patch(f"/api/v1/nodes/{agents.node_a}", mine)
    agents.a.patch(f"/api/v1/nodes/{agents.node_a}", {"spec": {"unschedulable": True}})
    agents.a.patch(f"/api/v1/nodes/{agents.node_a}", {"spec": {"unschedulable": None}})
    error = refused(agents.a.patch, f"/api/v1/nodes/{agents.node_b}", mine)
    assert "only the node its pod runs on" in error.message
    refused(agents.a.patch, f"/api/v1/nodes/{agents.node_b}", {"spec": {"unschedulable": True}})
    refused(agents.a.patch, f"/api/v1/nodes/{agents.node_a}",
            {"metadata": {"labels": {"role": "x"}}})
    refused(agents.a.patch, f"/api/v1/nodes/{agents.node_a}",
            {"metadata": {"annotations": {"other.io/x": "1"}}})
    assert agents.admin.get(f"/api/v1/nodes/{agents.node_b}")["spec"].get(
        "unschedulable") is None


def test_evicting_a_pod_on_another_node_is_refused(agents: Agents) -> None:
    """Finding 15: the eviction subresource was not matched, so any agent could evict any
    pod in the cluster."""
    def evict(client: Rest, pod: str) -> Any:
        return client.post(f"/api/v1/namespaces/{agents.workloads}/pods/{pod}/eviction", {
            "apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": pod, "namespace": agents.workloads}})

    error = refused(evict, agents.a, "web-b1")
    assert "only pods on the node its pod runs on" in error.message
    assert agents.admin.get(f"/api/v1/namespaces/{agents.workloads}/pods/web-b1")
    evict(agents.a, "web-a1")
    evict(agents.b, "web-b2")
    remaining = {p["metadata"]["name"]: p["metadata"].get("deletionTimestamp") for p in
                 agents.admin.get(f"/api/v1/namespaces/{agents.workloads}/pods")["items"]}
    assert remaining["web-b1"] is None and remaining["web-a2"] is None
    assert remaining.get("web-a1", "gone") and remaining.get("web-b2", "gone")


def test_deleting_a_pod_on_another_node_is_refused(agents: Agents) -> None:
    path = f"/api/v1/namespaces/{agents.workloads}/pods"
    refused(agents.a.delete, f"{path}/web-b2" if _exists(agents, "web-b2") else f"{path}/web-b1")
    agents.a.delete(f"{path}/web-a2")


def _exists(agents: Agents, pod: str) -> bool:
    try:
        agents.admin.get(f"/api/v1/namespaces/{agents.workloads}/pods/{pod}")
    except ApiError:
        return False
    return True


def _event(node: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": node, "apiVersion": "v1"},
            "reason": "Test", "message": "test", "type": "Normal", "count": 1,
            "firstTimestamp": "2026-12-06T00:00:00Z", "lastTimestamp": "2026-12-06T00:00:00Z",
            "source": {"component": "divingbell"}}


def test_events_only_about_the_own_node(agents: Agents) -> None:
    events = "/api/v1/namespaces/default/events"
    agents.a.post(events, _event(agents.node_a, f"{agents.node_a}.own"))
    refused(agents.a.post, events, _event(agents.node_b, f"{agents.node_b}.forged"))
    pod_event = _event(agents.node_a, f"{agents.node_a}.pod")
    pod_event["involvedObject"] = {"kind": "Pod", "name": "web-a1",
                                   "namespace": agents.workloads, "apiVersion": "v1"}
    refused(agents.a.post, events, pod_event)
    # events.k8s.io/v1 is another API group: RBAC gives the agent nothing there.
    refused(agents.a.post, "/apis/events.k8s.io/v1/namespaces/default/events", {
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": f"{agents.node_b}.v1", "namespace": "default"},
        "regarding": {"kind": "Node", "name": agents.node_b, "apiVersion": "v1"},
        "reason": "Test", "note": "forged", "type": "Normal", "action": "Test",
        "reportingController": "divingbell.io/agent", "reportingInstance": "x",
        "eventTime": _microtime(0)})


def _lease(agents: Agents, name: str, holder: str | None, renewed: float,
           resource_version: str | None = None, duration: int = 60) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": agents.namespace,
                                "labels": {"divingbell.io/slot-group": "rack",
                                           "divingbell.io/slot-index": "0"}}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    spec: dict[str, Any] = {"leaseDurationSeconds": duration, "leaseTransitions": 0}
    if holder:
        spec |= {"holderIdentity": holder, "acquireTime": _microtime(renewed),
                 "renewTime": _microtime(renewed)}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": spec}


def test_slot_leases_only_for_the_own_node(agents: Agents) -> None:
    """Finding 15: any agent could write any Lease in its namespace (take or free another
    node's slot). Now a Lease may only name the writer's own node as its holder, be freed
    only by its holder, and be taken over only once it expired."""
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{agents.namespace}/leases"
    refused(agents.b.post, leases, _lease(agents, "forged", agents.node_a, 0))
    held = agents.a.post(leases, _lease(agents, "slot-rack-0", agents.node_a, 0))
    version = held["metadata"]["resourceVersion"]
    # B may neither take A's live slot nor free it.
    refused(agents.b.put, f"{leases}/slot-rack-0",
            _lease(agents, "slot-rack-0", agents.node_b, 0, version))
    refused(agents.b.put, f"{leases}/slot-rack-0",
            _lease(agents, "slot-rack-0", None, 0, version))
    # A renews, then frees its own.
    renewed = agents.a.put(f"{leases}/slot-rack-0",
                           _lease(agents, "slot-rack-0", agents.node_a, 1, version))
    freed = agents.a.put(f"{leases}/slot-rack-0", _lease(
        agents, "slot-rack-0", None, 0, renewed["metadata"]["resourceVersion"]))
    # A free slot: B takes it.
    agents.b.put(f"{leases}/slot-rack-0", _lease(
        agents, "slot-rack-0", agents.node_b, 0, freed["metadata"]["resourceVersion"]))


def test_an_expired_slot_lease_may_be_taken_over(agents: Agents) -> None:
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{agents.namespace}/leases"
    stale = agents.a.post(leases, _lease(agents, "slot-stale-0", agents.node_a, -120,
                                         duration=60))
    agents.b.put(f"{leases}/slot-stale-0", _lease(
        agents, "slot-stale-0", agents.node_b, 0, stale["metadata"]["resourceVersion"]))


def _versions(admin: Rest, kube_cluster: ControlPlane, manifests: str) -> dict[str, str]:
    listed = kube_cluster.kubectl("get", "-f", "-", "-o",
                                  "jsonpath={range .items[*]}{.kind}/{.metadata.name}="
                                  "{.metadata.resourceVersion}{'\\n'}{end}",
                                  input_text=manifests).stdout
    return dict(line.split("=", 1) for line in listed.splitlines())


def test_applying_unchanged_manifests_changes_nothing(agents: Agents,
                                                      kube_cluster: ControlPlane) -> None:
    """Finding 15: `kubectl apply` of unchanged manifests said `configured` for the policies
    and the Secret. Client-side apply (twice: the first adds its last-applied copy to objects
    the fixture made server-side) and server-side apply must leave every object as it is."""
    kube_cluster.kubectl("apply", "-f", "-", input_text=agents.manifests)
    before = _versions(agents.admin, kube_cluster, agents.manifests)
    again = kube_cluster.kubectl("apply", "-f", "-", input_text=agents.manifests).stdout
    changed = [line for line in again.splitlines() if not line.endswith(" unchanged")]
    assert changed == [], again
    # The first server-side apply takes the fields over from client-side apply's manager.
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                         input_text=agents.manifests)
    before = _versions(agents.admin, kube_cluster, agents.manifests)
    kube_cluster.kubectl("apply", "--server-side", "-f", "-", input_text=agents.manifests)
    assert _versions(agents.admin, kube_cluster, agents.manifests) == before
