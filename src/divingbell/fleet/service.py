"""The fleet's operations on the store: no HTTP here (routes translate), no process state
that matters (every decision reads and writes rows, so any replica can serve any request).

Only derived, immutable data is cached in memory: a revision's validated document, keyed by
its number and digest (a revision's text never changes).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple, cast

import yaml
from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from divingbell.core.document.api import effective_document, load_document_text, node_config
from divingbell.core.errors import DocumentError
from divingbell.fleet import leases, rollouts, states
from divingbell.fleet.api.schemas import Discovery, ReportBody
from divingbell.fleet.auth import (
    BOOT,
    MACHINE_PREFIX,
    Credentials,
    Principal,
    check_machine_or_admin,
    check_machine_or_reader,
    format_token,
    hash_secret,
    new_secret,
    unauthorized,
    verify,
)
from divingbell.fleet.db import Prepared
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.models import (
    AuditEvent,
    BmcRow,
    Lease,
    Machine,
    MachineMac,
    Report,
    Revision,
    RolloutMember,
    RolloutRow,
    Setting,
    StateChange,
    Token,
    iso,
    utcnow,
)
from divingbell.fleet.revisions import (
    ACTIVE_REVISION,
    MachineLike,
    active_revision,
    labels_of,
    revision_document,
    set_active,
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
HISTORY_SHOWN = 50


def record_event(session: Session, machine: Machine, reason: str) -> None:
    """Something that happened to a machine without changing its state, in its history."""
    session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                            to_state=machine.state, reason=reason, at=utcnow()))


def audit(session: Session, actor: str, action: str, subject: str, detail: str = "") -> None:
    session.add(AuditEvent(at=utcnow(), actor=actor[:64], action=action, subject=subject[:255],
                           detail=detail))


# Machines ------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class View:
    """The few columns of a machine the hot paths need (no facts, no ORM)."""

    id: str
    state: str
    hostname: str
    roles: list[Any]
    rack: str | None
    last_report_revision: int | None
    last_report_etag: str | None
    last_report_state: str | None
    hostname_accepted: bool


VIEW_COLUMNS = (Machine.id, Machine.state, Machine.hostname, Machine.roles, Machine.rack,
                Machine.last_report_revision, Machine.last_report_etag,
                Machine.last_report_state, Machine.hostname_accepted)


def served_name(machine: MachineLike) -> str:
    """The host name that selects the document's host overrides: the machine's only once an
    operator accepted it (a claimed name is the machine's own word, and would hand it another
    host's override)."""
    return machine.hostname if machine.hostname_accepted else ""


# The hot paths' statements, built once: constructing SQLAlchemy statements per request costs
# more than running them. Plain tables (not ORM entities) keep execution on the Core path.
_MACHINES = cast(Table, Machine.__table__)
_REPORTS = cast(Table, Report.__table__)
_HISTORY = cast(Table, StateChange.__table__)
_SETTINGS = cast(Table, Setting.__table__)
_ACTIVE = (select(_SETTINGS.c.value).where(_SETTINGS.c.key == ACTIVE_REVISION)
           .scalar_subquery())
_VIEW_COLUMNS = [_MACHINES.c[c.key] for c in VIEW_COLUMNS]
_MEMBERS = cast(Table, RolloutMember.__table__)
_ROLLOUTS = cast(Table, RolloutRow.__table__)
# The machine asking about itself: its credential hash, the active revision, its view and its
# place in the latest rollout (NULLs when it has none), in one statement.
_SELF_VIEW = select(
    _MACHINES.c.credential_hash, _ACTIVE, *_VIEW_COLUMNS,
    _ROLLOUTS.c.status, _ROLLOUTS.c.revision, _ROLLOUTS.c.rollback, _MEMBERS.c.progress,
    _MEMBERS.c.previous_revision,  # rollouts.Place, in its order
).select_from(
    _MACHINES.outerjoin(_MEMBERS, and_(_MEMBERS.c.machine_id == _MACHINES.c.id,
                                       _MEMBERS.c.rollout_id == rollouts.LATEST))
    .outerjoin(_ROLLOUTS, _ROLLOUTS.c.id == _MEMBERS.c.rollout_id)
).where(_MACHINES.c.id == bindparam("id"))
_PLACE_AT = 2 + len(_VIEW_COLUMNS)
_SELF_VIEW_RUN = Prepared(_SELF_VIEW)
_INSERT_REPORT = Prepared(insert(_REPORTS).values({name: bindparam(name) for name in (
    "machine_id", "revision", "etag", "state", "modules", "drift", "duration_seconds",
    "boot_id", "received_at")}))
_INSERT_HISTORY = Prepared(insert(_HISTORY).values({name: bindparam(name) for name in (
    "machine_id", "from_state", "to_state", "reason", "at")}))
_REPORT_COLUMNS = ("last_report_at", "last_report_revision", "last_report_etag",
                   "last_report_state")
_UPDATE_AFTER_REPORT = {
    with_state: Prepared(update(_MACHINES).where(_MACHINES.c.id == bindparam("mid")).values(
        {name: bindparam(f"v_{name}") for name in (
            *_REPORT_COLUMNS, *(("state", "state_changed_at") if with_state else ()))}))
    for with_state in (False, True)}
_trims: dict[int, Prepared] = {}


def _trim_statement(keep: int) -> Prepared:
    statement = _trims.get(keep)
    if statement is None:
        cutoff = (select(_REPORTS.c.id).where(_REPORTS.c.machine_id == bindparam("mid"))
                  .order_by(_REPORTS.c.id.desc()).offset(keep).limit(1).scalar_subquery())
        statement = _trims[keep] = Prepared(delete(_REPORTS).where(
            _REPORTS.c.machine_id == bindparam("mid"), _REPORTS.c.id <= cutoff))
    return statement


def machine_view(connection: Connection, machine_id: str) -> View:
    row = connection.execute(select(*VIEW_COLUMNS).where(Machine.id == machine_id)).first()
    if row is None:
        raise not_found("machine", machine_id)
    return View(*row)


class Authorized(NamedTuple):
    principal: Principal
    machine: View
    active: int | None
    place: rollouts.Membership | None
    """The machine's place in the latest rollout (None: not in it)."""


def authorized_view(connection: Connection, credentials: Credentials, machine_id: str,
                    *, readers: bool) -> Authorized:
    """Check the caller, load the machine's view, the active revision and the machine's place
    in the latest rollout: one query when the machine asks about itself (every poll and
    report). `readers`: reader tokens may read."""
    if credentials.prefix == MACHINE_PREFIX and credentials.ident == machine_id:
        return _own_view(credentials, _SELF_VIEW_RUN.first(connection, {"id": machine_id}))
    principal = verify(connection, credentials)
    if readers:
        check_machine_or_reader(principal, machine_id)
    else:
        check_machine_or_admin(principal, machine_id)
    return Authorized(principal, machine_view(connection, machine_id),
                      active_revision(connection), rollouts.membership(connection, machine_id))


def own_views(connection: Connection, credentials: Sequence[Credentials]) -> list[Authorized]:
    """`authorized_view` for several machines each asking about itself (`credentials.ident`
    is the machine), their queries all sent before any answer is read: in PostgreSQL's
    pipeline mode one round trip for all. Raises for the first credential that fails."""
    if any(c.prefix != MACHINE_PREFIX for c in credentials):
        raise ValueError("own_views is for machines' own credentials")
    sent = [_SELF_VIEW_RUN.send(connection, {"id": c.ident}) for c in credentials]
    rows = [query.first() for query in sent]  # every answer read before any check may raise
    return [_own_view(c, row) for c, row in zip(credentials, rows, strict=True)]


def _own_view(credentials: Credentials, row: tuple[Any, ...] | None) -> Authorized:
    if row is None or not hmac.compare_digest(row[0], hash_secret(credentials.secret)):
        raise unauthorized("invalid token")
    active = int(row[1]) if row[1] else None
    place = row[_PLACE_AT:]
    return Authorized(Principal("machine", credentials.ident, "machine"),
                      View(*row[2:_PLACE_AT]), active,
                      None if place[3] is None else rollouts.Place(*place))


def machine_summary(machine: Machine, active: int | None,
                    power_state: str | None = None) -> dict[str, Any]:
    """`power_state`: the last state its BMC confirmed (None: no BMC)."""
    return {
        "id": machine.id, "uuid": machine.uuid, "hostname": machine.hostname,
        "hostname_accepted": machine.hostname_accepted, "state": machine.state,
        "unadmitted": machine.enrolled_with == "boot" and not machine.hostname_accepted
        and machine.state != states.DECOMMISSIONED,
        "state_changed_at": iso(machine.state_changed_at),
        "roles": list(machine.roles or []), "pinned": machine.pinned, "rack": machine.rack,
        "revision": machine.last_report_revision,
        "up_to_date": up_to_date(machine, active),
        "last_report_at": iso(machine.last_report_at),
        "macs": [i["mac"] for i in machine.interfaces or [] if i.get("mac")],
        "ips": [a["address"] for i in machine.interfaces or [] for a in i.get("addresses") or []
                if not str(a.get("address", "")).startswith("fe80:")],
        "power_state": power_state,
    }


MACHINES_PAGE = 500
"""Machines per page of GET /v1/machines when a client pages (`after` without `limit`)."""
MACHINES_PAGE_MAX = 5000
_MACHINE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class MachinePage:
    machines: list[Machine]
    next: str | None
    """The cursor of the page after this one; None on the last page."""
    power: dict[str, str]
    """The last power state each machine's BMC confirmed, by machine id (from the store: a
    list never queries a BMC); machines without a BMC are absent."""


def list_machines(session: Session, state: str | None, limit: int | None,
                  after: tuple[datetime, str] | None) -> MachinePage:
    """Machines in the order they were first seen: (created_at, id), neither of which ever
    changes, so paging by keyset returns every machine that exists throughout exactly once,
    however many register meanwhile. `limit=None` is every machine at once."""
    query = (select(Machine).options(undefer(Machine.interfaces))
             .order_by(Machine.created_at, Machine.id))
    if state is not None:
        query = query.where(Machine.state == state)
    if after is not None:
        at, machine_id = after
        # Row-value comparison spelled out: the same SQL on SQLite and PostgreSQL.
        query = query.where(or_(Machine.created_at > at,
                                and_(Machine.created_at == at, Machine.id > machine_id)))
    if limit is None:
        machines, cursor = list(session.scalars(query)), None
    else:
        rows = list(session.scalars(query.limit(limit + 1)))
        machines = rows[:limit]
        cursor = machine_cursor(rows[limit - 1]) if len(rows) > limit else None
    power = select(BmcRow.machine_id, BmcRow.power_state)
    if limit is not None:  # a page: its own BMCs (at most MACHINES_PAGE_MAX ids)
        power = power.where(BmcRow.machine_id.in_([m.id for m in machines]))
    return MachinePage(machines, cursor, {row.machine_id: row.power_state
                                          for row in session.execute(power)})


def machine_cursor(machine: Machine) -> str:
    """Opaque to clients: where a page ended, as (created_at, id)."""
    raw = json.dumps([machine.created_at.isoformat(), machine.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def parse_machine_cursor(text: str) -> tuple[datetime, str]:
    """The position a `machine_cursor` names; ValueError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        at_text, machine_id = json.loads(raw)
        at = datetime.fromisoformat(at_text)
    except (ValueError, TypeError) as exc:  # binascii and JSON errors are ValueErrors
        raise ValueError("not a machine cursor") from exc
    if at.tzinfo is not None or not isinstance(machine_id, str) \
            or not _MACHINE_ID.match(machine_id):
        raise ValueError("not a machine cursor")
    return at, machine_id


def machine_detail(session: Session, machine: Machine, active: int | None) -> dict[str, Any]:
    history = session.scalars(
        select(StateChange).where(StateChange.machine_id == machine.id)
        .order_by(StateChange.id.desc()).limit(HISTORY_SHOWN)).all()
    reports = session.scalars(select(Report).where(Report.machine_id == machine.id)
                              .order_by(Report.id.desc()).limit(5)).all()
    return {
        **machine_summary(machine, active),
        "serial": machine.serial, "boot_id": machine.boot_id,
        "labels": labels_of(machine), "interfaces": machine.interfaces, "disks": machine.disks,
        "lldp": machine.lldp, "reported_bmc": machine.reported_bmc,
        "created_at": iso(machine.created_at),
        "discovered_at": iso(machine.discovered_at),
        "last_report_state": machine.last_report_state,
        "install_output": machine.install_output,
        "history": [{"from": h.from_state, "to": h.to_state, "reason": h.reason,
                     "at": iso(h.at)} for h in reversed(history)],
        "reports": [report_dict(r) for r in reports],
    }


def report_dict(report: Report) -> dict[str, Any]:
    return {"revision": report.revision, "etag": report.etag, "state": report.state,
            "modules": report.modules, "drift": report.drift,
            "duration_seconds": report.duration_seconds, "boot_id": report.boot_id,
            "received_at": iso(report.received_at)}


# Revisions and configuration -----------------------------------------------------------------

def push_document(session: Session, data: bytes, name: str, who: str, *,
                  allow_removals: bool = False) -> tuple[int, bool, list[dict[str, Any]]]:
    """Validate exactly as `divingbell validate` does and store a new revision (made active).
    Returns (revision, created, what it removes, machines grouped); pushing the active document's
    exact text again creates nothing. A revision that removes more than it keeps on some
    machine is refused (409, naming them) unless `allow_removals`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    try:
        document = load_document_text(data, name)
    except DocumentError as exc:
        raise ApiError(422, {"error": "invalid-document", "problems": [
            {"path": p.path, "message": p.message, "location": p.location}
            for p in exc.problems]}) from None
    assert text is not None
    digest = hashlib.sha256(data).hexdigest()
    active = active_revision(session)
    if active is not None:
        current = session.get(Revision, active)
        if current is not None and current.digest == digest:
            return active, False, []
    removed = rollouts.removals_by_machine(session, document)
    beyond = sorted(m["name"] for group in removed if group["exceeds_kept"]
                    for m in group["machines"])
    named = ", ".join(beyond[:20]) + (f" and {len(beyond) - 20} more" if len(beyond) > 20
                                      else "")
    if beyond and not allow_removals:
        raise ApiError(409, {
            "error": "removals-need-consent", "field": "allow_removals",
            "message": f"this revision removes more than it keeps on {len(beyond)} machine(s): "
                       f"{named}; nothing was stored. Check what it removes, then push again "
                       "with --allow-removals (allow_removals=true)",
            "removals": [group for group in removed if group["exceeds_kept"]]})
    number = (session.scalar(select(func.max(Revision.number))) or 0) + 1
    session.add(Revision(number=number, source_name=name, text=text, digest=digest,
                         created_at=utcnow(), created_by=who))
    set_active(session, number)
    consent = (f"; removals allowed: removes more than it keeps on {len(beyond)} "
               f"machine(s): {named}" if beyond else "")
    audit(session, who, "push", f"revision {number}",
          f"{name} sha256:{digest[:12]}{consent}")
    session.flush()
    log.info("revision %d stored from %s by %s%s", number, name, who, consent)
    rollouts.start(session, number, active, who)
    return number, True, removed


def sees_secrets(principal: Principal) -> bool:
    """Only an admin reads a document's secrets through the API (and a machine its own
    configuration): readers and reader UI sessions see them masked everywhere."""
    return principal.role == "admin"


def shown_text(text: str, principal: Principal) -> str:
    """A stored revision's text as this caller may see it: as pushed for an admin; for anyone
    else, re-serialised with every secret masked (comments and layout are not kept)."""
    if sees_secrets(principal):
        return text
    from divingbell.core.document.loader import load_text
    from divingbell.core.document.secrets import mask_document

    data = load_text(text, "revision").data
    return yaml.safe_dump(mask_document(data), sort_keys=False, default_flow_style=False)


def activate(session: Session, number: int, who: str) -> None:
    if session.get(Revision, number) is None:
        raise not_found("revision", number)
    previous = active_revision(session)
    set_active(session, number)
    audit(session, who, "activate", f"revision {number}")
    log.info("revision %d activated by %s", number, who)
    if previous != number:
        rollouts.start(session, number, previous, who)


def config_etag(revision: int, hostname: str, labels: Mapping[str, str]) -> str:
    """`"<revision>-<digest of what else shapes the config>"`: a role change changes it too."""
    return _etag(revision, hostname, tuple(sorted(labels.items())))


@functools.lru_cache(maxsize=4096)
def _etag(revision: int, hostname: str, labels: tuple[tuple[str, str], ...]) -> str:
    # Cached: a report asks it twice (state, then the answer's up_to_date), a pure function.
    digest = hashlib.sha256(json.dumps([hostname, [list(pair) for pair in labels]]).encode())
    return f'"{revision}-{digest.hexdigest()[:10]}"'


def current_etag(machine: MachineLike, active: int | None) -> str | None:
    if active is None:
        return None
    return config_etag(active, served_name(machine), labels_of(machine))


def up_to_date(machine: MachineLike, active: int | None) -> bool:
    if active is None or machine.last_report_state != "converged":
        return False
    if machine.last_report_revision != active:
        return False
    if machine.last_report_etag is None:
        return True
    return machine.last_report_etag.strip('"') == (current_etag(machine, active) or "").strip('"')


@dataclass(frozen=True)
class Rendered:
    revision: int
    etag: str
    text: str | None  # None: not modified


def render_config(connection: Connection, machine: MachineLike, if_none_match: str | None,
                  active: int | None, place: rollouts.Membership | None, *,
                  masked: bool = False) -> Rendered:
    """The document this machine is served (`place`: its place in the latest rollout).
    `masked`: secrets masked, for readers."""
    # What this machine is served: its rollout's decision (machines wait for their wave).
    active = rollouts.served_by(place, active)
    if active is None:
        raise ApiError(404, {"error": "no-document",
                             "message": "no document pushed yet: divingbell fleet document push"})
    labels = labels_of(machine)
    name = served_name(machine)
    etag = config_etag(active, name, labels)
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Rendered(active, etag, None)
    revision = connection.execute(select(
        Revision.number, Revision.digest, Revision.text, Revision.source_name).where(
        Revision.number == active)).one()
    document = revision_document(revision)
    config = node_config(document, name, labels)
    # Every value in a served document is serialised, never pasted: the machine id and name
    # go into the comment as JSON strings (one line, whatever they hold).
    text = (f"# divingbell revision {active} for machine {json.dumps(machine.id)}"
            f"{f' as {json.dumps(name)}' if name else ''}\n")
    body = effective_document(document, config)
    if masked:
        body["conf"] = config.dump()
    text += yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
    return Rendered(active, etag, text)


def note_config_served(session: Session, machine: Machine, rendered: Rendered) -> None:
    """A running machine fetched a configuration it has not converged: it is updating."""
    if (machine.state in (states.READY, states.DEGRADED)
            and (machine.last_report_etag or "").strip('"') != rendered.etag.strip('"')):
        transition(session, machine, states.UPDATING,
                   f"fetched configuration {rendered.etag.strip(chr(34))}")


# Reports -------------------------------------------------------------------------------------

_known_revisions: set[tuple[str, int]] = set()


def revision_exists(connection: Connection, number: int) -> bool:
    """Revisions are never deleted, so a number once seen in a store is remembered (an
    immutable fact, safe to keep in one process)."""
    key = (str(connection.engine.url), number)
    if key in _known_revisions:
        return True
    found = connection.execute(select(Revision.number).where(Revision.number == number)
                               ).first() is not None
    if found:
        _known_revisions.add(key)
    return found


def add_report(connection: Connection, machine: View, active: int | None,
               place: rollouts.Membership | None, body: ReportBody, keep: int) -> View:
    """Store a report, update the machine's freshness and state, keep the last `keep`.
    Prebuilt Core statements only: this is the busiest write path of the service."""
    machine_id = machine.id
    if not revision_exists(connection, body.revision):
        raise ApiError(422, {"error": "unknown-revision", "field": "revision",
                             "message": f"revision {body.revision} does not exist"})
    now = utcnow()
    _INSERT_REPORT.execute(connection, {
        "machine_id": machine_id, "revision": body.revision, "etag": body.etag,
        "state": body.state, "modules": {k: v.model_dump() for k, v in body.modules.items()},
        "drift": body.drift, "duration_seconds": body.duration_seconds,
        "boot_id": body.boot_id, "received_at": now})
    after = replace(machine, last_report_revision=body.revision, last_report_etag=body.etag,
                    last_report_state=body.state)
    values: dict[str, Any] = {
        "mid": machine_id, "v_last_report_at": now, "v_last_report_revision": body.revision,
        "v_last_report_etag": body.etag, "v_last_report_state": body.state}
    # Ready means it converged what it is served: during a rollout, that may be the previous
    # revision (outdated, but healthy and available).
    served = rollouts.served_by(place, active)
    wanted = states.DEGRADED if body.state in ("failed", "reverted") else (
        states.READY if up_to_date(after, served) else states.UPDATING)
    changes_state = (wanted != machine.state
                     and wanted in states.TRANSITIONS.get(machine.state, frozenset()))
    if changes_state:
        values.update(v_state=wanted, v_state_changed_at=now)
        _INSERT_HISTORY.execute(connection, {
            "machine_id": machine_id, "from_state": machine.state, "to_state": wanted,
            "reason": f"report: revision {body.revision} {body.state}", "at": now})
        after = replace(after, state=wanted)
    _UPDATE_AFTER_REPORT[changes_state].execute(connection, values)
    # Keep the newest `keep`: delete everything at or below the (keep+1)-th newest id.
    _trim_statement(keep).execute(connection, {"mid": machine_id})
    failures = [f"{name}: {failure}" for name, module in sorted(body.modules.items())
                for failure in module.failures]
    if body.state != "rebooting":  # a machine waiting for its reboot is still updating
        rollouts.on_report(connection, machine_id, place, body.revision,
                           body.state == "converged",
                           "; ".join(failures) or f"report: {body.state}")
    return after


# Slots ---------------------------------------------------------------------------------------

def audit_events(session: Session, limit: int) -> list[dict[str, Any]]:
    rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
    return [{"at": iso(e.at), "actor": e.actor, "action": e.action, "subject": e.subject,
             "detail": e.detail} for e in rows]


def lease_dict(lease: Lease | leases.Held) -> dict[str, Any]:
    return {"slot": f"{lease.group}/{lease.index}", "group": lease.group,
            "holder": lease.holder, "expires_at": iso(lease.expires_at)}


def counts_by_state(session: Session) -> dict[str, int]:
    return {state: count for state, count in session.execute(
        select(Machine.state, func.count()).group_by(Machine.state))}


def up_to_date_counts(session: Session) -> tuple[int, int]:
    active = active_revision(session)
    fresh = outdated = 0
    # Machines with facts only (through the state index): booting rows are anonymous boot
    # requests, not members of the fleet, and must not make /metrics slower.
    for row in session.execute(select(*VIEW_COLUMNS).where(
            Machine.state.in_(sorted(states.HAS_FACTS)))):
        if up_to_date(View(*row), active):
            fresh += 1
        else:
            outdated += 1
    return fresh, outdated
