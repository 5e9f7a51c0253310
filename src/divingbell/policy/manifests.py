"""What to deploy for the policy part, as data: the webhook's Deployment, Service, RBAC,
PodDisruptionBudget and the Mutating/ValidatingWebhookConfigurations; the tenant ClusterRole
and the tenant controller's RBAC.

Every webhook fails closed (`failurePolicy: Fail`: a pod the policy could not check is not
admitted), answers within `timeoutSeconds` (5 by default: the API server's own budget is 10),
and never sees kube-system or its own namespace (so a broken webhook cannot lock out the
cluster's system pods or its own replacement).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from divingbell import __version__
from divingbell.policy.config import LabelSelector, PolicyConfig

NAME = "divingbell-policy"
TENANTS_NAME = "divingbell-tenants"
PORT = 8443
DEFAULT_IMAGE = f"divingbell:{__version__}"
CONFIG_DIR = "/etc/divingbell-policy"

POD_KINDS = [("", "v1", ["pods"])]
WORKLOAD_KINDS = [
    ("", "v1", ["pods", "pods/ephemeralcontainers", "replicationcontrollers", "podtemplates"]),
    ("apps", "v1", ["deployments", "statefulsets", "daemonsets", "replicasets"]),
    ("batch", "v1", ["jobs", "cronjobs"]),
]


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "divingbell"}


def namespace_selector(selector: LabelSelector | None, own_namespace: str) -> dict[str, Any]:
    out = selector.as_kubernetes() if selector is not None else {}
    expressions = list(out.get("matchExpressions") or [])  # type: ignore[call-overload]
    expressions.append({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                        "values": sorted({"kube-system", own_namespace})})
    out["matchExpressions"] = expressions
    return out


def _webhook(name: str, path: str, rules: list[dict[str, Any]], selector: dict[str, Any],
             namespace: str, ca_bundle: bytes, timeout: int) -> dict[str, Any]:
    return {
        "name": f"{name}.policy.divingbell.io",
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"namespace": namespace, "name": NAME, "path": path,
                                     "port": 443},
                         "caBundle": base64.b64encode(ca_bundle).decode()},
        "rules": rules,
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "sideEffects": "None",
        "timeoutSeconds": timeout,
        "namespaceSelector": selector,
    }


def _rules(kinds: list[tuple[str, str, list[str]]], operations: list[str]
           ) -> list[dict[str, Any]]:
    return [{"apiGroups": [group], "apiVersions": [version], "resources": resources,
             "operations": operations, "scope": "Namespaced"}
            for group, version, resources in kinds]


def webhook_configurations(config: PolicyConfig, namespace: str, ca_bundle: bytes,
                           timeout: int = 5) -> list[dict[str, Any]]:
    mutating, validating = [], []
    if config.uid_enforcer.enabled:
        mutating.append(_webhook(
            "uid", "/mutate/uid",
            [*_rules(POD_KINDS, ["CREATE"]),
             *_rules([("", "v1", ["pods/ephemeralcontainers"])], ["UPDATE"])],
            namespace_selector(config.selector_for(config.uid_enforcer), namespace),
            namespace, ca_bundle, timeout))
    if config.host_auto_mounter.enabled:
        mutating.append(_webhook(
            "automount", "/mutate/automount", _rules(POD_KINDS, ["CREATE"]),
            namespace_selector(config.selector_for(config.host_auto_mounter),
                               namespace), namespace, ca_bundle, timeout))
    if config.registry_enforcer.enabled:
        validating.append(_webhook(
            "registry", "/validate/registry", _rules(WORKLOAD_KINDS, ["CREATE", "UPDATE"]),
            namespace_selector(config.selector_for(config.registry_enforcer),
                               namespace), namespace, ca_bundle, timeout))
    if config.host_path_enforcer.enabled:
        validating.append(_webhook(
            "hostpath", "/validate/hostpath", _rules(WORKLOAD_KINDS, ["CREATE", "UPDATE"]),
            namespace_selector(config.selector_for(config.host_path_enforcer),
                               namespace), namespace, ca_bundle, timeout))
    out = []
    if mutating:
        out.append({"apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "MutatingWebhookConfiguration",
                    "metadata": {"name": NAME, "labels": _labels("webhook")},
                    "webhooks": mutating})
    if validating:
        out.append({"apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "ValidatingWebhookConfiguration",
                    "metadata": {"name": NAME, "labels": _labels("webhook")},
                    "webhooks": validating})
    return out


def webhook_server(policy_text: str, namespace: str, image: str, replicas: int
                   ) -> list[dict[str, Any]]:
    labels = _labels("webhook")
    digest = hashlib.sha256(policy_text.encode()).hexdigest()[:16]
    probe = {"httpGet": {"path": "/healthz", "port": PORT, "scheme": "HTTPS"},
             "periodSeconds": 10, "timeoutSeconds": 2}
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": "divingbell"}}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": NAME, "namespace": namespace, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": NAME, "labels": labels},
         "rules": [{"apiGroups": [""], "resources": ["namespaces"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": NAME, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": NAME},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
         "data": {"policy.yaml": policy_text}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
         "spec": {
             "replicas": replicas,
             "selector": {"matchLabels": {"app.kubernetes.io/name": NAME,
                                          "app.kubernetes.io/component": "webhook"}},
             "strategy": {"type": "RollingUpdate",
                          "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
             "template": {
                 "metadata": {"labels": labels,
                              "annotations": {"divingbell.io/policy-digest": digest}},
                 "spec": {
                     "serviceAccountName": NAME,
                     "priorityClassName": "system-cluster-critical",
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                         "runAsGroup": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "affinity": {"podAntiAffinity": {
                         "preferredDuringSchedulingIgnoredDuringExecution": [{
                             "weight": 100, "podAffinityTerm": {
                                 "topologyKey": "kubernetes.io/hostname",
                                 "labelSelector": {"matchLabels": {
                                     "app.kubernetes.io/name": NAME,
                                     "app.kubernetes.io/component": "webhook"}}}}]}},
                     "containers": [{
                         "name": "webhook",
                         "image": image,
                         "args": ["policy", "serve", "--config", f"{CONFIG_DIR}/policy.yaml",
                                  "--tls-cert", f"{CONFIG_DIR}/tls/tls.crt",
                                  "--tls-key", f"{CONFIG_DIR}/tls/tls.key",
                                  "--listen", f"0.0.0.0:{PORT}"],
                         "ports": [{"name": "https", "containerPort": PORT}],
                         "readinessProbe": probe,
                         "livenessProbe": {**probe, "failureThreshold": 3,
                                           "initialDelaySeconds": 5},
                         "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                       "limits": {"memory": "256Mi"}},
                         "securityContext": {"allowPrivilegeEscalation": False,
                                             "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}},
                         "volumeMounts": [
                             {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                             {"name": "tls", "mountPath": f"{CONFIG_DIR}/tls",
                              "readOnly": True}],
                     }],
                     "volumes": [
                         {"name": "config", "configMap": {"name": NAME}},
                         {"name": "tls", "secret": {"secretName": f"{NAME}-tls"}}],
                 }}}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
         "spec": {"minAvailable": 1,
                  "selector": {"matchLabels": {"app.kubernetes.io/name": NAME,
                                               "app.kubernetes.io/component": "webhook"}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
         "spec": {"selector": {"app.kubernetes.io/name": NAME,
                               "app.kubernetes.io/component": "webhook"},
                  "ports": [{"name": "https", "port": 443, "targetPort": "https"}]}},
    ]


# What a tenant may do in its own namespace (the Toolforge whitelist, in RBAC terms).
TENANT_RULES = [
    {"apiGroups": [""], "resources": ["pods", "pods/log", "pods/exec", "pods/portforward",
                                      "services", "configmaps", "secrets",
                                      "persistentvolumeclaims", "events"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["resourcequotas", "limitranges"],
     "verbs": ["get", "list", "watch"]},
]


def tenant_rbac(namespace: str, tenant_role: str = "divingbell-tenant"
                ) -> list[dict[str, Any]]:
    labels = {**_labels("tenants"), "app.kubernetes.io/name": TENANTS_NAME}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": tenant_role, "labels": labels}, "rules": TENANT_RULES},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": TENANTS_NAME, "namespace": namespace, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": TENANTS_NAME, "labels": labels},
         "rules": [
             {"apiGroups": [""], "resources": ["namespaces"],
              "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
             {"apiGroups": [""], "resources": ["resourcequotas", "limitranges"],
              "verbs": ["get", "create", "update"]},
             {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["rolebindings"],
              "verbs": ["get", "create", "update", "delete"]},
             # To bind tenants to their role without holding its permissions itself.
             {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
              "verbs": ["bind"], "resourceNames": [tenant_role]},
             {"apiGroups": ["certificates.k8s.io"],
              "resources": ["certificatesigningrequests"],
              "verbs": ["get", "create", "delete"]},
             {"apiGroups": ["certificates.k8s.io"],
              "resources": ["certificatesigningrequests/approval"], "verbs": ["update"]},
             {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
              "verbs": ["approve"],
              "resourceNames": ["kubernetes.io/kube-apiserver-client"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": TENANTS_NAME, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": TENANTS_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": TENANTS_NAME,
                       "namespace": namespace}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": TENANTS_NAME, "namespace": namespace, "labels": labels},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                    "verbs": ["get", "create", "update"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": TENANTS_NAME, "namespace": namespace, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": TENANTS_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": TENANTS_NAME,
                       "namespace": namespace}]},
    ]


def build(config: PolicyConfig, policy_text: str, *, ca_bundle: bytes, image: str,
          replicas: int = 2, timeout: int = 5, tenants: bool = True) -> list[dict[str, Any]]:
    namespace = config.namespace
    objects = webhook_server(policy_text, namespace, image, replicas)
    if tenants:
        objects += tenant_rbac(namespace)
    return objects + webhook_configurations(config, namespace, ca_bundle, timeout)
