"""What the fleet service's bootstrap routes do, as plain functions: request in, (status, body)
out. The FastAPI router (`fleet/api/bootstrap.py`) only parses HTTP and calls these, so the
rules (conflicts, protected labels, which certificate a node gets) live and are tested here.

- `join_script`: `GET /v1/join-scripts?hostname=&ip=&labels.static=K=V&labels.dynamic=K=V`
- `validate_design`: `POST /v1/designs/validate`
- `put_labels`: `PUT /v1/nodes/{name}/labels`
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divingbell.bootstrap.build import (
    BuildError,
    NodeCredentials,
    build_node_script,
)
from divingbell.bootstrap.design import (
    HOSTNAME,
    Design,
    Labels,
    Node,
    label_problem,
    load_design,
    parse_design,
)
from divingbell.bootstrap.labels import set_labels
from divingbell.core.document.types import is_ip_address
from divingbell.core.errors import DocumentError, Problem
from divingbell.kube import KubeError, NodeLabelApi

SHELL = "text/x-shellscript"
NODE_CERT_DAYS = 365


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any                      # JSON-able, or the script text
    media_type: str = "application/json"


@dataclass(frozen=True)
class FleetMachine:
    """What the fleet knows of a machine that asks for its join script."""

    role: str | None
    labels: Mapping[str, str] = field(default_factory=dict)


def _problem(field_name: str, message: str) -> dict[str, str]:
    return {"field": field_name, "message": message}


def _bad(problems: list[dict[str, str]], error: str = "invalid-request") -> Reply:
    return Reply(400, {"detail": {"error": error, "problems": problems}})


def _label_args(values: Sequence[str], field_name: str, problems: list[dict[str, str]]
                ) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        key, eq, label = value.partition("=")
        problem = None if eq else f"{value!r}: expected KEY=VALUE"
        problem = problem or label_problem(key, label)
        if problem:
            problems.append(_problem(field_name, problem))
        else:
            labels[key] = label
    return labels


def join_script(design_paths: Sequence[Path], pki_dir: Path, *, hostname: str, ip: str,
                static: Sequence[str] = (), dynamic: Sequence[str] = (), role: str | None = None,
                machine: Callable[[str], FleetMachine | None] = lambda _: None) -> Reply:
    """The join script for one host, from the current design.

    A host the design lists keeps its role and labels (the query's labels are added); for
    another host, the role comes from `role`, else from the fleet's machine. A hostname or
    address that conflicts with the design is refused with the reasons."""
    problems: list[dict[str, str]] = []
    if not hostname:
        problems.append(_problem("hostname", "required"))
    elif not HOSTNAME.match(hostname):
        problems.append(_problem("hostname", f"{hostname!r} is not a valid node name "
                                 "(lower-case DNS name)"))
    if not ip:
        problems.append(_problem("ip", "required"))
    elif not is_ip_address(ip):
        problems.append(_problem("ip", f"{ip!r} is not an IP address"))
    extra_static = _label_args(static, "labels.static", problems)
    extra_dynamic = _label_args(dynamic, "labels.dynamic", problems)
    if problems:
        return _bad(problems)
    try:
        design = load_design(design_paths)
    except DocumentError as exc:
        return Reply(409, {"detail": {"error": "design-invalid", "problems": [
            _as_dict(p) for p in exc.problems]}})
    known = design.node(hostname)
    owner = next((n for n in design.nodes if n.ip == ip), None)
    if known is not None and known.ip != ip:
        problems.append(_problem("ip", f"the design gives {hostname} the address {known.ip}, "
                                 f"not {ip}"))
    if owner is not None and owner.hostname != hostname:
        problems.append(_problem("ip", f"{ip} is the address of {owner.hostname} in the design"))
    fleet = machine(hostname)
    node: Node | None = known
    if node is None:
        chosen = role or (fleet.role if fleet else None)
        if chosen is None:
            problems.append(_problem("hostname", f"{hostname} is not in the design and has no "
                                     "role: pass role=, or give the machine a role in the fleet"))
        elif chosen not in design.roles:
            problems.append(_problem("role", f"no role {chosen!r} in the design (roles: "
                                     f"{', '.join(sorted(design.roles))})"))
        else:
            node = Node(hostname=hostname, ip=ip, role=chosen, labels=Labels())
    if problems or node is None:
        return _bad(problems, "conflict" if known is not None or owner is not None
                    else "invalid-request")
    if fleet is not None:
        extra_dynamic = {**fleet.labels, **extra_dynamic}
    try:
        credentials = _credentials(pki_dir, design, node)
        script = build_node_script(design, node, credentials, extra_static=extra_static,
                                   extra_dynamic=extra_dynamic)
    except BuildError as exc:
        return Reply(409, {"detail": {"error": "cannot-build", "problems": exc.problems}})
    return Reply(200, script.text, SHELL)


def _credentials(pki_dir: Path, design: Design, node: Node) -> NodeCredentials:
    """A key and certificate issued now from the cluster CA (like Promenade's join-scripts
    API) and never stored, so no node key is ever handed out twice: not even the catalog's
    own `kubelet-<node>` key, which stays for `bootstrap build` (scripts an operator copies)."""
    ca_cert, ca_key = pki_dir / f"{design.pki.ca}.pem", pki_dir / f"{design.pki.ca}-key.pem"
    if not (ca_cert.is_file() and ca_key.is_file()):
        raise BuildError([f"pki: {ca_cert.name} and {ca_key.name} are needed in {pki_dir}: the "
                          "fleet issues each node's key itself, and never serves a stored one"])
    from divingbell.pki import crypto

    authority = crypto.read_cert(ca_cert)
    key = crypto.new_key(crypto.key_algorithm(crypto.public_key_of(authority)))
    profile = crypto.LeafProfile(crypto.name(f"system:node:{node.hostname}", ["system:nodes"]),
                                 (node.hostname,), (node.ip,), ("server", "client"))
    cert = crypto.issue_leaf(profile, key.public_key(), authority, crypto.read_key(ca_key),
                             NODE_CERT_DAYS, datetime.datetime.now(datetime.UTC))
    return NodeCredentials(ca_cert.read_text(), crypto.cert_pem(cert).decode(),
                           crypto.key_pem(key).decode())


def validate_design(text: str) -> Reply:
    """Every problem in a design, with paths: 200 when valid, 422 with the problems if not."""
    try:
        design = parse_design(text, "design")
    except DocumentError as exc:
        problems = [_as_dict(p) for p in exc.problems]
        return Reply(422, {"detail": {"status": "Failure", "valid": False,
                                      "error_count": len(problems), "problems": problems}})
    return Reply(200, {"status": "Success", "valid": True, "error_count": 0, "problems": [],
                       "cluster": design.cluster.name,
                       "nodes": [n.hostname for n in design.nodes]})


def put_labels(api: NodeLabelApi, node: str, body: Any) -> Reply:
    """Make `body["labels"]` the node's labels; kubernetes.io/k8s.io labels are never
    removed. 404 for an unknown node, 422 naming the field for a bad body."""
    labels = body.get("labels") if isinstance(body, Mapping) else None
    if not isinstance(labels, Mapping):
        return Reply(422, {"detail": {"problems": [
            _problem("labels", "required: a mapping of label keys to values")]}})
    problems = []
    desired: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(value, str):
            problems.append(_problem(f"labels.{key}", "must be a string"))
            continue
        problem = label_problem(str(key), value)
        if problem:
            problems.append(_problem(f"labels.{key}", problem))
        desired[str(key)] = value
    if problems:
        return Reply(422, {"detail": {"problems": problems}})
    try:
        change = set_labels(api, node, desired)
    except KubeError as exc:
        if exc.code == 404:
            return Reply(404, {"detail": {"error": "node-not-found", "node": node}})
        return Reply(502, {"detail": {"error": "kubernetes", "message": str(exc)}})
    return Reply(200, change.as_dict())


def _as_dict(problem: Problem) -> dict[str, str | None]:
    return {"path": problem.path, "message": problem.message, "location": problem.location}
