"""`divingbell bootstrap`: build join scripts from a design, set node labels, tear a node down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from divingbell.commands.console import EXIT_FAILED, invalid_input
from divingbell.core.errors import DocumentError, Problem


@click.group()
def bootstrap() -> None:
    """Turn hosts into labelled Kubernetes nodes with self-contained scripts (like Promenade).

    \b
      divingbell pki generate catalog.yaml -o pki/            # the cluster's certificates
      divingbell bootstrap validate design.yaml               # every problem, with its path
      divingbell bootstrap build design.yaml --pki pki/ -o scripts/
      scp scripts/join-n1.sh n1: && ssh n1 sudo bash join-n1.sh
      divingbell bootstrap labels n1 rack=r1 team=blue --kubeconfig admin.conf
      divingbell bootstrap teardown --node n1 --kubeconfig admin.conf

    See docs/bootstrap.md for the design format and what the scripts do.
    """


def _design_files(func: Any) -> Any:
    return click.argument("designs", nargs=-1, required=True,
                          type=click.Path(exists=True, dir_okay=False, path_type=Path))(func)


def _format(func: Any) -> Any:
    return click.option("--format", "output_format", type=click.Choice(["text", "json"]),
                        default="text", show_default=True,
                        help="Output for people or for scripts.")(func)


@bootstrap.command()
@_design_files
@_format
def validate(designs: tuple[Path, ...], output_format: str) -> None:
    """Check DESIGNS (deep-merged in order) and list every problem with its path and file:line.

    Exit 0 when the design is valid, 2 when it is not.
    """
    from divingbell.bootstrap.design import load_design

    try:
        design = load_design(designs)
    except DocumentError as exc:
        invalid_input(exc.problems, output_format)
    if output_format == "json":
        click.echo(json.dumps({"ok": True, "cluster": design.cluster.name,
                               "nodes": [n.hostname for n in design.nodes]}, indent=2))
    else:
        click.echo(f"design of cluster {design.cluster.name} is valid: {len(design.nodes)} "
                   f"nodes, roles {', '.join(sorted(design.roles))}")


@bootstrap.command()
@_design_files
@click.option("--pki", "pki_dir", required=True,
              type=click.Path(exists=True, path_type=Path),
              help="The `divingbell pki generate` output directory, or its certificates.yaml "
              "bundle: the CA and each node's certificate (kubelet-<hostname> by default).")
@click.option("-o", "--output", "out", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for genesis.sh, join-<node>.sh and divingbell-bootstrap.service.")
@click.option("--node", "nodes", multiple=True, metavar="HOSTNAME",
              help="Build only this node's script. Repeat for several. Default: every node.")
@_format
def build(designs: tuple[Path, ...], pki_dir: Path, out: Path, nodes: tuple[str, ...],
          output_format: str) -> None:
    """Build each node's self-contained bootstrap script from DESIGNS.

    The genesis node (cluster.genesis) gets genesis.sh, every other node join-<hostname>.sh.
    Each script carries its node's files in an embedded archive (the kubelet's configuration
    and kubeconfig with the node's certificate, the container runtime's configuration, apt
    sources, the role's files and units), so the node needs nothing else. Run as root it:
    checks the host (hostname, IP, OS release, commands, no swap, free disk) and changes
    nothing if a check fails; writes the files; installs the role's packages; enables and
    starts the units; waits for the Node to be Ready; applies the dynamic labels; disables the
    unit that ran it. Running it again changes nothing.

    Scripts are written 0700: they contain the node's private key.
    """
    from divingbell.bootstrap.build import BuildError, build_all
    from divingbell.bootstrap.design import load_design

    try:
        design = load_design(designs)
    except DocumentError as exc:
        invalid_input(exc.problems, output_format)
    try:
        result = build_all(design, pki_dir, out, list(nodes) or None)
    except BuildError as exc:
        invalid_input([Problem("", p) for p in exc.problems], output_format)
    if output_format == "json":
        click.echo(json.dumps({"ok": True, "output": str(out), "scripts": [
            {"node": s.node, "file": s.name, "bytes": len(s.text.encode()),
             "files": [{"path": p, "mode": m} for p, m in s.files]} for s in result.scripts],
            "unit": str(result.unit)}, indent=2))
        return
    for script in result.scripts:
        click.echo(f"{out / script.name}: node {script.node}, {len(script.files)} files, "
                   f"{len(script.text.encode()) // 1024} KiB")
    click.echo(f"{out / 'divingbell-bootstrap.service'}: the unit that runs a script once")


def serve_options(func: Any) -> Any:
    """`divingbell serve`'s bootstrap options, passed on as FleetSettings fields."""
    func = click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
                        help="Credentials for the cluster's API server, for PUT "
                        "/v1/nodes/{name}/labels. Default: in-cluster, else ~/.kube/config."
                        )(func)
    func = click.option("--bootstrap-pki", type=click.Path(exists=True, file_okay=False),
                        help="The `divingbell pki generate` directory join scripts take "
                        "the CA and node certificates from.")(func)
    return click.option("--bootstrap-design", type=click.Path(exists=True, dir_okay=False),
                        multiple=True, callback=lambda _c, _p, value: tuple(value),
                        help="A design file GET /v1/join-scripts builds from (repeat for "
                        "several, deep-merged in order).")(func)


def _kube_options(func: Any) -> Any:
    func = click.option("--server", metavar="URL", hidden=True,
                        help="An unauthenticated API server URL (tests, kubectl proxy).")(func)
    return click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
                        envvar="KUBECONFIG",
                        help="Credentials for the API server. Default: $KUBECONFIG, the "
                        "in-cluster service account, else ~/.kube/config.")(func)


def _api(kubeconfig: str | None, server: str | None) -> Any:
    from divingbell.kube import LightkubeApi

    return LightkubeApi(kubeconfig, server=server)


@bootstrap.command()
@click.argument("node")
@click.argument("labels", nargs=-1, metavar="KEY=VALUE...")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@_kube_options
@_format
def labels(node: str, labels: tuple[str, ...], dry_run: bool, kubeconfig: str | None,
           server: str | None, output_format: str) -> None:
    """Make KEY=VALUE... the labels of NODE.

    Labels of the node that are not named are removed, except those under kubernetes.io/ and
    k8s.io/ (topology, node roles, the kubelet's own), which are never removed. With no
    KEY=VALUE, every label but those is removed. The keys set are recorded in the node's
    divingbell.io/bootstrap-labels annotation (teardown removes exactly those).
    """
    from divingbell.bootstrap.labels import parse_labels, plan_labels, set_labels
    from divingbell.kube import KubeError

    desired, problems = parse_labels(labels)
    if problems:
        raise click.UsageError("; ".join(problems))
    try:
        api = _api(kubeconfig, server)
        change = (plan_labels(api.node(node), desired) if dry_run
                  else set_labels(api, node, desired))
    except KubeError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    if output_format == "json":
        click.echo(json.dumps({**change.as_dict(), "dry_run": dry_run}, indent=2))
        return
    verb = "would " if dry_run else ""
    for key, value in change.set.items():
        click.echo(f"  + {key}={value}")
    for key in change.removed:
        click.echo(f"  - {key}")
    for key in change.kept_protected:
        click.echo(f"  = {key} (kept: Kubernetes' own domain)")
    click.echo(f"node {node}: {verb}set {len(change.set)}, {verb}remove {len(change.removed)}"
               if change.changed else f"node {node}: labels already as desired")


@bootstrap.command()
@click.option("--node", required=True, metavar="NAME", help="The node to take out.")
@click.option("--no-drain", is_flag=True,
              help="Skip draining (the node has no workloads, or was drained already).")
@click.option("--keep-node", is_flag=True,
              help="Leave the Node object in the API (default: delete it once the kubelet "
                   "is stopped).")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default="/", show_default=True,
              help="The node's root filesystem, when run from a pod (/host).")
@_kube_options
@_format
def teardown(node: str, no_drain: bool, keep_node: bool, root: Path, kubeconfig: str | None,
             server: str | None, output_format: str) -> None:
    """Take this host out of the cluster: drain NODE, remove the labels divingbell applied,
    stop and disable the kubelet, delete the Node and remove the kubelet's files (its
    certificate, key, kubeconfig, config and unit drop-in). Run it on the node, as root; a
    second run finishes what the first left. Refused on a node running the control plane.

    Draining goes through divingbell's maintenance code when it is installed; without it the
    command stops unless --no-drain says the node may lose its pods as they are.
    """
    from divingbell.bootstrap.teardown import TeardownError, run_teardown
    from divingbell.core.host import Host
    from divingbell.kube import KubeError

    try:
        api = _api(kubeconfig, server)
        steps = run_teardown(api, Host(root=root), node, drain=not no_drain,
                             delete_node=not keep_node)
    except (TeardownError, KubeError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    if output_format == "json":
        click.echo(json.dumps({"node": node, "steps": steps}, indent=2))
    else:
        for step in steps:
            click.echo(f"{step['step']}: {step['result']}")
