"""LightkubeApi: the thin real adapter (lightkube: typed, and it imports in ~0.13 s where the
official client takes ~1 s; only the agent, the policy webhook, the tenant controller and
`status --kube` import it). Every request is built by divingbell.kube.api, as the fake's are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from divingbell.kube import api


def _lease_resource() -> Any:
    """Leases as plain dicts: lightkube's typed Lease drops the microseconds of a whole-second
    MicroTime ("...:00Z"), which the API server's RFC3339Micro parser rejects."""
    from lightkube.generic_resource import create_namespaced_resource

    return create_namespaced_resource("coordination.k8s.io", "v1", "Lease", "leases")


class _LightkubeMaintenance:
    _client: Any
    _clock: Callable[[], float]

    def node_state(self, node: str) -> api.NodeState:
        from lightkube.resources.core_v1 import Node

        obj = self._maintenance_call(lambda: self._client.get(Node, node))
        return api.node_state_from(obj.to_dict())

    def node_states(self) -> list[api.NodeState]:
        from lightkube.resources.core_v1 import Node

        items = self._maintenance_call(lambda: list(self._client.list(Node)))
        return sorted((api.node_state_from(n.to_dict()) for n in items), key=lambda n: n.name)

    def delete_node(self, node: str) -> None:
        from lightkube.resources.core_v1 import Node

        self._maintenance_call(lambda: self._client.delete(Node, node))

    def pods_on_node(self, node: str) -> list[api.PodView]:
        from lightkube.resources.core_v1 import Pod

        items = self._maintenance_call(lambda: list(self._client.list(
            Pod, namespace="*", fields={"spec.nodeName": node})))
        return sorted((api.pod_view(p.to_dict()) for p in items), key=lambda p: p.ref)

    def budgets(self) -> list[api.BudgetView]:
        from lightkube.resources.policy_v1 import PodDisruptionBudget

        items = self._maintenance_call(
            lambda: list(self._client.list(PodDisruptionBudget, namespace="*")))
        return sorted((api.budget_view(b.to_dict()) for b in items), key=lambda b: b.ref)

    def evict(self, namespace: str, pod: str, grace_seconds: int) -> None:
        from lightkube.resources.core_v1 import Pod

        body = api.eviction_request(namespace, pod, grace_seconds).body or {}
        eviction = Pod.Eviction.from_dict(body)
        try:
            self._maintenance_call(
                lambda: self._client.create(eviction, pod, namespace=namespace))
        except api.KubeNotFound:
            return

    def delete_pod(self, namespace: str, pod: str, grace_seconds: int) -> None:
        from lightkube.resources.core_v1 import Pod

        self._maintenance_call(lambda: self._client.delete(
            Pod, pod, namespace=namespace, grace_period=grace_seconds))

    def get_lease(self, namespace: str, name: str) -> api.LeaseView | None:
        Lease = _lease_resource()
        try:
            obj = self._maintenance_call(
                lambda: self._client.get(Lease, name, namespace=namespace))
        except api.KubeNotFound:
            return None
        return api.lease_view(dict(obj))

    def list_leases(self, namespace: str) -> list[api.LeaseView]:
        Lease = _lease_resource()
        items = self._maintenance_call(
            lambda: list(self._client.list(Lease, namespace=namespace)))
        return sorted((api.lease_view(dict(i)) for i in items), key=lambda v: v.name)

    def create_lease(self, namespace: str, lease: api.LeaseView) -> api.LeaseView:
        obj = _lease_resource()(api.lease_body(namespace, lease))
        created = self._maintenance_call(lambda: self._client.create(obj, namespace=namespace))
        return api.lease_view(dict(created))

    def replace_lease(self, namespace: str, lease: api.LeaseView) -> api.LeaseView:
        obj = _lease_resource()(api.lease_body(namespace, lease))
        replaced = self._maintenance_call(lambda: self._client.replace(obj))
        return api.lease_view(dict(replaced))

    @staticmethod
    def _maintenance_call(action: Callable[[], Any]) -> Any:
        """As _call, with the status codes maintenance acts on as their own
        errors."""
        from lightkube import ApiError

        try:
            return action()
        except ApiError as exc:
            code, message = exc.status.code, exc.status.message
            if code == 409:
                raise api.KubeConflict(f"{message} (409)") from None
            if code == 404:
                raise api.KubeNotFound(f"{message} (404)") from None
            if code == 429:
                raise api.EvictionRefused(f"429 {message}") from None
            raise api.KubeError(f"API server: {code} {message}") from None
        except OSError as exc:
            raise api.KubeError(f"cannot reach the API server: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise api.KubeError(f"cannot reach the API server: {exc}") from None
            raise


def _call(action: Callable[[], Any]) -> Any:
    from lightkube import ApiError

    try:
        return action()
    except ApiError as exc:
        message = f"API server: {exc.status.code} {exc.status.message}"
        error = {404: api.KubeNotFound, 409: api.KubeConflict}.get(exc.status.code or 0,
                                                                    api.KubeError)
        raise error(message, code=exc.status.code, reason=exc.status.reason or ""
                    ) from None
    except OSError as exc:
        raise api.KubeError(f"cannot reach the API server: {exc}") from None
    except Exception as exc:  # httpx transport errors do not share a public base here
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise api.KubeError(f"cannot reach the API server: {exc}") from None
        raise


def _resource(kind: str) -> Any:
    """lightkube's typed resource for a kind of KINDS."""
    from lightkube.resources import apps_v1, certificates_v1, core_v1, rbac_authorization_v1

    for module in (core_v1, apps_v1, rbac_authorization_v1, certificates_v1):
        if hasattr(module, kind):
            return getattr(module, kind)
    raise KeyError(kind)


def _plain(result: Any) -> Any:
    """An answer as the API server wrote it: plain dicts and lists, times as strings."""
    if result is None or isinstance(result, list | dict):
        return result
    return json.loads(json.dumps(result.to_dict(), default=str))


def _object(action: Callable[[], Any]) -> api.Obj:
    out = _plain(_call(action))
    assert isinstance(out, dict)
    return out


class _LightkubeObjects:
    """The ObjectApi half: objects as plain dicts, errors with their code and reason."""

    _client: Any

    def get(self, kind: str, name: str, namespace: str | None = None) -> api.Obj:
        return _object(lambda: self._client.get(_resource(kind), name, namespace=namespace))

    def list(self, kind: str, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[api.Obj]:
        items = _call(lambda: [o.to_dict() for o in self._client.list(
            _resource(kind), namespace=namespace, labels=dict(labels) if labels else None)])
        assert isinstance(items, list)
        return items

    def create(self, obj: api.Obj) -> api.Obj:
        resource = _resource(obj["kind"])
        return _object(lambda: self._client.create(resource.from_dict(obj)))

    def replace(self, obj: api.Obj) -> api.Obj:
        resource = _resource(obj["kind"])
        return _object(lambda: self._client.replace(resource.from_dict(obj)))

    def merge_patch(self, kind: str, name: str, patch: api.Obj, namespace: str | None = None
                    ) -> api.Obj:
        from lightkube.types import PatchType

        return _object(lambda: self._client.patch(
            _resource(kind), name, patch, namespace=namespace, patch_type=PatchType.MERGE))

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        _call(lambda: self._client.delete(_resource(kind), name, namespace=namespace))

    def approve_csr(self, csr: api.Obj) -> api.Obj:
        from lightkube.resources.certificates_v1 import CertificateSigningRequestApproval

        body: Any = CertificateSigningRequestApproval.from_dict(csr)
        return _object(lambda: self._client.replace(body, csr["metadata"]["name"]))


def config_problem(kubeconfig: str | None, exc: Exception) -> str:
    """One line saying why no Kubernetes client could be configured, and from what."""
    where = (kubeconfig if kubeconfig is not None
             else "the in-cluster service account or ~/.kube/config")
    reason = f"no {exc.args[0]!r} in it" if isinstance(exc, KeyError) and exc.args else exc
    return (f"cannot configure the Kubernetes client from {where}: {reason}; give "
            "--kubeconfig FILE (or KUBECONFIG), or run in a pod with a service account")


# The real adapter. ------------------------------------------------------------------------

class LightkubeApi(_LightkubeMaintenance, _LightkubeObjects):
    def __init__(self, kubeconfig: str | None = None, *, server: str | None = None,
                 clock: Callable[[], float] = time.time, field_manager: str = api.COMPONENT
                 ) -> None:
        """`field_manager` names the writer in managedFields (the tenant controller and the
        webhook as `divingbell-policy`)."""
        from lightkube import Client, KubeConfig
        from lightkube.config.models import Cluster, User

        try:
            if server is not None:  # an unauthenticated server URL (tests, kubectl proxy)
                config = KubeConfig.from_one(cluster=Cluster(server=server), user=User())
            elif kubeconfig is not None:
                config = KubeConfig.from_file(kubeconfig)
            else:
                config = KubeConfig.from_env()  # in-cluster service account, else ~/.kube/config
            self._client = Client(config, field_manager=field_manager, trust_env=False)
        except Exception as exc:  # lightkube's config errors share no base class (KeyError...)
            raise api.KubeError(config_problem(kubeconfig, exc)) from None
        self._clock = clock
        self._series = api.EventSeries()

    def node_labels(self, node: str) -> dict[str, str]:
        from lightkube.resources.core_v1 import Node

        obj = _call(lambda: self._client.get(Node, node))
        return dict((obj.metadata.labels if obj.metadata else None) or {})

    def annotate_node(self, node: str, status: Mapping[str, str]) -> None:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = api.annotate_request(node, status).body or {}
        _call(lambda: self._client.patch(Node, node, body, patch_type=PatchType.MERGE))

    def node_event(self, node: str, reason: str, message: str, *, warning: bool = False
                   ) -> None:
        self._series.record(self._send_event, node, reason, message, warning, self._clock())

    def _send_event(self, request: api.Request) -> dict[str, Any]:
        from lightkube.resources.core_v1 import Event
        from lightkube.types import PatchType

        if request.method == "POST":
            event = Event.from_dict(request.body or {})
            assert isinstance(event, Event)
            result = _call(lambda: self._client.create(event, namespace=api.EVENTS_NAMESPACE))
        else:
            name = request.path.rsplit("/", 1)[1]
            if request.method == "GET":
                result = _call(lambda: self._client.get(Event, name,
                                                              namespace=api.EVENTS_NAMESPACE))
            else:
                result = _call(lambda: self._client.patch(
                    Event, name, request.body or {}, namespace=api.EVENTS_NAMESPACE,
                    patch_type=PatchType.MERGE))
        return dict(result.to_dict())

    def document_secrets(self, namespace: str, daemonset: str) -> list[api.DocumentSecret]:
        from lightkube.resources.apps_v1 import ControllerRevision, DaemonSet
        from lightkube.resources.core_v1 import Secret

        key, value = api.DOCUMENT_SELECTOR.split("=")
        secrets = _call(lambda: [s.to_dict() for s in self._client.list(
            Secret, namespace=namespace, labels={key: value})])
        found = _call(lambda: self._client.get(DaemonSet, daemonset,
                                                    namespace=namespace)).to_dict()
        revisions = _call(lambda: [r.to_dict() for r in self._client.list(
            ControllerRevision, namespace=namespace)])
        return api.document_usage(secrets, found, revisions, daemonset)

    def delete_secret(self, namespace: str, name: str) -> None:
        from lightkube.resources.core_v1 import Secret

        _call(lambda: self._client.delete(Secret, name, namespace=namespace))

    def nodes(self) -> list[api.NodeView]:
        from lightkube.resources.core_v1 import Node

        items = _call(lambda: list(self._client.list(Node)))
        return sorted((api.NodeView(n.metadata.name or "", dict(n.metadata.labels or {}),
                                dict(n.metadata.annotations or {}))
                       for n in items if n.metadata), key=lambda n: n.name)

    # Node labels (NodeLabelApi) --------------------------------------------------------

    def node(self, name: str) -> api.NodeView:
        from lightkube.resources.core_v1 import Node

        return self._view(_call(lambda: self._client.get(Node, name)))

    def patch_node(self, node: str, *, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   unschedulable: bool | None = None) -> api.NodeView:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = api.node_patch_request(node, labels=labels, annotations=annotations,
                                  unschedulable=unschedulable).body or {}
        return self._view(self._maintenance_call(lambda: self._client.patch(
            Node, node, body, patch_type=PatchType.MERGE)))

    @staticmethod
    def _view(obj: Any) -> api.NodeView:
        meta = obj.metadata
        return api.NodeView(meta.name or "", dict(meta.labels or {}), dict(meta.annotations or {}))
