"""The genesis node's control plane: the static pod manifests of etcd, kube-apiserver,
kube-controller-manager and kube-scheduler (divingbell's own templates in
`templates/static-pods/`), the components' kubeconfigs and the PKI files they name.

Everything comes from the design (`cluster.control_plane`: registry, versions, ports, extra
flags) and the PKI directory; nothing from the internet. A role file at the same path replaces
the file rendered here (the operator's override).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from divingbell.bootstrap.design import COMPONENTS, ControlPlane, Design, Node
from divingbell.bootstrap.paths import MANIFESTS

TEMPLATES = Path(__file__).with_name("templates") / "static-pods"
PKI = "/etc/kubernetes/pki"
ETCD_DATA = "/var/lib/etcd"
# Where each credential goes on the genesis node.
CONTROL_PLANE_PATHS = {
    "manifests": MANIFESTS,
    "pki": PKI,
    "etcd_data": ETCD_DATA,
    "ca": f"{PKI}/ca.pem",
    "ca_key": f"{PKI}/ca-key.pem",
    "apiserver_cert": f"{PKI}/apiserver.pem",
    "apiserver_key": f"{PKI}/apiserver-key.pem",
    "apiserver_kubelet_client_cert": f"{PKI}/apiserver-kubelet-client.pem",
    "apiserver_kubelet_client_key": f"{PKI}/apiserver-kubelet-client-key.pem",
    "controller_manager_cert": f"{PKI}/controller-manager.pem",
    "controller_manager_key": f"{PKI}/controller-manager-key.pem",
    "scheduler_cert": f"{PKI}/scheduler.pem",
    "scheduler_key": f"{PKI}/scheduler-key.pem",
    "admin_cert": f"{PKI}/admin.pem",
    "admin_key": f"{PKI}/admin-key.pem",
    "service_account_public": f"{PKI}/service-account.pem",
    "service_account_key": f"{PKI}/service-account-key.pem",
    "controller_manager_kubeconfig": "/etc/kubernetes/controller-manager.conf",
    "scheduler_kubeconfig": "/etc/kubernetes/scheduler.conf",
    "admin_kubeconfig": "/etc/kubernetes/admin.conf",
}
# Design fields under cluster.control_plane.pki naming a certificate (and its key).
_CERTIFICATE_FIELDS = ("apiserver", "apiserver_kubelet_client", "controller_manager", "scheduler",
                       "admin")
# path key -> (design field under cluster.control_plane.pki, kind in the PKI, mode): private
# keys 0600, certificates and public keys 0644.
_CREDENTIALS = {
    "ca_key": ("ca", "ca_key", "0600"),
    **{f"{field}_{kind}": (field, kind, mode) for field in _CERTIFICATE_FIELDS
       for kind, mode in (("cert", "0644"), ("key", "0600"))},
    "service_account_public": ("service_account", "public", "0644"),
    "service_account_key": ("service_account", "private", "0600"),
}
# What each certificate must be for the catalog hint in the error.
_CATALOG_HINTS = {
    "apiserver": "common_name: kube-apiserver, hosts: [<genesis ip>, 127.0.0.1, localhost, "
                 "<first service ip>], kubernetes_service_names: "
                 "[kubernetes.default.svc.cluster.local]",
    "apiserver_kubelet_client": "common_name: kube-apiserver-kubelet-client, groups: "
                                "[system:masters], usages: [client]",
    "controller_manager": "common_name: system:kube-controller-manager, usages: [client]",
    "scheduler": "common_name: system:kube-scheduler, usages: [client]",
    "admin": "common_name: admin, groups: [system:masters], usages: [client]",
    "service_account": "a keypair (keypairs: [{name: service-account}])",
}


def _merge_flags(defaults: Mapping[str, Any], extra: Mapping[str, str]) -> dict[str, str]:
    merged = {str(k): str(v) for k, v in defaults.items()}
    merged.update(extra)
    return merged


_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                          undefined=jinja2.StrictUndefined, autoescape=False,
                          keep_trailing_newline=True)
_ENV.filters["merge_flags"] = _merge_flags
_ENV.filters["q"] = lambda value: json.dumps(str(value))


def image(plane: ControlPlane, component: str, kubernetes_version: str) -> str:
    if component in plane.images:
        return plane.images[component]
    tag = plane.etcd_version if component == "etcd" else kubernetes_version
    return f"{plane.registry}/{component}:v{tag}"


def local_api_server(plane: ControlPlane, node: Node) -> str:
    """How the components on the genesis node reach the apiserver."""
    address = plane.bind_address or node.ip
    if address in ("0.0.0.0", "::"):
        address = "127.0.0.1"
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{plane.ports.apiserver}"


def credential_names(design: Design) -> dict[str, tuple[str, str]]:
    """path key -> (name in the PKI, kind), for `read_pems`."""
    plane = design.cluster.control_plane
    assert plane is not None
    names = plane.pki.model_dump()
    names["ca"] = design.pki.ca
    return {key: (names[field], kind) for key, (field, kind, _) in _CREDENTIALS.items()}


def missing_hint(design: Design, found: Mapping[str, str], missing: list[str]) -> str:
    """The build error for credentials not in the PKI: what to add to the catalog."""
    plane = design.cluster.control_plane
    assert plane is not None
    absent = dict.fromkeys(field for key, (field, _, _) in _CREDENTIALS.items()
                           if key not in found and field in _CATALOG_HINTS)
    hints = "; ".join(f"{getattr(plane.pki, field)} ({_CATALOG_HINTS[field]})"
                      for field in absent)
    return (f"pki: the control plane (cluster.control_plane) needs {', '.join(missing)}"
            + (f": add {hints} to the catalog and run `divingbell pki generate`" if hints
               else ""))


def control_plane_files(design: Design, node: Node, pems: Mapping[str, str],
                        context: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """path -> (content, mode) of everything the genesis node's control plane needs."""
    plane = design.cluster.control_plane
    assert plane is not None
    paths = CONTROL_PLANE_PATHS
    local = local_api_server(plane, node)
    ctx = {**context, "plane": plane, "cp": paths, "local_api_server": local,
           "bind_address": plane.bind_address or node.ip,
           "issuer": plane.service_account_issuer
           or f"https://kubernetes.default.svc.{design.cluster.cluster_domain}",
           "images": {c: image(plane, c, design.cluster.kubernetes_version) for c in COMPONENTS},
           "extra": {c: plane.extra_args.get(c, {}) for c in COMPONENTS}}
    files: dict[str, tuple[str, str]] = {}
    for key, (_, _, mode) in _CREDENTIALS.items():
        files[paths[key]] = (pems[key], mode)
    for component in COMPONENTS:
        files[f"{MANIFESTS}/{component}.yaml"] = (
            _ENV.get_template(f"{component}.yaml.j2").render(**ctx), "0600")
    for user, cert, key, kubeconfig in (
            ("system:kube-controller-manager", "controller_manager_cert",
             "controller_manager_key", "controller_manager_kubeconfig"),
            ("system:kube-scheduler", "scheduler_cert", "scheduler_key", "scheduler_kubeconfig"),
            ("admin", "admin_cert", "admin_key", "admin_kubeconfig")):
        files[paths[kubeconfig]] = (_ENV.get_template("component.kubeconfig.j2").render(
            **ctx, user=user, cert=paths[cert], key=paths[key]), "0600")
    return files
