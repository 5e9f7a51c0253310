"""The Kubernetes edge: node labels in, per-node status and events out.

`KubeApi` is the whole interface the agent and `status --kube` use. `LightkubeApi` is the thin
real adapter (lightkube: typed, and it imports in ~0.13 s where the official client takes ~1 s;
only the agent and `status --kube` import it). `FakeKube` is the in-memory stand-in for tests,
where no API server runs. Both build their requests with the same functions below, and a
contract test checks that what lightkube puts on the wire is exactly what the fake records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

ANNOTATION_PREFIX = "divingbell.io/"
EVENTS_NAMESPACE = "default"  # where events about cluster-scoped objects (nodes) live
COMPONENT = "divingbell"


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


def event_body(node: str, reason: str, message: str, warning: bool, now: float
               ) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{node}.divingbell.", "namespace": EVENTS_NAMESPACE},
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


def event_request(node: str, reason: str, message: str, warning: bool, now: float) -> Request:
    return Request("POST", f"/api/v1/namespaces/{EVENTS_NAMESPACE}/events",
                   event_body(node, reason, message, warning, now))


# Node labels (bootstrap: `divingbell bootstrap labels`, teardown, the fleet's label route). ---

class NodeLabelApi(KubeApi, Protocol):
    """What label management needs on top of `KubeApi`: one node, and a merge patch of its
    labels and annotations (a None value removes the key)."""

    def node(self, name: str) -> NodeView: ...

    def patch_node(self, name: str, *, labels: Mapping[str, str | None],
                   annotations: Mapping[str, str | None]) -> NodeView: ...


def node_patch_request(name: str, labels: Mapping[str, str | None],
                       annotations: Mapping[str, str | None]) -> Request:
    metadata: dict[str, Any] = {}
    if labels:
        metadata["labels"] = dict(sorted(labels.items()))
    if annotations:
        metadata["annotations"] = dict(sorted(annotations.items()))
    return Request("PATCH", f"/api/v1/nodes/{name}", {"metadata": metadata})


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
class FakeKube:
    """In-memory nodes, recording every request it is asked to send."""

    node_objects: dict[str, NodeView] = field(default_factory=dict)
    sent: list[Request] = field(default_factory=list)
    clock: Callable[[], float] = time.time

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
        self.sent.append(event_request(node, reason, message, warning, self.clock()))

    def nodes(self) -> list[NodeView]:
        self.sent.append(Request("GET", "/api/v1/nodes"))
        return sorted(self.node_objects.values(), key=lambda n: n.name)

    # Node labels (NodeLabelApi) --------------------------------------------------------

    def node(self, name: str) -> NodeView:
        self.sent.append(Request("GET", f"/api/v1/nodes/{name}"))
        return self._node(name)

    def patch_node(self, name: str, *, labels: Mapping[str, str | None],
                   annotations: Mapping[str, str | None]) -> NodeView:
        request = node_patch_request(name, labels, annotations)
        self.sent.append(request)
        current = self._node(name)
        view = NodeView(name, _merged(current.labels, labels),
                        _merged(current.annotations, annotations))
        self.node_objects[name] = view
        return view

    def events(self, node: str) -> list[dict[str, Any]]:
        return [r.body for r in self.sent if r.method == "POST" and r.body is not None
                and r.body["involvedObject"]["name"] == node]

    def _node(self, node: str) -> NodeView:
        if node not in self.node_objects:
            raise KubeError(f"node {node!r} not found (404)", status=404)
        return self.node_objects[node]


class KubeError(Exception):
    """The API server refused or could not be reached; the message says which. `status` is
    the API server's HTTP status when it answered (404: no such object), else None."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# The real adapter. ------------------------------------------------------------------------

class LightkubeApi:
    def __init__(self, kubeconfig: str | None = None, *, server: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        from lightkube import Client, KubeConfig
        from lightkube.config.models import Cluster, User

        if server is not None:  # an unauthenticated server URL (tests, kubectl proxy)
            config = KubeConfig.from_one(cluster=Cluster(server=server), user=User())
        elif kubeconfig is not None:
            config = KubeConfig.from_file(kubeconfig)
        else:
            config = KubeConfig.from_env()  # in-cluster service account, else ~/.kube/config
        self._client = Client(config, field_manager=COMPONENT, trust_env=False)
        self._clock = clock

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
        from lightkube.resources.core_v1 import Event

        body = event_request(node, reason, message, warning, self._clock()).body or {}
        event = Event.from_dict(body)
        assert isinstance(event, Event)
        self._call(lambda: self._client.create(event, namespace=EVENTS_NAMESPACE))

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

    def patch_node(self, name: str, *, labels: Mapping[str, str | None],
                   annotations: Mapping[str, str | None]) -> NodeView:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = node_patch_request(name, labels, annotations).body or {}
        return self._view(self._call(lambda: self._client.patch(
            Node, name, body, patch_type=PatchType.MERGE)))

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
                            status=exc.status.code) from None
        except OSError as exc:
            raise KubeError(f"cannot reach the API server: {exc}") from None
        except Exception as exc:  # httpx transport errors do not share a public base here
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise KubeError(f"cannot reach the API server: {exc}") from None
            raise
