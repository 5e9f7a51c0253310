"""Roles for machines: a pure function of the machines, so it is easy to test and to reason
about. The service runs it inside one locked transaction (see lifecycle.run_scheduler).

Rules (Enjoliver's, made safer):
- `control-plane` goes to an odd quorum, and only when that many machines are available: all
  or nothing. When part of the control plane exists (a member was decommissioned), only the
  missing number is added, again all or nothing.
- Control-plane machines are spread across racks (LLDP chassis): each pick takes the rack with
  the fewest control-plane members so far.
- Every other machine becomes a `worker`, but only once the control plane is complete: workers
  cannot join a cluster that has none.
- Pinned machines keep their roles and are never picked. Same inputs, same choice: candidates
  are ordered by (discovered_at, uuid).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

CONTROL_PLANE: Final = "control-plane"
WORKER: Final = "worker"
ROLES: Final = (CONTROL_PLANE, WORKER)
UNASSIGNED: Final = "unassigned"


def scheduling_class(roles: Iterable[str] | None) -> str | None:
    """What a scheduling pass needs to know of a machine, kept beside its roles in an indexed
    column (`machines.scheduling`, migration 0008) so that the pass reads only the machines
    that can change its outcome: `unassigned` (no roles: a candidate), `control-plane` (the
    quorum it tops up and spreads), None for everything else (workers: most of a fleet)."""
    held = list(roles or ())
    if not held:
        return UNASSIGNED
    return CONTROL_PLANE if CONTROL_PLANE in held else None


@dataclass(frozen=True)
class Candidate:
    id: str
    uuid: str
    discovered_at: datetime
    roles: tuple[str, ...]
    pinned: bool
    rack: str | None
    schedulable: bool
    """Has facts and is not decommissioned."""


def schedule(machines: Iterable[Candidate], control_plane_size: int) -> dict[str, list[str]]:
    """The roles to give: {machine id: roles} for machines whose roles change."""
    members = [m for m in machines if m.schedulable]
    control = [m for m in members if CONTROL_PLANE in m.roles]
    free = sorted((m for m in members if not m.roles and not m.pinned),
                  key=lambda m: (m.discovered_at, m.uuid))
    decided: dict[str, list[str]] = {}
    missing = control_plane_size - len(control)
    if missing > 0 and len(free) >= missing:
        picked = _spread(free, missing, [m.rack for m in control])
        for machine in picked:
            decided[machine.id] = [CONTROL_PLANE]
        control_count = len(control) + len(picked)
        free = [m for m in free if m.id not in decided]
    else:
        control_count = len(control)
    if control_count >= control_plane_size:
        for machine in free:
            decided[machine.id] = [WORKER]
    return decided


def _spread(free: list[Candidate], count: int, used_racks: list[str | None]) -> list[Candidate]:
    """Pick `count` machines, each from the rack with the fewest control-plane members so far
    (machines without a known rack count as one rack of their own each); ties keep order."""
    load: dict[str | None, int] = {}
    for rack in used_racks:
        if rack is not None:
            load[rack] = load.get(rack, 0) + 1
    remaining = list(free)
    picked: list[Candidate] = []
    for _ in range(count):
        best = min(range(len(remaining)),
                   key=lambda i: (load.get(remaining[i].rack, 0)
                                  if remaining[i].rack is not None else 0, i))
        chosen = remaining.pop(best)
        picked.append(chosen)
        if chosen.rack is not None:
            load[chosen.rack] = load.get(chosen.rack, 0) + 1
    return picked


def node_labels(roles: Iterable[str], rack: str | None) -> dict[str, str]:
    """A machine's node labels, fed to the document's label overrides."""
    labels: dict[str, str] = {}
    ordered = [r for r in ROLES if r in set(roles)]
    for role in ordered:
        labels[f"node-role.kubernetes.io/{role}"] = ""
    if ordered:
        labels["divingbell.io/role"] = ordered[0]
    if rack:
        labels["divingbell.io/rack"] = rack
    return labels


def rack_of(lldp: Iterable[Mapping[str, object]]) -> str | None:
    """The rack: the first LLDP neighbour's chassis name (or id), made a valid label value."""
    import re

    for neighbour in lldp:
        for key in ("chassis_name", "chassis_id"):
            value = neighbour.get(key)
            if isinstance(value, str) and value.strip():
                text = re.sub(r"[^A-Za-z0-9_.-]", "-", value.strip())[:63].strip("-_.")
                if text:
                    return text
    return None
