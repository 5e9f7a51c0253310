"""A maintenance reboot that does not come back gets one BMC power cycle, then an operator.

The fleet learns a node is rebooting from its agent: in the `rebooting` phase it renews its
maintenance slot with `rebooting: true` (`maintenance/sequence.py`), and the service keeps a
`RebootWatch` (started, last heard). The agent that runs after the reboot renews without it,
or releases the slot, and the watch is gone. A watch not heard from for the machine's health
timeout (`maintenance.reboot.health.timeout` of the document it is served) is overdue: the
host hung on its way down or up.

Each overdue watch is claimed by setting `rescued_at` in one conditional UPDATE (so on every
replica and every pass it is acted on once, never in a loop), then the machine's BMC is asked
for a `cycle` through `fleet/power.py` (its lease, pacing and audit): nothing is sent unless
the power state is confirmed first (`power/control.py`). Whatever happened is reported on the
machine (it becomes `degraded`, the reason in its history) and audited (`reboot-rescue`), and
the machine is left for an operator. A machine without a BMC is reported the same way.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from divingbell.fleet import lifecycle, states
from divingbell.fleet import slots as fleet_slots
from divingbell.fleet.db import Database
from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import BmcRow, Machine, RebootWatch, utcnow
from divingbell.fleet.power import power
from divingbell.fleet.settings import FleetSettings
from divingbell.power.secrets import SecretBox

log = logging.getLogger("divingbell.fleet.rescue")
ACTOR = "fleet:reboot-rescue"


@dataclass(frozen=True)
class Rescue:
    machine_id: str
    cycled: bool
    """A power cycle was sent and each change confirmed."""
    message: str


def heard(session: Session, machine_id: str, rebooting: bool, now: datetime) -> None:
    """The machine's agent renewed its slot: still rebooting (watch it from the first such
    renewal on) or back (forget the watch)."""
    watch = session.get(RebootWatch, machine_id)
    if not rebooting:
        if watch is not None:
            session.delete(watch)
        return
    if session.get(Machine, machine_id) is None:
        return  # an admin renewing for a holder that is not a machine: nothing to power
    if watch is None:
        session.add(RebootWatch(machine_id=machine_id, started_at=now, heard_at=now,
                                health_timeout_seconds=fleet_slots.health_timeout(
                                    session, machine_id), outcome=""))
    else:
        watch.heard_at = now


def released(session: Session, holder: str | None) -> None:
    """The slot was released (by its holder, or an operator): nothing left to watch."""
    if holder is not None:
        watch = session.get(RebootWatch, holder)
        if watch is not None:
            session.delete(watch)


def claim_overdue(session: Session, now: datetime) -> list[RebootWatch]:
    """The overdue watches not acted on yet, each claimed (`rescued_at`) by this caller."""
    candidates = session.scalars(select(RebootWatch).where(
        RebootWatch.rescued_at.is_(None))).all()
    claimed = []
    for watch in candidates:
        if now - watch.heard_at < timedelta(seconds=watch.health_timeout_seconds):
            continue
        result = session.execute(update(RebootWatch).where(
            RebootWatch.machine_id == watch.machine_id, RebootWatch.rescued_at.is_(None),
            RebootWatch.heard_at == watch.heard_at).values(rescued_at=now))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(watch)
    return claimed


def run_once(db: Database, settings: FleetSettings, box: SecretBox | None,
             now: datetime | None = None) -> list[Rescue]:
    """One pass: every overdue maintenance reboot gets its one power cycle and a report."""
    now = now or utcnow()
    with db.write() as session:
        overdue = [(w.machine_id, w.heard_at, w.health_timeout_seconds)
                   for w in claim_overdue(session, now)]
        has_bmc = {machine_id: session.get(BmcRow, machine_id) is not None
                   for machine_id, _, _ in overdue}
    return [_rescue(db, settings, box, machine_id, now - last, timeout, has_bmc[machine_id])
            for machine_id, last, timeout in overdue]


def _rescue(db: Database, settings: FleetSettings, box: SecretBox | None, machine_id: str,
            silent: timedelta, timeout: float, has_bmc: bool) -> Rescue:
    why = (f"maintenance reboot not back: no word from its agent for "
           f"{silent.total_seconds():.0f}s (health timeout {timeout:g}s)")
    cycled, detail = False, {}
    if not has_bmc:
        what = "it has no BMC, so nothing was done"
    else:
        try:
            outcome = power(db, settings, box, machine_id, "cycle", None, ACTOR)
        except ApiError as exc:  # no secrets key, the BMC removed meanwhile, its lease busy
            what = f"no power cycle: {exc.detail.get('message', exc.detail)}"
        else:
            cycled = outcome.ok
            detail = outcome.as_dict()
            what = (f"power-cycled once through its BMC: {outcome.message}" if outcome.ok
                    else f"not power-cycled: {outcome.message}")
    message = f"{why}; {what}; left for an operator"
    with db.write() as session:
        watch = session.get(RebootWatch, machine_id)
        if watch is not None:
            watch.outcome = message
        machine = session.get(Machine, machine_id)
        if machine is not None:
            if states.DEGRADED in states.TRANSITIONS.get(machine.state, frozenset()):
                lifecycle.transition(session, machine, states.DEGRADED, message)
            else:
                lifecycle.record_event(session, machine, message)
        lifecycle.audit(session, ACTOR, "reboot-rescue", machine_id,
                        json.dumps({"cycled": cycled, "message": message, "power": detail}))
    log.warning("machine %s: %s", machine_id, message)
    return Rescue(machine_id, cycled, message)


class RescueLoop:
    """`run_once` every `settings.reboot_rescue_interval_seconds` in a thread of the service."""

    def __init__(self, db: Database, settings: FleetSettings, box: SecretBox | None) -> None:
        self.db, self.settings, self.box = db, settings, box
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reboot-rescue", daemon=True)

    def start(self) -> RescueLoop:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2 * self.settings.power_timeout_seconds + 30)

    def _run(self) -> None:
        while not self.stopping.wait(self.settings.reboot_rescue_interval_seconds):
            try:
                run_once(self.db, self.settings, self.box)
            except Exception:  # the next pass tries again; the service stays up
                log.exception("reboot rescue pass failed")
