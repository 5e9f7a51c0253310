"""The maintenance sequence each node's agent runs, one step per agent tick.

Reboot needed -> window -> blockers (all before any lock) -> slot -> cordon (only if
schedulable, recording that divingbell did it) -> drain through the Eviction API -> record
`rebooting` and the boot id -> reboot by the strategy -> (new boot id) Ready and converged ->
uncordon only if divingbell cordoned -> release the slot -> clear the sentinel -> outcome.

The record of where the sequence is lives on the host (`/var/lib/divingbell/maintenance.json`,
0600), so the agent that starts after the reboot carries on from it; the node's
`divingbell.io/maintenance*` annotations and Events mirror every step for operators.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from divingbell.core.document.schema import MaintenanceConf, Reboot
from divingbell.core.errors import CommandError
from divingbell.core.host import Host
from divingbell.kube import ANNOTATION_PREFIX, EvictionRefused, KubeError, MaintenanceKube
from divingbell.maintenance import decide
from divingbell.maintenance.alerts import alert_blockers
from divingbell.maintenance.decide import (
    CORDONING,
    DRAINING,
    FAILED,
    IDLE,
    REBOOTING,
    VERIFYING,
    WAITING,
)
from divingbell.maintenance.slots import SlotBackend, SlotError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from divingbell.kube import KubeApi

log = logging.getLogger("divingbell.maintenance")

STATE_FILE = "/var/lib/divingbell/maintenance.json"
REBOOT_REQUIRED = "/run/reboot-required"
SENTINELS = (REBOOT_REQUIRED, "/run/reboot-required.pkgs")
REQUEST_ANNOTATION = f"{ANNOTATION_PREFIX}reboot-requested"
PHASE_ANNOTATION = f"{ANNOTATION_PREFIX}maintenance"
# --no-block: queue the job and return, rather than wait while the shutdown kills this agent.
STRATEGY_COMMANDS = {strategy: ["systemctl", strategy, "--no-block"]
                     for strategy in ("reboot", "kexec", "poweroff")}


@dataclass
class Record:
    """Where this node's maintenance is; saved on the host before every step that matters."""

    phase: str = IDLE
    reason: str = ""
    trigger: str = ""
    slot: str | None = None
    cordoned: bool = False  # divingbell cordoned the node in this maintenance
    boot_id: str = ""  # the boot before the reboot
    started_at: float | None = None
    drain_started_at: float | None = None
    drain_seconds: float | None = None
    forced: bool = False
    reboot_at: float | None = None
    booted_at: float | None = None
    finished_at: float | None = None
    taken_over_from: str | None = None  # the slot's previous holder, when it had expired
    retry_at: float = 0.0
    outcome: str = ""

    def annotations(self) -> dict[str, str]:
        return {PHASE_ANNOTATION: self.phase,
                f"{PHASE_ANNOTATION}-reason": self.reason[:512],
                f"{PHASE_ANNOTATION}-slot": self.slot or "",
                f"{PHASE_ANNOTATION}-boot-id": self.boot_id,
                f"{PHASE_ANNOTATION}-outcome": self.outcome[:512]}


class MaintenanceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.reboot_required = Gauge("divingbell_reboot_required",
                                     "1 when this node needs a reboot (a trigger is present)",
                                     registry=r)
        self.slot_held = Gauge("divingbell_maintenance_slot_held",
                               "1 while this node holds a maintenance slot", registry=r)
        self.drain_duration = Histogram(
            "divingbell_drain_duration_seconds", "Time to drain the node", registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600))
        self.reboots = Counter("divingbell_reboots_total",
                               "Maintenance reboots completed (node back, healthy)",
                               registry=r)
        self.reboots_failed = Counter(
            "divingbell_reboots_failed_total",
            "Maintenance reboots that failed (did not happen, or not healthy in time)",
            registry=r)
        self.drains_aborted = Counter("divingbell_drains_aborted_total",
                                      "Drains that timed out and were aborted", registry=r)


class Sequence:
    """One node's maintenance. `step` is called every agent tick and never blocks for long."""

    def __init__(self, node: str, host: Host, kube: MaintenanceKube | None,
                 slots: SlotBackend | None, *, holder: str | None = None,
                 metrics: MaintenanceMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 reboot: Callable[[str], None] | None = None,
                 alerts: Callable[[str, str, float], list[str]] = alert_blockers,
                 recheck_interval: float = 15.0) -> None:
        self.node, self.host, self.kube, self.slots = node, host, kube, slots
        self.holder = holder or node
        self.metrics, self.clock, self.alerts = metrics, clock, alerts
        self._reboot = reboot or self._run_strategy
        self._published: dict[str, str] = {}
        self._last_renew = float("-inf")
        # While waiting on blockers or a slot, Prometheus, the pods and the slots are asked at
        # most this often (a fleet of waiting agents must not hammer them).
        self.recheck_interval = recheck_interval
        self._next_check = float("-inf")
        self._request: str | None = None
        self._request_checked = float("-inf")

    # The record ------------------------------------------------------------------------------

    def load(self) -> Record:
        text = self.host.read_text(STATE_FILE)
        if not text:
            return Record()
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(Record)}
            record = Record(**{k: v for k, v in data.items() if k in known})
            if record.phase not in decide.PHASES:
                raise ValueError(f"unknown phase {record.phase!r}")
            return record
        except (ValueError, TypeError) as exc:
            log.error("unreadable %s (%s): starting from idle", STATE_FILE, exc)
            return Record()

    def save(self, record: Record) -> None:
        self.host.write_atomic(STATE_FILE, json.dumps(dataclasses.asdict(record), indent=1),
                               mode=0o600, dir_mode=0o700)

    def boot_id(self) -> str:
        try:
            return (self.host.proc_sys / "kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""

    # The step --------------------------------------------------------------------------------

    def step(self, conf: MaintenanceConf | None, labels: Mapping[str, str],
             converged: bool) -> Record:
        record = self.load()
        reboot = conf.reboot if conf is not None else None
        if reboot is None and record.phase == IDLE:
            return record  # not configured here, and nothing under way: stay out of the way
        for _ in range(6):  # phases that can go on at once do, in this same step
            before = record.phase
            if record.phase in (IDLE, WAITING):
                self._idle_or_waiting(record, reboot, labels)
            elif reboot is None or reboot.strategy == "none":
                if record.phase in (CORDONING, DRAINING):
                    # Not rebooted yet and no longer wanted: undo the cordon, free the slot.
                    self._abort(record, reboot or Reboot(), "maintenance is no longer enabled "
                                "for this node in the document")
                    break
                reboot = Reboot()  # already rebooted: finish with the defaults
                continue
            elif record.phase == CORDONING:
                self._cordon(record, reboot)
            elif record.phase == DRAINING:
                self._drain(record, reboot)
            elif record.phase == REBOOTING:
                self._rebooting(record, reboot)
            elif record.phase in (VERIFYING, FAILED):
                self._verify(record, reboot, converged)
            if record.phase == before or record.phase in (REBOOTING, WAITING, IDLE):
                break
        self._publish(record)
        if self.metrics is not None:
            self.metrics.slot_held.set(1 if record.slot else 0)
        return record

    def _idle_or_waiting(self, record: Record, reboot: Reboot | None,
                         labels: Mapping[str, str]) -> None:
        now = self.clock()
        if reboot is None or reboot.strategy == "none":
            found: list[str] = []
        else:
            found = decide.triggers(
                reboot.when, reboot_required=self.host.path(REBOOT_REQUIRED).exists(),
                requested=self._requested() if "requested" in reboot.when else None)
        if self.metrics is not None:
            self.metrics.reboot_required.set(1 if found else 0)
        if reboot is None or not found:
            if record.phase == WAITING:
                self._move(record, IDLE, "no reboot needed any more")
            return
        window_open = decide.in_window(reboot.window, dt.datetime.fromtimestamp(now, dt.UTC))
        window = decide.describe_window(reboot.window)
        gate = decide.may_start(found, window_open=window_open, window=window, blockers=[],
                                retry_at=record.retry_at, now=now)
        if gate.go and now < self._next_check:
            return  # asked recently; the reason shown is still the last answer
        if gate.go:
            self._next_check = now + self.recheck_interval
            gate = decide.may_start(found, window_open=True, window=window,
                                    blockers=self._blockers(reboot), retry_at=0, now=now)
        if not gate.go:
            self._wait(record, gate.reason)
            return
        if self.slots is None:
            self._wait(record, "no slot backend: the agent needs Kubernetes or the fleet "
                       "service to coordinate reboots")
            return
        group = decide.slot_group(reboot.group_by, labels)
        try:
            claim = self.slots.claim(group, self.holder, reboot.concurrency, reboot.slot_ttl)
        except (SlotError, KubeError) as exc:
            self._wait(record, f"cannot claim a slot: {exc}")
            return
        if claim.slot is None:
            held = ", ".join(f"{s.name} by {s.holder}" + (f" since {_stamp(s.since)}"
                                                         if s.since else "")
                             for s in claim.holders if s.holder)
            self._wait(record, f"waiting for a slot in group {group!r}"
                       + (f" ({held})" if held else ""))
            return
        record.slot, record.trigger, record.started_at = claim.slot.name, gate.reason, now
        record.cordoned, record.forced, record.drain_seconds = False, False, None
        record.outcome, record.finished_at = "", None
        record.reboot_at = record.booted_at = None
        record.taken_over_from = claim.taken_over_from
        self._last_renew = now
        taken = (f", taken over from {claim.taken_over_from} (expired)"
                 if claim.taken_over_from else "")
        self._move(record, CORDONING, f"slot {claim.slot.name} claimed{taken}: {gate.reason}")
        self._event("SlotClaimed", f"maintenance slot {claim.slot.name} claimed{taken} for: "
                    f"{gate.reason}")

    def _blockers(self, reboot: Reboot) -> list[str]:
        found = []
        if reboot.blockers.pods is not None and self.kube is not None:
            try:
                pods = self.kube.pods_on_node(self.node)
                found += [f"pod {p}" for p in decide.blocking_pods(
                    pods, reboot.blockers.pods.selector)]
            except KubeError as exc:
                found.append(f"unknown pods ({exc})")
        if reboot.blockers.alerts is not None:
            alerts = reboot.blockers.alerts
            found += self.alerts(alerts.prometheus, alerts.match, alerts.timeout)
        return found

    def _cordon(self, record: Record, reboot: Reboot) -> None:
        now = self.clock()
        if self.kube is not None:
            state = self.kube.node_state(self.node)
            if decide.should_cordon(state.unschedulable):
                self.kube.patch_node(self.node, unschedulable=True,
                                     annotations=decide.cordon_annotations(
                                         decide.AGENT, f"maintenance: {record.trigger}"))
                record.cordoned = True
                self.save(record)
                self._event("Cordoned", f"cordoned for maintenance ({record.trigger})")
            else:
                self._event("AlreadyCordoned", "the node was already cordoned by someone "
                            "else: divingbell will leave that cordon in place afterwards")
        record.drain_started_at = now
        self._move(record, DRAINING, "draining")

    def _drain(self, record: Record, reboot: Reboot) -> None:
        now = self.clock()
        self._renew(record, reboot, now)
        drain = reboot.drain
        started = record.drain_started_at or now
        if self.kube is not None:
            plan = decide.plan_eviction(self.kube.pods_on_node(self.node), drain.pod_selector)
            remaining = plan.remaining
        else:
            remaining = []
        if not remaining:
            if self.kube is not None:  # without Kubernetes there is nothing to drain
                record.drain_seconds = now - started
                if self.metrics is not None:
                    self.metrics.drain_duration.observe(record.drain_seconds)
                self._event("Drained", f"drained in {decide.describe_duration(now - started)}")
            self._start_reboot(record, reboot)
            return
        assert self.kube is not None
        if now - started >= drain.timeout:
            decision = decide.on_drain_timeout(drain.on_timeout, remaining,
                                               self.kube.budgets(), drain.timeout)
            if decision.action == "abort":
                self._event("DrainTimeout", decision.message, warning=True)
                if self.metrics is not None:
                    self.metrics.drains_aborted.inc()
                self._abort(record, reboot, decision.message)
                return
            if not record.forced:
                self._event("DrainTimeout", decision.message, warning=True)
                record.forced = True
            for pod in plan.evict:
                self.kube.delete_pod(pod.namespace, pod.name, round(drain.grace_period))
            record.reason = decision.message
            self.save(record)
            return
        refused = []
        for pod in plan.evict:
            try:
                self.kube.evict(pod.namespace, pod.name, round(drain.grace_period))
            except EvictionRefused:
                refused.append(pod.ref)
        reason = f"draining: {len(remaining)} pod(s) left"
        if refused:
            reason += f"; eviction refused by a PodDisruptionBudget for {', '.join(refused)}"
        record.reason = reason
        self.save(record)

    def _start_reboot(self, record: Record, reboot: Reboot) -> None:
        record.boot_id, record.reboot_at = self.boot_id(), self.clock()
        self._move(record, REBOOTING, f"rebooting ({reboot.strategy}) from boot "
                   f"{record.boot_id[:8] or '?'}")
        self._publish(record)  # the annotations say `rebooting` before the host goes down
        # The fleet service watches a reboot it is told of: renewed now, whatever the pace.
        self._renew(record, reboot, self.clock(), rebooting=True, force=True)
        self._event("Rebooting", f"rebooting by {reboot.strategy}")
        try:
            self._reboot(reboot.strategy)
        except CommandError as exc:
            if exc.returncode < 0:
                # Killed by the shutdown it started: the host is going down. The boot id says
                # after the boot (or `health.timeout` without one) whether it really rebooted.
                log.info("the reboot command was stopped by the shutdown: %s", exc)
                return
            self._reboot_failed(record, reboot, exc)
        except OSError as exc:
            self._reboot_failed(record, reboot, exc)

    def _reboot_failed(self, record: Record, reboot: Reboot, exc: Exception) -> None:
        self._event("RebootFailed", f"the reboot command failed: {exc}", warning=True)
        if self.metrics is not None:
            self.metrics.reboots_failed.inc()
        self._abort(record, reboot, f"the reboot command failed: {exc}")

    def _run_strategy(self, strategy: str) -> None:
        self.host.run(STRATEGY_COMMANDS[strategy])

    def _rebooting(self, record: Record, reboot: Reboot) -> None:
        now = self.clock()
        current = self.boot_id()
        back = bool(current) and current != record.boot_id
        # The first pass after the boot renews at once: the fleet stops watching the reboot.
        self._renew(record, reboot, now, rebooting=not back, force=back)
        if current and current != record.boot_id:
            record.booted_at = now
            self._move(record, VERIFYING, f"booted ({current[:8]}); waiting until Ready and "
                       "converged")
            down = decide.describe_duration(now - (record.reboot_at or now))
            self._event("Booted", f"back after {down}; waiting until the node is Ready and "
                        "its document converged")
        elif now - (record.reboot_at or now) >= reboot.health.timeout:
            limit = decide.describe_duration(reboot.health.timeout)
            message = f"the host did not reboot within {limit} (same boot id)"
            self._event("RebootFailed", message, warning=True)
            if self.metrics is not None:
                self.metrics.reboots_failed.inc()
            self._abort(record, reboot, message)

    def _verify(self, record: Record, reboot: Reboot, converged: bool) -> None:
        now = self.clock()
        self._renew(record, reboot, now)
        node_ready = True
        if self.kube is not None:
            node_ready = self.kube.node_state(self.node).ready
        if node_ready and converged:
            self._finish(record, reboot, now)
            return
        waited = now - (record.booted_at or now)
        if record.phase == VERIFYING and waited >= reboot.health.timeout:
            message = (f"not healthy {decide.describe_duration(waited)} after boot (node Ready: "
                       f"{node_ready}, converged: {converged}); keeping the node cordoned and "
                       f"the slot {record.slot} held until it is, or an operator releases it")
            self._move(record, FAILED, message)
            self._event("MaintenanceFailed", message, warning=True)
            if self.metrics is not None:
                self.metrics.reboots_failed.inc()

    def _finish(self, record: Record, reboot: Reboot, now: float) -> None:
        self._uncordon_if_ours(record)
        released = self._release(record)
        self._clear_sentinels(record)
        total = now - (record.started_at or now)
        parts = [f"total {decide.describe_duration(total)}"]
        if record.drain_seconds is not None:
            parts.append(f"drain {decide.describe_duration(record.drain_seconds)}")
        if record.reboot_at and record.booted_at:
            parts.append(f"reboot {decide.describe_duration(record.booted_at - record.reboot_at)}")
        if record.booted_at:
            parts.append(f"health {decide.describe_duration(now - record.booted_at)}")
        record.outcome = (f"rebooted ({reboot.strategy}) at {_stamp(record.reboot_at)}: "
                          + ", ".join(parts) + ("" if released else "; the slot was no longer "
                                                 "ours (expired while down)"))
        if record.taken_over_from:
            record.outcome += f"; the slot was taken over from {record.taken_over_from}"
        record.finished_at = now
        if self.metrics is not None:
            self.metrics.reboots.inc()
        record.slot, record.retry_at = None, 0.0
        self._move(record, IDLE, "maintenance done")
        self._event("MaintenanceDone", record.outcome)

    def _abort(self, record: Record, reboot: Reboot, why: str) -> None:
        self._uncordon_if_ours(record)
        self._release(record)
        record.slot = None
        record.retry_at = self.clock() + reboot.retry_after
        record.outcome = f"aborted: {why}"
        self._move(record, WAITING, f"aborted, retrying after {_stamp(record.retry_at)}: {why}")

    def _uncordon_if_ours(self, record: Record) -> None:
        if not record.cordoned or self.kube is None:
            return
        state = self.kube.node_state(self.node)
        gate = decide.may_uncordon(state.unschedulable, state.annotations, decide.AGENT)
        if gate.go:
            self.kube.patch_node(self.node, unschedulable=False,
                                 annotations={decide.CORDONED_BY: None,
                                              decide.CORDON_REASON: None})
            self._event("Uncordoned", "uncordoned (divingbell had cordoned it)")
        else:
            self._event("CordonKept", f"not uncordoning: {gate.reason}")
        record.cordoned = False
        self.save(record)

    def _release(self, record: Record) -> bool:
        if record.slot is None or self.slots is None:
            return False
        try:
            released = self.slots.release(record.slot, self.holder)
        except (SlotError, KubeError) as exc:
            # The TTL frees it anyway; say so rather than stall the sequence.
            self._event("SlotReleaseFailed", f"cannot release {record.slot} ({exc}); it "
                        "expires on its own", warning=True)
            return False
        if released:
            self._event("SlotReleased", f"maintenance slot {record.slot} released")
        return released

    def _renew(self, record: Record, reboot: Reboot, now: float, *, rebooting: bool = False,
               force: bool = False) -> None:
        if record.slot is None or self.slots is None:
            return
        if now - self._last_renew < reboot.slot_ttl / 4 and not force:
            return
        try:
            held = self.slots.renew(record.slot, self.holder, reboot.slot_ttl,
                                    rebooting=rebooting)
        except (SlotError, KubeError) as exc:
            log.warning("cannot renew slot %s: %s", record.slot, exc)
            return
        self._last_renew = now
        if not held:
            self._event("SlotLost", f"slot {record.slot} is no longer held by this node "
                        "(it expired, or an operator released it); finishing the "
                        "maintenance already under way", warning=True)
            record.slot = None
            self.save(record)

    def _clear_sentinels(self, record: Record) -> None:
        for sentinel in SENTINELS:
            stat = self.host.lstat(sentinel)
            # A sentinel written after the reboot asks for a new one; older ones are done.
            if stat is not None and stat.st_mtime <= (record.reboot_at or 0):
                self.host.remove(sentinel)
        if self.kube is not None and self._requested(fresh=True):
            self.kube.patch_node(self.node, annotations={REQUEST_ANNOTATION: None})
            self._request = None

    def _requested(self, *, fresh: bool = False) -> str | None:
        """An operator's request (`divingbell node reboot`), read from the Node at most every
        `recheck_interval`: idle agents must not poll the API server every tick."""
        if self.kube is None:
            return None
        now = self.clock()
        if fresh or now >= self._request_checked + self.recheck_interval:
            try:
                self._request = self.kube.node_state(self.node).annotations.get(
                    REQUEST_ANNOTATION)
                self._request_checked = now
            except KubeError as exc:
                log.warning("cannot read the node's reboot request: %s", exc)
        return self._request

    # Publishing ------------------------------------------------------------------------------

    def _move(self, record: Record, phase: str, reason: str) -> None:
        decide.check_transition(record.phase, phase)
        log.info("maintenance: %s -> %s: %s", record.phase, phase, reason)
        record.phase, record.reason = phase, reason
        self.save(record)

    def _wait(self, record: Record, reason: str) -> None:
        if record.phase != WAITING:
            self._move(record, WAITING, reason)
            self._event("MaintenanceWaiting", reason)
        elif record.reason != reason:
            record.reason = reason
            self.save(record)

    def _publish(self, record: Record) -> None:
        if self.kube is None:
            return
        changed: dict[str, str | None] = {k: v for k, v in record.annotations().items()
                                          if self._published.get(k) != v}
        if not changed:
            return
        try:
            self.kube.patch_node(self.node, annotations=changed)
            self._published.update({k: v or "" for k, v in changed.items()})
        except KubeError as exc:
            log.warning("cannot annotate node %s: %s", self.node, exc)

    def _event(self, reason: str, message: str, *, warning: bool = False) -> None:
        (log.warning if warning else log.info)("maintenance %s: %s", reason, message)
        if self.kube is None:
            return
        try:
            self.kube.node_event(self.node, reason, message, warning=warning)
        except KubeError as exc:
            log.warning("cannot record event %s: %s", reason, exc)


def _stamp(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The agent's hook ------------------------------------------------------------------------------
# What the hook reads from the agent, as protocols: the agent imports maintenance, never the
# other way round.

class NodeSettings(Protocol):
    """The agent's settings the hook needs: the node, its host and its document files."""

    @property
    def node(self) -> str: ...
    @property
    def host(self) -> Host: ...
    @property
    def documents(self) -> Iterable[Path]: ...


class TickingAgent(Protocol):
    """The agent as the hook sees it after each pass (in fleet mode it also has a `source`
    with the fleet `client` and its `machine_id`, looked up when present)."""

    @property
    def settings(self) -> NodeSettings: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def labels(self) -> Mapping[str, str] | None: ...
    @property
    def ready(self) -> bool: ...


class AgentMaintenance:
    """Called once per agent tick, after converging: runs the sequence with the node's
    effective `conf.maintenance` and whether the agent has converged (its readiness)."""

    def __init__(self, sequence: Sequence) -> None:
        self.sequence = sequence
        self._key: tuple[str, tuple[tuple[str, str], ...]] | None = None
        self._conf: MaintenanceConf | None = None

    def tick(self, agent: TickingAgent) -> None:
        from divingbell.core.document.api import load_document, node_config
        from divingbell.core.errors import DivingbellError

        if agent.revision is None:
            return  # no valid document yet: nothing says what maintenance may do
        if self.sequence.slots is None:
            self._wire_fleet(agent)
        labels = agent.labels or {}
        key = (agent.revision, tuple(sorted(labels.items())))
        try:
            if key != self._key:
                config = node_config(load_document(agent.settings.documents),
                                     agent.settings.node, labels)
                self._conf = cast("MaintenanceConf | None", config.modules.get("maintenance"))
                self._key = key
            self.sequence.step(self._conf, labels, agent.ready)
        except (DivingbellError, KubeError, SlotError, OSError) as exc:
            log.warning("maintenance step failed, retrying next tick: %s", exc)
        except Exception:  # a bug here must not stop the converger
            log.exception("maintenance step failed")


    def _wire_fleet(self, agent: TickingAgent) -> None:
        """Fleet mode: the agent's fleet client and machine id (the slot holder)."""
        source = getattr(agent, "source", None)
        client = getattr(source, "client", None)
        machine_id = getattr(source, "machine_id", None)
        if client is None or machine_id is None:
            return
        from divingbell.maintenance.slots import FleetSlots

        self.sequence.slots = FleetSlots(client)
        self.sequence.holder = str(machine_id)


def hook_for(settings: NodeSettings, kube: KubeApi | None, registry: CollectorRegistry,
             clock: Callable[[], float] = time.time,
             environ: Mapping[str, str] | None = None) -> AgentMaintenance:
    """The agent's maintenance. With Kubernetes, the slots are Leases in $POD_NAMESPACE
    (default divingbell); in fleet mode (`divingbell agent --server`), the fleet service's
    slots, wired on the first tick from the agent's own fleet client."""
    from divingbell.maintenance.slots import LeaseSlots

    env = os.environ if environ is None else environ
    maintenance_kube = cast("MaintenanceKube | None", kube if hasattr(kube, "pods_on_node")
                            else None)
    slots: SlotBackend | None = None
    if maintenance_kube is not None:
        slots = LeaseSlots(maintenance_kube, env.get("POD_NAMESPACE") or "divingbell", clock)
    return AgentMaintenance(Sequence(settings.node, settings.host, maintenance_kube, slots,
                                     metrics=MaintenanceMetrics(registry), clock=clock))


__all__ = ["AgentMaintenance", "NodeSettings", "Record", "Sequence", "TickingAgent",
           "hook_for"]
