"""The four admission policies as pure functions: a review and a namespace in, a verdict out.

Nothing here does I/O. The server (`policy/server.py`) parses the AdmissionReview, looks the
namespace up through the Kubernetes adapter, calls `Policy.review`, and encodes the verdict.
An object the policy cannot read (a field of the wrong type) is refused with code 400 naming
the field, never an exception.

Mutations are RFC 6902 JSON Patch operations computed against the object exactly as submitted:
a member is set with `add` (which replaces an existing member), a missing parent object or
array is created whole, and nothing is emitted when the object already complies.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from divingbell.policy.config import (
    HostAutoMounterConf,
    HostPathEnforcerConf,
    RegistryEnforcerConf,
    UidEnforcerConf,
    normal_path,
)

MARK_PREFIX = "policy.divingbell.io/"


class Malformed(Exception):
    """The object under review has a field of the wrong shape."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path = field_path
        super().__init__(f"{field_path}: {message}")


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReviewRequest:
    """The parts of an AdmissionReview's `request` the policies use."""

    uid: str
    group: str
    kind: str
    operation: str
    namespace: str
    name: str
    sub_resource: str
    object: Mapping[str, Any] | None

    @property
    def what(self) -> str:
        name = self.name or _get_str(self.object or {}, ("metadata", "generateName")) or ""
        return f"{self.kind} {name!r}" if name else self.kind


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    code: int = 200
    patch: tuple[dict[str, Any], ...] = ()

    @property
    def outcome(self) -> str:
        if not self.allowed:
            return "invalid" if self.code == 400 else "refused"
        return "mutated" if self.patch else "allowed"


ALLOW = Verdict(True)


def refuse(message: str) -> Verdict:
    return Verdict(False, message, 403)


# JSON Pointer (RFC 6901) -------------------------------------------------------------------

def pointer_token(key: str | int) -> str:
    """One reference token: `~` is written `~0` and `/` is written `~1`, in that order."""
    return str(key).replace("~", "~0").replace("/", "~1")


def pointer(*keys: str | int) -> str:
    return "".join("/" + pointer_token(k) for k in keys)


# Reading objects defensively ---------------------------------------------------------------

def _describe(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _mapping(value: Any, path: Sequence[str | int]) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise Malformed(_describe(path), "must be an object")
    return value


def _list(value: Any, path: Sequence[str | int]) -> list[Any] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise Malformed(_describe(path), "must be a list")
    return value


def _get_str(obj: Mapping[str, Any], path: Sequence[str]) -> str | None:
    current: Any = obj
    for key in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current if isinstance(current, str) else None


# Where pod specs live in each kind --------------------------------------------------------

TEMPLATE_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): ("spec",),
    ("", "PodTemplate"): ("template", "spec"),
    ("", "ReplicationController"): ("spec", "template", "spec"),
    ("apps", "Deployment"): ("spec", "template", "spec"),
    ("apps", "StatefulSet"): ("spec", "template", "spec"),
    ("apps", "DaemonSet"): ("spec", "template", "spec"),
    ("apps", "ReplicaSet"): ("spec", "template", "spec"),
    ("batch", "Job"): ("spec", "template", "spec"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template", "spec"),
}

CONTAINER_LISTS = (("containers", "container"), ("initContainers", "init container"),
                   ("ephemeralContainers", "ephemeral container"))


@dataclass(frozen=True)
class Container:
    list_name: str
    index: int
    label: str  # "init container 'setup'"
    body: Mapping[str, Any]

    def path(self, spec_path: Sequence[str | int], key: str) -> tuple[str | int, ...]:
        return (*spec_path, self.list_name, self.index, key)


def pod_spec(request: ReviewRequest) -> tuple[tuple[str, ...], Mapping[str, Any]] | None:
    """The pod spec inside the object under review (Pod or workload template), and its path;
    None for kinds without one or a DELETE."""
    path = TEMPLATE_PATHS.get((request.group, request.kind))
    if path is None or request.object is None:
        return None
    current: Any = request.object
    for depth, key in enumerate(path):
        current = _mapping(current, path[:depth] or ("object",))
        if current is None:
            return None
        current = current.get(key)
    spec = _mapping(current, path)
    return (path, spec) if spec is not None else None


def containers(spec: Mapping[str, Any], spec_path: Sequence[str],
               lists: Sequence[tuple[str, str]] = CONTAINER_LISTS) -> Iterator[Container]:
    for list_name, noun in lists:
        items = _list(spec.get(list_name), (*spec_path, list_name)) or []
        for index, item in enumerate(items):
            body = _mapping(item, (*spec_path, list_name, index))
            if body is None:
                raise Malformed(_describe((*spec_path, list_name, index)), "must be an object")
            name = body.get("name")
            label = f"{noun} {name!r}" if isinstance(name, str) else f"{noun} #{index}"
            yield Container(list_name, index, label, body)


# RegistryEnforcer --------------------------------------------------------------------------

def image_registry(image: str) -> str:
    """The registry a container runtime pulls `image` from: its first component when that has
    a `.` or `:` or is `localhost` (the distribution reference rule), else Docker Hub."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def image_allowed(image: str, registries: Sequence[str]) -> bool:
    """The exact registry host: `reg.example.org.evil/x` is not `reg.example.org`, and
    `internal/x` is Docker Hub's, not a registry called `internal`."""
    return image_registry(image) in registries


class _PodSpecValidator(ABC):
    """A validating policy: the pod spec of an object created or updated, of a kind that has
    one, is refused when `_offenders` finds anything in it, `_refusal` saying why."""

    def review(self, request: ReviewRequest, namespace: Namespace | None) -> Verdict:
        if request.operation not in ("CREATE", "UPDATE"):
            return ALLOW
        found = pod_spec(request)
        offenders = self._offenders(*found) if found else []
        return refuse(f"{request.what}: {self._refusal(offenders)}") if offenders else ALLOW

    @abstractmethod
    def _offenders(self, spec_path: Sequence[str], spec: Mapping[str, Any]) -> list[str]: ...

    @abstractmethod
    def _refusal(self, offenders: Sequence[str]) -> str: ...


@dataclass(frozen=True)
class RegistryEnforcer(_PodSpecValidator):
    """Validating: every container's image comes from an allowed registry."""

    conf: RegistryEnforcerConf
    name: str = "registry"
    mutating: bool = False

    def _refusal(self, offenders: Sequence[str]) -> str:
        allowed = ", ".join(f"{r}/..." for r in self.conf.registries)
        return f"images must come from {allowed}; {'; '.join(offenders)}"

    def _offenders(self, spec_path: Sequence[str], spec: Mapping[str, Any]) -> list[str]:
        offenders = []
        for container in containers(spec, spec_path):
            image = container.body.get("image")
            if not isinstance(image, str) or not image:
                offenders.append(f"{container.label} has no image")
            elif not image_allowed(image, self.conf.registries):
                offenders.append(f"{container.label} uses {image!r}")
        return offenders


# HostPathEnforcer --------------------------------------------------------------------------

@dataclass(frozen=True)
class HostPathEnforcer(_PodSpecValidator):
    """Validating: a hostPath volume names an allowed path, or one under an allowed prefix,
    after normalisation (`..`, `//`)."""

    conf: HostPathEnforcerConf
    name: str = "hostpath"
    mutating: bool = False

    def _refusal(self, offenders: Sequence[str]) -> str:
        rules = [*self.conf.paths, *(f"{p}..." for p in self.conf.prefixes)]
        return (f"host paths not allowed: {'; '.join(offenders)}. "
                f"Allowed: {', '.join(rules) or 'none'}")

    def _offenders(self, spec_path: Sequence[str], spec: Mapping[str, Any]) -> list[str]:
        offenders = []
        for index, volume in enumerate(_list(spec.get("volumes"), (*spec_path, "volumes"))
                                       or []):
            volume_path: tuple[str | int, ...] = (*spec_path, "volumes", index)
            body = _mapping(volume, volume_path) or {}
            host_path = _mapping(body.get("hostPath"), (*volume_path, "hostPath"))
            if host_path is None:
                continue
            path = host_path.get("path")
            name = body.get("name", f"#{index}")
            if not isinstance(path, str) or not path.startswith("/"):
                offenders.append(f"volume {name!r}: hostPath.path must be an absolute path "
                                 f"(got {path!r})")
                continue
            if not self.conf.allows(path):
                shown = (f"{path!r}" if normal_path(path) == path
                         else f"{path!r} (= {normal_path(path)})")
                offenders.append(f"volume {name!r}: host path {shown}")
        return offenders


# UidEnforcer ------------------------------------------------------------------------------

def _is_pod_creation(request: ReviewRequest) -> bool:
    if (request.group, request.kind) != ("", "Pod") or request.object is None:
        return False
    return request.operation == "CREATE" or (
        request.operation == "UPDATE" and request.sub_resource == "ephemeralcontainers")


def _set_members(ops: list[dict[str, Any]], base: Sequence[str | int],
                 current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> None:
    """Ops that make the object at `base` carry `desired` (creating it when absent)."""
    if current is None:
        ops.append({"op": "add", "path": pointer(*base), "value": dict(desired)})
        return
    for key, value in desired.items():
        if key not in current or current[key] != value or type(current[key]) is not type(value):
            ops.append({"op": "add", "path": pointer(*base, key), "value": value})


def _namespace_id(namespace: Namespace, annotation: str) -> int | str:
    """The numeric id the annotation holds, or why it cannot be used."""
    raw = namespace.annotations.get(annotation)
    if raw is None:
        return (f"namespace {namespace.name!r} has no {annotation} annotation, so its pods "
                "cannot be admitted; a cluster admin must set the tenant's uid: kubectl "
                f"annotate namespace {namespace.name} {annotation}=<uid>")
    if not raw.strip().isdigit() or not raw.strip().isascii():
        return (f"namespace {namespace.name!r} has {annotation}={raw!r}, which is not a "
                "numeric uid; a cluster admin must fix the annotation")
    value = int(raw.strip())
    if value == 0 or value > 2**31 - 1:
        return (f"namespace {namespace.name!r} has {annotation}={value}: root (0) and ids "
                "above 2147483647 are not allowed; a cluster admin must fix the annotation")
    return value


@dataclass(frozen=True)
class UidEnforcer:
    """Mutating: a new pod runs as its namespace's uid and gid (annotations), unprivileged,
    without supplementary groups or the node's namespaces; refused when it cannot."""

    conf: UidEnforcerConf
    name: str = "uid"
    mutating: bool = True

    def review(self, request: ReviewRequest, namespace: Namespace | None) -> Verdict:
        if not _is_pod_creation(request):
            return ALLOW
        if namespace is None:
            return refuse(f"{request.what}: its namespace could not be read; try again")
        uid = _namespace_id(namespace, self.conf.annotation)
        if isinstance(uid, str):
            return refuse(f"{request.what}: {uid}")
        gid: int | str = uid
        if self.conf.group_annotation in namespace.annotations:
            gid = _namespace_id(namespace, self.conf.group_annotation)
            if isinstance(gid, str):
                return refuse(f"{request.what}: {gid}")
        spec_path, spec = _pod_spec_of_pod(request)
        # An ephemeral-containers update may change nothing else in the pod.
        only_ephemeral = request.operation == "UPDATE"
        listed = [c for c in containers(spec, spec_path)
                  if not only_ephemeral or c.list_name == "ephemeralContainers"]
        privileged = [c.label for c in listed if _wants_privilege(c, spec_path)]
        if privileged:
            return refuse(f"{request.what}: pods in namespace {namespace.name!r} run as uid "
                          f"{uid} without privileges; remove privileged, SYS_ADMIN and ALL from "
                          f"{', '.join(privileged)}")
        pod_context_now = _mapping(spec.get("securityContext"),
                                   (*spec_path, "securityContext")) or {}
        extra_groups = [g for g in _list(pod_context_now.get("supplementalGroups"),
                                         (*spec_path, "securityContext", "supplementalGroups"))
                        or [] if g != gid]
        if extra_groups and not only_ephemeral:
            return refuse(f"{request.what}: pods in namespace {namespace.name!r} run with group "
                          f"{gid} only; remove supplementalGroups {extra_groups}")
        shared = [key for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key) is True]
        if shared and not self.conf.allow_host_namespaces:
            return refuse(f"{request.what}: pods in namespace {namespace.name!r} may not share "
                          f"the node's namespaces; remove {', '.join(shared)}")
        ops: list[dict[str, Any]] = []
        if not only_ephemeral:
            pod_context = _mapping(spec.get("securityContext"), (*spec_path, "securityContext"))
            _set_members(ops, (*spec_path, "securityContext"), pod_context, {
                "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid, "runAsNonRoot": True})
        for container in listed:
            base = container.path(spec_path, "securityContext")
            context = _mapping(container.body.get("securityContext"), base)
            _set_members(ops, base, context, {
                "runAsUser": uid, "runAsGroup": gid, "runAsNonRoot": True,
                "allowPrivilegeEscalation": False})
        if ops and not only_ephemeral:
            _mark(ops, request.object or {}, "run-as-user", str(uid))
        return Verdict(True, patch=tuple(ops))


def _pod_spec_of_pod(request: ReviewRequest) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    found = pod_spec(request)
    if found is None:
        raise Malformed("spec", "a Pod needs a spec")
    return found


def _wants_privilege(container: Container, spec_path: Sequence[str]) -> bool:
    base = container.path(spec_path, "securityContext")
    context = _mapping(container.body.get("securityContext"), base) or {}
    capabilities = _mapping(context.get("capabilities"), (*base, "capabilities")) or {}
    added = _list(capabilities.get("add"), (*base, "capabilities", "add")) or []
    # "ALL" is how a pod asks the runtime for every capability, SYS_ADMIN included.
    return context.get("privileged") is True or any(
        isinstance(c, str) and c.upper().removeprefix("CAP_") in ("SYS_ADMIN", "ALL")
        for c in added)


def _mark(ops: list[dict[str, Any]], obj: Mapping[str, Any], key: str, value: str) -> None:
    """Record on the pod what a policy did, as an annotation (a key with `/`: see pointer)."""
    metadata = _mapping(obj.get("metadata"), ("metadata",))
    if metadata is None:
        ops.append({"op": "add", "path": "/metadata",
                    "value": {"annotations": {MARK_PREFIX + key: value}}})
        return
    annotations = _mapping(metadata.get("annotations"), ("metadata", "annotations"))
    _set_members(ops, ("metadata", "annotations"), annotations, {MARK_PREFIX + key: value})


# HostAutoMounter --------------------------------------------------------------------------

_NOT_NAME = re.compile(r"[^a-z0-9]+")


def volume_name(path: str, taken: set[str]) -> str:
    """A DNS-1123 label for the volume of `path`, unique among `taken`."""
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    slug = _NOT_NAME.sub("-", path.lower()).strip("-")[:40].strip("-")
    base = f"host-{slug}-{digest}" if slug else f"host-{digest}"
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base[:58]}-{counter}"
    return name


@dataclass(frozen=True)
class HostAutoMounter:
    """Mutating: a new pod gets the configured host paths as read-only volumes, mounted in
    every container and init container that does not mount them already."""

    conf: HostAutoMounterConf
    name: str = "automount"
    mutating: bool = True

    def review(self, request: ReviewRequest, namespace: Namespace | None) -> Verdict:
        if not _is_pod_creation(request) or request.operation != "CREATE":
            return ALLOW
        spec_path, spec = _pod_spec_of_pod(request)
        volumes = _list(spec.get("volumes"), (*spec_path, "volumes"))
        by_path: dict[str, str] = {}
        taken: set[str] = set()
        for index, volume in enumerate(volumes or []):
            body = _mapping(volume, (*spec_path, "volumes", index)) or {}
            name = body.get("name")
            if isinstance(name, str):
                taken.add(name)
            host = _mapping(body.get("hostPath"), (*spec_path, "volumes", index, "hostPath"))
            if host and isinstance(host.get("path"), str) and isinstance(name, str):
                by_path.setdefault(normal_path(host["path"]), name)
        new_volumes = []
        for path in self.conf.paths:
            if path not in by_path:
                name = volume_name(path, taken)
                taken.add(name)
                by_path[path] = name
                new_volumes.append({"name": name, "hostPath": {"path": path}})
        ops: list[dict[str, Any]] = []
        if volumes is None and new_volumes:
            ops.append({"op": "add", "path": pointer(*spec_path, "volumes"),
                        "value": new_volumes})
        else:
            ops.extend({"op": "add", "path": pointer(*spec_path, "volumes", "-"), "value": v}
                       for v in new_volumes)
        for container in containers(spec, spec_path, CONTAINER_LISTS[:2]):
            base = container.path(spec_path, "volumeMounts")
            mounts = _list(container.body.get("volumeMounts"), base)
            mounted = set()
            for index, mount in enumerate(mounts or []):
                mount_path = (_mapping(mount, (*base, index)) or {}).get("mountPath")
                if isinstance(mount_path, str):
                    mounted.add(normal_path(mount_path))
            missing = [{"name": by_path[p], "mountPath": p, "readOnly": True}
                       for p in self.conf.paths if p not in mounted]
            if mounts is None and missing:
                ops.append({"op": "add", "path": pointer(*base), "value": missing})
            else:
                ops.extend({"op": "add", "path": pointer(*base, "-"), "value": m}
                           for m in missing)
        return Verdict(True, patch=tuple(ops))


Policy = UidEnforcer | RegistryEnforcer | HostPathEnforcer | HostAutoMounter
