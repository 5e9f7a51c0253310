"""Plan every module, then apply module by module.

Planning observes the host and decides; it touches nothing. If any module cannot be planned
(an unknown sysctl, a profile the parser rejects) apply refuses before changing anything.
Within a module, changes apply in plan order; if one fails, the ones already applied are undone
in reverse and the journal is put back as it was, so host and journal stay consistent. Other
modules still apply: they do not depend on each other's success.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from divingbell.core.document.nodeconfig import NodeConfig
from divingbell.core.engine.change import Action, Change, strongest
from divingbell.core.engine.files import note_original_meta, original_of
from divingbell.core.engine.journal import (
    JOURNAL_FILE,
    LAST_RUN_FILE,
    PREVIOUS_FILE,
    FileJournalStore,
    Journal,
    JournalError,
    JournalStore,
)
from divingbell.core.engine.lock import host_lock
from divingbell.core.errors import (
    CommandError,
    ModuleError,
    OutcomeFailed,
    UnsafePath,
)
from divingbell.core.host import Host, fault_point, interrupt
from divingbell.core.modules import MODULE_NAMES, get

ChangeListener = Callable[[Change, str], None]


@dataclass
class ModulePlan:
    """One module's changes for this host, or the error that stops it from planning."""

    module: str
    changes: list[Change] = field(default_factory=list)
    error: str | None = None
    override: str | None = None

    @property
    def disruption(self) -> str:
        return strongest(change.disruption for change in self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "override": self.override,
            "disruption": self.disruption,
            "error": self.error,
            "changes": [change.as_dict() for change in self.changes],
        }


@dataclass
class Plan:
    """What apply would do on one node: a ModulePlan per module involved."""

    node: str
    modules: list[ModulePlan]

    @property
    def errors(self) -> list[str]:
        return [f"{m.module}: {m.error}" for m in self.modules if m.error]

    @property
    def changes(self) -> list[Change]:
        return [change for module in self.modules for change in module.changes]

    def summary(self) -> dict[str, int]:
        return summarise(self.changes)

    @property
    def disruption(self) -> str:
        """The strongest disruption of any change: what applying the plan costs the node."""
        return strongest(change.disruption for change in self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "disruption": self.disruption,
            "modules": [module.as_dict() for module in self.modules],
            "summary": self.summary(),
            "errors": self.errors,
        }


def summarise(changes: list[Change]) -> dict[str, int]:
    counts = {"change": 0, "restore": 0, "remove": 0, "unchanged": 0}
    key = {Action.SET: "change", Action.WRITE: "change", Action.RESTORE: "restore",
           Action.DELETE: "remove", Action.NOOP: "unchanged"}
    for change in changes:
        counts[key[change.action]] += 1
    return counts


@dataclass
class ModuleResult:
    """What applying one module did: changes made, the error, and any rollback."""

    module: str
    applied: list[Change] = field(default_factory=list)
    error: str | None = None
    rolled_back: list[Change] = field(default_factory=list)
    rollback_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "error": self.error,
            "notes": self.notes,
            "applied": [c.as_dict() for c in self.applied if c.changes_host],
            "rolled_back": [c.as_dict() for c in self.rolled_back],
            "rollback_errors": self.rollback_errors,
        }


@dataclass
class ApplyReport:
    """The outcome of one apply: the plan, each module's result, timing and warnings."""

    node: str
    revision: str
    plan: Plan
    results: list[ModuleResult]
    started: float
    finished: float
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.plan.errors and not self.interrupted
                and not any(result.error for result in self.results))

    @property
    def planned_count(self) -> int:
        return sum(1 for change in self.plan.changes if change.changes_host)

    @property
    def applied(self) -> list[Change]:
        return [c for result in self.results for c in result.applied if c.changes_host]

    @property
    def errors(self) -> list[str]:
        """Every reason this run failed: plan errors, then each module's apply error."""
        return self.plan.errors + [f"{r.module}: {r.error}" for r in self.results if r.error]

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "revision": self.revision,
            "result": "interrupted" if self.interrupted else "ok" if self.ok else "failed",
            "applied_count": len(self.applied),
            "planned_count": self.planned_count,
            "warnings": self.warnings,
            "started": self.started,
            "finished": self.finished,
            "duration_seconds": round(self.finished - self.started, 4),
            "summary": summarise(self.applied),
            # What the plan cost the node; `reboot` also when an earlier apply's reboot is
            # still pending (the kernel module compares /proc/cmdline with the next boot).
            "disruption": self.plan.disruption,
            "errors": self.errors,
            "modules": [result.as_dict() for result in self.results],
        }


def make_plan(host: Host, config: NodeConfig, journal: Journal) -> Plan:
    """Observe and decide for every module the document or the journal mentions."""
    modules = []
    for name in MODULE_NAMES:
        desired = config.modules.get(name)
        record = journal.modules.get(name)
        if desired is None and (record is None or record.empty):
            continue
        applied = config.overrides.get(name)
        plan = ModulePlan(name, override=applied.description if applied else None)
        module = get(name)
        try:
            record = record if record is not None else journal.record(name)
            observed = module.observe(host, desired, record)
            plan.changes = module.plan(desired, observed, record)
        except (ModuleError, CommandError) as exc:
            plan.error = str(exc)
        except OSError as exc:  # UnsafePath among them: a path that must not be followed
            plan.error = _os_error(exc)
        modules.append(plan)
    return Plan(config.node, modules)


def apply_plan(
    host: Host,
    plan: Plan,
    journal: Journal,
    store: JournalStore,
    listener: ChangeListener | None = None,
) -> list[ModuleResult]:
    """Carry out a plan that has no errors. Returns one result per module."""
    if plan.errors:
        raise ValueError("refusing to apply a plan with errors")
    results = []
    for module_plan in plan.modules:
        if interrupt.is_set():
            break
        results.append(_apply_module(host, module_plan, journal, store, listener))
    return results


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: stop between changes."""


def _apply_module(
    host: Host,
    module_plan: ModulePlan,
    journal: Journal,
    store: JournalStore,
    listener: ChangeListener | None,
) -> ModuleResult:
    module = get(module_plan.module)
    result = ModuleResult(module_plan.module)
    record = journal.record(module_plan.module)
    snapshot = record.copy()
    # Originals reach the disk before the host changes: a crash in between leaves a journal
    # that still knows what to restore.
    try:
        for change in module_plan.changes:
            if change.capture_original and change.target not in record.originals:
                record.originals[change.target] = original_of(change)
                note_original_meta(host, change, record)
        store.save(journal)
    except (JournalError, OSError) as exc:
        journal.modules[module_plan.module] = snapshot
        result.error = _os_error(exc) if isinstance(exc, OSError) else str(exc)
        return result

    def checkpoint() -> None:
        store.save(journal)

    record.checkpoint = checkpoint
    failures: list[str] = []  # changes done and recorded whose outcome failed
    halted = False
    try:
        pending = list(module_plan.changes)
        while pending:
            # A change the kernel refuses now may be accepted once its siblings are in
            # (ipfrag_low_thresh must stay below ipfrag_high_thresh): retry such changes after
            # the rest, for as long as each pass makes progress.
            deferred: list[tuple[Change, ModuleError]] = []
            for change in pending:
                if halted:
                    break
                if change.changes_host:
                    if interrupt.is_set():
                        raise Interrupted
                    fault_point("change")
                try:
                    result.notes.extend(module.apply(host, change, record))
                except OutcomeFailed as exc:
                    failures.append(str(exc))
                    halted = exc.halt
                except ModuleError as exc:
                    if exc.retryable and len(pending) > 1:
                        deferred.append((change, exc))
                        continue
                    raise
                if change.forget:
                    record.originals.pop(change.target, None)
                result.applied.append(change)
                # What was done reaches the disk before the next change starts.
                store.save(journal)
                if listener is not None and change.changes_host:
                    listener(change, "done")
            if len(deferred) == len(pending) and not halted:
                raise deferred[0][1]
            pending = [] if halted else [change for change, _ in deferred]
    except Interrupted:
        # Everything applied so far is done and recorded; the rest waits for the next run.
        pass
    except (ModuleError, CommandError, OSError, JournalError) as exc:
        result.error = _os_error(exc) if isinstance(exc, OSError) else str(exc)
        for change in reversed(result.applied):
            if not change.changes_host:
                continue
            try:
                module.undo(host, change)
                result.rolled_back.append(change)
                if listener is not None:
                    listener(change, "rolled back")
            except (ModuleError, CommandError, OSError) as undo_exc:
                result.rollback_errors.append(f"{change.target}: {undo_exc}")
        if not result.rollback_errors:
            # The host is as it was before this run: so is the journal.
            journal.modules[module_plan.module] = snapshot
        result.applied = []
    finally:
        record.checkpoint = None
    if failures and result.error is None:
        result.error = "; ".join(failures)
    try:
        store.save(journal)
    except JournalError as exc:
        result.error = "; ".join(filter(None, [result.error, str(exc)]))
    return result


def _os_error(exc: OSError) -> str:
    if isinstance(exc, UnsafePath) or not (exc.filename and exc.strerror):
        return str(exc)
    return f"{exc.filename}: {exc.strerror}"


def apply_node(
    host: Host,
    config: NodeConfig,
    revision: str,
    *,
    lock_timeout: float = 10.0,
    listener: ChangeListener | None = None,
    adopt: bool = False,
) -> ApplyReport:
    """Converge the host to `config` under the host lock, and record the outcome.

    `adopt`: the journal is missing but divingbell's own files are on the host; start a fresh
    journal that owns them. What the document no longer has is restored, however much that
    is: whether a document is whole is decided before (the agent refuses one that evidently
    is not; the fleet asks for `--allow-removals` where a revision enters it).
    """
    with host_lock(host, lock_timeout):
        started = time.time()
        store = FileJournalStore(host)
        journal = store.load(adopt=adopt)
        cleaned = clean_stale_temp_files(host, journal)
        plan = make_plan(host, config, journal)
        warnings = [f"removed a temp file a killed write left: {path}" for path in cleaned]
        results: list[ModuleResult] = []
        if not plan.errors:
            try:
                store.keep_previous()
            except OSError as exc:
                warnings.append(f"cannot keep the previous journal generation "
                                f"({PREVIOUS_FILE}): {exc.strerror or exc}")
            results = apply_plan(host, plan, journal, store, listener)
        report = ApplyReport(config.node, revision, plan, results, started, time.time(),
                             interrupted=interrupt.is_set(), warnings=warnings)
        try:
            store.save_last_run(report.as_dict())
        except OSError as exc:
            # The host and the journal are right; only the report for `status` is missing.
            report.warnings.append(f"the outcome could not be recorded in {LAST_RUN_FILE}: "
                                   f"{exc.strerror or exc}; `status` shows the run before")
        return report


def clean_stale_temp_files(host: Host, journal: Journal) -> list[str]:
    """Temp files of killed atomic writes next to every file divingbell owns or captured."""
    paths = {JOURNAL_FILE, LAST_RUN_FILE, PREVIOUS_FILE}
    for record in journal.modules.values():
        paths |= set(record.owned_files)
        paths |= {p for p in record.originals if p.startswith("/")}
    removed = []
    for path in sorted(paths):
        try:
            removed.extend(host.clean_temp_files(path))
        except (OSError, ValueError):
            continue
    return removed


def plan_node(host: Host, config: NodeConfig, *, adopt: bool = False) -> Plan:
    """What apply would do, touching nothing."""
    return make_plan(host, config, FileJournalStore(host).load(adopt=adopt))
