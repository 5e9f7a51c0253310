"""The Kubernetes API as divingbell uses it: views, protocols, errors and the requests.

Both the real adapter (divingbell.kube.lightkube) and the fake (divingbell.kube.fake) build
their requests with the functions here, so a contract test can check that what lightkube puts
on the wire is exactly what the fake records.

Events are aggregated as the API's event series are (client-go's EventCorrelator): one Event
object per (node, reason, type, message), named deterministically, whose `count` and
`lastTimestamp` are raised on every repeat. A retry every few minutes, or a restarted pod
reporting the same failure, counts up the same Event ("x7 over 3m" in `kubectl describe`)
instead of creating a new one.
"""

from __future__ import annotations

import datetime
import hashlib
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


# Objects by kind, as plain dicts (policy: the webhook's namespace lookups, the tenant
# controller's namespaces, quotas, bindings and certificate requests). ---------------------

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, name: str | None = None, namespace: str | None = None,
             sub: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        scope = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        out = f"{prefix}{scope}/{self.plural}"
        if name is not None:
            out += f"/{name}"
        if sub is not None:
            out += f"/{sub}"
        return out


KINDS = {k.kind: k for k in (
    Kind("v1", "Namespace", "namespaces", False),
    Kind("v1", "ResourceQuota", "resourcequotas", True),
    Kind("v1", "LimitRange", "limitranges", True),
    Kind("v1", "ConfigMap", "configmaps", True),
    Kind("v1", "Secret", "secrets", True),
    Kind("apps/v1", "DaemonSet", "daemonsets", True),
    Kind("apps/v1", "ControllerRevision", "controllerrevisions", True),
    Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", True),
    Kind("certificates.k8s.io/v1", "CertificateSigningRequest", "certificatesigningrequests",
         False),
)}


class ObjectApi(Protocol):
    """Objects of the kinds in KINDS. Refusals: KubeNotFound (404), KubeConflict (409:
    reason `AlreadyExists` on create, `Conflict` on a stale resourceVersion), KubeError with
    the code and reason otherwise."""

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj: ...

    def list(self, kind: str, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[Obj]: ...

    def create(self, obj: Obj) -> Obj: ...

    def replace(self, obj: Obj) -> Obj:
        """PUT the whole object; 409 Conflict if metadata.resourceVersion is stale."""

    def merge_patch(self, kind: str, name: str, patch: Obj, namespace: str | None = None
                    ) -> Obj: ...

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None: ...

    def approve_csr(self, csr: Obj) -> Obj:
        """PUT the CSR, carrying an Approved condition, to its approval subresource."""


def label_query(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    return "?labelSelector=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def object_request(method: str, kind: str, name: str | None = None,
                   namespace: str | None = None, body: Obj | None = None, *,
                   sub: str | None = None, labels: Mapping[str, str] | None = None) -> Request:
    """A request of ObjectApi, the query decoded as the contract test's stub records it."""
    return Request(method, KINDS[kind].path(name, namespace, sub) + label_query(labels), body)


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
class _Namespaced:
    namespace: str
    name: str

    @property
    def ref(self) -> str:
        """namespace/name, as kubectl names it."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodView(_Namespaced):
    node: str
    labels: dict[str, str]
    owner_kinds: tuple[str, ...] = ()
    mirror: bool = False
    phase: str = "Running"
    deleting: bool = False
    ready: bool = True


@dataclass(frozen=True)
class BudgetView(_Namespaced):
    selector: dict[str, Any] | None  # the PDB's LabelSelector as the API has it
    disruptions_allowed: int
    min_available: int | str | None = None
    max_unavailable: int | str | None = None


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


# Node labels (bootstrap: `divingbell bootstrap labels`, teardown, the fleet's label route). ---

class NodeLabelApi(KubeApi, Protocol):
    """What label management needs on top of `KubeApi`: one node, and a merge patch of its
    labels and annotations (a None value removes the key)."""

    def node(self, name: str) -> NodeView: ...

    def patch_node(self, node: str, *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   unschedulable: bool | None = None) -> NodeView: ...

    def delete_node(self, node: str) -> None:
        """Teardown's last API step, once the kubelet is stopped."""


# Errors. ---------------------------------------------------------------------------------------

class KubeError(Exception):
    """The API server refused or could not be reached; the message says which. `code` is the
    HTTP status of a refusal (None: not reached), `reason` its Status reason (`NotFound`,
    `AlreadyExists`, `Conflict`, `Invalid`...; empty when not known)."""

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


# Maintenance (issue 15), the real adapter's half: the same requests through lightkube. ------

class KubeConflict(KubeError):
    """409: the object changed since it was read (`Conflict`: a stale resourceVersion) or
    already exists (`AlreadyExists`)."""

    def __init__(self, message: str, *, code: int | None = 409,
                 reason: str = "Conflict") -> None:
        super().__init__(message, code=code, reason=reason)


class KubeNotFound(KubeError):
    """404: no such object."""

    def __init__(self, message: str, *, code: int | None = 404,
                 reason: str = "NotFound") -> None:
        super().__init__(message, code=code, reason=reason)


class EvictionRefused(KubeError):
    """429: evicting the pod now would violate its PodDisruptionBudget."""

    def __init__(self, message: str, *, code: int | None = 429,
                 reason: str = "TooManyRequests") -> None:
        super().__init__(message, code=code, reason=reason)
