"""The Kubernetes edge of the policy part: the webhook's namespace lookups and the tenant
controller's objects.

`ClusterApi` is the whole interface, on plain dicts (objects as the API server writes them).
`LightkubeCluster` is the real adapter (lightkube, like `divingbell.kube`); `FakeCluster` is an
in-memory API server for tests, where no real one runs, with its semantics: 404 NotFound,
409 AlreadyExists on create, 409 Conflict on a replace with a stale resourceVersion, owned
objects gone with their namespace, and a CSR signer that issues an approved
`kubernetes.io/kube-apiserver-client` request like kube-controller-manager does. Both record
requests with `request_for`, and a contract test compares what lightkube puts on the wire with
what the fake records.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from divingbell.kube import KubeError
from divingbell.policy.admission import Namespace

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
    Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", True),
    Kind("certificates.k8s.io/v1", "CertificateSigningRequest", "certificatesigningrequests",
         False),
)}


class ClusterError(KubeError):
    """The API server refused (`code`, `reason` as it said) or could not be reached (code 0)."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.code = code  # 0, not None: not reached
        self.reason = reason


def not_found(what: str) -> ClusterError:
    return ClusterError(f"{what} not found (404)", 404, "NotFound")


class ClusterApi(Protocol):
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


@dataclass(frozen=True)
class Request:
    """What an adapter sends, as the API server sees it (query in the path, decoded)."""

    method: str
    path: str
    body: Obj | None = None


def label_query(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    return "?labelSelector=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def request_for(method: str, kind: str, name: str | None = None, namespace: str | None = None,
                body: Obj | None = None, *, sub: str | None = None,
                labels: Mapping[str, str] | None = None) -> Request:
    return Request(method, KINDS[kind].path(name, namespace, sub) + label_query(labels), body)


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, str | None]:
    metadata = obj.get("metadata") or {}
    return obj["kind"], metadata["name"], metadata.get("namespace")


# Namespaces for the webhook -----------------------------------------------------------------

@dataclass
class ClusterNamespaces:
    """The webhook's NamespaceReader over any ClusterApi."""

    api: ClusterApi

    def namespace(self, name: str) -> Namespace:
        from divingbell.policy.server import NamespaceNotFound, NamespaceUnavailable

        try:
            obj = self.api.get("Namespace", name)
        except ClusterError as exc:
            if exc.code == 404:
                raise NamespaceNotFound(name) from None
            raise NamespaceUnavailable(str(exc)) from None
        metadata = obj.get("metadata") or {}
        return Namespace(name, dict(metadata.get("labels") or {}),
                         dict(metadata.get("annotations") or {}))


# The fake ----------------------------------------------------------------------------------

Signer = Callable[[Obj], str]  # an approved CSR -> base64 PEM certificate


@dataclass
class FakeCluster:
    """An in-memory API server for the kinds above, recording every request."""

    signer: Signer | None = None
    sent: list[Request] = field(default_factory=list)
    objects: dict[tuple[str, str | None, str], Obj] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    fail_next: list[ClusterError] = field(default_factory=list)

    # -- the interface --
    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        self._record(request_for("GET", kind, name, namespace))
        return copy.deepcopy(self._stored(kind, name, namespace))

    def list(self, kind: str, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[Obj]:
        self._record(request_for("GET", kind, namespace=namespace, labels=labels))
        found = []
        for (k, ns, _), obj in sorted(self.objects.items(), key=lambda kv: str(kv[0])):
            if k != kind or (namespace is not None and ns != namespace):
                continue
            have = obj["metadata"].get("labels") or {}
            if all(have.get(key) == value for key, value in (labels or {}).items()):
                found.append(copy.deepcopy(obj))
        return found

    def create(self, obj: Obj) -> Obj:
        kind, name, namespace = _meta(obj)
        self._record(request_for("POST", kind, namespace=namespace, body=obj))
        key = self._key(kind, name, namespace)
        if key in self.objects:
            raise ClusterError(f'{KINDS[kind].plural} "{name}" already exists (409)', 409,
                               "AlreadyExists")
        if KINDS[kind].namespaced and ("Namespace", None, namespace) not in self.objects:
            raise not_found(f'namespaces "{namespace}"')
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = f"uid-{kind}-{name}"
        stored["metadata"]["creationTimestamp"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        self._store(key, stored)
        return copy.deepcopy(stored)

    def replace(self, obj: Obj) -> Obj:
        kind, name, namespace = _meta(obj)
        self._record(request_for("PUT", kind, name, namespace, body=obj))
        current = self._stored(kind, name, namespace)
        version = obj["metadata"].get("resourceVersion")
        if version is not None and version != current["metadata"]["resourceVersion"]:
            raise ClusterError(f'Operation cannot be fulfilled on {KINDS[kind].plural} '
                               f'"{name}": the object has been modified (409)', 409, "Conflict")
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = current["metadata"]["uid"]
        stored["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"]
        if kind == "RoleBinding" and stored.get("roleRef") != current.get("roleRef"):
            raise ClusterError("RoleBinding.rbac.authorization.k8s.io is invalid: roleRef: "
                               "Invalid value: cannot change roleRef (422)", 422, "Invalid")
        if kind == "CertificateSigningRequest":
            stored["status"] = current.get("status", {})
        self._store(self._key(kind, name, namespace), stored)
        return copy.deepcopy(stored)

    def merge_patch(self, kind: str, name: str, patch: Obj, namespace: str | None = None
                    ) -> Obj:
        self._record(request_for("PATCH", kind, name, namespace, body=patch))
        current = self._stored(kind, name, namespace)
        merged = _merge(current, patch)
        self._store(self._key(kind, name, namespace), merged)
        return copy.deepcopy(merged)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self._record(request_for("DELETE", kind, name, namespace))
        self._stored(kind, name, namespace)
        del self.objects[self._key(kind, name, namespace)]
        if kind == "Namespace":  # the namespace controller removes what it held
            for key in [k for k in self.objects if k[1] == name]:
                del self.objects[key]

    def approve_csr(self, csr: Obj) -> Obj:
        name = csr["metadata"]["name"]
        self._record(request_for("PUT", "CertificateSigningRequest", name, sub="approval",
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

    # -- helpers for tests --
    def put(self, obj: Obj) -> None:
        """Store an object as if someone else had created it (not recorded)."""
        kind, name, namespace = _meta(obj)
        stored = copy.deepcopy(obj)
        stored["metadata"].setdefault("uid", f"uid-{kind}-{name}")
        stored["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        self._store(self._key(kind, name, namespace), stored)

    def find(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        return self.objects.get(self._key(kind, name, namespace))

    # -- internals --
    def _record(self, request: Request) -> None:
        self.sent.append(Request(request.method, request.path, copy.deepcopy(request.body)))
        if self.fail_next:
            raise self.fail_next.pop(0)

    def _key(self, kind: str, name: str, namespace: str | None) -> tuple[str, str | None, str]:
        return (kind, namespace if KINDS[kind].namespaced else None, name)

    def _stored(self, kind: str, name: str, namespace: str | None) -> Obj:
        obj = self.objects.get(self._key(kind, name, namespace))
        if obj is None:
            raise not_found(f'{KINDS[kind].plural} "{name}"')
        return obj

    def _store(self, key: tuple[str, str | None, str], obj: Obj) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = obj


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


# The real adapter ---------------------------------------------------------------------------

def _resource(kind: str) -> Any:
    from lightkube.resources import certificates_v1, core_v1, rbac_authorization_v1

    for module in (core_v1, rbac_authorization_v1, certificates_v1):
        if hasattr(module, kind):
            return getattr(module, kind)
    raise KeyError(kind)


def _dict(value: Any) -> Obj:
    assert isinstance(value, dict)
    return value


class LightkubeCluster:
    def __init__(self, kubeconfig: str | None = None, *, server: str | None = None) -> None:
        from lightkube import Client, KubeConfig
        from lightkube.config.models import Cluster, User

        if server is not None:  # an unauthenticated server URL (tests, kubectl proxy)
            config = KubeConfig.from_one(cluster=Cluster(server=server), user=User())
        elif kubeconfig is not None:
            config = KubeConfig.from_file(kubeconfig)
        else:
            config = KubeConfig.from_env()
        self._client = Client(config, field_manager="divingbell-policy", trust_env=False)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        return _dict(self._call(lambda: self._client.get(_resource(kind), name,
                                                           namespace=namespace)))

    def list(self, kind: str, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[Obj]:
        items = self._call(lambda: [o.to_dict() for o in self._client.list(
            _resource(kind), namespace=namespace, labels=dict(labels) if labels else None)])
        assert isinstance(items, list)
        return items

    def create(self, obj: Obj) -> Obj:
        resource = _resource(obj["kind"])
        return _dict(self._call(lambda: self._client.create(resource.from_dict(obj))))

    def replace(self, obj: Obj) -> Obj:
        resource = _resource(obj["kind"])
        return _dict(self._call(lambda: self._client.replace(resource.from_dict(obj))))

    def merge_patch(self, kind: str, name: str, patch: Obj, namespace: str | None = None
                    ) -> Obj:
        from lightkube.types import PatchType

        return _dict(self._call(lambda: self._client.patch(
            _resource(kind), name, patch, namespace=namespace, patch_type=PatchType.MERGE)))

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self._call(lambda: self._client.delete(_resource(kind), name, namespace=namespace))

    def approve_csr(self, csr: Obj) -> Obj:
        from lightkube.resources.certificates_v1 import CertificateSigningRequestApproval

        body: Any = CertificateSigningRequestApproval.from_dict(csr)
        return _dict(self._call(lambda: self._client.replace(body, csr["metadata"]["name"])))

    @staticmethod
    def _call(action: Callable[[], Any]) -> Any:
        from lightkube import ApiError

        try:
            result = action()
        except ApiError as exc:
            raise ClusterError(f"API server: {exc.status.code} {exc.status.message}",
                               exc.status.code or 0, exc.status.reason or "") from None
        except OSError as exc:
            raise ClusterError(f"cannot reach the API server: {exc}") from None
        except Exception as exc:  # httpx transport errors do not share a public base here
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise ClusterError(f"cannot reach the API server: {exc}") from None
            raise
        if result is None or isinstance(result, list | dict):
            return result
        out = result.to_dict()
        assert isinstance(out, dict)
        return json.loads(json.dumps(out, default=str))

