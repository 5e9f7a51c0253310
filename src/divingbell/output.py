"""Human-readable rendering of plans, apply reports and status. No decisions are made here."""

from __future__ import annotations

import datetime as dt
from typing import Any

from divingbell.engine.change import Action, Change
from divingbell.engine.runner import ApplyReport, Plan, summarise

SYMBOL = {Action.SET: "~", Action.WRITE: "+", Action.RESTORE: "<", Action.DELETE: "-",
          Action.NOOP: "="}


def change_line(change: Change) -> str:
    if change.action is Action.NOOP:
        return f"  = {change.reason}"
    symbol = SYMBOL[change.action]
    if change.action is Action.WRITE and change.before is not None:
        symbol = "~"
    before = change.shown(change.before)
    after = change.shown(change.after)
    text = f"  {symbol} {change.target}: {_value(before)} -> {_value(after)}"
    if change.action in (Action.RESTORE, Action.DELETE, Action.WRITE):
        text += f"  ({change.reason})"
    return text


def _value(value: str | None) -> str:
    return "(absent)" if value is None else value


def summary_line(counts: dict[str, int], *, past: bool = False) -> str:
    if past:
        return (f"{counts['change']} changed, {counts['restore']} restored, "
                f"{counts['remove']} removed")
    return (f"{counts['change']} to change, {counts['restore']} to restore, "
            f"{counts['remove']} to remove, {counts['unchanged']} unchanged")


def plan_text(plan: Plan, *, verbose: bool = False) -> str:
    lines = [f"Plan for node {plan.node}:"]
    if not plan.modules:
        lines.append("  (the document configures nothing for this node, and divingbell owns "
                     "nothing here)")
    for module in plan.modules:
        header = f"{module.module}"
        if module.override:
            header += f"  [{module.override}]"
        lines.append(header)
        if module.error:
            lines.extend(f"  ! {part}" for part in module.error.split("; "))
            continue
        shown = [c for c in module.changes if verbose or c.changes_host]
        lines.extend(change_line(change) for change in shown)
        if not shown:
            lines.append(f"  = nothing to do ({len(module.changes)} settled)")
    if plan.errors:
        lines.append(f"Plan failed: {len(plan.errors)} module(s) cannot be applied; "
                     "nothing will change.")
    else:
        lines.append("Plan: " + summary_line(plan.summary()) + ".")
    return "\n".join(lines)


def applied_line(change: Change, status: str) -> str:
    line = change_line(change)
    return line if status == "done" else f"{line}  [{status}]"


def report_tail(report: ApplyReport) -> str:
    lines = []
    if report.plan.errors:
        lines.append(plan_text(report.plan))
        return "\n".join(lines)
    for result in report.results:
        lines.extend(f"{result.module}: note: {note}" for note in result.notes)
        if result.error:
            lines.append(f"{result.module}: FAILED: {result.error}")
            if result.rolled_back:
                lines.append(f"  rolled back {len(result.rolled_back)} change(s) from this run")
            lines.extend(f"  ! rollback failed: {e}" for e in result.rollback_errors)
    counts = summarise(report.applied)
    if report.interrupted:
        lines.append(f"Stopped by a signal between two changes ({summary_line(counts, past=True)}"
                     "); everything done is recorded.")
    elif report.ok and not report.applied:
        lines.append("No changes: the host already matches the document.")
    elif report.ok:
        lines.append(f"Applied: {summary_line(counts, past=True)}. "
                     "The host matches the document.")
    else:
        lines.append(f"Apply failed ({summary_line(counts, past=True)} in modules that "
                     "succeeded).")
    return "\n".join(lines)


def status_text(root: str, journal: dict[str, Any], last_run: dict[str, Any] | None) -> str:
    lines = [f"divingbell state on {root}"]
    modules = journal.get("modules", {})
    if not modules:
        lines.append("Owns nothing on this host.")
    for name, record in modules.items():
        lines.append(f"{name}:")
        for target, original in sorted(record.get("originals", {}).items()):
            if target.startswith("/"):
                continue
            lines.append(f"  {target} (original: {_value(original)})")
        for path in record.get("owned_files", []):
            lines.append(f"  {path} (owned file)")
    if last_run is None:
        lines.append("Last apply: never")
    else:
        when = dt.datetime.fromtimestamp(last_run.get("finished", 0), dt.UTC)
        counts = last_run.get("summary") or {"change": 0, "restore": 0, "remove": 0}
        lines.append(
            f"Last apply: {last_run.get('result')} at {when:%Y-%m-%d %H:%M:%S} UTC, node "
            f"{last_run.get('node')}, revision {last_run.get('revision')}, "
            f"{summary_line(counts, past=True)}"
        )
        errors = list(last_run.get("plan_errors") or []) + [
            f"{m['module']}: {m['error']}" for m in last_run.get("modules", []) if m.get("error")
        ]
        lines.extend(f"  ! {error}" for error in errors)
    return "\n".join(lines)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, like kubectl's."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths,
                                                                          strict=True)).rstrip()
                     for row in [header, *rows])
