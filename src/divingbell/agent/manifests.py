"""`divingbell manifests`: everything a cluster needs to run the agent, as plain data.

The document lives in an immutable Secret named by its digest (`divingbell-document-<digest>`),
and the DaemonSet's pod template mounts that Secret by name. So a new document is a new pod
template: a DaemonSet rolling update, gated by each node's readiness (the agent's `/readyz`,
ready only once the node converged the current revision). A node sees a new document only when
its pod is replaced, and `kubectl rollout undo` goes back to a template that mounts the old
Secret. The previous Secrets stay (as many as the DaemonSet keeps revisions) until pruned:
every document Secret carries the label `divingbell.io/document=true` and its digest.

A Secret, not a ConfigMap: documents hold crypt hashes and exec env secrets.

RBAC cannot narrow a request to one node, so ValidatingAdmissionPolicies confine the agent's
ServiceAccount to the node named in its own token's node-name claim: only `divingbell.io/`
annotations and the cordon on that Node; deletes and evictions of its pods; Events about it;
slot Leases held in its name (docs/kubernetes.md has the table and the residual rights).
Events about a Node can only live in the `default` namespace (the API server rejects a core/v1
Event about a cluster-scoped object anywhere else), so the agent gets a Role for events in
`default` alone, never a ClusterRole.
"""

from __future__ import annotations

import base64
import hashlib
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
        # `data`, not `stringData`: the API server stores only `data`, so a client-side
        # `kubectl apply` of `stringData` finds it missing and says `configured` on every
        # run. to_yaml prints the files readable, as a comment above the Secret.
        "data": {PurePosixPath(n).name: base64.b64encode(text.encode()).decode()
                 for n, text in sorted(files.items())},
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
# `dyn`: the API server's type checker resolves the rule's resource `events` in every group,
# and events.k8s.io/v1 Events have no involvedObject, which it would report in the policy's
# status; the policy only ever sees core/v1 Events (matchPolicy Exact).
EVENT_POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("dyn(object).involvedObject.kind == 'Node'"
     " && dyn(object).involvedObject.name in variables.nodeNames",
     "the divingbell agent may record Events only about the node its pod runs on"),
)


# Pods: a drain that ends in `on_timeout: force` deletes only pods on the agent's own node.
POD_POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("has(oldObject.spec.nodeName) && oldObject.spec.nodeName in variables.nodeNames",
     "the divingbell agent may delete only pods on the node its pod runs on"),
)

# Evictions: the admission request for pods/eviction carries the Eviction, not the pod, so
# the policy takes the pods of the eviction's namespace as its parameters (paramKind Pod) and
# checks the one the eviction names. Evaluated once per pod of that namespace, only for the
# agent's own evictions (the match condition comes first).
EVICTION_POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("params.metadata.name != request.name"
     " || (has(params.spec.nodeName) && params.spec.nodeName in variables.nodeNames)",
     "the divingbell agent may evict only pods on the node its pod runs on"),
)

# Slot Leases: the holder is always the writer's own node (or nobody); a Lease another node
# holds may change only once it expired: its renewTime plus its duration lie before the
# new renewTime. The new renewTime is the writer's own clock (CEL has none), so an agent
# could claim a later time to take over a live slot: docs/kubernetes.md, "Residual rights".
LEASE_POLICY_VARIABLES: tuple[tuple[str, str], ...] = (
    ("newHolder",
     "has(object.spec.holderIdentity) ? object.spec.holderIdentity : ''"),
    ("oldHolder",
     "oldObject == null || !has(oldObject.spec.holderIdentity)"
     " ? '' : oldObject.spec.holderIdentity"),
)
LEASE_POLICY_VALIDATIONS: tuple[tuple[str, str], ...] = (
    ("variables.newHolder == '' || variables.newHolder in variables.nodeNames",
     "the divingbell agent may hold a slot Lease only in the name of the node its pod runs "
     "on"),
    ("variables.oldHolder == '' || variables.oldHolder in variables.nodeNames"
     " || (variables.newHolder != '' && has(object.spec.renewTime)"
     " && has(oldObject.spec.renewTime) && has(oldObject.spec.leaseDurationSeconds)"
     " && timestamp(object.spec.renewTime) > timestamp(oldObject.spec.renewTime)"
     " + duration(string(oldObject.spec.leaseDurationSeconds) + 's'))",
     "the divingbell agent may not free or take another node's slot Lease before it expired"),
)


def admission_policy(namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """ValidatingAdmissionPolicies (and bindings) that confine the agent's ServiceAccount to
    its own node: Node updates to divingbell.io/ annotations and the cordon; pod deletes and
    evictions to its pods; Events to ones about it; slot Leases to its own name."""
    node_names = [{"name": n, "expression": e} for n, e in POLICY_VARIABLES[:1]]
    core = {"apiGroups": [""], "apiVersions": ["v1"]}
    return [
        *_policy(f"{APP}-agent-own-node", namespace, labels,
                 {**core, "operations": ["UPDATE"],  # a PATCH is admitted as an UPDATE
                  "resources": ["nodes", "nodes/status"]},
                 [{"name": n, "expression": e} for n, e in POLICY_VARIABLES],
                 POLICY_VALIDATIONS),
        *_policy(f"{APP}-agent-own-pods", namespace, labels,
                 {**core, "operations": ["DELETE"], "resources": ["pods"]},
                 node_names, POD_POLICY_VALIDATIONS),
        *_policy(f"{APP}-agent-own-evictions", namespace, labels,
                 {**core, "operations": ["CREATE"], "resources": ["pods/eviction"]},
                 node_names, EVICTION_POLICY_VALIDATIONS, params=True),
        # Exact: only core/v1 Events (the agent's Role). events.k8s.io/v1 Events have no
        # involvedObject (`regarding`), and RBAC gives the agent nothing in that group.
        *_policy(f"{APP}-agent-own-events", namespace, labels,
                 {**core, "operations": ["CREATE", "UPDATE"], "resources": ["events"]},
                 node_names, EVENT_POLICY_VALIDATIONS, match_policy="Exact"),
        *_policy(f"{APP}-agent-own-slots", namespace, labels,
                 {"apiGroups": ["coordination.k8s.io"], "apiVersions": ["v1"],
                  "operations": ["CREATE", "UPDATE"], "resources": ["leases"]},
                 [*node_names, *({"name": n, "expression": e}
                                 for n, e in LEASE_POLICY_VARIABLES)],
                 LEASE_POLICY_VALIDATIONS),
    ]


def _policy(name: str, namespace: str, labels: Mapping[str, str], rule: dict[str, Any],
            variables: list[dict[str, str]], validations: tuple[tuple[str, str], ...], *,
            params: bool = False, match_policy: str = "Equivalent") -> list[dict[str, Any]]:
    # Every field the API server would default is written out (scope, matchPolicy, the
    # selectors): a list the server completes differs from the applied one, so a
    # client-side `kubectl apply` would report `configured` on every run.
    spec: dict[str, Any] = {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": [{**rule, "scope": "*"}],
                             "matchPolicy": match_policy,
                             "namespaceSelector": {}, "objectSelector": {}},
        "matchConditions": [{
            "name": "divingbell-agent",
            "expression": f"request.userInfo.username == "
                          f"'{service_account_user(namespace)}'"}],
        "variables": variables,
        "validations": [{"expression": e, "message": m, "reason": "Forbidden"}
                        for e, m in validations],
    }
    binding: dict[str, Any] = {"policyName": name, "validationActions": ["Deny"]}
    if params:
        spec["paramKind"] = {"apiVersion": "v1", "kind": "Pod"}
        # Every pod of the request's namespace; none there (the pod is gone): denied.
        binding["paramRef"] = {"selector": {}, "parameterNotFoundAction": "Deny"}
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name, "labels": dict(labels)}, "spec": spec},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": name, "labels": dict(labels)}, "spec": binding},
    ]


# The DaemonSet ---------------------------------------------------------------------------

def _daemonset(meta: dict[str, Any], labels: dict[str, str], names: list[str], digest: str,
               secret_name: str, image: str, max_unavailable: int | str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": PORT}, "periodSeconds": 20,
             "timeoutSeconds": 5, "failureThreshold": 3}
    # Three misses before a ready pod counts as unavailable: a rolling update replaces an
    # unavailable old pod at once, so one slow answer on a busy node must not let a failing
    # document past the node it halted at.
    ready = {"httpGet": {"path": "/readyz", "port": PORT}, "periodSeconds": 5,
             "timeoutSeconds": 3, "failureThreshold": 3}
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
    # The last-applied copy holds the data base64-encoded: 4 bytes for every 3.
    if (size + 2) // 3 * 4 > ANNOTATIONS_LIMIT - 16 * 1024:
        return None, (f"the document files hold {size} bytes: a client-side `kubectl apply` "
                      "copies the Secret (base64, a third larger) into its "
                      "last-applied-configuration annotation, which holds at most 256 KiB; "
                      "use `kubectl apply --server-side`")
    return None, None


# What a YAML comment cannot hold: characters outside YAML's printable set, and line breaks
# other than "\n" (one would end the comment and let the rest be read as YAML).
_NOT_IN_COMMENT = re.compile(
    "[^\t\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd"
    "\U00010000-\U0010ffff]")


def unreadable_reason(text: str) -> str | None:
    """Why `text` cannot be shown as a readable comment beside its Secret, or None."""
    found = _NOT_IN_COMMENT.search(text)
    if found is None:
        return None
    line = text.count("\n", 0, found.start()) + 1
    return f"line {line} holds U+{ord(found.group()):04X}, which a YAML comment cannot hold"


def _readable_copy(secret: Mapping[str, Any]) -> str:
    """The document files a Secret holds, as comment lines (`data` shows them base64)."""
    lines = [f"# {secret['metadata']['name']} holds these files (base64 in `data`):"]
    for name, encoded in secret.get("data", {}).items():
        text = base64.b64decode(encoded).decode(errors="replace")
        if unreadable_reason(text):
            lines.append(f"# --- {name}: not shown (control characters)")
            continue
        lines.append(f"# --- {name}")
        lines.extend(f"#   {line}".rstrip(" ") if not line.strip() else f"#   {line}"
                     for line in text.removesuffix("\n").split("\n"))
    return "\n".join(lines) + "\n"


def to_yaml(objects: list[dict[str, Any]]) -> str:
    parts = []
    for obj in objects:
        text = yaml.dump(obj, Dumper=_ManifestDumper, sort_keys=False,
                         default_flow_style=False, allow_unicode=True, width=100)
        if obj.get("kind") == "Secret" and DOCUMENT_LABEL in obj["metadata"].get("labels", {}):
            text = _readable_copy(obj) + text
        parts.append(text)
    return "---\n".join(parts)
