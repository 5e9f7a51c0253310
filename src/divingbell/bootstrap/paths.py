"""Where bootstrap puts things on a node: shared by the script builder and by teardown, which
runs on the node without the `bootstrap` extra (no Jinja2)."""

from __future__ import annotations

# The Node annotation listing the labels a script set (teardown removes those).
OWNED_ANNOTATION = "divingbell.io/bootstrap-labels"
MANIFESTS = "/etc/kubernetes/manifests"
PATHS = {
    "ca": "/etc/kubernetes/pki/ca.pem",
    "cert": "/etc/kubernetes/pki/kubelet.pem",
    "key": "/etc/kubernetes/pki/kubelet-key.pem",
    "kubelet_config": "/etc/kubernetes/kubelet/config.yaml",
    "kubeconfig": "/etc/kubernetes/kubelet/kubeconfig",
    "kubelet_dropin": "/etc/systemd/system/kubelet.service.d/10-divingbell.conf",
    "containerd_config": "/etc/containerd/config.toml",
}
