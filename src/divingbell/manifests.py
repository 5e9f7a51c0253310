"""`divingbell manifests`: everything a cluster needs to run the agent, as plain data.

The document lives in an immutable Secret named by its digest (`divingbell-document-<digest>`),
and the DaemonSet's pod template mounts that Secret by name. So a new document is a new pod
template: a DaemonSet rolling update, gated by each node's readiness (the agent's `/readyz`,
ready only once the node converged the current revision). A node sees a new document only when
its pod is replaced, and `kubectl rollout undo` goes back to a template that mounts the old
Secret. The previous Secrets stay (as many as the DaemonSet keeps revisions) until pruned:
every document Secret carries the label `divingbell.io/document=true` and its digest.

A Secret, not a ConfigMap: documents hold crypt hashes and exec env secrets.

The agent's ServiceAccount may get and patch Nodes (RBAC cannot narrow a patch further), so a
ValidatingAdmissionPolicy confines it: only `divingbell.io/` annotations, and only on the node
named in its own token's node-name claim. Events about a Node can only live in the `default`
namespace (the API server rejects a core/v1 Event about a cluster-scoped object anywhere else),
so the agent gets a Role for events in `default` alone, never a ClusterRole.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import yaml

from divingbell import __version__

APP = "divingbell"
PORT = 9114
CONFIG_DIR = "/etc/divingbell"
DEFAULT_IMAGE = f"divingbell:{__version__}"
EVENTS_NAMESPACE = "default"  # the only namespace the API accepts Events about a Node in
DOCUMENT_LABEL = "divingbell.io/document"
DIGEST_LABEL = "divingbell.io/document-digest"
DIGEST_ENV = "DIVINGBELL_DOCUMENT_DIGEST"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
# DaemonSet revisions kept for `rollout undo`, and so document Secrets worth keeping.
REVISION_HISTORY = 5
# apt's resolver with Debian bookworm's full package lists peaks at ~90 MiB, dpkg with ~800
# packages' file lists at ~30 MiB, the agent at ~60 MiB; maintainer scripts and triggers
# (initramfs, man-db) run in this cgroup too, which is also charged for dpkg's dirty page
# cache. An OOM kill mid-dpkg leaves half-configured packages, so the limit is generous; the
# request (what the scheduler reserves) stays small. Measured figures: docs/kubernetes.md.
MEMORY_REQUEST = "128Mi"
MEMORY_LIMIT = "1Gi"

# Matched with fullmatch: `$` would also accept a trailing newline.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

# An image reference as the container runtimes parse it (distribution/reference, the OCI
# distribution spec): [registry[:port]/]path[:tag][@digest].
_REGISTRY_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = rf"(?:{_REGISTRY_PART}(?:\.{_REGISTRY_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?P<name>(?:{_REGISTRY}/)?{_PATH_PART}(?:/{_PATH_PART})*)"
    r"(?::(?P<tag>\w[\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}))?", re.ASCII)
_IMAGE_NAME_MAX = 255  # registry and path together, as distribution/reference limits them
IMAGE_FORM = ("[registry[:port]/]path[:tag][@sha256:digest], path components of lower-case "
              "letters and digits joined by '.', '_', '__' or '-', a tag of at most 128 "
              "letters, digits, '_', '.' and '-' not starting with '.' or '-'")


def document_digest(files: Mapping[str, str] | Mapping[str, bytes]) -> str:
    """The digest of the document files as mounted: base names and contents (text is UTF-8,
    as the kubelet writes a Secret's stringData)."""
    digest = hashlib.sha256()
    for name, content in sorted((PurePosixPath(n).name, t) for n, t in files.items()):
        data = content.encode() if isinstance(content, str) else content
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


def document_secret_name(digest: str) -> str:
    return f"{APP}-document-{digest}"


def check_namespace(value: str) -> str:
    """A namespace name is an RFC 1123 DNS label."""
    if not _DNS_LABEL.fullmatch(value):
        raise ValueError(f"{value!r} is not a namespace name: at most 63 characters, lower-case "
                         "letters, digits and '-', starting and ending with a letter or digit")
    return value


def check_image(value: str) -> str:
    """An image reference a container runtime accepts, so nothing else reaches the pod spec
    (a space, a newline or YAML of its own)."""
    shown = value if len(value) <= 80 else value[:80] + "…"
    found = _IMAGE.fullmatch(value)
    if found is None:
        raise ValueError(f"{shown!r} is not an image reference: {IMAGE_FORM}")
    if len(found["name"]) > _IMAGE_NAME_MAX:
        raise ValueError(f"{shown!r} is not an image reference: its registry and path are "
                         f"{len(found['name'])} characters, at most {_IMAGE_NAME_MAX}")
    return value


def check_secret_name(value: str) -> str:
    if not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(f"{value!r} is not a Secret name: lower-case letters, digits, '-' and "
                         "'.', starting and ending with a letter or digit")
    return value


def service_account_user(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:{APP}"


def build(files: Mapping[str, str], *, namespace: str = APP, image: str = DEFAULT_IMAGE,
          max_unavailable: int | str = 1, existing_secret: str | None = None
          ) -> list[dict[str, Any]]:
    """Every object, in the order `kubectl apply` needs them.

    With `existing_secret`, the document is not printed: the pod template mounts that Secret
    (created by the operator, one key per document file name) instead of one made here.
    """
    check_namespace(namespace)
    check_image(image)
    labels = {"app.kubernetes.io/name": APP}
    meta = {"namespace": namespace, "labels": labels}
    digest = document_digest(files)
    names = sorted(PurePosixPath(name).name for name in files)
    if existing_secret is None:
        secret_name = document_secret_name(digest)
        documents = [_document_secret(files, secret_name, digest, namespace)]
    else:
        secret_name = check_secret_name(existing_secret)
        documents = []
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": namespace, "labels": {
             **labels,
             # hostPID, hostNetwork, privileged and a hostPath root: only the privileged
             # Pod Security level admits the agent's pods.
             "pod-security.kubernetes.io/enforce": "privileged",
             "pod-security.kubernetes.io/enforce-version": "latest",
             "pod-security.kubernetes.io/warn": "privileged",
             "pod-security.kubernetes.io/audit": "privileged"}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": APP, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": APP, "labels": labels},
         "rules": [
             # Labels for overrides; annotations for per-node status. The admission policy
             # below narrows the patch to divingbell.io/ annotations on the agent's own node.
             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
             # Maintenance (docs/maintenance.md): drain the node through the Eviction API;
             # delete only what a drain with on_timeout: force leaves behind (the admission
             # policy below confines deletes to pods on the agent's own node).
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "delete"]},
             {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
             {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
              "verbs": ["list"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": APP, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": APP},
         "subjects": [_subject(namespace)]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": f"{APP}-events", "namespace": EVENTS_NAMESPACE, "labels": labels},
         # get + patch: a repeated event is counted on the existing object (an event series).
         "rules": [{"apiGroups": [""], "resources": ["events"],
                    "verbs": ["create", "get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"{APP}-events", "namespace": EVENTS_NAMESPACE, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": f"{APP}-events"},
         "subjects": [_subject(namespace)]},
        # The maintenance slots: Leases in the agent's own namespace only.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": f"{APP}-slots", **meta},
         "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                    "verbs": ["get", "list", "create", "update"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"{APP}-slots", **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": f"{APP}-slots"},
         "subjects": [_subject(namespace)]},
        *admission_policy(namespace, labels),
        *documents,
        _daemonset(meta, labels, names, digest, secret_name, image, max_unavailable),
    ]


def _subject(namespace: str) -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": APP, "namespace": namespace}


def _document_secret(files: Mapping[str, str], name: str, digest: str, namespace: str
                     ) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": APP, DOCUMENT_LABEL: "true",
                                DIGEST_LABEL: digest}},
        "type": "Opaque",
        # Immutable: the kubelet never re-projects it into running pods, and nobody can edit
        # a document under a node's feet. A new document is a new Secret.
        "immutable": True,
        "stringData": {PurePosixPath(n).name: text for n, text in sorted(files.items())},
    }


# The admission policy ----------------------------------------------------------------------

# CEL, standard library only (no optional types), so it runs on every API server with
# admissionregistration.k8s.io/v1 (Kubernetes 1.30+), and in the tests with cel-python.
POLICY_VARIABLES: tuple[tuple[str, str], ...] = (
    ("nodeNames",
     f"has(request.userInfo.extra) && '{NODE_NAME_CLAIM}' in request.userInfo.extra"
     f" ? request.userInfo.extra['{NODE_NAME_CLAIM}'] : []"),
    ("newAnnotations",
     "has(object.metadata.annotations) ? object.metadata.annotations : {}"),
    ("oldAnnotations",
     "has(oldObject.metadata.annotations) ? oldObject.metadata.annotations : {}"),
)
POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("object.metadata.name in variables.nodeNames",
     "the divingbell agent may change only the node its pod runs on (the token's node-name "
     "claim)"),
    ("(has(object.metadata.labels) ? object.metadata.labels : {}) =="
     " (has(oldObject.metadata.labels) ? oldObject.metadata.labels : {})",
     "the divingbell agent may not change node labels"),
    # The only spec field the agent may change is `unschedulable` (a maintenance cordon).
    ("(has(object.spec.taints) ? object.spec.taints : []) =="
     " (has(oldObject.spec.taints) ? oldObject.spec.taints : [])"
     " && (has(object.spec.podCIDR) ? object.spec.podCIDR : '') =="
     " (has(oldObject.spec.podCIDR) ? oldObject.spec.podCIDR : '')"
     " && (has(object.spec.podCIDRs) ? object.spec.podCIDRs : []) =="
     " (has(oldObject.spec.podCIDRs) ? oldObject.spec.podCIDRs : [])"
     " && (has(object.spec.providerID) ? object.spec.providerID : '') =="
     " (has(oldObject.spec.providerID) ? oldObject.spec.providerID : '')",
     "the divingbell agent may not change a node's spec other than unschedulable (taints, "
     "podCIDR, providerID)"),
    ("(has(object.metadata.finalizers) ? object.metadata.finalizers : []) =="
     " (has(oldObject.metadata.finalizers) ? oldObject.metadata.finalizers : [])"
     " && (has(object.metadata.ownerReferences) ? object.metadata.ownerReferences : []) =="
     " (has(oldObject.metadata.ownerReferences) ? oldObject.metadata.ownerReferences : [])",
     "the divingbell agent may not change a node's finalizers or owners"),
    ("variables.newAnnotations.all(k, k.startsWith('divingbell.io/')"
     " || (k in variables.oldAnnotations"
     " && variables.oldAnnotations[k] == variables.newAnnotations[k]))"
     " && variables.oldAnnotations.all(k, k.startsWith('divingbell.io/')"
     " || k in variables.newAnnotations)",
     "the divingbell agent may change only divingbell.io/ annotations"),
)


# Events: only about the agent's own Node (the Role already limits them to `default`).
EVENT_POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("object.involvedObject.kind == 'Node'"
     " && object.involvedObject.name in variables.nodeNames",
     "the divingbell agent may record Events only about the node its pod runs on"),
)


# Pods: a drain that ends in `on_timeout: force` deletes only pods on the agent's own node.
POD_POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("has(oldObject.spec.nodeName) && oldObject.spec.nodeName in variables.nodeNames",
     "the divingbell agent may delete only pods on the node its pod runs on"),
)


def admission_policy(namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """ValidatingAdmissionPolicies (and bindings) that confine the agent's ServiceAccount: Node
    updates to divingbell.io/ annotations of its own node; Events to ones about that node."""
    node_names = [{"name": n, "expression": e} for n, e in POLICY_VARIABLES[:1]]
    return [
        *_policy(f"{APP}-agent-own-node", namespace, labels,
                 {"apiGroups": [""], "apiVersions": ["v1"],
                  "operations": ["UPDATE"],  # a PATCH is admitted as an UPDATE
                  "resources": ["nodes", "nodes/status"]},
                 [{"name": n, "expression": e} for n, e in POLICY_VARIABLES],
                 POLICY_VALIDATIONS),
        *_policy(f"{APP}-agent-own-pods", namespace, labels,
                 {"apiGroups": [""], "apiVersions": ["v1"],
                  "operations": ["DELETE"], "resources": ["pods"]},
                 node_names, POD_POLICY_VALIDATIONS),
        *_policy(f"{APP}-agent-own-events", namespace, labels,
                 {"apiGroups": [""], "apiVersions": ["v1"],
                  "operations": ["CREATE", "UPDATE"], "resources": ["events"]},
                 node_names, EVENT_POLICY_VALIDATIONS),
    ]


def _policy(name: str, namespace: str, labels: Mapping[str, str], rule: dict[str, Any],
            variables: list[dict[str, str]], validations: tuple[tuple[str, str], ...]
            ) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name, "labels": dict(labels)},
         "spec": {
             "failurePolicy": "Fail",
             "matchConstraints": {"resourceRules": [rule]},
             "matchConditions": [{
                 "name": "divingbell-agent",
                 "expression": f"request.userInfo.username == "
                               f"'{service_account_user(namespace)}'"}],
             "variables": variables,
             "validations": [{"expression": e, "message": m, "reason": "Forbidden"}
                             for e, m in validations],
         }},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": name, "labels": dict(labels)},
         "spec": {"policyName": name, "validationActions": ["Deny"]}},
    ]


# The DaemonSet ---------------------------------------------------------------------------

def _daemonset(meta: dict[str, Any], labels: dict[str, str], names: list[str], digest: str,
               secret_name: str, image: str, max_unavailable: int | str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": PORT}, "periodSeconds": 20,
             "timeoutSeconds": 5, "failureThreshold": 3}
    ready = {"httpGet": {"path": "/readyz", "port": PORT}, "periodSeconds": 5,
             "timeoutSeconds": 3, "failureThreshold": 1}
    container = {
        "name": "agent",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["agent", *(f"{CONFIG_DIR}/{n}" for n in names), "--root", "/host",
                 "--listen", f"0.0.0.0:{PORT}"],
        "env": [{"name": "NODE_NAME",
                 "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                # The agent refuses a mounted document that is not the one this pod was
                # made for (an operator's own Secret edited in place).
                {"name": DIGEST_ENV,
                 "valueFrom": {"fieldRef": {
                     "fieldPath": f"metadata.annotations['{DIGEST_LABEL}']"}}},
                {"name": "POD_NAMESPACE",  # where the maintenance slot Leases live
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "ports": [{"name": "metrics", "containerPort": PORT, "protocol": "TCP"}],
        "securityContext": {"privileged": True},
        "resources": {"requests": {"cpu": "50m", "memory": MEMORY_REQUEST},
                      "limits": {"memory": MEMORY_LIMIT}},
        "livenessProbe": probe,
        "readinessProbe": ready,
        "volumeMounts": [
            {"name": "host", "mountPath": "/host", "mountPropagation": "HostToContainer"},
            {"name": "document", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": APP, **meta},
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": max_unavailable}},
            "minReadySeconds": 5,
            "revisionHistoryLimit": REVISION_HISTORY,
            "template": {
                "metadata": {"labels": dict(labels),
                             "annotations": {DIGEST_LABEL: digest,
                                             "prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(PORT)}},
                "spec": {
                    "serviceAccountName": APP,
                    "priorityClassName": "system-node-critical",
                    "hostPID": True,
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "host", "hostPath": {"path": "/", "type": "Directory"}},
                        {"name": "document",
                         "secret": {"secretName": secret_name, "defaultMode": 0o400}},
                    ],
                },
            },
        },
    }


def parse_max_unavailable(value: str) -> int | str:
    """`N` or `P%`, as the DaemonSet takes it."""
    text = value.strip()
    if text.endswith("%") and text[:-1].isdigit() and 0 < int(text[:-1]) <= 100:
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"{value!r}: give a count (1) or a percentage (10%)")


# YAML out ----------------------------------------------------------------------------------

class _ManifestDumper(yaml.SafeDumper):
    """No anchors or aliases (reviewers and some tools reject them); multi-line strings as
    literal blocks, so the document reads as it was written."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def analyze_scalar(self, scalar: str) -> Any:
        # PyYAML refuses block styles for any tab, though YAML allows tabs in a literal
        # block's content (only its indentation must be spaces): judge as if they were spaces.
        analysis = super().analyze_scalar(scalar)
        if "\t" in scalar and not analysis.allow_block:
            analysis.allow_block = super().analyze_scalar(scalar.replace("\t", " ")).allow_block
        return analysis


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)


SECRET_LIMIT = 1024 * 1024  # the API server refuses a Secret whose data is larger
ANNOTATIONS_LIMIT = 256 * 1024  # kubectl's client-side apply copies the object into one


def secret_size_problem(size: int) -> tuple[str | None, str | None]:
    """(error, note) for document files of `size` bytes in one Secret."""
    if size > SECRET_LIMIT:
        return (f"the document files hold {size} bytes; a Kubernetes Secret holds at most "
                f"{SECRET_LIMIT} (1 MiB), so the API server would refuse it. Move large "
                "script bodies out of the document (an apt package, an image)"), None
    if size > ANNOTATIONS_LIMIT - 16 * 1024:
        return None, (f"the document files hold {size} bytes: a client-side `kubectl apply` "
                      "copies the Secret into its last-applied-configuration annotation, "
                      "which holds at most 256 KiB; use `kubectl apply --server-side`")
    return None, None


def unreadable_reason(text: str) -> str | None:
    """Why a multi-line `text` cannot be shown as a literal block (it is then one quoted,
    escaped string), or None. A literal block cannot keep spaces at a line's end."""
    if "\n" not in text:
        return None
    for number, line in enumerate(text.split("\n"), 1):
        if line != line.rstrip(" "):
            return f"line {number} ends in spaces"
    if not _ManifestDumper(io.StringIO()).analyze_scalar(text).allow_block:
        return "it holds control characters"
    return None


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_ManifestDumper, sort_keys=False,
                         default_flow_style=False, allow_unicode=True, width=100)
