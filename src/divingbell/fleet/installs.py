"""Install grants: at most `install_parallel` machines install at once, each holding a lease
(divingbell.fleet.leases) that expires after `install_ttl_seconds` if no result comes.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from divingbell.fleet import leases, states
from divingbell.fleet.errors import ApiError
from divingbell.fleet.lifecycle import INSTALL, lock_scheduler, transition
from divingbell.fleet.models import Lease, Machine, iso, utcnow
from divingbell.fleet.settings import FleetSettings


def expire_stuck_installs(session: Session, now: datetime) -> None:
    """Machines in `installing` whose grant expired (or was taken) are failed, with a reason.

    One statement, so one snapshot: with two (live leases, then installing machines), a grant
    committed by another replica in between showed its machine installing without its lease,
    and that fresh install was failed (PostgreSQL, READ COMMITTED; found by the replica test).
    """
    live = select(Lease.holder).where(Lease.kind == INSTALL, Lease.holder.is_not(None),
                                      Lease.expires_at > now)
    stuck = session.scalars(select(Machine).where(Machine.state == states.INSTALLING,
                                                  Machine.id.not_in(live)))
    for machine in stuck:
        transition(session, machine, states.FAILED,
                   "install grant expired without a result", now)


def grant_install(session: Session, machine: Machine, settings: FleetSettings
                  ) -> leases.Held:
    # Read-then-claim (a machine renews the grant it holds): grants serialise on the
    # scheduler's lock, or one machine asking twice at once would hold two.
    lock_scheduler(session)
    session.refresh(machine)  # as the last grant holding the lock left it
    now = utcnow()
    expire_stuck_installs(session, now)
    if not machine.roles:
        raise ApiError(409, {"granted": False, "reason": "no-role", "retry_after": 30,
                             "message": "the machine has no role yet (the scheduler gives "
                                        "roles once enough machines are discovered)"})
    if machine.state != states.INSTALLING and states.INSTALLING not in states.TRANSITIONS.get(
            machine.state, frozenset()):
        raise ApiError(409, {"granted": False, "reason": f"state-{machine.state}",
                             "retry_after": 60,
                             "message": f"a machine in state {machine.state} cannot install"})
    result = leases.claim(session, INSTALL, INSTALL, settings.install_parallel, machine.id,
                          settings.install_ttl_seconds, now)
    if isinstance(result, leases.Busy):
        soonest = min((h.expires_at for h in result.holders), default=now + timedelta(seconds=30))
        raise ApiError(409, {"granted": False, "reason": "throttle-full",
                             "retry_after": max(1, int((soonest - now).total_seconds()) + 1),
                             "installing": [h.holder for h in result.holders]})
    assert isinstance(result, leases.Held)  # install grants are not one per holder
    transition(session, machine, states.INSTALLING,
               f"install grant {result.name} until {iso(result.expires_at)}", now)
    return result


def install_result(session: Session, machine: Machine, success: bool, output: str) -> None:
    if machine.state != states.INSTALLING:
        raise ApiError(409, {"error": "not-installing", "state": machine.state,
                             "message": "no install in progress for this machine"})
    machine.install_output = output[-65536:]
    transition(session, machine, states.INSTALLED if success else states.FAILED,
               "install succeeded" if success else "install failed (output kept)")
    leases.release_all(session, INSTALL, machine.id)
