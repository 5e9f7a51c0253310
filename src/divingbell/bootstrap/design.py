"""The bootstrap design: the cluster, its roles and its nodes, as one YAML document (or several
files, deep-merged like the node document). Validated whole, every problem with its path and
file:line, before any script is built."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from divingbell.core.document.fields import matching_text
from divingbell.core.document.loader import Loaded, load_files, load_text
from divingbell.core.document.problems import check_model, closest, problem_at
from divingbell.core.document.types import is_ip_address
from divingbell.core.errors import DocumentError, Problem

# Label syntax, as the API server checks it.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
HOSTNAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}"
                       r"[a-z0-9])?)*$")
_UNIT = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|socket|timer|mount|path|target)$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+:~-]+)?$")
_SAFE_PATH = re.compile(r"^(/[A-Za-z0-9._@+-]+)+$")
_MODE = re.compile(r"^0?[0-7]{3}$")
_COMMAND = re.compile(r"^[A-Za-z0-9._+-]+$")
_OS_RELEASE = re.compile(r"^[a-z0-9._-]+ [A-Za-z0-9._-]+$")
_REGISTRY_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_ENDPOINT = re.compile(r"^https://[A-Za-z0-9.\-\[\]:]+(:[0-9]+)?$")
# What the kubelet may set on its own Node (NodeRestriction); anything else in these domains
# must be applied through the API, as a dynamic label.
KUBELET_ALLOWED = ("kubernetes.io/hostname", "kubernetes.io/arch", "kubernetes.io/os",
                   "beta.kubernetes.io/instance-type", "node.kubernetes.io/instance-type",
                   "failure-domain.beta.kubernetes.io/region",
                   "failure-domain.beta.kubernetes.io/zone", "topology.kubernetes.io/region",
                   "topology.kubernetes.io/zone")
KUBELET_ALLOWED_PREFIXES = ("kubelet.kubernetes.io/", "node.kubernetes.io/")


def label_problem(key: str, value: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if (slash and (not prefix or len(prefix) > 253 or not _LABEL_PREFIX.match(prefix))) or (
            not _LABEL_NAME.match(name)):
        return f"{key!r} is not a valid label key"
    if not _LABEL_VALUE.match(value):
        return f"{value!r} is not a valid label value (63 characters: letters, digits, -_.)"
    return None


def node_may_set(key: str) -> bool:
    """A label a node's own credential may set on its Node (NodeRestriction): anything outside
    kubernetes.io/k8s.io, and the kubelet's own there."""
    return not is_protected(key) or key in KUBELET_ALLOWED or key.startswith(
        KUBELET_ALLOWED_PREFIXES)


def is_protected(key: str) -> bool:
    """Labels in the kubernetes.io and k8s.io domains belong to Kubernetes: never removed."""
    domain = key.rpartition("/")[0]
    return any(domain == d or domain.endswith("." + d) for d in ("kubernetes.io", "k8s.io"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _matching(pattern: re.Pattern[str], problem: str) -> Callable[[Any], Any]:
    """A field validator: the string, or each string of the list, matches `pattern`; else
    `problem`, with the repr of the first that does not in its {}."""
    def check(value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            matching_text(text, pattern, problem)
        return value
    return check


def _ip_address(value: str | None) -> str | None:
    if value is not None and not is_ip_address(value):
        raise ValueError(f"{value!r} is not an IP address")
    return value


def _labels(value: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, raw in value.items():
        text = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
        problem = label_problem(str(key), text)
        if problem:
            raise ValueError(problem)
        out[str(key)] = text
    return out


class Labels(_Strict):
    static: dict[str, str] = Field(default_factory=dict)
    dynamic: dict[str, str] = Field(default_factory=dict)

    @field_validator("static", "dynamic", mode="before")
    @classmethod
    def _valid(cls, value: Any) -> Any:
        return _labels(value) if isinstance(value, Mapping) else value

    @field_validator("static")
    @classmethod
    def _kubelet_may_set(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not node_may_set(key):
                raise ValueError(f"the kubelet may not set {key!r} on its own Node: put it "
                                 "under labels.dynamic")
        return value


class FileSpec(_Strict):
    path: str
    content: str
    mode: str = "0644"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _SAFE_PATH.match(value) or "/../" in value + "/":
            raise ValueError(f"{value!r} must be an absolute path of letters, digits and ._@+-")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        text = str(value)
        if not _MODE.match(text):
            raise ValueError(f"{text!r} is not an octal file mode like '0644'")
        return text if text.startswith("0") else "0" + text


class UnitSpec(_Strict):
    name: str
    content: str | None = None  # None: the unit comes with a package

    _name = field_validator("name")(_matching(
        _UNIT, "{} is not a systemd unit name (e.g. kubelet.service)"))


class Role(_Strict):
    packages: list[str] = Field(default_factory=list)
    files: list[FileSpec] = Field(default_factory=list)
    units: list[UnitSpec] = Field(default_factory=list)
    labels: Labels = Field(default_factory=Labels)

    _packages = field_validator("packages")(_matching(
        _PACKAGE, "{} is not a package name (optionally =version)"))


class AptRepository(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    uris: list[str] = Field(min_length=1)
    suites: list[str] = Field(min_length=1)
    components: list[str] = Field(default_factory=list)
    key: str = Field(description="ASCII-armored public key the repository is signed with")

    @field_validator("key")
    @classmethod
    def _armored(cls, value: str) -> str:
        if "BEGIN PGP PUBLIC KEY BLOCK" not in value:
            raise ValueError("must be an ASCII-armored public key (-----BEGIN PGP PUBLIC KEY "
                             "BLOCK-----)")
        return value

    @field_validator("uris")
    @classmethod
    def _uris(cls, value: list[str]) -> list[str]:
        for uri in value:
            if not re.match(r"^(https?|file|copy):/", uri) or any(c.isspace() for c in uri):
                raise ValueError(f"{uri!r} is not an http(s):// or file:/ URI")
        return value


class HostRequirements(_Strict):
    os_release: list[str] = Field(default_factory=lambda: ["debian 12", "ubuntu 22.04",
                                                           "ubuntu 24.04"], min_length=1)
    commands: list[str] = Field(default_factory=list)
    min_disk_mb: int = Field(default=2048, ge=0)
    disk_path: str = "/var/lib"

    _commands = field_validator("commands")(_matching(_COMMAND, "{} is not a command name"))

    _releases = field_validator("os_release")(_matching(
        _OS_RELEASE, "{} must be '<ID> <VERSION_ID>' from /etc/os-release, e.g. 'debian 12'"))


class RegistryHost(_Strict):
    """How containerd reaches one registry (its hosts.toml): an air-gapped site's own."""

    host: str = Field(description="HOST[:PORT] as image references name it")
    plain_http: bool = False
    ca: str | None = Field(default=None, description="PEM of the CA that signed its certificate")

    _host = field_validator("host")(_matching(
        _REGISTRY_HOST, "{} is not a registry host like registry.example:5000"))

    @field_validator("ca")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value is not None and "BEGIN CERTIFICATE" not in value:
            raise ValueError("must be a PEM certificate (-----BEGIN CERTIFICATE-----)")
        return value


class ContainerRuntime(_Strict):
    package: str = "containerd"
    unit: str = "containerd.service"
    endpoint: str = "unix:///run/containerd/containerd.sock"
    sandbox_image: str = "registry.k8s.io/pause:3.9"
    # The kubelet's cgroupDriver and containerd's SystemdCgroup, which must agree.
    cgroup_driver: Literal["systemd", "cgroupfs"] = "systemd"
    registries: list[RegistryHost] = Field(default_factory=list)

    @field_validator("registries")
    @classmethod
    def _unique(cls, value: list[RegistryHost]) -> list[RegistryHost]:
        hosts = [r.host for r in value]
        for host in hosts:
            if hosts.count(host) > 1:
                raise ValueError(f"{host} is named twice")
        return value


# What divingbell's kubelet configuration sets itself: kubelet.extra_config may not repeat them
# (override the whole file through a role file instead).
KUBELET_CONFIG_KEYS = ("apiVersion", "kind", "authentication", "authorization", "cgroupDriver",
                       "clusterDNS", "clusterDomain", "containerRuntimeEndpoint",
                       "tlsCertFile", "tlsPrivateKeyFile", "failSwapOn", "rotateCertificates",
                       "staticPodPath")


class Kubelet(_Strict):
    extra_config: dict[str, Any] = Field(
        default_factory=dict, description="More KubeletConfiguration fields, e.g. "
        "failCgroupV1: false")

    @field_validator("extra_config")
    @classmethod
    def _not_ours(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in KUBELET_CONFIG_KEYS:
                raise ValueError(f"{key!r} is set by divingbell (cluster.container_runtime, "
                                 "cluster.cluster_dns, ...); to change it, override "
                                 "/etc/kubernetes/kubelet/config.yaml with a role file")
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9]*$", key):
                raise ValueError(f"{key!r} is not a KubeletConfiguration field name")
        return value


COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
_REGISTRY = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._-]+)*$")
_IMAGE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._-]+)+(:[A-Za-z0-9._-]+)?"
                    r"(@sha256:[0-9a-f]{64})?$")


def _known_component(name: str) -> None:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; components: {', '.join(COMPONENTS)}")


class ControlPlanePorts(_Strict):
    apiserver: int = Field(default=6443, ge=1, le=65535)
    etcd_client: int = Field(default=2379, ge=1, le=65535)
    etcd_peer: int = Field(default=2380, ge=1, le=65535)
    controller_manager: int = Field(default=10257, ge=1, le=65535)
    scheduler: int = Field(default=10259, ge=1, le=65535)

    @model_validator(mode="after")
    def _distinct(self) -> ControlPlanePorts:
        seen: dict[int, str] = {}
        for name, port in self.model_dump().items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both port {port}")
            seen[port] = name
        return self


class ControlPlanePki(_Strict):
    """Names in the PKI directory (the catalog's document_name / keypair name) of what the
    control plane's static pods use."""

    apiserver: str = "apiserver"
    apiserver_kubelet_client: str = "apiserver-kubelet-client"
    controller_manager: str = "controller-manager"
    scheduler: str = "scheduler"
    admin: str = "admin"
    service_account: str = "service-account"


class ControlPlane(_Strict):
    """The genesis node's static pods: etcd, kube-apiserver, kube-controller-manager and
    kube-scheduler from divingbell's own templates. Images come from the design's registry
    only (air-gapped: nothing assumed from the internet)."""

    registry: str = Field(description="HOST[:PORT][/PATH] the control-plane images are in")
    etcd_version: str = Field(default="3.6.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([-+.A-Za-z0-9]*)$")
    images: dict[str, str] = Field(default_factory=dict,
                                   description="component -> full image reference override")
    ports: ControlPlanePorts = Field(default_factory=ControlPlanePorts)
    bind_address: str | None = Field(default=None, description="the apiserver's; default the "
                                     "genesis node's ip")
    service_account_issuer: str | None = None
    pki: ControlPlanePki = Field(default_factory=ControlPlanePki)
    extra_args: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="component -> {flag: value}, added or replacing")

    _registry = field_validator("registry")(_matching(
        _REGISTRY, "{} is not a registry like registry.example:5000/kube"))

    @field_validator("images")
    @classmethod
    def _images(cls, value: dict[str, str]) -> dict[str, str]:
        for component, image in value.items():
            _known_component(component)
            if not _IMAGE.match(image):
                raise ValueError(f"{component}: {image!r} is not an image reference like "
                                 "registry.example:5000/kube-apiserver:v1.36.2")
        return value

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for component, flags in value.items():
            _known_component(component)
            for flag in flags:
                if not re.match(r"^[a-z0-9][a-z0-9-]*$", flag):
                    raise ValueError(f"{component}: {flag!r} is not a flag name (without --)")
        return value

    _bind = field_validator("bind_address")(_ip_address)


class Cluster(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    api_endpoints: list[str] = Field(min_length=1)
    pod_cidr: str
    service_cidr: str
    cluster_dns: str
    cluster_domain: str = "cluster.local"
    kubernetes_version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    genesis: str | None = None
    container_runtime: ContainerRuntime = Field(default_factory=ContainerRuntime)
    kubelet: Kubelet = Field(default_factory=Kubelet)
    ready_timeout_seconds: int = Field(default=600, ge=1, le=86400)
    ready_poll_seconds: int = Field(default=5, ge=1, le=300)
    # Absent: genesis brings up no control plane (the operator's own files do).
    control_plane: ControlPlane | None = None

    _endpoints = field_validator("api_endpoints")(_matching(
        _ENDPOINT, "{} must be https://HOST[:PORT]"))

    @field_validator("pod_cidr", "service_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        try:
            ipaddress.ip_network(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a network like 10.96.0.0/12") from None
        return value

    @field_validator("cluster_dns")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _dns_in_service_cidr(self) -> Cluster:
        if ipaddress.ip_address(self.cluster_dns) not in ipaddress.ip_network(self.service_cidr):
            raise ValueError(f"cluster_dns {self.cluster_dns} is outside service_cidr "
                             f"{self.service_cidr}")
        return self


class Pki(_Strict):
    ca: str = "kubernetes"
    node_certificate: str = Field(default="kubelet-{hostname}",
                                  description="The node's certificate in the PKI directory")
    # Once a certificate every script carried for the wait and the labels: refused now (one
    # node's copy could patch every Node). Kept as a field so the refusal says why.
    api_certificate: str | None = None

    @field_validator("api_certificate")
    @classmethod
    def _no_shared_credential(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "every join script would carry this one credential, so whoever holds one node "
                "could patch every Node: remove it. Scripts ask as their node (NodeRestriction "
                "lets it label only itself); labels under kubernetes.io/ (node-role...) are "
                "applied by the fleet (PUT /v1/nodes/{name}/labels) or `divingbell bootstrap "
                "labels` with an operator's kubeconfig")
        return value


class Node(_Strict):
    hostname: str
    ip: str
    role: str
    labels: Labels = Field(default_factory=Labels)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not HOSTNAME.match(value) or len(value) > 253:
            raise ValueError(f"{value!r} is not a valid node name (lower-case DNS name)")
        return value

    _address = field_validator("ip")(_ip_address)


class Design(_Strict):
    cluster: Cluster
    pki: Pki = Field(default_factory=Pki)
    host: HostRequirements = Field(default_factory=HostRequirements)
    apt_repositories: list[AptRepository] = Field(default_factory=list)
    roles: dict[str, Role] = Field(min_length=1)
    nodes: list[Node] = Field(default_factory=list)

    def node(self, hostname: str) -> Node | None:
        return next((n for n in self.nodes if n.hostname == hostname), None)


def load_design(paths: Sequence[Path]) -> Design:
    return validate_design(load_files(paths))


def parse_design(text: str, source: str = "<design>") -> Design:
    return validate_design(load_text(text, source))


def validate_design(loaded: Loaded) -> Design:
    design, problems = check_model(Design, loaded.data, loaded)
    if design is not None:
        problems = cross_checks(design, loaded)
    if problems:
        raise DocumentError(problems)
    assert design is not None
    return design


def _control_plane_checks(design: Design, plane: ControlPlane,
                          add: Callable[[tuple[str | int, ...], str], None]) -> None:
    """What the apiserver would refuse at start, or what would leave the kubelets unable to
    reach it, said at validation instead."""
    network = ipaddress.ip_network(design.cluster.service_cidr)
    if network.max_prefixlen - network.prefixlen > 20:
        add(("cluster", "service_cidr"), f"{network} is too large for the apiserver's "
            f"--service-cluster-ip-range (at most 2^20 addresses: a /{network.max_prefixlen - 20}"
            " or smaller)")
    genesis = design.node(design.cluster.genesis or "")
    endpoint = re.match(r"^https://\[?([^\]/]+?)\]?(?::([0-9]+))?$",
                        design.cluster.api_endpoints[0])
    if genesis is not None and endpoint is not None:
        host, port = endpoint.group(1), int(endpoint.group(2) or 443)
        if host in (genesis.ip, plane.bind_address) and port != plane.ports.apiserver:
            add(("cluster", "api_endpoints", 0),
                f"{design.cluster.api_endpoints[0]} is the genesis node, whose apiserver "
                f"listens on cluster.control_plane.ports.apiserver {plane.ports.apiserver}")


def cross_checks(design: Design, loaded: Loaded) -> list[Problem]:
    """What one field cannot say alone: roles that exist, names and addresses used once."""
    problems: list[Problem] = []

    def add(path: tuple[str | int, ...], message: str) -> None:
        problems.append(problem_at(loaded, path, message))

    seen_names: dict[str, int] = {}
    seen_ips: dict[str, int] = {}
    for index, node in enumerate(design.nodes):
        if node.role not in design.roles:
            close = closest(node.role, list(design.roles))
            add(("nodes", index, "role"), f"unknown role {node.role!r}"
                + (f"; did you mean {close!r}?" if close else
                   f"; roles: {', '.join(sorted(design.roles))}"))
        if node.hostname in seen_names:
            add(("nodes", index, "hostname"),
                f"{node.hostname!r} is also nodes[{seen_names[node.hostname]}]")
        seen_names.setdefault(node.hostname, index)
        if node.ip in seen_ips:
            add(("nodes", index, "ip"), f"{node.ip} is also the address of "
                f"{design.nodes[seen_ips[node.ip]].hostname!r}")
        seen_ips.setdefault(node.ip, index)
    if design.cluster.genesis is not None and design.cluster.genesis not in seen_names:
        add(("cluster", "genesis"), f"{design.cluster.genesis!r} is not one of the nodes")
    for name, role in design.roles.items():
        paths: dict[str, int] = {}
        for index, spec in enumerate(role.files):
            if spec.path in paths:
                add(("roles", name, "files", index, "path"),
                    f"{spec.path} is also roles.{name}.files[{paths[spec.path]}]")
            paths.setdefault(spec.path, index)
    names: dict[str, int] = {}
    for index, repo in enumerate(design.apt_repositories):
        if repo.name in names:
            add(("apt_repositories", index, "name"), f"{repo.name!r} is used twice")
        names.setdefault(repo.name, index)
    plane = design.cluster.control_plane
    if plane is not None and design.cluster.genesis is None:
        add(("cluster", "control_plane"), "needs cluster.genesis: the node that runs it")
    if plane is not None:
        _control_plane_checks(design, plane, add)
    if "{hostname}" not in design.pki.node_certificate:
        add(("pki", "node_certificate"), "must contain {hostname}: each node has its own")
    return problems
