"""`divingbell node`: the operator's maintenance commands (cordon, drain, uncordon, reboot,
status, release, decommission). They run the same steps as the agent's maintenance sequence,
recording who did what and why on the Node."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from divingbell.kube import MaintenanceKube
    from divingbell.maintenance.slots import Slot, SlotBackend

F = TypeVar("F", bound=Callable[..., Any])
EXIT_FAILED = 1


def _kube_options(func: F) -> F:
    func = click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
                        envvar="KUBECONFIG", help="Which cluster (default: in-cluster, then "
                        "~/.kube/config).")(func)
    return func


def _slot_options(func: F) -> F:
    func = click.option("--namespace", default="divingbell", show_default=True,
                        envvar="DIVINGBELL_NAMESPACE",
                        help="Where the agents keep their slot Leases.")(func)
    func = click.option("--server", metavar="URL", envvar="DIVINGBELL_FLEET_URL",
                        help="Use the fleet service's slots instead of Kubernetes Leases.")(func)
    return click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
                        envvar="DIVINGBELL_FLEET_TOKEN_FILE",
                        help="The fleet service token (admin, for release), 0600.")(func)


def _format_option(func: F) -> F:
    return click.option("--format", "output_format", type=click.Choice(["text", "json"]),
                        default="text", show_default=True,
                        help="Output for people or for scripts.")(func)


def _reason_option(default: str) -> Callable[[F], F]:
    return click.option("--reason", default=default, show_default=True,
                        help="Why: recorded on the Node with who did it.")


def _who_option(func: F) -> F:
    return click.option("--as", "who", metavar="NAME",
                        help="Who to record (default: USER@HOST).")(func)


@click.group()
def node() -> None:
    """Node maintenance by hand: the steps the agent runs on its own, recorded on the Node.

    \b
      divingbell node status
      divingbell node cordon node3 --reason "disk swap"
      divingbell node drain node3 --timeout 10m
      divingbell node uncordon node3
      divingbell node reboot node3 --reason "firmware 2.1"
      divingbell node release default/0 --yes
      divingbell node decommission node3 --yes

    A cordon records who placed it and why (divingbell.io/cordoned-by, cordon-reason);
    uncordon never lifts someone else's cordon unless --force.
    """


@node.command()
@click.argument("name")
@_reason_option("maintenance")
@_who_option
@_kube_options
def cordon(name: str, reason: str, who: str | None, kubeconfig: str | None) -> None:
    """Mark NAME unschedulable, recording who and why (an existing cordon is left alone)."""
    from divingbell.maintenance import operator

    click.echo(_run(lambda: operator.cordon(_kube(kubeconfig), name,
                                            who or operator.operator_name(), reason)))


@node.command()
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Lift the cordon even if someone else (or the agent) placed it.")
@_who_option
@_kube_options
def uncordon(name: str, force: bool, who: str | None, kubeconfig: str | None) -> None:
    """Make NAME schedulable again, if you cordoned it (or with --force)."""
    from divingbell.maintenance import operator

    click.echo(_run(lambda: operator.uncordon(_kube(kubeconfig), name,
                                              who or operator.operator_name(), force=force)))


def _drain_options(func: F) -> F:
    from divingbell.core.document.schema import parse_duration

    def duration(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    func = click.option("--timeout", default="15m", show_default=True, callback=duration,
                        help="Give up (or --force) after this long.")(func)
    func = click.option("--grace-period", default="60s", show_default=True,
                        callback=duration, help="Each pod's termination grace period.")(func)
    func = click.option("--pod-selector", default="", metavar="SELECTOR",
                        help="Evict only pods matching this label selector.")(func)
    func = click.option("--interval", default="2s", show_default=True, callback=duration,
                        help="How often to look at the pods while draining.")(func)
    return click.option("--force", "force_on_timeout", is_flag=True,
                        help="On timeout, delete the pods that are left (bypasses their "
                        "PodDisruptionBudgets).")(func)


@node.command()
@click.argument("name")
@_drain_options
@_reason_option("drain")
@_who_option
@_kube_options
@_format_option
def drain(name: str, timeout: float, grace_period: float, pod_selector: str, interval: float,
          force_on_timeout: bool, reason: str, who: str | None, kubeconfig: str | None,
          output_format: str) -> None:
    """Cordon NAME and evict its pods through the Eviction API (PodDisruptionBudgets are
    respected; DaemonSet and mirror pods stay). Exits 1 naming the pods and budgets that
    block if the drain does not finish in time; the node stays cordoned."""
    from divingbell.maintenance import operator

    kube = _kube(kubeconfig)
    who = who or operator.operator_name()
    say = click.echo if output_format == "text" else (lambda _: None)
    say(_run(lambda: operator.cordon(kube, name, who, reason)))
    report = _run(lambda: operator.drain(
        kube, name, grace_seconds=round(grace_period), timeout=timeout,
        pod_selector=pod_selector, force_on_timeout=force_on_timeout, poll=interval,
        progress=say))
    _print_drain(name, report, output_format)
    if not report.done and not force_on_timeout:
        sys.exit(EXIT_FAILED)


@node.command()
@click.argument("name")
@_reason_option("requested by an operator")
@_who_option
@_kube_options
def reboot(name: str, reason: str, who: str | None, kubeconfig: str | None) -> None:
    """Ask NAME's agent to reboot it: the full sequence (window, blockers, slot, cordon,
    drain, reboot, health, uncordon), as for /run/reboot-required."""
    from divingbell.maintenance import operator

    click.echo(_run(lambda: operator.request_reboot(_kube(kubeconfig), name,
                                                    who or operator.operator_name(), reason)))


@node.command()
@_kube_options
@_slot_options
@_format_option
@click.option("--no-kube", is_flag=True, help="Only the slots (hosts without Kubernetes).")
def status(kubeconfig: str | None, namespace: str, server: str | None,
           token_file: str | None, output_format: str, no_kube: bool) -> None:
    """Each node's maintenance state, and who holds each slot and since when."""
    from divingbell.maintenance import operator

    rows = [] if no_kube else _run(lambda: operator.node_rows(_kube(kubeconfig)))
    kube = None if no_kube or server else _kube(kubeconfig)
    slots = _run(lambda: _slots(kube, namespace, server, token_file).list())
    if output_format == "json":
        click.echo(json.dumps({"nodes": [vars(r) for r in rows],
                               "slots": [_slot_dict(s) for s in slots]}, indent=2))
        return
    if rows:
        click.echo(_table(["NODE", "MAINTENANCE", "CORDONED BY", "SLOT", "REASON"],
                          [[r.node, r.maintenance, r.cordoned_by or "-", r.slot or "-",
                            r.reason or r.outcome] for r in rows]))
        click.echo("")
    if slots:
        click.echo(_table(["SLOT", "HOLDER", "SINCE", "EXPIRES"],
                          [[s.name, s.holder or "(free)", _stamp(s.since),
                            _stamp(s.expires_at)] for s in slots]))
    else:
        click.echo("No maintenance slots exist yet (created when a node first needs one).")


@node.command()
@click.argument("slot")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_kube_options
@_slot_options
def release(slot: str, yes: bool, kubeconfig: str | None, namespace: str, server: str | None,
            token_file: str | None) -> None:
    """Free a stuck maintenance SLOT (GROUP/INDEX, as `status` shows it).

    Only for a holder that is gone for good: if it is still in maintenance, another node
    may start its own and two nodes will be down at once. A dead holder's slot frees itself
    when its TTL runs out."""
    kube = None if server else _kube(kubeconfig)
    backend = _slots(kube, namespace, server, token_file)
    current = next((s for s in _run(backend.list) if s.name == slot), None)
    if current is None:
        raise click.ClickException(f"no slot {slot!r} (see `divingbell node status`)")
    if current.holder is None:
        click.echo(f"{slot} is already free.")
        return
    click.echo(f"WARNING: {slot} is held by {current.holder} since {_stamp(current.since)}, "
               f"expiring {_stamp(current.expires_at)}. If {current.holder} is still in "
               "maintenance, releasing lets another node start: two nodes down at once.",
               err=True)
    if not yes and not click.confirm("Release it?", err=True):
        sys.exit(EXIT_FAILED)
    before = _run(lambda: backend.force_release(slot))
    click.echo(f"released {slot} (was held by {before.holder if before else '?'})")


@node.command()
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_drain_options
@_reason_option("decommissioned")
@_who_option
@_kube_options
@_slot_options
@_format_option
def decommission(name: str, yes: bool, timeout: float, grace_period: float,
                 pod_selector: str, interval: float, force_on_timeout: bool, reason: str,
                 who: str | None, kubeconfig: str | None, namespace: str, server: str | None,
                 token_file: str | None, output_format: str) -> None:
    """Drain NAME, then delete its Node object, and report what was removed. Nothing is
    deleted if the drain does not finish (unless --force)."""
    from divingbell.maintenance import operator

    kube = _kube(kubeconfig)
    who = who or operator.operator_name()
    if not yes and not click.confirm(f"Drain and delete node {name}?", err=True):
        sys.exit(EXIT_FAILED)
    say = click.echo if output_format == "text" else (lambda _: None)
    say(_run(lambda: operator.cordon(kube, name, who, f"decommission: {reason}")))
    report = _run(lambda: operator.drain(
        kube, name, grace_seconds=round(grace_period), timeout=timeout,
        pod_selector=pod_selector, force_on_timeout=force_on_timeout, poll=interval,
        progress=say))
    if not report.done and not force_on_timeout:
        _print_drain(name, report, output_format)
        click.echo(f"not deleting {name}: the drain did not finish", err=True)
        sys.exit(EXIT_FAILED)
    released = []
    backend = _slots(None if server else kube, namespace, server, token_file)
    for slot in _run(backend.list):
        if slot.holder == name:
            _run(functools.partial(backend.force_release, slot.name))
            released.append(slot.name)
    _run(lambda: kube.delete_node(name))
    result = {"node": name, "deleted": True, "evicted": report.evicted,
              "force_deleted": report.deleted,
              "left_with_the_node": [f"{p} ({why})" for p, why in report.skipped],
              "released_slots": released}
    if output_format == "json":
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"removed Node {name} ({reason}, by {who})")
    click.echo(f"  evicted: {', '.join(report.evicted) or 'nothing'}")
    if report.deleted:
        click.echo(f"  deleted after the timeout: {', '.join(report.deleted)}")
    if report.skipped:
        click.echo("  not evicted, gone with the node: "
                   + ", ".join(f"{p} ({why})" for p, why in report.skipped))
    if released:
        click.echo(f"  released its slot(s): {', '.join(released)}")


# helpers ------------------------------------------------------------------------------------

def _kube(kubeconfig: str | None) -> MaintenanceKube:
    from divingbell.kube import LightkubeApi

    try:
        return LightkubeApi(kubeconfig)
    except Exception as exc:  # lightkube's config errors share no public base
        raise click.ClickException(f"cannot configure the Kubernetes client: {exc}") from None


def _slots(kube: MaintenanceKube | None, namespace: str, server: str | None,
           token_file: str | None) -> SlotBackend:
    from divingbell.fleet.client import FleetApiError, FleetClient, read_token
    from divingbell.maintenance.slots import FleetSlots, LeaseSlots

    if server:
        try:
            token = (read_token(token_file) if token_file
                     else os.environ.get("DIVINGBELL_FLEET_TOKEN"))
            return FleetSlots(FleetClient(server, token))
        except (FleetApiError, OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    assert kube is not None
    return LeaseSlots(kube, namespace)


T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Turn the errors an operator can act on into one clear line (exit 1)."""
    from divingbell.kube import KubeError
    from divingbell.maintenance.operator import OperatorError
    from divingbell.maintenance.slots import SlotError

    try:
        return action()
    except (KubeError, OperatorError, SlotError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


def _print_drain(name: str, report: Any, output_format: str) -> None:
    if output_format == "json":
        click.echo(json.dumps({"node": name, "drained": report.done,
                               "evicted": report.evicted, "force_deleted": report.deleted,
                               "blocking": [{"pod": p, "budgets": b}
                                            for p, b in report.blocking],
                               "skipped": [{"pod": p, "why": w} for p, w in report.skipped],
                               "seconds": round(report.seconds, 1)}, indent=2))
        return
    if report.done:
        click.echo(f"{name} drained in {report.seconds:.0f}s: evicted "
                   f"{len(report.evicted)} pod(s), left {len(report.skipped)} "
                   "(DaemonSet, mirror or finished).")
        return
    click.echo(f"{name} NOT drained after {report.seconds:.0f}s; still there:", err=True)
    for pod, budgets in report.blocking:
        protected = (f"protected by PodDisruptionBudget {', '.join(budgets)}" if budgets
                     else "still terminating")
        click.echo(f"  {pod}: {protected}", err=True)
    click.echo(f"The node stays cordoned. Retry, use --force, or `divingbell node uncordon "
               f"{name}`.", err=True)


def _slot_dict(slot: Slot) -> dict[str, Any]:
    return {"slot": slot.name, "holder": slot.holder, "since": _stamp(slot.since),
            "expires_at": _stamp(slot.expires_at)}


def _stamp(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)
