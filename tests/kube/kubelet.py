"""The test as the kubelet: Nodes made through the API, pods bound to them, their status patched
Running/Ready, and service-account tokens bound to a pod (TokenRequest), as a kubelet gets
them for the pod's containers. Nothing of this is in the product."""

from __future__ import annotations

import datetime
from typing import Any

from tests.kube.controlplane import ApiError, Rest


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_node(admin: Rest, name: str, labels: dict[str, str] | None = None,
             address: str = "127.0.0.1") -> dict[str, Any]:
    """A Ready Node with no kubelet behind it (idempotent within a session)."""
    try:
        node: dict[str, Any] = admin.post("/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  **(labels or {})}}})
    except ApiError as error:
        if error.code != 409:
            raise
        node = admin.get(f"/api/v1/nodes/{name}")
    admin.patch(f"/api/v1/nodes/{name}/status", {"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "the test acts as this node's kubelet",
                        "lastHeartbeatTime": now_rfc3339(),
                        "lastTransitionTime": now_rfc3339()}],
        "addresses": [{"type": "InternalIP", "address": address}],
        "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
        "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"}}})
    return node


def add_pod(admin: Rest, namespace: str, name: str, node: str, *,
            labels: dict[str, str] | None = None, service_account: str | None = None,
            owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pod bound to `node` (no scheduler involved)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owner:
        metadata["ownerReferences"] = [owner]
    spec: dict[str, Any] = {"nodeName": node, "containers": [
        {"name": "main", "image": "registry.invalid/pause:1"}],
        "terminationGracePeriodSeconds": 0}
    if service_account:
        spec["serviceAccountName"] = service_account
    pod: dict[str, Any] = admin.post(f"/api/v1/namespaces/{namespace}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    return pod


def set_ready(admin: Rest, namespace: str, name: str, ready: bool = True,
              container: str = "main") -> None:
    """What the kubelet reports for a running container: phase Running, Ready as given."""
    status = "True" if ready else "False"
    stamp = now_rfc3339()
    admin.patch(f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": {
        "phase": "Running", "startTime": stamp, "podIP": "127.0.0.1",
        "conditions": [{"type": t, "status": status, "lastTransitionTime": stamp}
                       for t in ("Ready", "ContainersReady")] + [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp}],
        "containerStatuses": [{"name": container, "ready": ready, "restartCount": 0,
                               "image": "registry.invalid/pause:1", "imageID": "",
                               "started": True,
                               "state": {"running": {"startedAt": stamp}}}]}},
        kind="strategic-merge")


def pod_token(admin: Rest, namespace: str, service_account: str, pod: dict[str, Any],
              seconds: int = 3600) -> str:
    """A TokenRequest bound to `pod`: the token carries the pod's node in its node-name
    claim, as the kubelet's projected token does."""
    answer = admin.post(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds, "boundObjectRef": {
                "apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"]}}})
    token: str = answer["status"]["token"]
    return token


def finish_deletions(admin: Rest, node: str) -> None:
    """Remove the pods of `node` that are being deleted, as its kubelet does once they
    stopped."""
    pods = admin.get("/api/v1/pods", fieldSelector=f"spec.nodeName={node}")["items"]
    for pod in pods:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            try:
                admin.request("DELETE",
                              f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                              {"gracePeriodSeconds": 0})
            except ApiError as error:
                if error.code != 404:
                    raise
