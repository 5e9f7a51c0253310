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


# The fake. --------------------------------------------------------------------------------

@dataclass
class FakeKube:
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
            raise KubeError(f"node {node!r} not found (404)")
        return self.node_objects[node]


class KubeError(Exception):
    """The API server refused or could not be reached; the message says which. `code` is the
    HTTP status of a refusal (None: not reached)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def config_problem(kubeconfig: str | None, exc: Exception) -> str:
    """One line saying why no Kubernetes client could be configured, and from what."""
    where = (kubeconfig if kubeconfig is not None
             else "the in-cluster service account or ~/.kube/config")
    reason = f"no {exc.args[0]!r} in it" if isinstance(exc, KeyError) and exc.args else exc
    return (f"cannot configure the Kubernetes client from {where}: {reason}; give "
            "--kubeconfig FILE (or KUBECONFIG), or run in a pod with a service account")


# The real adapter. ------------------------------------------------------------------------

class LightkubeApi:
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
