"""Rollouts in the store: the pure decisions of `fleet.rollout`, loaded from and saved to rows.

Every function takes a session inside a write transaction and locks the current rollout's row
first (FOR UPDATE on PostgreSQL; the write transaction itself on SQLite), so two replicas never
step the same rollout at once. Nothing is kept in a process: a report handled by one replica
and a `pause` pressed on another see the same rollout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NamedTuple, TypeAlias, cast

from sqlalchemy import Connection, Row, bindparam, select
from sqlalchemy.orm import Session

from divingbell.core.document.validate import ValidDocument
from divingbell.fleet import revisions, states
from divingbell.fleet import rollout as logic
from divingbell.fleet.configdiff import (
    DISRUPTION_KINDS,
    Removals,
    Target,
    disruption,
    machine_diff,
    override_names,
    removals,
)
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.models import (
    Machine,
    Revision,
    RolloutMember,
    RolloutRow,
    Setting,
    iso,
    utcnow,
)

log = logging.getLogger("divingbell.fleet.rollout")

POLICY_KEY = "rollout_policy"
# Machines whose agent runs and reports take part in a rollout; the others (being installed,
# failed installs) are not in service yet and are simply served the current revision.
IN_SERVICE = (states.READY, states.UPDATING, states.DEGRADED)
OPEN = (logic.Status.RUNNING.value, logic.Status.PAUSED.value, logic.Status.HALTED.value)


# Policy --------------------------------------------------------------------------------------

def policy_of(data: Mapping[str, Any]) -> logic.Policy:
    try:
        return logic.Policy(max_unavailable=data.get("max_unavailable", 1),
                            max_failures=int(data.get("max_failures", 0)),
                            pause_seconds=float(data.get("pause_seconds", 0.0)))
    except (TypeError, ValueError) as exc:
        raise ApiError(422, {"error": "invalid-policy", "message": str(exc)}) from None


def policy_dict(policy: logic.Policy) -> dict[str, Any]:
    return {"max_unavailable": policy.max_unavailable, "max_failures": policy.max_failures,
            "pause_seconds": policy.pause_seconds}


def get_policy(session: Session) -> logic.Policy:
    raw = session.scalar(select(Setting.value).where(Setting.key == POLICY_KEY))
    return policy_of(json.loads(raw)) if raw else logic.Policy()


def set_policy(session: Session, policy: logic.Policy, who: str) -> None:
    row = session.get(Setting, POLICY_KEY)
    value = json.dumps(policy_dict(policy))
    if row is None:
        session.add(Setting(key=POLICY_KEY, value=value))
    else:
        row.value = value
    log.info("rollout policy set to %s by %s", value, who)


# Loading and saving --------------------------------------------------------------------------

def current_row(session: Session, *, lock: bool = False) -> RolloutRow | None:
    query = select(RolloutRow).order_by(RolloutRow.id.desc()).limit(1)
    if lock:
        query = query.with_for_update()
    return session.scalars(query).first()


def _members(session: Session, row: RolloutRow) -> list[RolloutMember]:
    return list(session.scalars(select(RolloutMember).where(RolloutMember.rollout_id == row.id)))


def _load(row: RolloutRow, members: list[RolloutMember]) -> logic.Rollout:
    gate = tuple(row.gate) if row.gate else None
    return logic.Rollout(
        revision=row.revision,
        previous={m.machine_id: m.previous_revision for m in members},
        waves=[list(w) for w in row.waves],
        progress={m.machine_id: logic.Progress(m.progress) for m in members},
        policy=policy_of(row.policy), status=logic.Status(row.status),
        gate=(int(gate[0]), float(gate[1])) if gate else None,
        failures=[logic.Failure(f["machine"], f["error"]) for f in row.failures],
        rollback=row.rollback)


def _save(row: RolloutRow, members: list[RolloutMember], rollout: logic.Rollout,
          now: datetime, reason: str) -> None:
    by_id = {m.machine_id: m for m in members}
    for machine_id, progress in rollout.progress.items():
        member = by_id[machine_id]
        if member.progress == progress.value:
            continue
        if progress is logic.Progress.UPDATING and member.started_at is None:
            member.started_at = now
        if progress in (logic.Progress.DONE, logic.Progress.FAILED):
            member.finished_at = now
        if progress is logic.Progress.UPDATING and member.progress == logic.Progress.FAILED:
            member.finished_at = None  # resumed: tried again
        member.progress = progress.value
    errors = {f.machine: f.error for f in rollout.failures}
    for machine_id, member in by_id.items():
        member.error = errors.get(machine_id, member.error if
                                  member.progress == logic.Progress.FAILED else "")
    if row.status != rollout.status.value:
        log.info("rollout %d of revision %d: %s -> %s (%s)", row.id, row.revision, row.status,
                 rollout.status.value, reason)
        if rollout.status in (logic.Status.COMPLETED, logic.Status.ABORTED):
            row.finished_at = now
    row.status = rollout.status.value
    row.gate = list(rollout.gate) if rollout.gate else None
    row.failures = [{"machine": f.machine, "error": f.error} for f in rollout.failures]
    row.rollback = rollout.rollback
    row.reason = reason
    row.updated_at = now


def _fleet_members(session: Session, ids: list[str] | None = None) -> dict[str, logic.Member]:
    query = select(Machine)
    query = query.where(Machine.id.in_(ids)) if ids is not None else query.where(
        Machine.state.in_(IN_SERVICE))
    return {m.id: logic.Member(id=m.id, name=m.hostname or m.id,
                               control_plane="control-plane" in (m.roles or []),
                               rack=m.rack, available=m.state == states.READY)
            for m in session.scalars(query)}


# Starting, stepping, serving -----------------------------------------------------------------

def start(session: Session, revision: int, from_revision: int | None, who: str) -> RolloutRow:
    """Start a rollout of `revision`. An open rollout is superseded: each machine keeps the
    revision it is served now until its turn in the new one."""
    now = utcnow()
    previous = current_row(session, lock=True)
    served: dict[str, int | None] = {}
    after_halt = previous is not None and previous.status == logic.Status.HALTED.value
    if previous is not None:
        old = _load(previous, _members(session, previous))
        served = {m: logic.served_revision(old, m) for m in old.progress}
        if previous.status in OPEN:
            previous.status = logic.Status.ABORTED.value
            previous.finished_at = now
            previous.reason = f"superseded by a rollout of revision {revision}"
    members = _fleet_members(session)
    served = {m: served.get(m, from_revision) for m in members}
    policy = get_policy(session)
    planned = logic.start(revision, members.values(), served, policy)
    # After a halt, the fix is not trusted blindly: the new rollout waits for `resume`, so the
    # operator can check its plan first.
    status = logic.Status.PAUSED if after_halt else logic.Status.RUNNING
    reason = ("started paused: it replaces a halted rollout; check `rollout plan`, then resume"
              if after_halt else "started")
    row = RolloutRow(revision=revision, from_revision=from_revision, status=status.value,
                     policy=policy_dict(policy), waves=[list(w) for w in planned.waves],
                     gate=None, failures=[], rollback=False, reason=reason, started_by=who,
                     started_at=now, updated_at=now)
    session.add(row)
    session.flush()
    wave_of = {m: i for i, wave in enumerate(planned.waves) for m in wave}
    rows = [RolloutMember(rollout_id=row.id, machine_id=m, wave=wave_of[m],
                          progress=planned.progress[m].value,
                          previous_revision=planned.previous[m], error="")
            for m in planned.progress]
    session.add_all(rows)
    session.flush()
    log.info("rollout %d of revision %d started by %s over %d machine(s) in %d wave(s)",
             row.id, revision, who, len(rows), len(planned.waves))
    if status is logic.Status.RUNNING:
        _step(session, row, rows, now)
    return row


def _step(session: Session, row: RolloutRow, members: list[RolloutMember], now: datetime,
          rollout: logic.Rollout | None = None) -> logic.Decision:
    rollout = rollout or _load(row, members)
    fleet = _fleet_members(session, [m.machine_id for m in members])
    decision = logic.step(rollout, fleet, now.timestamp())
    if decision.start:
        log.info("rollout %d: serving revision %d to %s", row.id, row.revision,
                 ", ".join(fleet[m].name for m in decision.start if m in fleet))
    _save(row, members, decision.rollout, now, decision.reason)
    return decision


def advance(session: Session) -> None:
    """Re-decide the open rollout (a timer passed, a machine became available)."""
    row = current_row(session, lock=True)
    if row is not None and row.status == logic.Status.RUNNING.value:
        _step(session, row, _members(session, row), utcnow())


# One query on the hot paths (every config poll and report): the newest rollout's row joined
# with this machine's membership in it.
LATEST = select(RolloutRow.id).order_by(RolloutRow.id.desc()).limit(1).scalar_subquery()


class Place(NamedTuple):
    """A machine's place in the latest rollout, read along with the machine itself on the
    hot paths (views.authorized_view)."""

    status: str
    revision: int
    rollback: bool
    progress: str
    previous_revision: int | None


Membership: TypeAlias = "Row[str, int, bool, str, int | None] | Place"
MEMBERSHIP_COLUMNS = (RolloutRow.status, RolloutRow.revision, RolloutRow.rollback,
                      RolloutMember.progress, RolloutMember.previous_revision)
_MEMBERSHIP = (
    select(*MEMBERSHIP_COLUMNS)
    .select_from(RolloutRow)
    .join(RolloutMember, RolloutMember.rollout_id == RolloutRow.id)
    .where(RolloutRow.id == LATEST, RolloutMember.machine_id == bindparam("mid")))


def membership(connection: Session | Connection, machine_id: str) -> Membership | None:
    """This machine's place in the latest rollout (None: not in it), for `served_revision`
    and `on_report`: a report asks both, with one query."""
    return connection.execute(_MEMBERSHIP, {"mid": machine_id}).first()


def served_revision(connection: Session | Connection, machine_id: str,
                    active: int | None) -> int | None:
    """Which revision this machine is served: its rollout's decision, else the active one."""
    return served_by(membership(connection, machine_id), active)


def served_by(found: Membership | None, active: int | None) -> int | None:
    """`served_revision`, from the machine's `membership` already read."""
    if found is None:
        return active
    previous = found.previous_revision if found.previous_revision is not None else active
    if found.status == logic.Status.ABORTED.value and found.rollback:
        return previous
    if found.progress == logic.Progress.PENDING.value:
        return previous
    return int(found.revision)


def settles_turn(found: Membership | None, revision: int) -> bool:
    """Whether a report of `revision` by a machine with this `membership` may settle its turn
    in the open rollout (its wave waits for it): only then does a report touch the rollout."""
    return (found is not None and found.status in OPEN and int(found.revision) == revision
            and found.progress == logic.Progress.UPDATING.value)


def on_report(connection: Session | Connection, machine_id: str, found: Membership | None,
              revision: int, converged: bool, error: str) -> None:
    """A report, with the machine's `membership`: if it settles this machine's turn in the
    open rollout, re-decide the rollout (under its row lock). Other reports cost no query."""
    if not settles_turn(found, revision):
        return
    session = connection if isinstance(connection, Session) else Session(bind=connection)
    row = current_row(session, lock=True)
    if row is None or row.status not in OPEN:
        return
    members = _members(session, row)
    rollout = logic.record_report(_load(row, members), machine_id, revision, converged, error)
    _step(session, row, members, utcnow(), rollout)
    session.flush()


def act(session: Session, verb: str, who: str, *, rollback: bool = False) -> RolloutRow:
    row = current_row(session, lock=True)
    if row is None:
        raise ApiError(404, {"error": "no-rollout", "message": "no rollout yet"})
    members = _members(session, row)
    try:
        rollout = logic.act(_load(row, members), verb, rollback=rollback)
    except logic.RolloutError as exc:
        raise ApiError(409, {"error": "invalid-action", "message": str(exc)}) from None
    now = utcnow()
    reason = f"{verb}{' with rollback' if rollback and verb == 'abort' else ''} by {who}"
    log.info("rollout %d: %s", row.id, reason)
    _save(row, members, rollout, now, reason)
    if verb == "abort" and rollback and row.from_revision is not None:
        # New machines get the revision the fleet is rolled back to, too.
        revisions.set_active(session, row.from_revision)
    if verb == "resume":
        _step(session, row, members, now)
    return row


# Views ---------------------------------------------------------------------------------------

def view(session: Session, row: RolloutRow) -> dict[str, Any]:
    members = _members(session, row)
    names = {m.id: m.hostname or m.id for m in session.scalars(
        select(Machine).where(Machine.id.in_([m.machine_id for m in members])))}
    by_id = {m.machine_id: m for m in members}
    rollout = _load(row, members)
    waves = []
    for wave in row.waves:
        entries = []
        for machine_id in wave:
            member = by_id[machine_id]
            duration = ((member.finished_at - member.started_at).total_seconds()
                        if member.started_at and member.finished_at else None)
            entries.append({"id": machine_id, "name": names.get(machine_id, machine_id),
                            "progress": member.progress, "error": member.error or None,
                            "previous_revision": member.previous_revision,
                            "started_at": iso(member.started_at),
                            "finished_at": iso(member.finished_at),
                            "duration_seconds": duration})
        waves.append(entries)
    return {**summary_view(row), "policy": row.policy, "waves": waves,
            "summary": logic.summary(rollout), "halt_reason": rollout.describe_halt(names),
            "failures": row.failures, "reason": row.reason, "rollback": row.rollback}


def summary_view(row: RolloutRow) -> dict[str, Any]:
    return {"id": row.id, "revision": row.revision, "from_revision": row.from_revision,
            "status": row.status, "started_by": row.started_by,
            "started_at": iso(row.started_at), "updated_at": iso(row.updated_at),
            "finished_at": iso(row.finished_at)}


def history(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    rows = session.scalars(select(RolloutRow).order_by(RolloutRow.id.desc()).limit(limit))
    return [summary_view(r) for r in rows]


def get(session: Session, rollout_id: int) -> RolloutRow:
    row = session.get(RolloutRow, rollout_id)
    if row is None:
        raise not_found("rollout", rollout_id)
    return row


_SERVED_ALL = (
    select(RolloutMember.machine_id, RolloutRow.status, RolloutRow.revision,
           RolloutRow.rollback, RolloutMember.progress, RolloutMember.previous_revision)
    .select_from(RolloutRow)
    .join(RolloutMember, RolloutMember.rollout_id == RolloutRow.id)
    .where(RolloutRow.id == LATEST))


def _machines_with_served(session: Session
                          ) -> list[tuple[Target, int | None, ValidDocument | None]]:
    """Every machine not decommissioned, by name, with the revision it is served now and that
    revision's document (None before the first push). Two queries, whatever the fleet's size."""
    active = revisions.active_revision(session)
    # The columns `membership` answers (read by name), with the machine's id in front.
    memberships = {row.machine_id: cast(Membership, row)
                   for row in session.execute(_SERVED_ALL)}
    machines = list(session.scalars(select(Machine).where(
        Machine.state != states.DECOMMISSIONED).order_by(Machine.hostname)))
    documents: dict[int, ValidDocument] = {}
    found = []
    for machine in machines:
        number = served_by(memberships.get(machine.id), active)
        if number is not None and number not in documents:
            old = session.get(Revision, number)
            if old is not None:
                documents[number] = revisions.revision_document(old)
        target = Target(machine.id, machine.hostname or machine.id,
                        revisions.labels_of(machine))
        found.append((target, number, documents.get(number) if number is not None else None))
    found.sort(key=lambda item: item[0].name)
    return found


def _keyer(served: list[tuple[Target, int | None, ValidDocument | None]],
           new_document: ValidDocument) -> Callable[[Target, int | None], tuple[Any, ...]]:
    """Machines with the same served revision, labels and (where an override names it) host
    name have the same configurations, old and new: keyed alike, compared once."""
    documents = {id(d): d for _, _, d in served if d is not None}
    named = override_names(new_document, *documents.values())[0]

    def key(target: Target, number: int | None) -> tuple[Any, ...]:
        return (number, tuple(sorted(target.labels.items())),
                target.name if target.name in named else None)

    return key


def plan(session: Session, revision_number: int) -> dict[str, Any]:
    """Per machine, how its effective configuration would change if `revision_number` became
    current, and what it would remove (restored or removed on the host) against what it
    keeps: the blast radius before anything moves."""
    new = session.get(Revision, revision_number)
    if new is None:
        raise not_found("revision", revision_number)
    new_document = revisions.revision_document(new)
    diffs: list[dict[str, Any]] = []
    served = _machines_with_served(session)
    configuration = _keyer(served, new_document)
    seen: dict[tuple[Any, ...],
               tuple[dict[str, list[str]], dict[str, Any], dict[str, Any]]] = {}
    for target, number, old_document in served:
        key = configuration(target, number)
        if key not in seen:
            seen[key] = (machine_diff(old_document, new_document, target).modules,
                         removals(old_document, new_document, target).as_dict(),
                         disruption(old_document, new_document, target).as_dict())
        modules, removed, disrupts = seen[key]
        diffs.append({"id": target.id, "name": target.name, "changed": bool(modules),
                      "modules": modules, "from_revision": number, "removals": removed,
                      "disruption": disrupts})
    changed = [d for d in diffs if d["changed"]]
    return {"revision": revision_number, "active": revisions.active_revision(session),
            "machines": diffs, "changed": len(changed), "unchanged": len(diffs) - len(changed),
            "exceeds_kept": [d["name"] for d in diffs if d["removals"]["exceeds_kept"]],
            "disruption": {kind: sum(1 for d in diffs if d["disruption"]["kind"] == kind)
                           for kind in DISRUPTION_KINDS}}


def removals_by_machine(session: Session, new_document: ValidDocument) -> list[dict[str, Any]]:
    """What `new_document` would take away from the machines, grouped: machines that lose the
    same entries (per module) and keep as many are one group, naming each (`machines`, by
    name). Groups that remove more than they keep come first."""
    served = _machines_with_served(session)
    configuration = _keyer(served, new_document)
    seen: dict[tuple[Any, ...], Removals] = {}
    groups: dict[str, dict[str, Any]] = {}
    for target, number, old_document in served:
        key = configuration(target, number)
        if key not in seen:
            seen[key] = removals(old_document, new_document, target)
        removed = seen[key]
        if not removed.modules:
            continue
        summary = removed.as_dict()
        group = groups.setdefault(json.dumps(summary, sort_keys=True),
                                  {"machines": [], **summary})
        group["machines"].append({"id": target.id, "name": target.name,
                                  "from_revision": number})
    return sorted(groups.values(), key=lambda g: (not g["exceeds_kept"], g["machines"][0]["name"]))
