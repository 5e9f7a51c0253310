"""The host commands: validate, render, plan, apply, status, agent, manifests, schema.

Thin click wrappers: what they share (errors, JSON, exit codes, labels, the document cache)
is in divingbell.commands.console, the apply body in divingbell.commands.apply (which
also runs without click on `apply`'s fast path).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from divingbell.commands import console
from divingbell.commands.apply import ApplyOptions, run_apply

if TYPE_CHECKING:
    from divingbell.core.document.cache import Resolved
    from divingbell.core.document.nodeconfig import NodeConfig
    from divingbell.core.document.validate import ValidDocument
    from divingbell.core.engine.runner import Plan

F = TypeVar("F", bound=Callable[..., Any])


def _files_argument(func: F) -> F:
    return click.argument(
        "files", nargs=-1, required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )(func)


def node_options(func: F) -> F:
    func = click.option(
        "--label", "labels", multiple=True, metavar="KEY=VALUE",
        help="A label of the node, for label overrides. Repeat for several.",
    )(func)
    return click.option(
        "--node", metavar="NAME",
        help="The node's name, for host overrides. Default: $NODE_NAME, else this host's name.",
    )(func)


def host_options(func: F) -> F:
    func = click.option(
        "--proc-sys", type=click.Path(file_okay=False, path_type=Path), default="/proc/sys",
        show_default=True, envvar="DIVINGBELL_PROC_SYS",
        help="Where kernel tunables (sysctls) are read and written. --root never moves them: "
        "sysctls belong to the running kernel, so plan and apply read and set the live "
        "kernel's /proc/sys unless this names another tree (a sandbox or a test).",
    )(func)
    return click.option(
        "--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default="/",
        show_default=True, envvar="DIVINGBELL_ROOT",
        help="The host's root filesystem (a privileged pod mounts it at /host). Files "
        "(/etc/..., units, divingbell's state in /var/lib/divingbell) are under it and "
        "commands (apt, useradd, systemctl, ethtool) run chrooted into it. Kernel state is "
        "not: sysctls follow --proc-sys, NICs and mounts are the running kernel's.",
    )(func)


def _format_option(*choices: str) -> Callable[[F], F]:
    return click.option(
        "--format", "output_format", type=click.Choice(choices), default=choices[0],
        show_default=True, help="Output for people or for scripts.",
    )


@click.command(short_help="Check documents; every problem with its path and file:line.")
@_files_argument
@_format_option("text", "json")
def validate(files: tuple[Path, ...], output_format: str) -> None:
    """Check documents; report every problem with its path and file:line.

    Later FILES deep-merge over earlier ones (mappings merge, lists are replaced), like
    layered values files. Exits 0 when valid, 2 when not.
    """
    from divingbell.core.errors import DocumentError

    try:
        document = _load(files)
    except DocumentError as exc:
        if output_format == "json":
            console.print_json({"valid": False, "problems": [vars(p) for p in exc.problems]})
        else:
            click.echo(f"{len(exc.problems)} problem(s) in {', '.join(map(str, files))}:",
                       err=True)
            for problem in exc.problems:
                click.echo(f"  {problem}", err=True)
        sys.exit(console.EXIT_INVALID)
    if output_format == "json":
        console.print_json({"valid": True, "problems": [], "notes": document.notes})
    else:
        console.print_notes(document.notes)
        click.echo(f"valid: {', '.join(map(str, files))}")


@click.command(short_help="Print a node's effective configuration, after overrides.")
@_files_argument
@node_options
@_format_option("yaml", "json")
def render(
    files: tuple[Path, ...], node: str | None, labels: tuple[str, ...], output_format: str
) -> None:
    """Print the effective configuration of a node, after overrides.

    One key per module, in the document's own shape, defaults filled in; secrets masked.
    """
    document = _load_or_exit(files, output_format)
    console.print_notes(document.notes)
    config = _node_config(document, node, labels)
    data = config.dump()
    if output_format == "json":
        console.print_json(data)
    else:
        import yaml

        for module, applied in config.overrides.items():
            click.echo(f"# {module}: {applied.description}")
        # width: long keys and values stay on one line (no folding).
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                                  width=float("inf")).rstrip() if data else "{}")


@click.command(short_help="Show what apply would change on this host; touch nothing.")
@_files_argument
@node_options
@host_options
@_format_option("text", "json")
@click.option("-v", "--verbose", is_flag=True, help="Also list what is already right, and why.")
@click.option("--diff", is_flag=True,
              help="Show each file's content change line by line (units, drop-ins, sudoers, "
              "sources). Files that are not world-readable are never shown.")
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 0 when nothing would change, 2 when something would, 1 on any error "
              "(an invalid document included): for scripts and CI.")
def plan(
    files: tuple[Path, ...], node: str | None, labels: tuple[str, ...], root: Path,
    proc_sys: Path, output_format: str, verbose: bool, diff: bool, detailed_exitcode: bool,
) -> None:
    """Show what apply would change on this host, touching nothing.

    Each change shows the value before and after, and what carrying it out costs the node's
    workloads when that is more than nothing: [restart:<unit>] (services restart),
    [reload:<unit>] or [reboot] (only a reboot makes it take effect). The last line gives the
    whole plan's disruption, the strongest of its changes: none < reload < restart < reboot
    (JSON: `disruption` on each change and module, and at the top).

    Exits 1 if some module cannot be applied, 2 if the document is invalid (with
    --detailed-exitcode: 0 / 2 / 1, see below).
    """
    from divingbell.commands.output import plan_text
    from divingbell.core.engine.runner import plan_node

    invalid_exit = console.EXIT_FAILED if detailed_exitcode else console.EXIT_INVALID
    resolved = _resolve_or_exit(files, node, labels, root, output_format, invalid_exit)
    if "sysctl" in resolved.config.modules:
        _warn_live_kernel(root, proc_sys, output_format)
    result = console.guarded(lambda: plan_node(console.host(root, proc_sys), resolved.config),
                             output_format, resolved.config.node)
    if output_format == "json":
        console.print_json(_plan_json(result, resolved.revision, resolved.notes, diff))
    else:
        click.echo(plan_text(result, verbose=verbose, diff=diff))
    if result.errors:
        sys.exit(console.EXIT_FAILED)
    if detailed_exitcode and any(c.changes_host for c in result.changes):
        sys.exit(console.EXIT_CHANGES)
    sys.exit(0)


@click.command(short_help="Converge this host to the document.")
@_files_argument
@node_options
@host_options
@_format_option("text", "json")
@click.option("--lock-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for another divingbell run on this host to finish.")
@click.option("--allow-empty", is_flag=True,
              help="Accept a document without `conf:` (an empty file) as \"nothing on this "
              "node\": divingbell restores every original it holds.")
@click.option("--adopt", is_flag=True,
              help="The journal is gone but divingbell's own files are on the host: start a "
              "fresh journal that owns them (see docs/hardening.md).")
def apply(
    files: tuple[Path, ...], node: str | None, labels: tuple[str, ...], root: Path,
    proc_sys: Path, output_format: str, lock_timeout: float, allow_empty: bool, adopt: bool,
) -> None:
    """Converge this host to the document, printing each change as it is made.

    Settings that left the document get their original values back. If a module fails
    midway, what this run changed in that module is rolled back. You get what the document
    says, however much it removes (`divingbell plan` shows it first); only a file without
    `conf:` is refused unless --allow-empty. SIGTERM or Ctrl-C stops between two changes,
    records what was done and exits 130/143. Exits 0 when the host matches the document, 1 on
    failure, 2 for an invalid document, 3 if another run holds the lock.
    """
    with _usage_errors():
        run_apply(ApplyOptions(files, node, labels, root, proc_sys, output_format,
                               lock_timeout, allow_empty, adopt))


@click.command(short_help="What divingbell owns here, and the last apply's outcome.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default="/", show_default=True, envvar="DIVINGBELL_ROOT",
              help="The host's root filesystem (divingbell's state is in its /var/lib/divingbell).")
@click.option("--kube", is_flag=True,
              help="Instead: every node's revision, state and reason, from the cluster.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False), envvar="KUBECONFIG",
              help="For --kube: which cluster. Default: in-cluster, else ~/.kube/config.")
@_format_option("text", "json")
def status(root: Path, kube: bool, kubeconfig: str | None, output_format: str) -> None:
    """Show what divingbell owns on this host and the outcome of the last apply.

    Every setting, file, user, package and script divingbell owns, with the original it puts
    back. With --kube, show the fleet instead: one line per node from its divingbell.io/
    annotations, which every agent keeps current.
    """
    if kube:
        _kube_status(kubeconfig, output_format)
        return
    from divingbell.commands.output import status_text
    from divingbell.core.engine.journal import FileJournalStore
    from divingbell.core.host import Host

    store = FileJournalStore(Host(root=root))
    journal = console.guarded(lambda: store.load().as_dict(), output_format)
    last_run = console.guarded(store.load_last_run, output_format)
    if output_format == "json":
        console.print_json({"root": str(root), "journal": journal, "last_run": last_run})
    else:
        click.echo(status_text(str(root), journal, last_run))


def _kube_status(kubeconfig: str | None, output_format: str) -> None:
    from divingbell.kube import KubeError, LightkubeApi

    try:
        nodes = LightkubeApi(kubeconfig).nodes()
    except KubeError as exc:
        console.fail(str(exc), output_format, console.EXIT_FAILED)
    except Exception as exc:  # lightkube's ConfigError: no in-cluster config and no kubeconfig
        if type(exc).__name__ != "ConfigError":
            raise
        console.fail("no Kubernetes configuration found: pass --kubeconfig FILE or set KUBECONFIG "
              "(inside a pod the service account is used)", output_format, console.EXIT_FAILED)
    rows = [{"node": n.name, "revision": n.status.get("revision", ""),
             "state": n.status.get("state", "(no agent)"), "reason": n.status.get("reason", "")}
            for n in nodes]
    if output_format == "json":
        console.print_json(rows)
        return
    from divingbell.commands.output import table

    click.echo(table(["NODE", "REVISION", "STATE", "REASON"],
                     [[r["node"], r["revision"], r["state"], r["reason"]] for r in rows]))
    degraded = sum(1 for r in rows if r["state"] == "Degraded")
    click.echo(f"{len(rows)} node(s), {degraded} degraded.")
    sys.exit(console.EXIT_FAILED if degraded else 0)


def _check_namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from divingbell.agent.manifests import check_namespace

    try:
        return check_namespace(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def check_image_option(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> str | None:
    from divingbell.agent.manifests import check_image

    try:
        return None if value is None else check_image(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(short_help="Print the Kubernetes objects that run the agent on every node.")
@_files_argument
@click.option("--namespace", default="divingbell", show_default=True, callback=_check_namespace,
              help="Where the agent runs (a DNS label; created, labelled for privileged pods).")
@click.option("--image", default=None, metavar="IMAGE", callback=check_image_option,
              help="The agent image. Default: divingbell:<this version> (see deploy/).")
@click.option("--max-unavailable", default="1", show_default=True, metavar="N|P%",
              help="Nodes converging a new document at once; a failing node holds the rest.")
@click.option("--document-secret", metavar="NAME",
              help="Mount this existing Secret (one key per file name) instead of printing one. "
              "Give each document version a new name, or nodes cannot tell versions apart.")
@click.option("--previous", "previous", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The document the nodes run now (repeat for several files): show on stderr "
              "what the new one removes, per kind of node and per module. One that removes "
              "more than it keeps on some node is refused (exit 1) unless --allow-removals.")
@click.option("--allow-removals", is_flag=True,
              help="With --previous: print the objects even if the new document removes more "
              "than it keeps on some node.")
def manifests(files: tuple[Path, ...], namespace: str, image: str | None,
              max_unavailable: str, document_secret: str | None, previous: tuple[Path, ...],
              allow_removals: bool) -> None:
    """Print the Kubernetes objects that run the agent on every node, as YAML.

    The document files are validated first and go into an immutable Secret named by their
    digest (divingbell-document-<digest>), which the DaemonSet's pod template mounts. So
    `kubectl apply` of a changed document is a rolling update, node by node, gated by each
    node's readiness (= converged without error); a node sees the new document only when its
    pod is replaced, and `kubectl rollout undo` mounts the previous Secret again. Old document
    Secrets carry the label divingbell.io/document=true: see the README to prune them.

    \b
      divingbell manifests site.yaml --image registry.example/divingbell:1.0 \\
          | kubectl apply -f -
      kubectl -n divingbell rollout status daemonset/divingbell
    """
    from divingbell.agent.manifests import DEFAULT_IMAGE, build, parse_max_unavailable, to_yaml

    document = _load_or_exit(files)
    if previous:
        _show_removals(_load_or_exit(previous), document, allow_removals)
    try:
        limit = parse_max_unavailable(max_unavailable)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-unavailable") from None
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise click.BadParameter("document files need distinct names (they become Secret "
                                 "keys)", param_hint="FILES")
    try:
        objects = build({f.name: f.read_text() for f in files}, namespace=namespace,
                        image=image or DEFAULT_IMAGE, max_unavailable=limit,
                        existing_secret=document_secret)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--document-secret") from None
    if document_secret is None:
        from divingbell.agent.manifests import secret_size_problem, unreadable_reason

        size = sum(len(f.read_bytes()) for f in files)
        error, note = secret_size_problem(size)
        if error:
            click.echo(f"error: {error}", err=True)
            sys.exit(console.EXIT_INVALID)
        if note:
            click.echo(f"note: {note}", err=True)

        for f in files:
            reason = unreadable_reason(f.read_text())
            if reason:
                click.echo(f"note: {f}: {reason}, so the output has no readable copy of "
                           "it beside the Secret (whose data is base64)", err=True)
    click.echo(to_yaml(objects), nl=False)


def _show_removals(previous: ValidDocument, document: ValidDocument, allowed: bool) -> None:
    """What `document` removes against `previous`, per kind of node (host and label
    overrides, any other node), on stderr; exit 1 when it removes more than it keeps on one
    of them and that was not `allowed`."""
    from divingbell.commands.fleetapi import removal_lines
    from divingbell.fleet.configdiff import override_targets, removals

    beyond = []
    for target in override_targets(previous, document):
        found = removals(previous, document, target)
        if not found.modules:
            continue
        for line in removal_lines({"name": target.name, **found.as_dict()}):
            click.echo(line, err=True)
        if found.exceeds_kept:
            beyond.append(target.name)
    if beyond and not allowed:
        click.echo(f"error: this document removes more than it keeps on {', '.join(beyond)}; "
                   "nothing was printed. Check what it removes, then run again with "
                   "--allow-removals", err=True)
        sys.exit(console.EXIT_FAILED)


@click.command(short_help="Print the document's JSON Schema, for editors and CI.")
def schema() -> None:
    """Print the document's JSON Schema, for editors and CI checks."""
    from divingbell.core.document.schema import Document

    schema_doc = Document.model_json_schema(mode="validation")
    schema_doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema_doc["title"] = "divingbell document"
    console.print_json(schema_doc)


# helpers ------------------------------------------------------------------------------------

def _load(files: tuple[Path, ...], allow_empty: bool = False) -> ValidDocument:
    from divingbell.core.document.api import load_document

    return load_document(files, allow_empty=allow_empty)


def _load_or_exit(files: tuple[Path, ...], output_format: str = "text",
                  exit_code: int = console.EXIT_INVALID,
                  allow_empty: bool = False) -> ValidDocument:
    from divingbell.core.errors import DocumentError

    try:
        return _load(files, allow_empty)
    except DocumentError as exc:
        console.document_error(exc, output_format, exit_code)


def _warn_live_kernel(root: Path, proc_sys: Path, output_format: str) -> None:
    if output_format == "text" and root.resolve() != Path("/") and \
            proc_sys == Path("/proc/sys"):
        click.echo(f"note: files act on {root}, but sysctls on the running kernel's /proc/sys "
                   "(net.* within this network namespace): --root does not move them; "
                   "--proc-sys does", err=True)


def _plan_json(plan: Plan, revision: str, notes: list[str], diff: bool) -> dict[str, Any]:
    from divingbell.commands.output import file_diff

    data = {"node": plan.node, "revision": revision,
            "result": "failed" if plan.errors else (
                "changes" if any(c.changes_host for c in plan.changes) else "ok"),
            **plan.as_dict(), "notes": notes}
    if diff:
        for module, module_plan in zip(data["modules"], plan.modules, strict=True):
            for shown, change in zip(module["changes"], module_plan.changes, strict=True):
                text = file_diff(change)
                if text is not None:
                    shown["diff"] = text
    return data


def _node_config(document: ValidDocument, node: str | None, labels: tuple[str, ...]) -> NodeConfig:
    from divingbell.core.document.api import node_config

    return node_config(document, node_name(node), parse_labels(labels))


# Kubernetes label syntax: an optional DNS-subdomain prefix and "/", a name of at most 63
# characters; values likewise (or empty).
# (Patterns, not compiled objects: compiled on first use, not on every start.)
_LABEL_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_LABEL_PREFIX = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


@contextmanager
def _usage_errors() -> Iterator[None]:
    """A bad --node or --label, as click reports a bad option (exit 2)."""
    try:
        yield
    except console.BadArgument as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{exc.option}'") from None


def node_name(node: str | None) -> str:
    with _usage_errors():
        return console.node_name(node)


def parse_labels(labels: tuple[str, ...]) -> Mapping[str, str]:
    with _usage_errors():
        return console.parse_labels(labels)


def _resolve_or_exit(files: tuple[Path, ...], node: str | None, labels: tuple[str, ...],
                     root: Path, output_format: str, exit_code: int) -> Resolved:
    with _usage_errors():
        return console.resolve_or_exit(files, node, labels, root, output_format, exit_code)


HOST_COMMANDS = [validate, render, plan, apply, status, manifests, schema]
