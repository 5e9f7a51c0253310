"""What `divingbell node ...` does, for an operator at a terminal: the same steps as the agent's
sequence (cordon with a record of who and why, drain through the Eviction API, uncordon only
one's own cordon), run by hand. The CLI prints; this module decides and acts."""

from __future__ import annotations

import getpass
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from divingbell.kube import (
    EvictionRefused,
    KubeError,
    KubeNotFound,
    MaintenanceKube,
    NodeState,
)
from divingbell.maintenance import decide
from divingbell.maintenance.sequence import PHASE_ANNOTATION, REQUEST_ANNOTATION

log = logging.getLogger("divingbell.node")


class OperatorError(Exception):
    """The step was refused or failed; the message says why and what to do."""


def operator_name() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def cordon(kube: MaintenanceKube, node: str, who: str, reason: str) -> str:
    state = _state(kube, node)
    if state.unschedulable:
        owner = state.annotations.get(decide.CORDONED_BY, "someone else (no divingbell record)")
        return f"{node} is already cordoned by {owner}; left as it is"
    kube.patch_node(node, unschedulable=True,
                    annotations=decide.cordon_annotations(who, reason))
    _event(kube, node, "Cordoned", f"cordoned by {who}: {reason}")
    return f"{node} cordoned by {who}: {reason}"


def uncordon(kube: MaintenanceKube, node: str, who: str, *, force: bool) -> str:
    state = _state(kube, node)
    gate = decide.may_uncordon(state.unschedulable, state.annotations, who, force=force)
    if not gate.go:
        if not state.unschedulable:
            return f"{node} is not cordoned"
        raise OperatorError(f"not uncordoning {node}: {gate.reason}")
    kube.patch_node(node, unschedulable=False,
                    annotations={decide.CORDONED_BY: None, decide.CORDON_REASON: None})
    _event(kube, node, "Uncordoned", f"uncordoned by {who} ({gate.reason})")
    return f"{node} uncordoned ({gate.reason})"


@dataclass
class DrainReport:
    evicted: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    blocking: list[tuple[str, list[str]]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        return not self.blocking


def drain(kube: MaintenanceKube, node: str, *, grace_seconds: int, timeout: float,
          pod_selector: str = "", force_on_timeout: bool = False, poll: float = 2.0,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep,
          progress: Callable[[str], None] = lambda _: None) -> DrainReport:
    """Evict until nothing evictable is left or `timeout`; the node must be cordoned first."""
    report, started = DrainReport(), clock()
    asked: set[str] = set()
    forced = False
    while True:
        plan = decide.plan_eviction(kube.pods_on_node(node), pod_selector)
        report.skipped = plan.skipped
        if not plan.remaining:
            report.blocking, report.seconds = [], clock() - started
            return report
        if clock() - started >= timeout and not forced:
            decision = decide.on_drain_timeout("force" if force_on_timeout else "stop",
                                               plan.remaining, kube.budgets(), timeout, node)
            report.blocking, report.seconds = decision.blocking, clock() - started
            if not force_on_timeout:
                _event(kube, node, "DrainTimeout", decision.message, warning=True)
                return report
            forced = True
            for pod in plan.evict:
                kube.delete_pod(pod.namespace, pod.name, grace_seconds)
                report.deleted.append(pod.ref)
                progress(f"deleted {pod.ref} (forced after the timeout)")
        for pod in plan.evict if not forced else []:
            try:
                kube.evict(pod.namespace, pod.name, grace_seconds)
            except EvictionRefused:
                if pod.ref not in asked:
                    progress(f"waiting: evicting {pod.ref} would violate its "
                             "PodDisruptionBudget")
                asked.add(pod.ref)
                continue
            report.evicted.append(pod.ref)
            progress(f"evicted {pod.ref}")
        sleep(poll)


def request_reboot(kube: MaintenanceKube, node: str, who: str, reason: str) -> str:
    _state(kube, node)
    kube.patch_node(node, annotations={REQUEST_ANNOTATION: f"{who}: {reason}"[:256]})
    _event(kube, node, "RebootRequested", f"reboot requested by {who}: {reason}")
    return (f"reboot of {node} requested; its agent reboots it in its window when a slot is "
            "free (if its document enables `when: [requested]`). Follow it with "
            "`divingbell node status`.")


@dataclass(frozen=True)
class NodeRow:
    node: str
    maintenance: str
    reason: str
    cordoned_by: str
    slot: str
    outcome: str


def node_rows(kube: MaintenanceKube) -> list[NodeRow]:
    rows = []
    for state in kube.node_states():
        a = state.annotations
        cordoned = ""
        if state.unschedulable:
            cordoned = a.get(decide.CORDONED_BY, "someone (no divingbell record)")
        rows.append(NodeRow(state.name, a.get(PHASE_ANNOTATION, "-"),
                            a.get(f"{PHASE_ANNOTATION}-reason", ""), cordoned,
                            a.get(f"{PHASE_ANNOTATION}-slot", ""),
                            a.get(f"{PHASE_ANNOTATION}-outcome", "")))
    return rows


def _state(kube: MaintenanceKube, node: str) -> NodeState:
    try:
        return kube.node_state(node)
    except KubeNotFound:
        raise OperatorError(f"no node {node!r} in this cluster") from None


def _event(kube: MaintenanceKube, node: str, reason: str, message: str, *,
           warning: bool = False) -> None:
    try:
        kube.node_event(node, reason, message, warning=warning)
    except KubeError as exc:  # the step itself is done; the Event is the record of it
        log.warning("cannot record event %s on %s: %s", reason, node, exc)
