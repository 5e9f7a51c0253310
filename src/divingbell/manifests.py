"""`divingbell manifests`: everything a cluster needs to run the agent, as plain data.

The pod template carries the document's digest, so a new document is a DaemonSet rolling
update; the readiness probe is the agent's `/readyz` (ready only once the node converged the
current revision), so a document that fails on a node stops the rollout there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from divingbell import __version__

APP = "divingbell"
PORT = 9114
CONFIG_DIR = "/etc/divingbell"
DEFAULT_IMAGE = f"divingbell:{__version__}"


def document_digest(files: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for name, text in sorted(files.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def build(files: Mapping[str, str], *, namespace: str = APP, image: str = DEFAULT_IMAGE,
          max_unavailable: int | str = 1) -> list[dict[str, Any]]:
    """Namespace, ServiceAccount, ClusterRole(+Binding), Role(+Binding) for the maintenance
    slots, ConfigMap and DaemonSet, in order."""
    labels = {"app.kubernetes.io/name": APP}
    meta = {"namespace": namespace, "labels": labels}
    digest = document_digest(files)
    names = [PurePosixPath(name).name for name in files]
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": namespace, "labels": labels}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": APP, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": APP, "labels": labels},
         "rules": [
             # Labels for overrides; annotations for per-node status (RBAC cannot narrow a
             # patch to annotations, so the agent only ever sends divingbell.io/ keys).
             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch",
                                                                   "patch"]},
             {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
             # Maintenance (docs/maintenance.md): drain the node through the Eviction API;
             # delete only what a drain with on_timeout: force leaves behind.
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "delete"]},
             {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
             {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
              "verbs": ["list"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": APP, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": APP},
         "subjects": [{"kind": "ServiceAccount", "name": APP, "namespace": namespace}]},
        # The maintenance slots: Leases in the agent's own namespace only.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": f"{APP}-slots", **meta},
         "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                    "verbs": ["get", "list", "create", "update"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"{APP}-slots", **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": f"{APP}-slots"},
         "subjects": [{"kind": "ServiceAccount", "name": APP, "namespace": namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": APP, **meta},
         "data": {PurePosixPath(name).name: text for name, text in files.items()}},
        _daemonset(meta, labels, names, digest, image, max_unavailable),
    ]


def _daemonset(meta: dict[str, Any], labels: dict[str, str], names: list[str], digest: str,
               image: str, max_unavailable: int | str) -> dict[str, Any]:
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
                {"name": "POD_NAMESPACE",  # where the maintenance slot Leases live
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "ports": [{"name": "metrics", "containerPort": PORT, "protocol": "TCP"}],
        "securityContext": {"privileged": True},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": "256Mi"}},
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
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": max_unavailable}},
            "minReadySeconds": 5,
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"divingbell.io/document-digest": digest,
                                             "prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(PORT)}},
                "spec": {
                    "serviceAccountName": APP,
                    "hostPID": True,
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "host", "hostPath": {"path": "/", "type": "Directory"}},
                        {"name": "document", "configMap": {"name": APP}},
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
