"""The ValidatingAdmissionPolicy that confines the agent's ServiceAccount, evaluated with
cel-python on admission requests as kube-apiserver builds them: the agent may change
divingbell.io/ annotations on its own node (the node-name claim of its token) and nothing else;
other users are not affected."""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("celpy", reason="cel-python evaluates the policy (pip install cel-python)")

from tests.k8s.admission import admit

AGENT = "system:serviceaccount:ops:divingbell"
NODE: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"role": "compute"},
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                     "divingbell.io/state": "Working"}},
        "spec": {"podCIDR": "10.244.1.0/24"}}


def request(username: str = AGENT, node_names: list[str] | None = None) -> dict[str, Any]:
    extra = {} if node_names is None else {"authentication.kubernetes.io/node-name": node_names}
    return {"operation": "UPDATE", "userInfo": {"username": username, "extra": extra}}


def changed(node: str = "node-1", **edits: Any) -> dict[str, Any]:
    new = copy.deepcopy(NODE)
    new["metadata"]["name"] = node
    for path, value in edits.items():
        *parents, leaf = path.split("__")
        target: dict[str, Any] = new
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value
    return new


def old(node: str = "node-1") -> dict[str, Any]:
    previous = copy.deepcopy(NODE)
    previous["metadata"]["name"] = node
    return previous


def policy_named(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"
                and o["metadata"]["name"] == name]
    (binding,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"
                  and o["spec"]["policyName"] == name]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert found["spec"]["failurePolicy"] == "Fail"
    return found


@pytest.fixture
def policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = policy_named(objects, "divingbell-agent-own-node")
    assert found["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0] == "nodes"
    return found


@pytest.fixture
def event_policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = policy_named(objects, "divingbell-agent-own-events")
    assert found["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["events"]
    return found


def status_edit() -> dict[str, Any]:
    return {"metadata__annotations": {**NODE["metadata"]["annotations"],
                                      "divingbell.io/state": "Done",
                                      "divingbell.io/revision": "abc"}}


def test_the_agent_may_set_divingbell_annotations_on_its_own_node(
        policy: dict[str, Any]) -> None:
    assert admit(policy, request(node_names=["node-1"]), changed(**status_edit()), old()) == []


@pytest.mark.parametrize(("case", "req", "new", "denied"), [
    ("another node", request(node_names=["node-1"]), changed("node-2", **status_edit()),
     "only the node its pod runs on"),
    ("a token without the node-name claim", request(), changed(**status_edit()),
     "only the node its pod runs on"),
    ("a label", request(node_names=["node-1"]),
     changed(metadata__labels={"role": "storage"}), "may not change node labels"),
    ("a label removed", request(node_names=["node-1"]), changed(metadata__labels=None),
     "may not change node labels"),
    ("a taint", request(node_names=["node-1"]),
     changed(spec__taints=[{"key": "x", "effect": "NoSchedule"}]), "spec"),
    ("a pod CIDR", request(node_names=["node-1"]), changed(spec__podCIDR="10.9.9.0/24"),
     "spec"),
    ("a cordon of another node", request(node_names=["node-1"]),
     changed("node-2", spec__unschedulable=True), "only the node its pod runs on"),
    ("another annotation", request(node_names=["node-1"]),
     changed(metadata__annotations={**NODE["metadata"]["annotations"], "team": "x"}),
     "only divingbell.io/ annotations"),
    ("another annotation removed", request(node_names=["node-1"]),
     changed(metadata__annotations={"divingbell.io/state": "Done"}),
     "only divingbell.io/ annotations"),
    ("a finalizer", request(node_names=["node-1"]), changed(metadata__finalizers=["x/y"]),
     "finalizers"),
])
def test_everything_else_the_agent_tries_is_denied(policy: dict[str, Any], case: str,
                                                   req: dict[str, Any], new: dict[str, Any],
                                                   denied: str) -> None:
    messages = admit(policy, req, new, old(new["metadata"]["name"]))
    assert messages and any(denied in m for m in messages), (case, messages)


def test_the_agent_may_cordon_and_uncordon_its_own_node_for_maintenance(
        policy: dict[str, Any]) -> None:
    annotations = {**NODE["metadata"]["annotations"], "divingbell.io/cordoned-by": "x"}
    cordoned = changed(spec__unschedulable=True, metadata__annotations=annotations)
    assert admit(policy, request(node_names=["node-1"]), cordoned, old()) == []
    assert admit(policy, request(node_names=["node-1"]), old(), cordoned) == []


def pod(node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}}


def test_the_agent_deletes_pods_only_on_its_own_node(objects: list[dict[str, Any]]) -> None:
    pods = policy_named(objects, "divingbell-agent-own-pods")
    delete = {**request(node_names=["node-1"]), "operation": "DELETE"}
    assert admit(pods, delete, None, pod("node-1")) == []
    assert admit(pods, delete, None, pod("node-2")) == [
        "the divingbell agent may delete only pods on the node its pod runs on"]
    assert admit(pods, {**request("kubernetes-admin"), "operation": "DELETE"}, None,
                 pod("node-2")) == []


def test_other_users_are_not_affected(policy: dict[str, Any]) -> None:
    for user in ("kubernetes-admin", "system:serviceaccount:other:divingbell",
                 "system:node:node-1"):
        assert admit(policy, request(user), changed("node-2",
                                                    metadata__labels={"role": "x"}), old()) == []


def event(node: str, kind: str = "Node") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{node}.divingbell.abc", "namespace": "default"},
            "involvedObject": {"apiVersion": "v1", "kind": kind, "name": node},
            "reason": "Applied", "message": "m", "type": "Normal", "count": 1}


def test_the_agent_records_events_only_about_its_own_node(
        event_policy: dict[str, Any]) -> None:
    mine = request(node_names=["node-1"])
    assert admit(event_policy, mine, event("node-1"), None) == []
    repeat = {**event("node-1"), "count": 2}
    assert admit(event_policy, mine, repeat, event("node-1")) == []
    for denied in (event("node-2"), event("node-1", kind="Pod")):
        assert admit(event_policy, mine, denied, None) == [
            "the divingbell agent may record Events only about the node its pod runs on"]
    assert admit(event_policy, request(), event("node-1"), None) != []
    assert admit(event_policy, request("kubelet"), event("node-2"), None) == []


def lease(holder: str | None, renewed: str = "2026-12-06T10:00:00.000000Z",
          seconds: int = 60) -> dict[str, Any]:
    spec: dict[str, Any] = {"leaseDurationSeconds": seconds, "leaseTransitions": 0}
    if holder is not None:
        spec |= {"holderIdentity": holder, "acquireTime": renewed, "renewTime": renewed}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "divingbell-slot-rack-0", "namespace": "ops"}, "spec": spec}


def test_the_agent_holds_slot_leases_only_in_its_own_name(
        objects: list[dict[str, Any]]) -> None:
    """The same cases the real API server runs (tests/kube/test_agent_rights.py), without
    one: a Lease names the writer's node or nobody; another node's only once expired."""
    slots = policy_named(objects, "divingbell-agent-own-slots")
    create = {**request(node_names=["node-1"]), "operation": "CREATE"}
    update = {**request(node_names=["node-1"]), "operation": "UPDATE"}
    holder_message = ("the divingbell agent may hold a slot Lease only in the name of the node "
                      "its pod runs on")
    live_message = ("the divingbell agent may not free or take another node's slot Lease "
                     "before it expired")
    assert admit(slots, create, lease("node-1"), None) == []
    assert admit(slots, create, lease("node-2"), None) == [holder_message]
    assert admit(slots, update, lease("node-1", "2026-12-06T10:00:30.000000Z"),
                 lease("node-1")) == []  # renew
    assert admit(slots, update, lease(None), lease("node-1")) == []  # release its own
    assert admit(slots, update, lease(None), lease(None)) == []
    assert admit(slots, update, lease("node-1"), lease(None)) == []  # a free slot
    assert admit(slots, update, lease("node-1", "2026-12-06T10:00:30.000000Z"),
                 lease("node-2")) == [live_message]
    assert admit(slots, update, lease(None), lease("node-2")) == [live_message]
    assert admit(slots, update, lease("node-1", "2026-12-06T10:01:01.000000Z"),
                 lease("node-2")) == []  # expired at 10:01:00
    assert admit(slots, {**request("kubernetes-admin"), "operation": "UPDATE"},
                 lease(None), lease("node-2")) == []
