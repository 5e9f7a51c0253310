"""The Kubernetes edge: node labels in, per-node status and events out.

`KubeApi` is the whole interface the agent and `status --kube` use. `LightkubeApi` is the thin
real adapter (lightkube: typed, and it imports in ~0.13 s where the official client takes ~1 s;
only the agent and `status --kube` import it). `FakeKube` is the in-memory stand-in for tests,
where no API server runs. Both build their requests with the same functions below, and a
contract test checks that what lightkube puts on the wire is exactly what the fake records.

Events are aggregated as the API's event series are (client-go's EventCorrelator): one Event
object per (node, reason, type, message), named deterministically, whose `count` and
`lastTimestamp` are raised on every repeat. A retry every few minutes, or a restarted pod
reporting the same failure, counts up the same Event ("x7 over 3m" in `kubectl describe`)
instead of creating a new one.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ANNOTATION_PREFIX = "divingbell.io/"
# Events about a cluster-scoped object (a Node) must live in `default`: the API server rejects a
# core/v1 Event whose namespace differs from its involvedObject's unless it is `default`.
EVENTS_NAMESPACE = "default"
COMPONENT = "divingbell"
EVENT_SERIES_REMEMBERED = 256


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]

    @property
    def status(self) -> dict[str, str]:
        """This node's divingbell annotations, without the prefix."""
        return {k.removeprefix(ANNOTATION_PREFIX): v for k, v in self.annotations.items()
                if k.startswith(ANNOTATION_PREFIX)}


class KubeApi(Protocol):
    def node_labels(self, node: str) -> dict[str, str]: ...

    def annotate_node(self, node: str, status: Mapping[str, str]) -> None:
        """Set `divingbell.io/<key>` annotations on the node."""

    def node_event(self, node: str, reason: str, message: str, *, warning: bool = False
                   ) -> None: ...

    def nodes(self) -> list[NodeView]: ...


# The requests, built once for the adapter and the fake alike. -------------------------------

def annotation_patch(status: Mapping[str, str]) -> dict[str, Any]:
    """A JSON merge patch that sets divingbell's annotations and touches nothing else."""
    return {"metadata": {"annotations": {f"{ANNOTATION_PREFIX}{k}": v
                                         for k, v in sorted(status.items())}}}


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def event_name(node: str, reason: str, message: str, warning: bool) -> str:
    """One name per series: the same node, reason, type and message are the same Event."""
    key = f"{reason}\0{'Warning' if warning else 'Normal'}\0{message[:1024]}"
    return f"{node}.divingbell.{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def event_body(node: str, reason: str, message: str, warning: bool, now: float
               ) -> dict[str, Any]:
    stamp = _stamp(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(node, reason, message, warning),
                     "namespace": EVENTS_NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


@dataclass(frozen=True)
class Request:
    """What an adapter sends, as the API server sees it."""

    method: str
    path: str
    body: dict[str, Any] | None = None


def annotate_request(node: str, status: Mapping[str, str]) -> Request:
    return Request("PATCH", f"/api/v1/nodes/{node}", annotation_patch(status))


EVENTS_PATH = f"/api/v1/namespaces/{EVENTS_NAMESPACE}/events"


def event_request(node: str, reason: str, message: str, warning: bool, now: float) -> Request:
    return Request("POST", EVENTS_PATH, event_body(node, reason, message, warning, now))


def event_get_request(name: str) -> Request:
    return Request("GET", f"{EVENTS_PATH}/{name}")


def event_repeat_request(name: str, count: int, now: float) -> Request:
    """A merge patch counting one more occurrence of an existing Event."""
    return Request("PATCH", f"{EVENTS_PATH}/{name}", {"count": count,
                                                       "lastTimestamp": _stamp(now)})


class EventSeries:
    """Which Events this process created and their counts (bounded, oldest forgotten): a
    repeat patches the count; an Event from before a restart is found by its name (409 on
    create), and one the API server expired (event TTL, 1 h by default) is created anew."""

    def __init__(self) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()

    def record(self, send: Callable[[Request], dict[str, Any]], node: str, reason: str,
               message: str, warning: bool, now: float) -> None:
        name = event_name(node, reason, message, warning)
        count = self._counts.get(name)
        if count is not None:
            try:
                send(event_repeat_request(name, count + 1, now))
                self._remember(name, count + 1)
                return
            except KubeError as exc:
                if exc.code != 404:
                    raise
        try:
            send(event_request(node, reason, message, warning, now))
            self._remember(name, 1)
            return
        except KubeError as exc:
            if exc.code != 409:
                raise
        existing = send(event_get_request(name))
        count = int(existing.get("count") or 1) + 1
        send(event_repeat_request(name, count, now))
        self._remember(name, count)

    def _remember(self, name: str, count: int) -> None:
        self._counts[name] = count
        self._counts.move_to_end(name)
        while len(self._counts) > EVENT_SERIES_REMEMBERED:
            self._counts.popitem(last=False)


# Document Secrets (`divingbell documents`): which ones the DaemonSet can still go back to. ------

DOCUMENT_SELECTOR = "divingbell.io/document=true"
DOCUMENT_VOLUME = "document"


@dataclass(frozen=True)
class DocumentSecret:
    name: str
    digest: str
    created: str
    used_by: tuple[str, ...] = ()  # "current", "revision 3", ...


def secrets_list_request(namespace: str) -> Request:
    return Request("GET", f"/api/v1/namespaces/{namespace}/secrets?labelSelector="
                   + DOCUMENT_SELECTOR.replace("/", "%2F").replace("=", "%3D"))


def daemonset_request(namespace: str, name: str) -> Request:
    return Request("GET", f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}")


def revisions_list_request(namespace: str) -> Request:
    return Request("GET", f"/apis/apps/v1/namespaces/{namespace}/controllerrevisions")


def secret_delete_request(namespace: str, name: str) -> Request:
    return Request("DELETE", f"/api/v1/namespaces/{namespace}/secrets/{name}")


def template_document(template: Mapping[str, Any] | None) -> str | None:
    """The Secret a pod template mounts as its document, if any."""
    for volume in ((template or {}).get("spec") or {}).get("volumes") or []:
        if volume.get("name") == DOCUMENT_VOLUME and "secret" in volume:
            return str(volume["secret"].get("secretName"))
    return None


def document_usage(secrets: Sequence[Mapping[str, Any]], daemonset: Mapping[str, Any] | None,
                   revisions: Sequence[Mapping[str, Any]], daemonset_name: str
                   ) -> list[DocumentSecret]:
    """Each document Secret with what still uses it: the DaemonSet's current template, or one
    of the ControllerRevisions it keeps (what `kubectl rollout undo` can return to)."""
    users: dict[str, list[str]] = {}
    if daemonset is not None:
        current = template_document((daemonset.get("spec") or {}).get("template"))
        if current:
            users.setdefault(current, []).append("current")
    for rev in sorted(revisions, key=lambda r: int(r.get("revision") or 0)):
        owners = (rev.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("kind") == "DaemonSet" and o.get("name") == daemonset_name
                   for o in owners):
            continue
        # A DaemonSet's ControllerRevision holds its template as a patch of `spec`.
        template = ((rev.get("data") or {}).get("spec") or {}).get("template")
        name = template_document(template)
        if name:
            users.setdefault(name, []).append(f"revision {rev.get('revision')}")
    found = []
    for secret in secrets:
        meta = secret.get("metadata") or {}
        name = str(meta.get("name"))
        found.append(DocumentSecret(name, str((meta.get("labels") or {}).get(
            "divingbell.io/document-digest", "")), str(meta.get("creationTimestamp") or ""),
            tuple(users.get(name, ()))))
    return sorted(found, key=lambda d: (d.created, d.name))


# Maintenance (issue 15): leases, pods, budgets, evictions, cordon, node delete. ---------------
# Views, request builders and the fake's semantics for the maintenance sequence and the
# `divingbell node` commands. Kept in these separate sections; the classes below inherit them.

LEASES_API = "/apis/coordination.k8s.io/v1"
MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


@dataclass(frozen=True)
class NodeState:
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    unschedulable: bool
    ready: bool
    boot_id: str


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    node: str
    labels: dict[str, str]
    owner_kinds: tuple[str, ...] = ()
    mirror: bool = False
    phase: str = "Running"
    deleting: bool = False
    ready: bool = True

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class BudgetView:
    namespace: str
    name: str
    selector: dict[str, Any] | None  # the PDB's LabelSelector as the API has it
    disruptions_allowed: int
    min_available: int | str | None = None
    max_unavailable: int | str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LeaseView:
    name: str
    holder: str | None
    duration_seconds: int
    acquired: float | None = None
    renewed: float | None = None
    transitions: int = 0
    resource_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)


class MaintenanceKube(KubeApi, Protocol):
    """What node maintenance needs from the API server, on top of `KubeApi`."""

    def node_state(self, node: str) -> NodeState: ...

    def node_states(self) -> list[NodeState]: ...

    def patch_node(self, node: str, *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   unschedulable: bool | None = None) -> NodeView:
        """Cordon (True) / uncordon (False) and set or (None) remove labels and annotations,
        in one merge patch; keys are full (`divingbell.io/cordoned-by`)."""

    def delete_node(self, node: str) -> None: ...

    def pods_on_node(self, node: str) -> list[PodView]: ...

    def budgets(self) -> list[BudgetView]: ...

    def evict(self, namespace: str, pod: str, grace_seconds: int) -> None:
        """Raises EvictionRefused when a budget forbids it; a pod already gone is fine."""

    def delete_pod(self, namespace: str, pod: str, grace_seconds: int) -> None: ...

    def get_lease(self, namespace: str, name: str) -> LeaseView | None: ...

    def list_leases(self, namespace: str) -> list[LeaseView]: ...

    def create_lease(self, namespace: str, lease: LeaseView) -> LeaseView:
        """Raises KubeConflict if it exists already."""

    def replace_lease(self, namespace: str, lease: LeaseView) -> LeaseView:
        """Raises KubeConflict if `lease.resource_version` is stale."""


def with_query(path: str, params: Mapping[str, str | int | None]) -> str:
    """A path with its query in one canonical form (sorted, URL-encoded)."""
    from urllib.parse import urlencode

    items = sorted((k, str(v)) for k, v in params.items() if v is not None)
    return f"{path}?{urlencode(items)}" if items else path


def microtime(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime(MICROTIME)


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def node_patch_request(node: str, *, labels: Mapping[str, str | None] | None = None,
                       annotations: Mapping[str, str | None] | None = None,
                       unschedulable: bool | None = None) -> Request:
    """One merge patch of a Node: labels, annotations (None removes a key) and the cordon."""
    body: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    if labels:
        metadata["labels"] = dict(sorted(labels.items()))
    if annotations:
        metadata["annotations"] = dict(sorted(annotations.items()))
    if metadata or unschedulable is None:
        body["metadata"] = metadata
    if unschedulable is not None:
        # As kubectl uncordon: false is the field's absence.
        body["spec"] = {"unschedulable": True if unschedulable else None}
    return Request("PATCH", f"/api/v1/nodes/{node}", body)


def pods_on_node_request(node: str) -> Request:
    return Request("GET", with_query("/api/v1/pods", {"fieldSelector": f"spec.nodeName={node}"}))


def budgets_request() -> Request:
    return Request("GET", "/apis/policy/v1/poddisruptionbudgets")


def eviction_request(namespace: str, pod: str, grace_seconds: int) -> Request:
    return Request("POST", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", {
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
        "deleteOptions": {"kind": "DeleteOptions", "gracePeriodSeconds": grace_seconds}})


def delete_pod_request(namespace: str, pod: str, grace_seconds: int) -> Request:
    return Request("DELETE", with_query(f"/api/v1/namespaces/{namespace}/pods/{pod}",
                                        {"gracePeriodSeconds": grace_seconds}))


def delete_node_request(node: str) -> Request:
    return Request("DELETE", f"/api/v1/nodes/{node}")


def lease_path(namespace: str, name: str | None = None) -> str:
    base = f"{LEASES_API}/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def lease_body(namespace: str, lease: LeaseView) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": lease.name, "namespace": namespace}
    if lease.labels:
        metadata["labels"] = dict(sorted(lease.labels.items()))
    if lease.resource_version:
        metadata["resourceVersion"] = lease.resource_version
    spec: dict[str, Any] = {"leaseDurationSeconds": lease.duration_seconds,
                            "leaseTransitions": lease.transitions}
    if lease.holder is not None:
        spec["holderIdentity"] = lease.holder
    if lease.acquired is not None:
        spec["acquireTime"] = microtime(lease.acquired)
    if lease.renewed is not None:
        spec["renewTime"] = microtime(lease.renewed)
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": spec}


def lease_view(body: Mapping[str, Any]) -> LeaseView:
    metadata, spec = body.get("metadata") or {}, body.get("spec") or {}
    return LeaseView(
        name=metadata.get("name", ""), holder=spec.get("holderIdentity") or None,
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquired=parse_time(spec.get("acquireTime")), renewed=parse_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=str(metadata.get("resourceVersion") or ""),
        labels=dict(metadata.get("labels") or {}))


def node_state_from(body: Mapping[str, Any]) -> NodeState:
    metadata, spec, status = (body.get(k) or {} for k in ("metadata", "spec", "status"))
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    return NodeState(metadata.get("name", ""), dict(metadata.get("labels") or {}),
                     dict(metadata.get("annotations") or {}), bool(spec.get("unschedulable")),
                     ready, (status.get("nodeInfo") or {}).get("bootID", ""))


def pod_view(body: Mapping[str, Any]) -> PodView:
    metadata, spec, status = (body.get(k) or {} for k in ("metadata", "spec", "status"))
    annotations = metadata.get("annotations") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    return PodView(
        metadata.get("namespace", ""), metadata.get("name", ""), spec.get("nodeName") or "",
        dict(metadata.get("labels") or {}),
        tuple(o.get("kind", "") for o in metadata.get("ownerReferences") or []
              if o.get("controller")),
        MIRROR_ANNOTATION in annotations, status.get("phase") or "Unknown",
        bool(metadata.get("deletionTimestamp")), ready)


def budget_view(body: Mapping[str, Any]) -> BudgetView:
    metadata, spec, status = (body.get(k) or {} for k in ("metadata", "spec", "status"))
    return BudgetView(metadata.get("namespace", ""), metadata.get("name", ""),
                      spec.get("selector"), int(status.get("disruptionsAllowed") or 0),
                      spec.get("minAvailable"), spec.get("maxUnavailable"))


@dataclass
class FakePod:
    """A pod in the fake: it stops `stop_seconds` after being asked to (at most its grace)."""

    namespace: str
    name: str
    node: str
    labels: dict[str, str] = field(default_factory=dict)
    owner_kind: str | None = "ReplicaSet"
    mirror: bool = False
    phase: str = "Running"
    ready: bool = True
    stop_seconds: float = 0.0
    gone_at: float | None = None

    def body(self, clock: float) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "labels": dict(self.labels)}
        if self.owner_kind:
            metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": self.owner_kind,
                                            "name": f"{self.name}-owner", "uid": "u",
                                            "controller": True}]
        if self.mirror:
            metadata["annotations"] = {MIRROR_ANNOTATION: "hash"}
        if self.gone_at is not None:
            metadata["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                          time.gmtime(clock))
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"nodeName": self.node, "containers": [{"name": "main",
                                                                 "image": "busybox"}]},
                "status": {"phase": self.phase, "conditions": [
                    {"type": "Ready", "status": "True" if self.ready else "False"}]}}


class _FakeMaintenance:
    """The fake's maintenance half, with the API server's semantics: 409 on a stale
    resourceVersion or an existing name, 404 on a missing object, 429 when an eviction would
    violate a PodDisruptionBudget (500 when two budgets select the pod, as the real server),
    and pods that take time to terminate after an eviction."""

    node_objects: dict[str, NodeView]
    sent: list[Request]
    clock: Callable[[], float]

    def _maint(self) -> _FakeMaintenanceState:
        state: _FakeMaintenanceState | None = self.__dict__.get("_maintenance_state")
        if state is None:
            state = self.__dict__.setdefault("_maintenance_state", _FakeMaintenanceState())
        return state

    # Test set-up (not API calls, not recorded)
    def add_pod(self, pod: FakePod) -> None:
        with self._maint().lock:
            self._maint().pods[(pod.namespace, pod.name)] = pod

    def add_budget(self, namespace: str, name: str, selector: dict[str, Any], *,
                   min_available: int | str | None = None,
                   max_unavailable: int | str | None = None,
                   expected_pods: int | None = None) -> None:
        """`expected_pods`: the scale of the pods' controller (the disruption controller counts
        against it, so a pod evicted and not yet replaced still counts); default: the pods."""
        with self._maint().lock:
            self._maint().budgets[(namespace, name)] = {
                "selector": selector, "minAvailable": min_available,
                "maxUnavailable": max_unavailable}
            self._maint().expected[(namespace, name)] = expected_pods

    def set_node_ready(self, node: str, ready: bool) -> None:
        self._maint().ready[node] = ready

    def set_boot_id(self, node: str, boot_id: str) -> None:
        self._maint().boot_ids[node] = boot_id

    def pod_names(self) -> list[str]:
        with self._maint().lock:
            self._reap()
            return sorted(f"{ns}/{name}" for ns, name in self._maint().pods)

    # The API
    def node_state(self, node: str) -> NodeState:
        state = self._maint()
        with state.lock:
            self.sent.append(Request("GET", f"/api/v1/nodes/{node}"))
            return node_state_from(self._node_body(node))

    def node_states(self) -> list[NodeState]:
        with self._maint().lock:
            self.sent.append(Request("GET", "/api/v1/nodes"))
            return [node_state_from(self._node_body(n)) for n in sorted(self.node_objects)]

    def delete_node(self, node: str) -> None:
        with self._maint().lock:
            self.sent.append(delete_node_request(node))
            self._existing_node(node)
            del self.node_objects[node]

    def pods_on_node(self, node: str) -> list[PodView]:
        state = self._maint()
        with state.lock:
            self.sent.append(pods_on_node_request(node))
            self._reap()
            now = self.clock()
            return [pod_view(p.body(now)) for _, p in sorted(state.pods.items())
                    if p.node == node]

    def budgets(self) -> list[BudgetView]:
        state = self._maint()
        with state.lock:
            self.sent.append(budgets_request())
            self._reap()
            return [budget_view(self._budget_body(ns, name))
                    for ns, name in sorted(state.budgets)]

    def evict(self, namespace: str, pod: str, grace_seconds: int) -> None:
        state = self._maint()
        with state.lock:
            self.sent.append(eviction_request(namespace, pod, grace_seconds))
            self._reap()
            target = state.pods.get((namespace, pod))
            if target is None:
                return  # 404 on the wire: the pod is gone, which is what was asked
            if target.gone_at is not None:
                return  # already terminating: the server accepts and does nothing new
            if target.phase in ("Running", "Unknown"):
                covering = [(ns, name) for ns, name in sorted(state.budgets)
                            if ns == namespace and self._selects(ns, name, target)]
                if len(covering) > 1:
                    raise KubeError("API server: 500 This pod has more than one "
                                    "PodDisruptionBudget, which the eviction subresource "
                                    "does not support.")
                if covering and self._allowed(*covering[0]) <= 0:
                    raise EvictionRefused(
                        "429 Cannot evict pod as it would violate the pod's disruption "
                        f"budget {covering[0][0]}/{covering[0][1]}.")
            self._terminate(target, grace_seconds)

    def delete_pod(self, namespace: str, pod: str, grace_seconds: int) -> None:
        state = self._maint()
        with state.lock:
            self.sent.append(delete_pod_request(namespace, pod, grace_seconds))
            self._reap()
            target = state.pods.get((namespace, pod))
            if target is None:
                raise KubeNotFound(f'pods "{pod}" not found (404)')
            self._terminate(target, grace_seconds)

    def get_lease(self, namespace: str, name: str) -> LeaseView | None:
        state = self._maint()
        with state.lock:
            self.sent.append(Request("GET", lease_path(namespace, name)))
            body = state.leases.get((namespace, name))
            return lease_view(body) if body is not None else None

    def list_leases(self, namespace: str) -> list[LeaseView]:
        state = self._maint()
        with state.lock:
            self.sent.append(Request("GET", lease_path(namespace)))
            return [lease_view(b) for (ns, _), b in sorted(state.leases.items())
                    if ns == namespace]

    def create_lease(self, namespace: str, lease: LeaseView) -> LeaseView:
        state = self._maint()
        with state.lock:
            request = Request("POST", lease_path(namespace), lease_body(namespace, lease))
            self.sent.append(request)
            if (namespace, lease.name) in state.leases:
                raise KubeConflict(f'leases "{lease.name}" already exists (409)')
            return self._store_lease(namespace, lease.name, request.body or {})

    def replace_lease(self, namespace: str, lease: LeaseView) -> LeaseView:
        state = self._maint()
        with state.lock:
            request = Request("PUT", lease_path(namespace, lease.name),
                              lease_body(namespace, lease))
            self.sent.append(request)
            current = state.leases.get((namespace, lease.name))
            if current is None:
                raise KubeNotFound(f'leases "{lease.name}" not found (404)')
            if lease.resource_version != current["metadata"]["resourceVersion"]:
                raise KubeConflict(
                    f'Operation cannot be fulfilled on leases "{lease.name}": the object has '
                    "been modified; please apply your changes to the latest version (409)")
            return self._store_lease(namespace, lease.name, request.body or {})

    # Semantics
    def _store_lease(self, namespace: str, name: str, body: dict[str, Any]) -> LeaseView:
        state = self._maint()
        state.version += 1
        stored = {**body, "metadata": {**body["metadata"],
                                       "resourceVersion": str(state.version)}}
        state.leases[(namespace, name)] = stored
        return lease_view(stored)

    def _existing_node(self, node: str) -> NodeView:
        if node not in self.node_objects:
            raise KubeNotFound(f'nodes "{node}" not found (404)')
        return self.node_objects[node]

    def _node_body(self, node: str) -> dict[str, Any]:
        view, state = self._existing_node(node), self._maint()
        return {"metadata": {"name": node, "labels": view.labels,
                             "annotations": view.annotations},
                "spec": {"unschedulable": True} if state.unschedulable.get(node) else {},
                "status": {"conditions": [{"type": "Ready", "status": "True" if
                                           state.ready.get(node, True) else "False"}],
                           "nodeInfo": {**_NODE_INFO, "bootID": state.boot_ids.get(node, "")}}}

    def _terminate(self, pod: FakePod, grace_seconds: int) -> None:
        pod.gone_at = self.clock() + min(float(grace_seconds), pod.stop_seconds)
        pod.ready = False
        self._reap()

    def _reap(self) -> None:
        state, now = self._maint(), self.clock()
        for key in [k for k, p in state.pods.items() if p.gone_at is not None
                    and p.gone_at <= now]:
            del state.pods[key]

    def _selects(self, namespace: str, name: str, pod: FakePod) -> bool:
        from divingbell.maintenance.selectors import from_label_selector

        selector = self._maint().budgets[(namespace, name)]["selector"]
        return pod.namespace == namespace and from_label_selector(selector).matches(pod.labels)

    def _allowed(self, namespace: str, name: str) -> int:
        """What the disruption controller would publish as status.disruptionsAllowed."""
        state = self._maint()
        spec = state.budgets[(namespace, name)]
        pods = [p for p in state.pods.values() if p.phase in ("Running", "Unknown")
                and self._selects(namespace, name, p)]
        expected = state.expected.get((namespace, name)) or len(pods)
        healthy = sum(1 for p in pods if p.ready and p.gone_at is None)
        if spec["minAvailable"] is not None:
            return max(0, healthy - _scaled(spec["minAvailable"], expected, up=True))
        if spec["maxUnavailable"] is not None:
            return max(0, _scaled(spec["maxUnavailable"], expected, up=True)
                       - (expected - healthy))
        return max(0, healthy - expected)

    def _budget_body(self, namespace: str, name: str) -> dict[str, Any]:
        spec = self._maint().budgets[(namespace, name)]
        return {"metadata": {"name": name, "namespace": namespace},
                "spec": {k: v for k, v in spec.items() if v is not None},
                "status": {"disruptionsAllowed": self._allowed(namespace, name)}}


_NODE_INFO = {"architecture": "amd64", "containerRuntimeVersion": "containerd://1.7",
              "kernelVersion": "6.1.0", "kubeProxyVersion": "", "kubeletVersion": "v1.31.0",
              "machineID": "0", "operatingSystem": "linux", "osImage": "Debian 12",
              "systemUUID": "0"}


def _scaled(value: int | str, total: int, *, up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        share = int(value[:-1]) * total
        return -(-share // 100) if up else share // 100
    return int(value)


@dataclass
class _FakeMaintenanceState:
    lock: threading.RLock = field(default_factory=threading.RLock)
    pods: dict[tuple[str, str], FakePod] = field(default_factory=dict)
    budgets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    unschedulable: dict[str, bool] = field(default_factory=dict)
    ready: dict[str, bool] = field(default_factory=dict)
    boot_ids: dict[str, str] = field(default_factory=dict)
    expected: dict[tuple[str, str], int | None] = field(default_factory=dict)
    version: int = 0
# Node labels (bootstrap: `divingbell bootstrap labels`, teardown, the fleet's label route). ---

class NodeLabelApi(KubeApi, Protocol):
    """What label management needs on top of `KubeApi`: one node, and a merge patch of its
    labels and annotations (a None value removes the key)."""

    def node(self, name: str) -> NodeView: ...

    def patch_node(self, node: str, *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   unschedulable: bool | None = None) -> NodeView: ...


def _merged(current: Mapping[str, str], patch: Mapping[str, str | None]) -> dict[str, str]:
    out = dict(current)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# The fake. --------------------------------------------------------------------------------

@dataclass
class FakeKube(_FakeMaintenance):
    """In-memory nodes, recording every request it is asked to send."""

    node_objects: dict[str, NodeView] = field(default_factory=dict)
    sent: list[Request] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    event_objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: EventSeries = field(default_factory=EventSeries)
    # (namespace, kind, name) -> object: Secrets, DaemonSets and ControllerRevisions.
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    def add_node(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.node_objects[name] = NodeView(name, dict(labels or {}), {})

    def set_labels(self, name: str, labels: Mapping[str, str]) -> None:
        node = self.node_objects[name]
        self.node_objects[name] = NodeView(name, dict(labels), node.annotations)

    def node_labels(self, node: str) -> dict[str, str]:
        self.sent.append(Request("GET", f"/api/v1/nodes/{node}"))
        return dict(self._node(node).labels)

    def annotate_node(self, node: str, status: Mapping[str, str]) -> None:
        request = annotate_request(node, status)
        self.sent.append(request)
        current = self._node(node)
        assert request.body is not None
        annotations = {**current.annotations, **request.body["metadata"]["annotations"]}
        self.node_objects[node] = NodeView(node, current.labels, annotations)

    def node_event(self, node: str, reason: str, message: str, *, warning: bool = False
                   ) -> None:
        self.series.record(self._send_event, node, reason, message, warning, self.clock())

    def _send_event(self, request: Request) -> dict[str, Any]:
        """The events endpoints with the API server's semantics: a create of an existing
        name is 409 AlreadyExists, a get or patch of a missing one 404."""
        self.sent.append(request)
        if request.method == "POST":
            assert request.body is not None
            name = request.body["metadata"]["name"]
            if name in self.event_objects:
                raise KubeError(f"API server: 409 events {name!r} already exists", code=409)
            self.event_objects[name] = dict(request.body)
            return dict(request.body)
        name = request.path.rsplit("/", 1)[1]
        if name not in self.event_objects:
            raise KubeError(f"API server: 404 events {name!r} not found", code=404)
        if request.method == "PATCH":
            assert request.body is not None
            self.event_objects[name] = {**self.event_objects[name], **request.body}
        return dict(self.event_objects[name])

    def expire_events(self) -> None:
        """What the API server's event TTL does (an hour after the last update)."""
        self.event_objects.clear()

    def nodes(self) -> list[NodeView]:
        self.sent.append(Request("GET", "/api/v1/nodes"))
        return sorted(self.node_objects.values(), key=lambda n: n.name)

    # Node labels (NodeLabelApi) --------------------------------------------------------

    def node(self, name: str) -> NodeView:
        self.sent.append(Request("GET", f"/api/v1/nodes/{name}"))
        return self._node(name)

    def patch_node(self, node: str, *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   unschedulable: bool | None = None) -> NodeView:
        state = self._maint()
        with state.lock:
            self.sent.append(node_patch_request(node, labels=labels, annotations=annotations,
                                                unschedulable=unschedulable))
            current = self._existing_node(node)
            view = NodeView(node, _merged(current.labels, labels or {}),
                            _merged(current.annotations, annotations or {}))
            self.node_objects[node] = view
            if unschedulable is not None:
                state.unschedulable[node] = unschedulable
            return view

    def events(self, node: str) -> list[dict[str, Any]]:
        """The Event objects about `node`, oldest first (creation order)."""
        return [e for e in self.event_objects.values()
                if e["involvedObject"]["name"] == node]

    def put(self, obj: Mapping[str, Any]) -> None:
        """Store a namespaced object as `kubectl apply` would."""
        meta = obj["metadata"]
        self.objects[meta["namespace"], obj["kind"], meta["name"]] = dict(obj)

    def document_secrets(self, namespace: str, daemonset: str) -> list[DocumentSecret]:
        self.sent.append(secrets_list_request(namespace))
        key, value = DOCUMENT_SELECTOR.split("=")
        secrets = [o for (ns, kind, _), o in sorted(self.objects.items()) if ns == namespace
                   and kind == "Secret" and o["metadata"].get("labels", {}).get(key) == value]
        self.sent.append(daemonset_request(namespace, daemonset))
        found = self.objects.get((namespace, "DaemonSet", daemonset))
        if found is None:
            raise KubeError(f"API server: 404 daemonsets {daemonset!r} not found", code=404)
        self.sent.append(revisions_list_request(namespace))
        revisions = [o for (ns, kind, _), o in sorted(self.objects.items())
                     if ns == namespace and kind == "ControllerRevision"]
        return document_usage(secrets, found, revisions, daemonset)

    def delete_secret(self, namespace: str, name: str) -> None:
        self.sent.append(secret_delete_request(namespace, name))
        if self.objects.pop((namespace, "Secret", name), None) is None:
            raise KubeError(f"API server: 404 secrets {name!r} not found", code=404)

    def _node(self, node: str) -> NodeView:
        if node not in self.node_objects:
            raise KubeError(f"node {node!r} not found (404)", code=404)
        return self.node_objects[node]


class KubeError(Exception):
    """The API server refused or could not be reached; the message says which. `code` is the
    HTTP status of a refusal (None: not reached)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


# Maintenance (issue 15), the real adapter's half: the same requests through lightkube. ------

class KubeConflict(KubeError):
    """409: the object changed since it was read (stale resourceVersion) or already exists."""

    def __init__(self, message: str, *, code: int | None = 409) -> None:
        super().__init__(message, code=code)


class KubeNotFound(KubeError):
    """404: no such object."""

    def __init__(self, message: str, *, code: int | None = 404) -> None:
        super().__init__(message, code=code)


class EvictionRefused(KubeError):
    """429: evicting the pod now would violate its PodDisruptionBudget."""

    def __init__(self, message: str, *, code: int | None = 429) -> None:
        super().__init__(message, code=code)



def _lease_resource() -> Any:
    """Leases as plain dicts: lightkube's typed Lease drops the microseconds of a whole-second
    MicroTime ("...:00Z"), which the API server's RFC3339Micro parser rejects."""
    from lightkube.generic_resource import create_namespaced_resource

    return create_namespaced_resource("coordination.k8s.io", "v1", "Lease", "leases")


class _LightkubeMaintenance:
    _client: Any
    _clock: Callable[[], float]

    def node_state(self, node: str) -> NodeState:
        from lightkube.resources.core_v1 import Node

        obj = self._maintenance_call(lambda: self._client.get(Node, node))
        return node_state_from(obj.to_dict())

    def node_states(self) -> list[NodeState]:
        from lightkube.resources.core_v1 import Node

        items = self._maintenance_call(lambda: list(self._client.list(Node)))
        return sorted((node_state_from(n.to_dict()) for n in items), key=lambda n: n.name)

    def delete_node(self, node: str) -> None:
        from lightkube.resources.core_v1 import Node

        self._maintenance_call(lambda: self._client.delete(Node, node))

    def pods_on_node(self, node: str) -> list[PodView]:
        from lightkube.resources.core_v1 import Pod

        items = self._maintenance_call(lambda: list(self._client.list(
            Pod, namespace="*", fields={"spec.nodeName": node})))
        return sorted((pod_view(p.to_dict()) for p in items), key=lambda p: p.ref)

    def budgets(self) -> list[BudgetView]:
        from lightkube.resources.policy_v1 import PodDisruptionBudget

        items = self._maintenance_call(
            lambda: list(self._client.list(PodDisruptionBudget, namespace="*")))
        return sorted((budget_view(b.to_dict()) for b in items), key=lambda b: b.ref)

    def evict(self, namespace: str, pod: str, grace_seconds: int) -> None:
        from lightkube.resources.core_v1 import Pod

        body = eviction_request(namespace, pod, grace_seconds).body or {}
        eviction = Pod.Eviction.from_dict(body)
        try:
            self._maintenance_call(
                lambda: self._client.create(eviction, pod, namespace=namespace))
        except KubeNotFound:
            return

    def delete_pod(self, namespace: str, pod: str, grace_seconds: int) -> None:
        from lightkube.resources.core_v1 import Pod

        self._maintenance_call(lambda: self._client.delete(
            Pod, pod, namespace=namespace, grace_period=grace_seconds))

    def get_lease(self, namespace: str, name: str) -> LeaseView | None:
        Lease = _lease_resource()
        try:
            obj = self._maintenance_call(
                lambda: self._client.get(Lease, name, namespace=namespace))
        except KubeNotFound:
            return None
        return lease_view(dict(obj))

    def list_leases(self, namespace: str) -> list[LeaseView]:
        Lease = _lease_resource()
        items = self._maintenance_call(
            lambda: list(self._client.list(Lease, namespace=namespace)))
        return sorted((lease_view(dict(i)) for i in items), key=lambda v: v.name)

    def create_lease(self, namespace: str, lease: LeaseView) -> LeaseView:
        obj = _lease_resource()(lease_body(namespace, lease))
        created = self._maintenance_call(lambda: self._client.create(obj, namespace=namespace))
        return lease_view(dict(created))

    def replace_lease(self, namespace: str, lease: LeaseView) -> LeaseView:
        obj = _lease_resource()(lease_body(namespace, lease))
        replaced = self._maintenance_call(lambda: self._client.replace(obj))
        return lease_view(dict(replaced))

    @staticmethod
    def _maintenance_call(action: Callable[[], Any]) -> Any:
        """As LightkubeApi._call, with the status codes maintenance acts on as their own
        errors."""
        from lightkube import ApiError

        try:
            return action()
        except ApiError as exc:
            code, message = exc.status.code, exc.status.message
            if code == 409:
                raise KubeConflict(f"{message} (409)") from None
            if code == 404:
                raise KubeNotFound(f"{message} (404)") from None
            if code == 429:
                raise EvictionRefused(f"429 {message}") from None
            raise KubeError(f"API server: {code} {message}") from None
        except OSError as exc:
            raise KubeError(f"cannot reach the API server: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise KubeError(f"cannot reach the API server: {exc}") from None
            raise


def config_problem(kubeconfig: str | None, exc: Exception) -> str:
    """One line saying why no Kubernetes client could be configured, and from what."""
    where = (kubeconfig if kubeconfig is not None
             else "the in-cluster service account or ~/.kube/config")
    reason = f"no {exc.args[0]!r} in it" if isinstance(exc, KeyError) and exc.args else exc
    return (f"cannot configure the Kubernetes client from {where}: {reason}; give "
            "--kubeconfig FILE (or KUBECONFIG), or run in a pod with a service account")


# The real adapter. ------------------------------------------------------------------------

class LightkubeApi(_LightkubeMaintenance):
    def __init__(self, kubeconfig: str | None = None, *, server: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        from lightkube import Client, KubeConfig
        from lightkube.config.models import Cluster, User

        try:
            if server is not None:  # an unauthenticated server URL (tests, kubectl proxy)
                config = KubeConfig.from_one(cluster=Cluster(server=server), user=User())
            elif kubeconfig is not None:
                config = KubeConfig.from_file(kubeconfig)
            else:
                config = KubeConfig.from_env()  # in-cluster service account, else ~/.kube/config
            self._client = Client(config, field_manager=COMPONENT, trust_env=False)
        except Exception as exc:  # lightkube's config errors share no base class (KeyError...)
            raise KubeError(config_problem(kubeconfig, exc)) from None
        self._clock = clock
        self._series = EventSeries()

    def node_labels(self, node: str) -> dict[str, str]:
        from lightkube.resources.core_v1 import Node

        obj = self._call(lambda: self._client.get(Node, node))
        return dict((obj.metadata.labels if obj.metadata else None) or {})

    def annotate_node(self, node: str, status: Mapping[str, str]) -> None:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = annotate_request(node, status).body or {}
        self._call(lambda: self._client.patch(Node, node, body, patch_type=PatchType.MERGE))

    def node_event(self, node: str, reason: str, message: str, *, warning: bool = False
                   ) -> None:
        self._series.record(self._send_event, node, reason, message, warning, self._clock())

    def _send_event(self, request: Request) -> dict[str, Any]:
        from lightkube.resources.core_v1 import Event
        from lightkube.types import PatchType

        if request.method == "POST":
            event = Event.from_dict(request.body or {})
            assert isinstance(event, Event)
            result = self._call(lambda: self._client.create(event, namespace=EVENTS_NAMESPACE))
        else:
            name = request.path.rsplit("/", 1)[1]
            if request.method == "GET":
                result = self._call(lambda: self._client.get(Event, name,
                                                              namespace=EVENTS_NAMESPACE))
            else:
                result = self._call(lambda: self._client.patch(
                    Event, name, request.body or {}, namespace=EVENTS_NAMESPACE,
                    patch_type=PatchType.MERGE))
        return dict(result.to_dict())

    def document_secrets(self, namespace: str, daemonset: str) -> list[DocumentSecret]:
        from lightkube.resources.apps_v1 import ControllerRevision, DaemonSet
        from lightkube.resources.core_v1 import Secret

        key, value = DOCUMENT_SELECTOR.split("=")
        secrets = self._call(lambda: [s.to_dict() for s in self._client.list(
            Secret, namespace=namespace, labels={key: value})])
        found = self._call(lambda: self._client.get(DaemonSet, daemonset,
                                                    namespace=namespace)).to_dict()
        revisions = self._call(lambda: [r.to_dict() for r in self._client.list(
            ControllerRevision, namespace=namespace)])
        return document_usage(secrets, found, revisions, daemonset)

    def delete_secret(self, namespace: str, name: str) -> None:
        from lightkube.resources.core_v1 import Secret

        self._call(lambda: self._client.delete(Secret, name, namespace=namespace))

    def nodes(self) -> list[NodeView]:
        from lightkube.resources.core_v1 import Node

        items = self._call(lambda: list(self._client.list(Node)))
        return sorted((NodeView(n.metadata.name or "", dict(n.metadata.labels or {}),
                                dict(n.metadata.annotations or {}))
                       for n in items if n.metadata), key=lambda n: n.name)

    # Node labels (NodeLabelApi) --------------------------------------------------------

    def node(self, name: str) -> NodeView:
        from lightkube.resources.core_v1 import Node

        return self._view(self._call(lambda: self._client.get(Node, name)))

    def patch_node(self, node: str, *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   unschedulable: bool | None = None) -> NodeView:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = node_patch_request(node, labels=labels, annotations=annotations,
                                  unschedulable=unschedulable).body or {}
        return self._view(self._maintenance_call(lambda: self._client.patch(
            Node, node, body, patch_type=PatchType.MERGE)))

    @staticmethod
    def _view(obj: Any) -> NodeView:
        meta = obj.metadata
        return NodeView(meta.name or "", dict(meta.labels or {}), dict(meta.annotations or {}))

    @staticmethod
    def _call(action: Callable[[], Any]) -> Any:
        from lightkube import ApiError

        try:
            return action()
        except ApiError as exc:
            raise KubeError(f"API server: {exc.status.code} {exc.status.message}",
                            code=exc.status.code) from None
        except OSError as exc:
            raise KubeError(f"cannot reach the API server: {exc}") from None
        except Exception as exc:  # httpx transport errors do not share a public base here
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise KubeError(f"cannot reach the API server: {exc}") from None
            raise
