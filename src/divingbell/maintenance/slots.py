"""The fleet semaphore: a few maintenance slots per group, each with a holder and a TTL the
holder renews while it works; an expired slot is taken over, so a node that died holding one
never stalls the fleet.

One small interface, two backends: `LeaseSlots` (Kubernetes `coordination.k8s.io/v1` Leases in
the agent's namespace, one per slot, claimed with resourceVersion optimistic concurrency) and
`FleetSlots` (the fleet service's `/v1/slots`, rows claimed atomically in its database).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from divingbell.fleet.client import FleetApiError, FleetClient
from divingbell.kube import KubeConflict, LeaseView, MaintenanceKube
from divingbell.maintenance.decide import SlotState, lease_name, plan_claim

log = logging.getLogger("divingbell.maintenance")

GROUP_LABEL = "divingbell.io/slot-group"
INDEX_LABEL = "divingbell.io/slot-index"


@dataclass(frozen=True)
class Slot:
    name: str  # "<group>/<index>"
    holder: str | None
    expires_at: float | None = None
    since: float | None = None

    @property
    def group(self) -> str:
        return self.name.rpartition("/")[0]

    @property
    def index(self) -> int:
        return int(self.name.rpartition("/")[2])


@dataclass(frozen=True)
class ClaimResult:
    slot: Slot | None  # None: no free slot
    holders: list[Slot] = field(default_factory=list)  # who holds the group's slots
    taken_over_from: str | None = None


class SlotError(Exception):
    """The backend could not be asked (API server or fleet service unreachable, refused)."""


class SlotBackend(Protocol):
    def claim(self, group: str, holder: str, slots: int, ttl: float) -> ClaimResult: ...

    def renew(self, slot: str, holder: str, ttl: float, rebooting: bool = False) -> bool:
        """False: the slot is no longer ours (expired and taken over, or force-released).
        `rebooting`: the holder is in its maintenance reboot, not back yet (the fleet service
        watches such a holder and power-cycles it once if it does not come back)."""

    def release(self, slot: str, holder: str) -> bool:
        """False: it was not ours to release (already free or someone else's)."""

    def list(self) -> list[Slot]: ...

    def force_release(self, slot: str) -> Slot | None:
        """An operator frees a stuck slot; returns what it was."""


# Kubernetes Leases ---------------------------------------------------------------------------

class LeaseSlots:
    def __init__(self, kube: MaintenanceKube, namespace: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.kube, self.namespace, self.clock = kube, namespace, clock

    def claim(self, group: str, holder: str, slots: int, ttl: float) -> ClaimResult:
        for _ in range(slots + 3):  # each conflict means someone else moved: read again
            leases = [self.kube.get_lease(self.namespace, lease_name(group, i))
                      for i in range(slots)]
            now = self.clock()
            states = [SlotState(i, lease is not None, lease.holder if lease else None,
                                _expiry(lease)) for i, lease in enumerate(leases)]
            plan = plan_claim(states, holder, now)
            if plan is None:
                return ClaimResult(None, [self._slot(group, i, lease)
                                          for i, lease in enumerate(leases) if lease])
            current = leases[plan.index]
            acquired = current.acquired if plan.kind == "renew" and current else now
            wanted = LeaseView(
                lease_name(group, plan.index), holder, max(1, round(ttl)), acquired, now,
                (current.transitions + (0 if plan.kind == "renew" else 1)) if current else 0,
                current.resource_version if current else "",
                {GROUP_LABEL: _label_value(group), INDEX_LABEL: str(plan.index)})
            try:
                if current is None:
                    stored = self.kube.create_lease(self.namespace, wanted)
                else:
                    stored = self.kube.replace_lease(self.namespace, wanted)
            except KubeConflict:
                log.info("slot %s/%d changed while claiming it; reading again", group,
                         plan.index)
                continue
            return ClaimResult(self._slot(group, plan.index, stored), [],
                               plan.previous if plan.kind == "takeover" else None)
        return ClaimResult(None, [])

    def renew(self, slot: str, holder: str, ttl: float, rebooting: bool = False) -> bool:
        def extend(lease: LeaseView) -> None:
            self.kube.replace_lease(self.namespace, LeaseView(
                lease.name, holder, max(1, round(ttl)), lease.acquired, self.clock(),
                lease.transitions, lease.resource_version, lease.labels))
        return self._change_held(slot, holder, extend)

    def release(self, slot: str, holder: str) -> bool:
        return self._change_held(slot, holder, self._free)

    def _change_held(self, slot: str, holder: str, change: Callable[[LeaseView], None]) -> bool:
        """`change` the slot's Lease while `holder` holds it, reading it again after a conflict
        (three tries); False once it is not the holder's."""
        group, index = _split(slot)
        for _ in range(3):
            lease = self.kube.get_lease(self.namespace, lease_name(group, index))
            if lease is None or lease.holder != holder:
                return False
            try:
                change(lease)
                return True
            except KubeConflict:
                continue
        return False

    def list(self) -> list[Slot]:
        return [self._slot(lease.labels.get(GROUP_LABEL, "?"),
                           int(lease.labels.get(INDEX_LABEL, "0")), lease)
                for lease in self.kube.list_leases(self.namespace)
                if GROUP_LABEL in lease.labels]

    def force_release(self, slot: str) -> Slot | None:
        for current in self.list():
            if current.name == slot:
                group, index = _split(slot)
                lease = self.kube.get_lease(self.namespace, lease_name(group, index))
                if lease is not None and lease.holder is not None:
                    self._free(lease)
                return current
        return None

    def _free(self, lease: LeaseView) -> None:
        self.kube.replace_lease(self.namespace, LeaseView(
            lease.name, None, lease.duration_seconds, None, None, lease.transitions,
            lease.resource_version, lease.labels))

    @staticmethod
    def _slot(group: str, index: int, lease: LeaseView | None) -> Slot:
        if lease is None:
            return Slot(f"{group}/{index}", None)
        return Slot(f"{group}/{index}", lease.holder, _expiry(lease), lease.acquired)


def _expiry(lease: LeaseView | None) -> float | None:
    if lease is None or lease.holder is None or lease.renewed is None:
        return None
    return lease.renewed + lease.duration_seconds


def _split(slot: str) -> tuple[str, int]:
    group, _, index = slot.rpartition("/")
    if not group or not index.isdigit():
        raise SlotError(f"{slot!r} is not a slot: use GROUP/INDEX, like default/0")
    return group, int(index)


def _label_value(group: str) -> str:
    import re

    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", group)[:63].strip("-_.")
    return clean or "group"


# The fleet service ---------------------------------------------------------------------------

class FleetSlots:
    """`/v1/slots` of the fleet service (docs/fleet.md), through its stdlib-only client."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client

    def claim(self, group: str, holder: str, slots: int, ttl: float) -> ClaimResult:
        """`slots` is not sent: the service decides a group's count (the document it serves
        this machine says the same) and caps `ttl`."""
        status, body = self._ask("POST", "/v1/slots/claim", {
            "group": group, "holder": holder, "ttl_seconds": round(ttl, 3)}, ok=(409,))
        if status == 409:
            detail = body.get("detail") if isinstance(body, dict) else None
            if isinstance(detail, dict) and detail.get("error") == "holds-another-slot":
                raise SlotError(str(detail.get("message", "holds another slot")))
            holders = detail.get("holders", []) if isinstance(detail, dict) else []
            return ClaimResult(None, [_fleet_slot(h) for h in holders])
        return ClaimResult(_fleet_slot(body), [], body.get("taken_over_from"))

    def renew(self, slot: str, holder: str, ttl: float, rebooting: bool = False) -> bool:
        status, _ = self._ask("POST", f"/v1/slots/{_path(slot)}/renew",
                              {"holder": holder, "ttl_seconds": round(ttl, 3),
                               "rebooting": rebooting}, ok=(404, 409))
        return status == 200

    def release(self, slot: str, holder: str) -> bool:
        status, _ = self._ask("POST", f"/v1/slots/{_path(slot)}/release", {"holder": holder},
                              ok=(404, 409))
        return status == 200

    def list(self) -> list[Slot]:
        _, body = self._ask("GET", "/v1/slots", None, ok=())
        items = body if isinstance(body, list) else body.get("slots", [])
        return [_fleet_slot(item) for item in items]

    def force_release(self, slot: str) -> Slot | None:
        before = next((s for s in self.list() if s.name == slot), None)
        self._ask("DELETE", f"/v1/slots/{_path(slot)}", None, ok=(404,))
        return before

    def _ask(self, method: str, path: str, body: object, ok: tuple[int, ...]
             ) -> tuple[int, Any]:
        try:
            answer = self.client.request(method, path, body, ok=ok)
        except FleetApiError as exc:
            raise SlotError(str(exc)) from None
        try:
            data = answer.json()
        except ValueError:
            data = {}
        return answer.status, data if isinstance(data, dict | list) else {}


def _path(slot: str) -> str:
    group, index = _split(slot)
    from urllib.parse import quote

    return f"{quote(group, safe='')}/{index}"


def _fleet_slot(item: object) -> Slot:
    if not isinstance(item, dict):
        raise SlotError(f"fleet service: unexpected slot {item!r}")
    return Slot(str(item.get("slot", "?")), item.get("holder"), _timestamp(item.get("expires_at")),
                _timestamp(item.get("since") or item.get("acquired_at")))


def _timestamp(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    import datetime as dt

    parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
