"""A machine's lifecycle in the store: enrolment (`discover`, with the boot token spent and the
credential issued once), boot requests, MACs, host names, roles and the scheduler's pass under
its lock, decommission, re-enrolment and reprovision; every change a state transition
(`states.TRANSITIONS`) kept in its history, every operator's act in the audit log. No HTTP here
(routes translate), no process state that matters: every decision reads and writes rows, so any
replica can serve any request.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from divingbell.fleet import leases, states
from divingbell.fleet.api.schemas import Discovery
from divingbell.fleet.auth import (
    BOOT,
    MACHINE_PREFIX,
    Principal,
    format_token,
    hash_secret,
    new_secret,
    unauthorized,
)
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.models import (
    AuditEvent,
    Machine,
    MachineMac,
    Setting,
    StateChange,
    Token,
    utcnow,
)
from divingbell.fleet.scheduler import (
    CONTROL_PLANE,
    UNASSIGNED,
    Candidate,
    rack_of,
    schedule,
)
from divingbell.fleet.settings import FleetSettings

log = logging.getLogger("divingbell.fleet")

SCHEDULER_LOCK = "scheduler"
INSTALL = "install"
SLOT = "slot"


def record_event(session: Session, machine: Machine, reason: str) -> None:
    """Something that happened to a machine without changing its state, in its history."""
    session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                            to_state=machine.state, reason=reason, at=utcnow()))


def audit(session: Session, actor: str, action: str, subject: str, detail: str = "") -> None:
    session.add(AuditEvent(at=utcnow(), actor=actor[:64], action=action, subject=subject[:255],
                           detail=detail))


def transition(session: Session, machine: Machine, wanted: str, reason: str,
               now: datetime | None = None) -> None:
    """Move a machine to `wanted` (checked against states.TRANSITIONS) and record it."""
    if machine.state == wanted:
        return
    states.check_transition(machine.state, wanted)
    now = now or utcnow()
    session.add(StateChange(machine_id=machine.id, from_state=machine.state, to_state=wanted,
                            reason=reason, at=now))
    log.info("machine %s: %s -> %s (%s)", machine.id, machine.state, wanted, reason)
    machine.state = wanted
    machine.state_changed_at = now


@dataclass(frozen=True)
class Enrolment:
    machine: Machine
    credential: str | None
    """The new machine credential (`dbm_...`), issued once per enrolment; None when a machine
    updated its own facts with the credential it has."""
    created: bool


ACTIVE_EXCLUDED = (states.BOOTING, states.DECOMMISSIONED)
"""States whose machines hold no hostname: a hostname is unique among the others."""


def discover(session: Session, facts: Discovery, settings: FleetSettings,
             principal: Principal) -> Enrolment:
    """Enrol a machine, or update its facts (by UUID). Enrolment binds identity once:

    - a machine that has a credential is updated only with that credential (its facts; the
      credential stays); anyone else gets 409 `already-enrolled` (an operator's `fleet
      reenroll` clears the credential so that the next boot may enrol it again);
    - a boot token enrols only the machine of the boot that received it (its UUID, MAC and
      `booting` row), once: it is deleted here, in the enrolling transaction;
    - an operator's bootstrap or admin token enrols a machine that has no credential.

    Every replica serialises on the scheduler lock first, so two concurrent enrolments of one
    machine issue one credential."""
    lock_scheduler(session)
    now = utcnow()
    machine = session.scalars(select(Machine).where(Machine.uuid == facts.uuid)).first()
    macs = [i.mac for i in facts.interfaces if i.mac]
    if principal.kind == "machine":
        if machine is None or machine.id != principal.id:
            raise ApiError(403, {"error": "forbidden", "field": "uuid", "message": (
                "a machine credential registers only its own machine: uuid "
                f"{facts.uuid} is not machine {principal.id}")})
    elif machine is not None and machine.credential_hash:
        raise ApiError(409, {"error": "already-enrolled", "machine": machine.id, "message": (
            f"machine {machine.id} (uuid {facts.uuid}) is enrolled: registering it again "
            "needs its own credential, or an operator's `divingbell fleet reenroll "
            f"{machine.id}`")})
    elif principal.role == BOOT:
        _spend_boot_token(session, principal.id, facts, macs, machine, now)
    if macs:
        owners = session.execute(select(MachineMac.mac, MachineMac.machine_id).where(
            MachineMac.mac.in_(macs))).all()
        for mac, owner in owners:
            if machine is None or owner != machine.id:
                raise mac_conflict(mac, owner, machine.id if machine else f"uuid:{facts.uuid}")
    if facts.hostname:
        _check_hostname_free(session, facts.hostname, machine.id if machine else None,
                             machine.id if machine is not None else f"uuid:{facts.uuid}")
    created = machine is None
    if machine is None:
        machine = Machine(id="m" + secrets.token_hex(6), uuid=facts.uuid, state=states.DISCOVERED,
                          state_changed_at=now, created_at=now, discovered_at=now, roles=[],
                          pinned=False, credential_hash="", hostname_accepted=False)
        session.add(machine)
        session.add(StateChange(machine_id=machine.id, from_state=None,
                                to_state=states.DISCOVERED, reason="first discovery", at=now))
    elif machine.state in (states.BOOTING, states.DECOMMISSIONED):
        transition(session, machine, states.DISCOVERED, "discovered again", now)
        machine.discovered_at = now
        if machine.roles:  # re-enrolled with its roles kept (a reinstall)
            transition(session, machine, states.SCHEDULED, "enrolled again with its roles", now)
    # An operator's token vouches for the name it registers; a machine's own credential keeps
    # an accepted name only while it does not change it. A boot token never inherits one: the
    # machine it enrols again (after reenroll or decommission) may be whoever booted first.
    operator = principal.kind == "token" and principal.role in ("admin", "bootstrap")
    machine.hostname_accepted = bool(facts.hostname) and (
        operator or (principal.kind == "machine" and machine.hostname_accepted
                     and machine.hostname == facts.hostname))
    machine.boot_id = facts.boot_id
    machine.hostname = facts.hostname
    machine.serial = facts.serial
    machine.interfaces = [i.model_dump() for i in facts.interfaces]
    machine.disks = [d.model_dump() for d in facts.disks]
    machine.lldp = [n.model_dump() for n in facts.lldp]
    machine.rack = rack_of(machine.lldp)
    machine.reported_bmc = facts.bmc.model_dump() if facts.bmc else None
    credential = None
    if principal.kind != "machine":
        secret = new_secret()
        machine.credential_hash = hash_secret(secret)
        credential = format_token(MACHINE_PREFIX, machine.id, secret)
        machine.enrolled_with = "boot" if principal.role == BOOT else "operator"
        audit(session, principal.label, "enrol", machine.id,
              f"uuid {facts.uuid}{f' as {facts.hostname}' if facts.hostname else ''}")
    session.flush()
    session.execute(delete(MachineMac).where(MachineMac.machine_id == machine.id))
    for mac in macs:
        session.add(MachineMac(mac=mac, machine_id=machine.id))
    try:
        session.flush()
    except IntegrityError:
        # Another replica registered a machine with one of these MACs at the same moment.
        raise ApiError(409, {"error": "mac-conflict", "mac": macs[0] if len(macs) == 1 else macs,
                             "machines": [machine.id],
                             "message": "a MAC of this machine was registered by another "
                                        "machine concurrently; retry to see which"}) from None
    run_scheduler(session, settings)
    return Enrolment(machine, credential, created)


def _spend_boot_token(session: Session, token_id: str, facts: Discovery, macs: Sequence[str],
                      machine: Machine | None, now: datetime) -> None:
    """A boot token enrols the machine of its own boot, once: checked against its binding and
    deleted in this transaction (a second use, on any replica, finds it gone)."""
    token = session.get(Token, token_id)
    if token is None or token.role != BOOT or (
            token.expires_at is not None and token.expires_at <= now):
        raise unauthorized("boot token already used or expired: boot again for a fresh one")
    bound_row = token.machine_id is not None and machine is not None \
        and machine.id != token.machine_id
    if (token.bound_uuid is not None and token.bound_uuid != facts.uuid) or bound_row \
            or (token.bound_uuid is None and machine is not None):
        raise ApiError(403, {"error": "forbidden", "field": "uuid", "message": (
            f"this boot token was issued to another boot: it cannot enrol uuid {facts.uuid}")})
    if token.bound_mac is not None and token.bound_mac not in macs:
        raise ApiError(403, {"error": "forbidden", "field": "interfaces", "message": (
            f"this boot token was issued to the boot of MAC {token.bound_mac}, which these "
            "interfaces do not have")})
    session.delete(token)


def record_boot(session: Session, uuid: str, mac: str | None = None) -> Machine:
    """A network boot request from `uuid` (and its boot MAC): an unknown machine is created in
    state `booting` (no credential until it registers with its facts); a known one is
    returned unchanged (a decommissioned machine booting again becomes `booting`). For the
    network-boot routes."""
    uuid = uuid.lower()
    machine = session.scalars(select(Machine).where(Machine.uuid == uuid)).first()
    now = utcnow()
    if machine is None:
        machine = Machine(id="m" + secrets.token_hex(6), uuid=uuid, state=states.BOOTING,
                          state_changed_at=now, created_at=now, discovered_at=now, roles=[],
                          pinned=False, credential_hash="", hostname="", interfaces=[],
                          disks=[], lldp=[])
        session.add(machine)
        session.add(StateChange(machine_id=machine.id, from_state=None, to_state=states.BOOTING,
                                reason=f"boot request{f' from {mac}' if mac else ''}", at=now))
        if mac and session.get(MachineMac, mac) is None:
            session.add(MachineMac(mac=mac, machine_id=machine.id))
        session.flush()
    elif machine.state == states.DECOMMISSIONED:
        transition(session, machine, states.BOOTING, "boot request after decommission", now)
    return machine


def machine_by_mac(session: Session, mac: str) -> Machine | None:
    owner = session.get(MachineMac, mac.lower())
    return None if owner is None else session.get(Machine, owner.machine_id)


def mac_conflict(mac: str, owner: str, newcomer: str) -> ApiError:
    return ApiError(409, {"error": "mac-conflict", "mac": mac, "machines": [owner, newcomer],
                          "message": f"MAC {mac} is already on machine {owner}; decommission "
                                     "it or fix the report"})


def get_machine(session: Session, machine_id: str) -> Machine:
    machine = session.get(Machine, machine_id)
    if machine is None:
        raise not_found("machine", machine_id)
    return machine


def set_roles(session: Session, machine: Machine, roles: Sequence[str], pinned: bool,
              settings: FleetSettings, who: str) -> None:
    lock_scheduler(session)
    if machine.state == states.DECOMMISSIONED:
        raise ApiError(409, {"error": "decommissioned",
                             "message": f"machine {machine.id} is decommissioned"})
    unique = sorted(set(roles))
    machine.roles = unique
    machine.pinned = pinned and bool(unique)
    reason = (f"roles {', '.join(unique) or 'cleared'} "
              f"{'pinned' if machine.pinned else 'unpinned'} by {who}")
    audit(session, who, "roles", machine.id, reason)
    if unique and machine.state == states.DISCOVERED:
        transition(session, machine, states.SCHEDULED, reason)
    elif not unique and machine.state == states.SCHEDULED:
        transition(session, machine, states.DISCOVERED, reason)
    else:
        session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                                to_state=machine.state, reason=reason, at=utcnow()))
    session.flush()
    run_scheduler(session, settings)


def decommission(session: Session, machine: Machine, settings: FleetSettings, who: str) -> None:
    """Out of the fleet, and out of trust: its credential (so its config, reports, slots,
    install flow and join script), its MACs, roles, grants, slots and pending boot tokens go.
    Booting again is how it comes back, enrolling anew."""
    lock_scheduler(session)
    transition(session, machine, states.DECOMMISSIONED, f"decommissioned by {who}")
    audit(session, who, "decommission", machine.id)
    machine.roles = []
    machine.pinned = False
    machine.enrolled_with = None  # out of trust: booting again is a new enrolment
    _revoke(session, machine)
    session.execute(delete(MachineMac).where(MachineMac.machine_id == machine.id))
    session.flush()
    run_scheduler(session, settings)


def reenroll(session: Session, machine: Machine, who: str) -> None:
    """An operator lets the next boot of this machine enrol it again (a reinstall, a lost
    credential): its credential is revoked, its grants and slots released, and it is
    `booting`, so /v1/ipxe hands its next boot the discovery profile and a boot token bound
    to it. Roles, MACs and history stay."""
    lock_scheduler(session)
    if machine.state == states.DECOMMISSIONED:
        raise ApiError(409, {"error": "decommissioned", "message": (
            f"machine {machine.id} is decommissioned: booting it enrols it again")})
    audit(session, who, "reenroll", machine.id)
    transition(session, machine, states.BOOTING, f"re-enrolment allowed by {who}")
    _revoke(session, machine)
    session.flush()


def accept_hostname(session: Session, machine: Machine, hostname: str | None, who: str) -> None:
    """An operator vouches for a machine's host name (the claimed one when None)."""
    lock_scheduler(session)
    name = machine.hostname if hostname is None else hostname
    if not name:
        raise ApiError(422, {"error": "no-hostname", "field": "hostname", "message": (
            f"machine {machine.id} claimed no hostname: give one")})
    if machine.state in ACTIVE_EXCLUDED:
        raise ApiError(409, {"error": "not-enrolled", "message": (
            f"machine {machine.id} is {machine.state}: accept its name once it enrolled")})
    _check_hostname_free(session, name, machine.id, machine.id)
    machine.hostname, machine.hostname_accepted = name, True
    audit(session, who, "accept-hostname", machine.id, name)
    session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                            to_state=machine.state, reason=f"hostname {name} accepted by {who}",
                            at=utcnow()))


def _check_hostname_free(session: Session, hostname: str, machine_id: str | None,
                         newcomer: str) -> None:
    holder = session.execute(select(Machine.id).where(
        Machine.hostname == hostname, Machine.state.not_in(ACTIVE_EXCLUDED),
        *([Machine.id != machine_id] if machine_id is not None else [])).limit(1)).scalar()
    if holder is not None:
        raise ApiError(409, {"error": "hostname-conflict", "field": "hostname",
                             "hostname": hostname, "machines": [holder, newcomer],
                             "message": f"hostname {hostname} is already machine {holder}'s; "
                                        f"{newcomer} cannot have it"})


def _revoke(session: Session, machine: Machine) -> None:
    machine.credential_hash = ""
    session.execute(delete(Token).where(Token.role == BOOT, Token.machine_id == machine.id))
    leases.release_all(session, INSTALL, machine.id)
    leases.release_all(session, SLOT, machine.id)


REPROVISIONABLE = frozenset({states.INSTALLED, states.FAILED, states.READY, states.UPDATING,
                             states.DEGRADED})


def reprovision(session: Session, machine: Machine, who: str) -> None:
    """Install the machine again, as itself: an operator's re-enrolment of an installed (or
    failed) machine. Its credential is revoked (the OS holding it is about to be replaced) and
    its leases released; it is `booting`, so its next network boot gets a boot token bound to
    it, enrols keeping its id, roles, history and reports, and, having roles, is scheduled and
    takes an install grant like a new machine."""
    lock_scheduler(session)
    if machine.state not in REPROVISIONABLE:
        raise states.TransitionError(machine.state, states.BOOTING)
    audit(session, who, "reprovision", machine.id)
    transition(session, machine, states.BOOTING, f"reprovision requested by {who}")
    _revoke(session, machine)
    session.flush()


def lock_scheduler(session: Session) -> None:
    """Hold the scheduler row's lock until the transaction ends (FOR UPDATE on PostgreSQL; on
    SQLite the write transaction already excludes other writers). Taken first by every
    transaction that schedules, so two of them never wait on each other's rows (deadlock)."""
    session.execute(select(Setting).where(Setting.key == SCHEDULER_LOCK).with_for_update())


# What a scheduling pass can act on: the control plane (its size and racks) and machines with
# no roles yet. Workers are most of a fleet and never change the outcome, and the pass runs on
# every registration: its candidates are read through the scheduling index (migration 0008),
# so a registration costs the same in a fleet of 1,000 or 100,000. Booting machines have no
# facts and never count, whatever their roles.
_SCHEDULER_CANDIDATES = select(
    Machine.id, Machine.uuid, Machine.discovered_at, Machine.roles, Machine.pinned,
    Machine.rack, Machine.state).where(
    Machine.scheduling.in_((UNASSIGNED, CONTROL_PLANE)),
    Machine.state.in_(sorted(states.HAS_FACTS)))


def run_scheduler(session: Session, settings: FleetSettings) -> dict[str, list[str]]:
    """One scheduling pass; replicas never schedule at once (see lock_scheduler)."""
    lock_scheduler(session)
    rows = session.execute(_SCHEDULER_CANDIDATES).all()
    candidates = [Candidate(r.id, r.uuid, r.discovered_at, tuple(r.roles or ()), r.pinned, r.rack,
                            r.state in states.HAS_FACTS) for r in rows]
    decided = schedule(candidates, settings.control_plane_size)
    now = utcnow()
    for machine_id, roles in sorted(decided.items()):
        machine = session.get(Machine, machine_id)
        assert machine is not None
        machine.roles = roles
        if machine.state == states.DISCOVERED:
            transition(session, machine, states.SCHEDULED, f"scheduler: {', '.join(roles)}", now)
        else:
            session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                                    to_state=machine.state,
                                    reason=f"scheduler: {', '.join(roles)}", at=now))
    return decided
