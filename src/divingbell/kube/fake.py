"""FakeKube: in-memory nodes, pods, budgets, leases and objects (namespaces, quotas, bindings,
CSRs, secrets...) with the real API's semantics (409 on a stale resourceVersion or an existing
name, 429 when an eviction would break a budget, 404s, a namespace's objects gone with it, a
CSR signer), for tests where no API server runs. It records every request it is asked to
send, built with the same functions as the real adapter's (divingbell.kube.api).
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from divingbell.kube.api import (
    DOCUMENT_SELECTOR,
    KINDS,
    MIRROR_ANNOTATION,
    BudgetView,
    DocumentSecret,
    EventSeries,
    EvictionRefused,
    KubeConflict,
    KubeError,
    KubeNotFound,
    LeaseView,
    NodeState,
    NodeView,
    Obj,
    PodView,
    Request,
    annotate_request,
    budget_view,
    budgets_request,
    daemonset_request,
    delete_node_request,
    delete_pod_request,
    document_usage,
    eviction_request,
    lease_body,
    lease_path,
    lease_view,
    node_patch_request,
    node_state_from,
    object_request,
    pod_view,
    pods_on_node_request,
    revisions_list_request,
    secret_delete_request,
    secrets_list_request,
)


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
        with self._answering(pods_on_node_request(node)) as state:
            now = self.clock()
            return [pod_view(p.body(now)) for _, p in sorted(state.pods.items())
                    if p.node == node]

    def budgets(self) -> list[BudgetView]:
        with self._answering(budgets_request()) as state:
            return [budget_view(self._budget_body(ns, name))
                    for ns, name in sorted(state.budgets)]

    def evict(self, namespace: str, pod: str, grace_seconds: int) -> None:
        with self._answering(eviction_request(namespace, pod, grace_seconds)) as state:
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
        with self._answering(delete_pod_request(namespace, pod, grace_seconds)) as state:
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
        # Ready stays as it was: only the kubelet reports it, and only once the containers
        # stopped (seen on a real API server). The disruption controller does not count a
        # pod that is being deleted as healthy anyway (_allowed).
        pod.gone_at = self.clock() + min(float(grace_seconds), pod.stop_seconds)
        self._reap()

    @contextmanager
    def _answering(self, request: Request) -> Iterator[_FakeMaintenanceState]:
        """Record `request` and hold the lock while it is answered, from the pods as they are
        now (those whose grace period ended are gone)."""
        state = self._maint()
        with state.lock:
            self.sent.append(request)
            self._reap()
            yield state

    def _reap(self) -> None:
        state, now = self._maint(), self.clock()
        for key in [k for k, p in state.pods.items() if p.gone_at is not None
                    and p.gone_at <= now]:
            del state.pods[key]

    def _selects(self, namespace: str, name: str, pod: FakePod) -> bool:
        from divingbell.core.document.selectors import from_label_selector

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


Signer = Callable[[Obj], str]  # an approved CSR -> base64 PEM certificate
ObjectKey = tuple[str, str | None, str]  # kind, namespace (None: cluster-scoped), name


class _FakeObjects:
    """The fake's ObjectApi half: objects of the kinds in KINDS, with the API server's
    semantics: 404 NotFound, 409 AlreadyExists on create (404 in a missing namespace), 409
    Conflict on a replace with a stale resourceVersion, 422 on a RoleBinding's roleRef
    changed, a namespace's objects gone with it, and a CSR signer that issues an approved
    `kubernetes.io/kube-apiserver-client` request as kube-controller-manager does. A test
    makes the next requests fail by queueing errors in `fail_next`."""

    objects: dict[ObjectKey, Obj]
    sent: list[Request]
    clock: Callable[[], float]
    signer: Signer | None
    fail_next: list[KubeError]
    _versions: itertools.count[int]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        self._record(object_request("GET", kind, name, namespace))
        return copy.deepcopy(self._stored(kind, name, namespace))

    def list(self, kind: str, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[Obj]:
        self._record(object_request("GET", kind, namespace=namespace, labels=labels))
        found = []
        for (k, ns, _), obj in sorted(self.objects.items(), key=lambda kv: str(kv[0])):
            if k != kind or (namespace is not None and ns != namespace):
                continue
            have = obj["metadata"].get("labels") or {}
            if all(have.get(key) == value for key, value in (labels or {}).items()):
                found.append(copy.deepcopy(obj))
        return found

    def create(self, obj: Obj) -> Obj:
        kind, name, namespace = _identity(obj)
        self._record(object_request("POST", kind, namespace=namespace, body=obj))
        key = self._key(kind, name, namespace)
        if key in self.objects:
            raise KubeConflict(f'{KINDS[kind].plural} "{name}" already exists (409)',
                               reason="AlreadyExists")
        if KINDS[kind].namespaced and ("Namespace", None, namespace) not in self.objects:
            raise _not_found("namespaces", str(namespace))
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = f"uid-{kind}-{name}"
        stored["metadata"]["creationTimestamp"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        self._store(key, stored)
        return copy.deepcopy(stored)

    def replace(self, obj: Obj) -> Obj:
        kind, name, namespace = _identity(obj)
        self._record(object_request("PUT", kind, name, namespace, body=obj))
        current = self._stored(kind, name, namespace)
        version = obj["metadata"].get("resourceVersion")
        if version is not None and version != current["metadata"]["resourceVersion"]:
            raise KubeConflict(f'Operation cannot be fulfilled on {KINDS[kind].plural} '
                               f'"{name}": the object has been modified (409)')
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = current["metadata"]["uid"]
        stored["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"]
        if kind == "RoleBinding" and stored.get("roleRef") != current.get("roleRef"):
            raise KubeError("RoleBinding.rbac.authorization.k8s.io is invalid: roleRef: "
                            "Invalid value: cannot change roleRef (422)", code=422,
                            reason="Invalid")
        if kind == "CertificateSigningRequest":
            stored["status"] = current.get("status", {})
        self._store(self._key(kind, name, namespace), stored)
        return copy.deepcopy(stored)

    def merge_patch(self, kind: str, name: str, patch: Obj, namespace: str | None = None
                    ) -> Obj:
        self._record(object_request("PATCH", kind, name, namespace, body=patch))
        merged = _merge_patch(self._stored(kind, name, namespace), patch)
        self._store(self._key(kind, name, namespace), merged)
        return copy.deepcopy(merged)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self._record(object_request("DELETE", kind, name, namespace))
        self._stored(kind, name, namespace)
        del self.objects[self._key(kind, name, namespace)]
        if kind == "Namespace":  # the namespace controller removes what it held
            for key in [k for k in self.objects if k[1] == name]:
                del self.objects[key]

    def approve_csr(self, csr: Obj) -> Obj:
        name = csr["metadata"]["name"]
        self._record(object_request("PUT", "CertificateSigningRequest", name, sub="approval",
                                    body=csr))
        current = self._stored("CertificateSigningRequest", name, None)
        status = copy.deepcopy(csr.get("status") or {})
        current["status"] = status
        self._store(self._key("CertificateSigningRequest", name, None), current)
        approved = any(c.get("type") == "Approved" and c.get("status") == "True"
                       for c in status.get("conditions") or [])
        signer = current["spec"].get("signerName")
        if approved and signer == "kubernetes.io/kube-apiserver-client" and self.signer:
            current["status"]["certificate"] = self.signer(current)  # the controller-manager
        return copy.deepcopy(current)

    # Test set-up (not API calls, not recorded)
    def put(self, obj: Mapping[str, Any]) -> None:
        """Store an object as if someone else had created it (`kubectl apply`)."""
        kind, name, namespace = _identity(obj)
        stored = copy.deepcopy(dict(obj))
        stored["metadata"].setdefault("uid", f"uid-{kind}-{name}")
        stored["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        self._store(self._key(kind, name, namespace), stored)

    def find(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        return self.objects.get(self._key(kind, name, namespace))

    # Semantics
    def _record(self, request: Request) -> None:
        self.sent.append(Request(request.method, request.path, copy.deepcopy(request.body)))
        if self.fail_next:
            raise self.fail_next.pop(0)

    @staticmethod
    def _key(kind: str, name: str, namespace: str | None) -> ObjectKey:
        return (kind, namespace if KINDS[kind].namespaced else None, name)

    def _stored(self, kind: str, name: str, namespace: str | None) -> Obj:
        obj = self.objects.get(self._key(kind, name, namespace))
        if obj is None:
            raise _not_found(KINDS[kind].plural, name)
        return obj

    def _store(self, key: ObjectKey, obj: Obj) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = obj


def _by_name(item: tuple[ObjectKey, Obj]) -> str:
    return item[0][2]


def _identity(obj: Mapping[str, Any]) -> tuple[str, str, str | None]:
    metadata = obj.get("metadata") or {}
    return obj["kind"], metadata["name"], metadata.get("namespace")


def _not_found(plural: str, name: str) -> KubeNotFound:
    return KubeNotFound(f'{plural} "{name}" not found (404)')


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


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
class FakeKube(_FakeMaintenance, _FakeObjects):
    """In-memory nodes and objects, recording every request it is asked to send."""

    node_objects: dict[str, NodeView] = field(default_factory=dict)
    sent: list[Request] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    event_objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: EventSeries = field(default_factory=EventSeries)
    objects: dict[ObjectKey, Obj] = field(default_factory=dict)
    signer: Signer | None = None
    fail_next: list[KubeError] = field(default_factory=list)
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

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

    def document_secrets(self, namespace: str, daemonset: str) -> list[DocumentSecret]:
        self.sent.append(secrets_list_request(namespace))
        key, value = DOCUMENT_SELECTOR.split("=")
        secrets = [o for (kind, ns, _), o in sorted(self.objects.items(), key=_by_name)
                   if ns == namespace and kind == "Secret"
                   and o["metadata"].get("labels", {}).get(key) == value]
        self.sent.append(daemonset_request(namespace, daemonset))
        found = self.find("DaemonSet", daemonset, namespace)
        if found is None:
            raise KubeError(f"API server: 404 daemonsets {daemonset!r} not found", code=404)
        self.sent.append(revisions_list_request(namespace))
        revisions = [o for (kind, ns, _), o in sorted(self.objects.items(), key=_by_name)
                     if ns == namespace and kind == "ControllerRevision"]
        return document_usage(secrets, found, revisions, daemonset)

    def delete_secret(self, namespace: str, name: str) -> None:
        self.sent.append(secret_delete_request(namespace, name))
        if self.objects.pop(("Secret", namespace, name), None) is None:
            raise KubeError(f"API server: 404 secrets {name!r} not found", code=404)

    def _node(self, node: str) -> NodeView:
        if node not in self.node_objects:
            raise KubeError(f"node {node!r} not found (404)", code=404)
        return self.node_objects[node]
