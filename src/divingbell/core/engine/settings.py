"""The two decisions every module makes about a live setting, made the same way everywhere.

`converge`: the document wants `after`; set it, or say it is already so. The first time
divingbell sees a setting its current value is captured as the original.
`restore`: the setting left the document; put the original back, or just forget it when there
is nothing to do (already at the original, or the setting no longer exists).
"""

from __future__ import annotations

from typing import Any

from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.journal import ModuleRecord


def converge(module: str, target: str, before: str | None, after: str, record: ModuleRecord,
             *, payload: Any = None, sensitive: bool = False) -> Change:
    capture = target not in record.originals
    if before == after:
        return Change(module, target, Action.NOOP, before, after, f"{target} is already {after}",
                      sensitive=sensitive, capture_original=capture, payload=payload)
    return Change(module, target, Action.SET, before, after, "set by the document",
                  sensitive=sensitive, capture_original=capture, payload=payload)


def restore(module: str, target: str, current: str | None, original: str | None,
            *, payload: Any = None) -> Change:
    if current is None or original is None:
        return Change(module, target, Action.NOOP, current, original,
                      f"{target} no longer exists; forgetting it", forget=True)
    if current == original:
        return Change(module, target, Action.NOOP, current, original,
                      f"left the document; already at its original {original}", forget=True)
    return Change(module, target, Action.RESTORE, current, original,
                  "left the document; restoring its original value", forget=True,
                  payload=payload)


def left_the_document(record: ModuleRecord, wanted: set[str] | dict[str, Any]) -> list[str]:
    """Settings (not files) with a recorded original that the document no longer wants."""
    return sorted(t for t in record.originals if not t.startswith("/") and t not in wanted)
