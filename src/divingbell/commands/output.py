"""Human-readable rendering of plans, apply reports and status. No decisions are made here."""

from __future__ import annotations

from typing import Any

from divingbell.core.engine.change import NONE, Action, Change
from divingbell.core.engine.runner import ApplyReport, Plan, summarise

SYMBOL = {Action.SET: "~", Action.WRITE: "+", Action.RESTORE: "<", Action.DELETE: "-",
          Action.NOOP: "="}


def change_line(change: Change) -> str:
    if change.action is Action.NOOP:
        return f"  = {change.reason}" + _disruption(change)
    symbol = SYMBOL[change.action]
    if change.action is Action.WRITE and change.before is not None:
        symbol = "~"
    before = change.shown(change.before)
    after = change.shown(change.after)
    text = f"  {symbol} {change.target}: {_value(before)} -> {_value(after)}"
    if change.action in (Action.RESTORE, Action.DELETE, Action.WRITE):
        text += f"  ({change.reason})"
    return text + _disruption(change)


def _disruption(change: Change) -> str:
    return "" if change.disruption == NONE else f"  [{change.disruption}]"


def _value(value: str | None) -> str:
    return "(absent)" if value is None else value


def summary_line(counts: dict[str, int], *, past: bool = False) -> str:
    if past:
        return (f"{counts['change']} changed, {counts['restore']} restored, "
                f"{counts['remove']} removed")
    return (f"{counts['change']} to change, {counts['restore']} to restore, "
            f"{counts['remove']} to remove, {counts['unchanged']} unchanged")


def file_diff(change: Change) -> str | None:
    """A unified diff of an owned file's content for `plan --diff`, or None when the change
    is not a file's content. Sensitive changes show no content, only that they are hidden."""
    from divingbell.core.engine.files import FileChange

    payload = change.payload
    if not isinstance(payload, FileChange) or not change.changes_host:
        return None
    if change.sensitive:
        return "(content not shown: it holds secrets)"
    import difflib

    before = payload.previous
    after = payload.write.content if payload.write is not None else None
    lines = difflib.unified_diff(
        (before or "").splitlines(keepends=True), (after or "").splitlines(keepends=True),
        fromfile="/dev/null" if before is None else f"{change.target} (now)",
        tofile="/dev/null" if after is None else f"{change.target} (planned)")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines).rstrip("\n")


def plan_text(plan: Plan, *, verbose: bool = False, diff: bool = False) -> str:
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
        # A settled change that still costs something (a reboot pending), or that the
        # operator must know of (a reverted kernel line held), is always shown.
        shown = [c for c in module.changes
                 if verbose or c.changes_host or c.disruption != NONE or c.notice]
        for change in shown:
            lines.append(change_line(change))
            text = file_diff(change) if diff else None
            if text:
                lines.extend(f"      {line}" for line in text.splitlines())
        if not shown:
            lines.append(f"  = nothing to do ({len(module.changes)} settled)")
    if plan.errors:
        lines.append(f"Plan failed: {len(plan.errors)} module(s) cannot be applied; "
                     "nothing will change.")
    else:
        lines.append("Plan: " + summary_line(plan.summary()) + f"; disruption: {plan.disruption}.")
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
        originals = dict(record.get("originals", {}))
        owned = list(record.get("owned_files", []))
        for path in owned:
            original = originals.pop(path, None)
            kept = (f"; the original ({_size(original)}) is put back when released"
                    if original is not None else "")
            lines.append(f"  {path} (owned file{kept})")
        for target, original in sorted(originals.items()):
            lines.append(f"  {target} (original: {_one_line(original)})")
        lines.extend(f"  {line}" for line in _state_lines(record.get("state", {})))
        if not owned and not originals and not record.get("state"):
            lines.append("  (nothing owned)")
    if last_run is None:
        lines.append("Last apply: never")
    else:
        when = _utc(last_run.get("finished", 0))
        counts = last_run.get("summary") or {"change": 0, "restore": 0, "remove": 0}
        lines.append(
            f"Last apply: {last_run.get('result')} at {when:%Y-%m-%d %H:%M:%S} UTC, node "
            f"{last_run.get('node')}, revision {last_run.get('revision')}, "
            f"{summary_line(counts, past=True)}"
        )
        errors = list(last_run.get("errors") or [])
        if "errors" not in last_run:  # written by a divingbell before 0.x named it `errors`
            errors = list(last_run.get("plan_errors") or []) + [
                f"{m['module']}: {m['error']}" for m in last_run.get("modules", [])
                if m.get("error")]
        lines.extend(f"  ! {error}" for error in errors)
        disruption = last_run.get("disruption")
        if disruption == "reboot":
            lines.append("  disruption: reboot (pending until the node boots again: "
                         "`divingbell plan` shows what the running kernel lacks)")
        elif disruption not in (None, "none"):
            lines.append(f"  disruption: {disruption}")
    return "\n".join(lines)


def _size(content: str) -> str:
    count = len(content.splitlines())
    return f"{count} line{'s' if count != 1 else ''}"


def _one_line(value: Any) -> str:
    if value is None:
        return "(absent)"
    text = str(value)
    return f"{_size(text)} of content" if "\n" in text.rstrip("\n") else text.rstrip("\n")


def _state_lines(state: dict[str, Any]) -> list[str]:
    """A module's own memory (scripts run, users created, packages installed), one line per
    item, without secrets."""
    lines = []
    for key, value in sorted(state.items()):
        if isinstance(value, dict):
            for item, detail in sorted(value.items()):
                if isinstance(detail, dict):
                    facts = ", ".join(_fact(k, v) for k, v in sorted(detail.items())
                                      if k != "hash" and v is not False
                                      and not isinstance(v, dict | list))
                    lines.append(f"{key} {item}: {facts}" if facts else f"{key} {item}")
                else:
                    lines.append(f"{key} {item}: {_one_line(detail)}")
        elif isinstance(value, list):
            lines.append(f"{key}: {', '.join(map(str, value)) or '(none)'}")
        else:
            lines.append(f"{key}: {_one_line(value)}")
    return lines


def _utc(timestamp: float) -> Any:
    import datetime as dt  # only status shows times: not imported by every run

    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _fact(key: str, value: Any) -> str:
    if key.endswith("_at") and isinstance(value, int | float):
        value = f"{_utc(value):%Y-%m-%d %H:%M:%S} UTC"
    return f"{key.replace('_', ' ')} {_one_line(value)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, like kubectl's."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths,
                                                                          strict=True)).rstrip()
                     for row in [header, *rows])
