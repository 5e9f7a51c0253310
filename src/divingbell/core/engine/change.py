"""A change is data: what a module would do to one setting or file, with before and after."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MASK = "(sensitive)"

# What carrying out a change costs the workloads on the node, weakest first:
#   none                a live change (or one that only affects what starts later)
#   reload:<units>      services re-read their configuration, in place
#   restart:<units>     services stop and start again (or stop for good)
#   reboot              only a reboot makes it take effect
# <units> is one unit or several, comma-separated. Decided by the module that plans the change.
NONE = "none"
REBOOT = "reboot"
_RANKS = {"none": 0, "reload": 1, "restart": 2, "reboot": 3}


def restart(*units: str) -> str:
    return f"restart:{','.join(sorted(set(units)))}" if units else NONE


def reload(*units: str) -> str:
    return f"reload:{','.join(sorted(set(units)))}" if units else NONE


def disruption_kind(disruption: str) -> str:
    """`none`, `reload`, `restart` or `reboot`."""
    return disruption.partition(":")[0]


def disruption_rank(disruption: str) -> int:
    return _RANKS[disruption_kind(disruption)]


def strongest(disruptions: Iterable[str]) -> str:
    """The strongest of several disruptions; restarts (or reloads) of different units add up:
    `restart:a.service` and `restart:b.service` give `restart:a.service,b.service`."""
    top, units = NONE, set[str]()
    for disruption in disruptions:
        kind, _, named = disruption.partition(":")
        if _RANKS[kind] > disruption_rank(top):
            top, units = kind, set()
        if kind == disruption_kind(top):
            units |= set(filter(None, named.split(",")))
    if top in ("reload", "restart"):
        return f"{top}:{','.join(sorted(units))}"
    return top


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
    disruption: str = NONE      # what carrying it out costs the node's workloads (see above)
    notice: bool = False        # settled, but the operator must see it (a reverted line held)
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
            "disruption": self.disruption,
        }
