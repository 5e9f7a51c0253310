"""A change is data: what a module would do to one setting or file, with before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MASK = "(sensitive)"


class Action(StrEnum):
    SET = "set"          # a live setting takes the document's value
    RESTORE = "restore"  # a setting that left the document gets its original value back
    WRITE = "write"      # an owned file is created or rewritten
    DELETE = "delete"    # an owned file is removed (or its original content put back)
    NOOP = "noop"        # nothing to do; `reason` says why


@dataclass(frozen=True)
class Change:
    """One setting or file: what it is, what it becomes, and why."""

    module: str
    target: str                 # the setting or path, as the operator knows it
    action: Action
    before: str | None
    after: str | None
    reason: str                 # always set: why this change, or why nothing changes
    sensitive: bool = False     # before/after are secrets: never printed
    capture_original: bool = False  # record `before` as the target's original, once
    forget: bool = False        # once applied, the target is no longer owned
    payload: Any = field(default=None, compare=False, repr=False)  # module-private

    @property
    def changes_host(self) -> bool:
        return self.action is not Action.NOOP

    @property
    def touches_journal(self) -> bool:
        return self.capture_original or self.forget

    def shown(self, value: str | None) -> str | None:
        return MASK if self.sensitive and value is not None else value

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "target": self.target,
            "action": str(self.action),
            "before": self.shown(self.before),
            "after": self.shown(self.after),
            "reason": self.reason,
        }
