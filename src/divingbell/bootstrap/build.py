"""Build each node's self-contained bootstrap script from a design and a PKI directory.

Every file a node gets is rendered here (Jinja2, strict: an undefined variable is a build error
naming the design path), packed into a gzip'd tar with its mode, and embedded in the script, so
the node needs nothing but the script. The script itself is `templates/node.sh.j2`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shlex
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from divingbell.bootstrap import controlplane
from divingbell.bootstrap.design import COMPONENTS, Design, Node, Role, node_may_set
from divingbell.bootstrap.paths import MANIFESTS, OWNED_ANNOTATION, PATHS
from divingbell.core.errors import DivingbellError

TEMPLATES = Path(__file__).with_name("templates")
# Needed before anything is installed; curl (for the API steps) is installed with the packages.
BASE_COMMANDS = ("systemctl", "apt-get", "dpkg-query", "tar", "gzip", "base64", "install",
                 "cmp", "stat", "df", "awk", "sed", "ip", "mktemp")


class BuildError(DivingbellError):
    """The design cannot be built into scripts; each problem names its design path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class NodeCredentials:
    """The CA and the node's own certificate and key: the only credential a script carries
    (the API steps too ask as the node, so a node's script can act on that node alone)."""

    ca_pem: str
    cert_pem: str
    key_pem: str
    # The genesis node's control plane (cluster.control_plane): CA key, component certificates,
    # service-account keypair, by CONTROL_PLANE_PATHS key. Empty for every other node.
    control_plane: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltScript:
    node: str
    name: str        # genesis.sh or join-<node>.sh
    text: str
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, mode)


def _env(**options: Any) -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, **options)
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    env.filters["to_yaml"] = lambda value: yaml.safe_dump(dict(value), sort_keys=True,
                                                          default_flow_style=False)
    env.filters["join_labels"] = lambda labels: ",".join(f"{k}={v}" for k, v in
                                                        sorted(labels.items()))
    return env


_FILES_ENV = _env(loader=jinja2.FileSystemLoader(TEMPLATES))
# Bash's ${#array[@]} would open a Jinja comment: the script template uses {## ##} for those.
_SCRIPT_ENV = _env(loader=jinja2.FileSystemLoader(TEMPLATES), comment_start_string="{##",
                   comment_end_string="##}")
_USER_ENV = _env()


def read_credentials(pki_dir: Path, design: Design, hostname: str) -> NodeCredentials:
    """The CA and the node's own certificate and key, from a `divingbell pki` directory or from
    its `certificates.yaml` bundle."""
    name = design.pki.node_certificate.format(hostname=hostname)
    pems, missing = read_pems(pki_dir, {"ca": (design.pki.ca, "ca"), "cert": (name, "cert"),
                                         "key": (name, "key")})
    if missing:
        raise BuildError([
            f"pki: {', '.join(missing)} not found: add {{document_name: {name}, common_name: "
            f"'system:node:{hostname}', groups: ['system:nodes'], hosts: [{hostname}]}} under "
            f"certificate_authorities.{design.pki.ca} in the catalog and run "
            "`divingbell pki generate`"])
    plane: dict[str, str] = {}
    if design.cluster.control_plane is not None and design.cluster.genesis == hostname:
        plane, missing = read_pems(pki_dir, controlplane.credential_names(design))
        if missing:
            raise BuildError([controlplane.missing_hint(design, plane, missing)])
    return NodeCredentials(pems["ca"], pems["cert"], pems["key"], plane)


_BUNDLE_SCHEMAS = {"ca": "deckhand/CertificateAuthority/v1", "cert": "deckhand/Certificate/v1",
                   "key": "deckhand/CertificateKey/v1",
                   "ca_key": "deckhand/CertificateAuthorityKey/v1",
                   "public": "deckhand/PublicKey/v1", "private": "deckhand/PrivateKey/v1"}
_KEY_KINDS = ("key", "ca_key", "private")


def read_pems(pki: Path, wanted: Mapping[str, tuple[str, str]]
               ) -> tuple[dict[str, str], list[str]]:
    """{key: (name, kind)} -> ({key: PEM text}, what is missing): from the directory's
    <name>.pem / <name>-key.pem, or from the bundle's documents."""
    found: dict[str, str] = {}
    missing: list[str] = []
    if pki.is_file():
        try:
            documents = list(yaml.safe_load_all(pki.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise BuildError([f"pki: cannot read the bundle {pki}: {exc}"]) from None
        data = {(str((d.get("metadata") or {}).get("name")), str(d.get("schema"))):
                d.get("data") for d in documents if isinstance(d, dict)}
        for key, (name, kind) in wanted.items():
            value = data.get((name, _BUNDLE_SCHEMAS[kind]))
            if isinstance(value, str):
                found[key] = value
            else:
                missing.append(f"{name} ({_BUNDLE_SCHEMAS[kind]}) in {pki}")
        return found, missing
    for key, (name, kind) in wanted.items():
        path = pki / (f"{name}-key.pem" if kind in _KEY_KINDS else f"{name}.pem")
        if path.is_file():
            found[key] = path.read_text()
        else:
            missing.append(str(path))
    return found, missing


def design_digest(design: Design) -> str:
    return hashlib.sha256(design.model_dump_json().encode()).hexdigest()[:12]


def build_node_script(design: Design, node: Node, credentials: NodeCredentials, *,
                      extra_static: Mapping[str, str] | None = None,
                      extra_dynamic: Mapping[str, str] | None = None) -> BuiltScript:
    role = design.roles[node.role]
    genesis = design.cluster.genesis == node.hostname
    static = {**role.labels.static, **node.labels.static, **(extra_static or {})}
    wanted = {**role.labels.dynamic, **node.labels.dynamic, **(extra_dynamic or {})}
    # The script asks as its node, which NodeRestriction lets set only some labels on itself;
    # the others (node-role.kubernetes.io/...) are left for the fleet or an operator.
    dynamic = {k: v for k, v in wanted.items() if node_may_set(k)}
    left = {k: v for k, v in wanted.items() if not node_may_set(k)}
    plane = design.cluster.control_plane if genesis else None
    if plane is not None:
        # Genesis holds the admin credential for its control plane: it waits for /readyz and
        # applies every label, those a node may not set on itself too.
        dynamic, left = wanted, {}
    context: dict[str, Any] = {
        "cluster": design.cluster, "node": node, "role": role, "role_name": node.role,
        "paths": PATHS, "api_server": design.cluster.api_endpoints[0],
        "api_cert": controlplane.CONTROL_PLANE_PATHS["admin_cert"] if plane else PATHS["cert"],
        "api_key": controlplane.CONTROL_PLANE_PATHS["admin_key"] if plane else PATHS["key"],
        "static_labels": static, "dynamic_labels": wanted,
        "static_pod_path": MANIFESTS if plane is not None else None,
    }
    files = _node_files(design, node, role, credentials, context)
    control_plane: dict[str, Any] = {}
    if plane is not None:
        control_plane = {"local_api_server": controlplane.local_api_server(plane, node),
                         "mirror_pods": [f"{c}-{node.hostname}" for c in COMPONENTS]}
    runtime = design.cluster.container_runtime
    packages = list(dict.fromkeys([runtime.package, *role.packages]))
    for needed in ("kubelet", "curl"):
        if not any(p.split("=")[0] == needed for p in packages):
            packages.append(needed)
    units = list(dict.fromkeys([runtime.unit, *[u.name for u in role.units],
                                "kubelet.service"]))
    owned = sorted({*static, *dynamic})
    script_name = "genesis.sh" if genesis else f"join-{node.hostname}.sh"
    text = _SCRIPT_ENV.get_template("node.sh.j2").render(
        kind="genesis" if genesis else "join", script_name=script_name,
        design_digest=design_digest(design), host=design.host,
        packages=packages, units=units,
        commands=list(dict.fromkeys([*BASE_COMMANDS, *design.host.commands])),
        os_releases=design.host.os_release,
        label_fragments="\n".join(f'{json.dumps(k)}:{json.dumps(v)}'
                                  for k, v in sorted(dynamic.items())),
        label_patch=json.dumps({"metadata": {
            "labels": dict(sorted(dynamic.items())),
            "annotations": {OWNED_ANNOTATION: ",".join(owned)}}}, separators=(",", ":"))
        if dynamic else "",
        labels_left=json.dumps(dict(sorted(left.items())), separators=(",", ":")) if left else "",
        control_plane=control_plane, archive=_archive(files), **context)
    return BuiltScript(node.hostname, script_name, text, [(p, m) for p, (_, m) in files.items()])


def _node_files(design: Design, node: Node, role: Role, credentials: NodeCredentials,
                context: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every file the node gets: path -> (content, mode)."""
    files: dict[str, tuple[str, str]] = {
        PATHS["ca"]: (credentials.ca_pem, "0644"),
        PATHS["cert"]: (credentials.cert_pem, "0644"),
        PATHS["key"]: (credentials.key_pem, "0600"),
        PATHS["kubelet_config"]: (_builtin("kubelet-config.yaml.j2", context), "0644"),
        PATHS["kubeconfig"]: (_builtin("kubeconfig.j2", context), "0600"),
        PATHS["kubelet_dropin"]: (_builtin("kubelet-dropin.conf.j2", context), "0644"),
        PATHS["containerd_config"]: (_builtin("containerd-config.toml.j2", context), "0644"),
    }
    for registry in design.cluster.container_runtime.registries:
        directory = f"/etc/containerd/certs.d/{registry.host}"
        files[f"{directory}/hosts.toml"] = (
            _builtin("hosts.toml.j2", {**context, "registry": registry}), "0644")
        if registry.ca:
            files[f"{directory}/ca.pem"] = (registry.ca if registry.ca.endswith("\n")
                                            else registry.ca + "\n", "0644")
    # Not the agent's apt module's names (divingbell-<name>): the agent would take these for
    # files of its own, and a node document's repository of the same name would replace them.
    for repo in design.apt_repositories:
        files[f"/etc/apt/sources.list.d/bootstrap-{repo.name}.sources"] = (
            _builtin("apt.sources.j2", {**context, "repo": repo}), "0644")
        files[f"/etc/apt/keyrings/bootstrap-{repo.name}.asc"] = (
            repo.key if repo.key.endswith("\n") else repo.key + "\n", "0644")
    if context["static_pod_path"] is not None:
        if not credentials.control_plane:
            raise BuildError([
                f"cluster.control_plane: genesis node {node.hostname} needs the control "
                "plane's certificates (the CA key, apiserver, controller-manager, scheduler, "
                "admin, service-account); build it with `divingbell bootstrap build --pki`"])
        files.update(controlplane.control_plane_files(design, node, credentials.control_plane,
                                                      context))
    problems: list[str] = []
    # A role file at a path divingbell renders replaces it: the operator's override.
    for index, spec in enumerate(role.files):
        where = f"roles.{node.role}.files[{index}].content"
        rendered = _render_user(spec.content, context, where, problems)
        files[spec.path] = (rendered, spec.mode)
    for index, unit in enumerate(role.units):
        if unit.content is not None:
            where = f"roles.{node.role}.units[{index}].content"
            files[f"/etc/systemd/system/{unit.name}"] = (
                _render_user(unit.content, context, where, problems), "0644")
    if problems:
        raise BuildError(problems)
    return files


def _builtin(template: str, context: Mapping[str, Any]) -> str:
    return _FILES_ENV.get_template(template).render(**context)


def _render_user(source: str, context: Mapping[str, Any], where: str, problems: list[str]
                 ) -> str:
    try:
        return _USER_ENV.from_string(source).render(**context)
    except jinja2.UndefinedError as exc:
        problems.append(f"{where}: {exc.message} (available: cluster, node, role, role_name, "
                        "paths, api_server, static_labels, dynamic_labels)")
    except jinja2.TemplateSyntaxError as exc:
        problems.append(f"{where}: template line {exc.lineno}: {exc.message}")
    return ""


def _archive(files: Mapping[str, tuple[str, str]]) -> str:
    """The files as a gzip'd tar (files/<path> plus a manifest of "mode path" lines), base64
    in 76-column lines. Reproducible: fixed owner, times and order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        manifest = "".join(f"{int(mode, 8):o} {path}\n" for path, (_, mode) in
                           sorted(files.items()))
        entries = [("manifest", manifest, "0644"),
                   *((f"files{path}", content, mode)
                     for path, (content, mode) in sorted(files.items()))]
        for name, content, mode in entries:
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), int(mode, 8), 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    compressed = gzip.compress(buffer.getvalue(), mtime=0)
    return base64.encodebytes(compressed).decode().rstrip("\n")


@dataclass(frozen=True)
class BuildResult:
    scripts: list[BuiltScript]
    unit: Path | None


BOOTSTRAP_UNIT = """\
# Runs this node's divingbell bootstrap script once; the script disables this unit when the
# node has joined. Install: the node's script as /var/lib/divingbell/bootstrap.sh (0700), this
# file in /etc/systemd/system/, then `systemctl enable --now divingbell-bootstrap.service`.
[Unit]
Description=divingbell bootstrap: join this host to the Kubernetes cluster
Wants=network-online.target
After=network-online.target
ConditionPathExists=/var/lib/divingbell/bootstrap.sh

[Service]
Type=oneshot
ExecStart=/bin/bash /var/lib/divingbell/bootstrap.sh
RemainAfterExit=no
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""


def build_all(design: Design, pki_dir: Path, out: Path, nodes: list[str] | None = None
              ) -> BuildResult:
    wanted = nodes or [n.hostname for n in design.nodes]
    unknown = [name for name in wanted if design.node(name) is None]
    if unknown:
        raise BuildError([f"no node {name!r} in the design" for name in unknown])
    if not wanted:
        raise BuildError(["nodes: the design has no nodes to build scripts for"])
    scripts = []
    problems: list[str] = []
    for name in wanted:
        node = design.node(name)
        assert node is not None
        try:
            scripts.append(build_node_script(design, node, read_credentials(pki_dir, design,
                                                                             name)))
        except BuildError as exc:
            problems.extend(exc.problems)
    if problems:
        raise BuildError(problems)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    from divingbell.pki.crypto import write_file

    for script in scripts:
        # The script carries the node's private key: readable by root only.
        write_file(out / script.name, script.text.encode(), 0o700)
    unit = out / "divingbell-bootstrap.service"
    write_file(unit, BOOTSTRAP_UNIT.encode(), 0o644)
    return BuildResult(scripts, unit)
