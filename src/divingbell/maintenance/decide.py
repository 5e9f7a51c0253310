"""The decisions of node maintenance, as pure functions of what was observed and the clock.

Nothing here reads a host or calls an API: the sequence (`sequence.py`) observes, asks these
functions, and acts. The phases and their allowed transitions are data, so an illegal jump is an
error, not a silent overwrite.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from divingbell.core.document.schema import WEEKDAYS, MaintenanceWindow
from divingbell.core.document.selectors import from_label_selector, parse_selector
from divingbell.kube import BudgetView, PodView

# Phases: the value of the node's `divingbell.io/maintenance` annotation. ---------------------

IDLE = "idle"
"""Nothing to do (or the last maintenance finished: see the outcome)."""
WAITING = "waiting"
"""A reboot is needed; waiting for the window, a blocker, a slot, or a retry time."""
CORDONING = "cordoning"
"""A slot is held; cordoning the node (only if it was schedulable)."""
DRAINING = "draining"
"""Evicting pods through the Eviction API and waiting for them to be gone."""
REBOOTING = "rebooting"
"""The reboot was asked for; the boot id before it is recorded."""
VERIFYING = "verifying"
"""Booted again (a new boot id): waiting for the node to be Ready and converged."""
FAILED = "failed"
"""The node did not come back healthy in time: it stays cordoned and keeps its slot, so the
rollout stops here until it recovers or an operator releases the slot."""

TRANSITIONS: dict[str, frozenset[str]] = {
    IDLE: frozenset({WAITING, CORDONING}),
    WAITING: frozenset({IDLE, CORDONING}),
    CORDONING: frozenset({DRAINING, WAITING}),
    DRAINING: frozenset({REBOOTING, WAITING}),  # waiting again: the drain was aborted
    REBOOTING: frozenset({VERIFYING, WAITING}),  # waiting again: the host did not reboot
    VERIFYING: frozenset({IDLE, FAILED}),
    FAILED: frozenset({IDLE}),
}
PHASES = tuple(TRANSITIONS)


class IllegalTransition(Exception):
    pass


def check_transition(current: str, new: str) -> None:
    if new != current and new not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"maintenance cannot go from {current!r} to {new!r}")


# The window ----------------------------------------------------------------------------------

def in_window(window: MaintenanceWindow | None, now: dt.datetime) -> bool:
    """Whether maintenance may start at `now` (aware), judged on the zone's wall clock.

    `days` are the days a window opens; a window whose end is before its start runs past
    midnight into the next day. On the wall clock, a DST jump is handled as people read it: a
    window 02:00-05:00 on the night clocks go forward opens at 03:00 (02:xx never happens), and
    on the night they go back it lasts an hour longer.
    """
    if window is None:
        return True
    local = now.astimezone(ZoneInfo(window.timezone))
    start, end, today = _minutes(window.start), _minutes(window.end), WEEKDAYS[local.weekday()]
    yesterday = WEEKDAYS[(local.weekday() - 1) % 7]
    minute = local.hour * 60 + local.minute
    if start < end:
        return today in window.days and start <= minute < end
    return (today in window.days and minute >= start) or (yesterday in window.days
                                                           and minute < end)


def describe_window(window: MaintenanceWindow | None) -> str:
    if window is None:
        return "any time"
    days = ",".join(window.days) if len(window.days) < 7 else "every day"
    return f"{days} {window.start}-{window.end} {window.timezone}"


def _minutes(clock_time: str) -> int:
    hours, minutes = clock_time.split(":")
    return int(hours) * 60 + int(minutes)


# Triggers and blockers -------------------------------------------------------------------------

def triggers(when: Iterable[str], *, reboot_required: bool, requested: str | None) -> list[str]:
    """Why this node needs a reboot now, among the triggers the document enables."""
    found = []
    if "reboot-required" in when and reboot_required:
        found.append("reboot-required")
    if "requested" in when and requested:
        found.append(f"requested ({requested})")
    return found


def blocking_pods(pods: Sequence[PodView], selector: str) -> list[str]:
    """Pods matching the blocker selector that run (or are about to run) on the node."""
    wanted = parse_selector(selector)
    return [p.ref for p in pods if p.phase in ("Running", "Pending") and not p.deleting
            and wanted.matches(p.labels)]


def firing_alerts(alerts: Sequence[Mapping[str, object]], pattern: str) -> list[str]:
    """Names of firing alerts (Prometheus /api/v1/alerts) whose alertname matches."""
    regex = re.compile(pattern)
    names = set()
    for alert in alerts:
        labels = alert.get("labels")
        name = str(labels.get("alertname", "")) if isinstance(labels, Mapping) else ""
        if alert.get("state") == "firing" and regex.search(name):
            names.add(name)
    return sorted(names)


@dataclass(frozen=True)
class Gate:
    go: bool
    reason: str


def may_start(found_triggers: Sequence[str], *, window_open: bool, window: str,
              blockers: Sequence[str], retry_at: float, now: float) -> Gate:
    """Whether to go for a slot. Blockers are checked here, before any lock is taken."""
    if not found_triggers:
        return Gate(False, "no reboot needed")
    if now < retry_at:
        return Gate(False, f"retrying in {int(retry_at - now)}s after an aborted attempt")
    if not window_open:
        return Gate(False, f"outside the maintenance window ({window})")
    if blockers:
        return Gate(False, "blocked by " + ", ".join(blockers))
    return Gate(True, ", ".join(found_triggers))


# Slots ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotState:
    """One slot as last read: absent (never created), free, or held until `expires_at`."""

    index: int
    exists: bool
    holder: str | None = None
    expires_at: float | None = None

    def free(self, now: float) -> bool:
        return self.holder is None or (self.expires_at is not None and now >= self.expires_at)


@dataclass(frozen=True)
class Claim:
    index: int
    kind: str  # "renew" (already mine), "create", "take" (free), "takeover" (expired)
    previous: str | None = None


def plan_claim(slots: Sequence[SlotState], holder: str, now: float) -> Claim | None:
    """Which slot to claim: the one already held, else the first absent, free or expired one.
    None: every slot is held by a live holder."""
    for slot in slots:
        if slot.holder == holder:
            return Claim(slot.index, "renew")
    for slot in slots:
        if not slot.exists:
            return Claim(slot.index, "create")
        if slot.holder is None:
            return Claim(slot.index, "take")
        if slot.free(now):
            return Claim(slot.index, "takeover", slot.holder)
    return None


def slot_group(group_by: str | None, labels: Mapping[str, str]) -> str:
    """The semaphore this node uses: one per value of the `group_by` label, else `default`."""
    if group_by is None:
        return "default"
    return labels.get(group_by) or "default"


def lease_name(group: str, index: int) -> str:
    """A Lease name (DNS-1123) for a slot; a group that is not a valid name gets a digest."""
    clean = re.sub(r"[^a-z0-9-]+", "-", group.lower()).strip("-")[:40] or "group"
    if clean != group:
        clean = f"{clean}-{hashlib.sha256(group.encode()).hexdigest()[:8]}"
    return f"divingbell-slot-{clean}-{index}"


# Cordon ownership ------------------------------------------------------------------------------

CORDONED_BY = "divingbell.io/cordoned-by"
CORDON_REASON = "divingbell.io/cordon-reason"
AGENT = "divingbell-agent"


def should_cordon(unschedulable: bool) -> bool:
    """Cordon only a schedulable node: a cordon someone else placed is theirs to lift."""
    return not unschedulable


def cordon_annotations(who: str, reason: str) -> dict[str, str | None]:
    return {CORDONED_BY: who, CORDON_REASON: reason[:256]}


def may_uncordon(unschedulable: bool, annotations: Mapping[str, str], who: str, *,
                 force: bool = False) -> Gate:
    if not unschedulable:
        return Gate(False, "the node is not cordoned")
    owner = annotations.get(CORDONED_BY)
    if owner == who or force:
        return Gate(True, f"cordoned by {owner or 'someone else'}"
                    + (" (--force)" if force and owner != who else ""))
    if owner is None:
        return Gate(False, "cordoned by someone else (no divingbell record of who); "
                    "use --force to lift it anyway")
    return Gate(False, f"cordoned by {owner} (reason: "
                f"{annotations.get(CORDON_REASON, 'none given')}); use --force to lift it")


# Draining ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvictionPlan:
    evict: list[PodView]        # to ask the Eviction API for now
    terminating: list[PodView]  # asked already, still there
    skipped: list[tuple[str, str]]  # (pod, why it stays)

    @property
    def remaining(self) -> list[PodView]:
        return [*self.evict, *self.terminating]


def plan_eviction(pods: Sequence[PodView], pod_selector: str = "") -> EvictionPlan:
    """What a drain evicts: never DaemonSet pods (their controller would put them straight
    back) or mirror pods (the kubelet runs static pods from files), never finished pods."""
    wanted = parse_selector(pod_selector)
    evict, terminating, skipped = [], [], []
    for pod in pods:
        if "DaemonSet" in pod.owner_kinds:
            skipped.append((pod.ref, "DaemonSet pod"))
        elif pod.mirror:
            skipped.append((pod.ref, "mirror (static) pod"))
        elif pod.phase in ("Succeeded", "Failed"):
            skipped.append((pod.ref, f"finished ({pod.phase})"))
        elif not wanted.matches(pod.labels):
            skipped.append((pod.ref, "not selected by drain.pod_selector"))
        elif pod.deleting:
            terminating.append(pod)
        else:
            evict.append(pod)
    return EvictionPlan(evict, terminating, skipped)


def budgets_for(pod: PodView, budgets: Sequence[BudgetView]) -> list[BudgetView]:
    return [b for b in budgets if b.namespace == pod.namespace
            and from_label_selector(b.selector).matches(pod.labels)]


@dataclass(frozen=True)
class TimeoutDecision:
    action: str  # "abort" or "force" (the agent's sequence), "stop" (`divingbell node drain`)
    blocking: list[tuple[str, list[str]]]  # (pod, the budgets protecting it)
    message: str


def on_drain_timeout(policy: str, remaining: Sequence[PodView],
                     budgets: Sequence[BudgetView], timeout: float,
                     node: str = "the node") -> TimeoutDecision:
    """Name the pods still there and the budgets protecting them, and say what happens: the
    agent's sequence aborts (uncordon, release its slot) or forces; an operator's `node drain`
    just stops, leaving the node cordoned and holding no slot."""
    blocking = [(p.ref, [b.ref for b in budgets_for(p, budgets)]) for p in remaining]
    named = "; ".join(f"{pod} (PodDisruptionBudget {', '.join(pdbs)})" if pdbs
                      else f"{pod} (still terminating)" for pod, pdbs in blocking)
    then = {
        "abort": "aborting: uncordon if divingbell cordoned, release the slot, retry later",
        "force": "forcing: deleting them without the budget",
        "stop": f"stopped: {node} stays cordoned and nothing was deleted (`divingbell node "
                "uncordon` lifts the cordon; `node drain --force` deletes what is left)",
    }[policy]
    return TimeoutDecision(policy, blocking,
                           f"drain timed out after {int(timeout)}s; blocking: {named}; {then}")


def describe_duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
