"""The hot paths: what a machine's own polls and reports read and write, on prebuilt Core
statements (constructing SQLAlchemy statements per request costs more than running them).

`View` is the few columns of a machine they need; `authorized_view`/`own_views` check the caller
and load its view, the active revision and its place in the latest rollout in one query;
`render_config` is the configuration it is served, named by an ETag (`config_etag`, and whether
it is `up_to_date`); `add_report` stores a report and moves the machine's state.

Only derived, immutable data is cached in memory: ETags (a pure function) and the revision
numbers a store is known to hold (revisions are never deleted).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
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
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable, Insert

from divingbell.core.document.api import effective_document, node_config
from divingbell.fleet import rollouts, states
from divingbell.fleet.api.schemas import ReportBody
from divingbell.fleet.auth import (
    MACHINE_PREFIX,
    Credentials,
    Principal,
    check_machine_or_admin,
    check_machine_or_reader,
    hash_secret,
    unauthorized,
    verify,
)
from divingbell.fleet.db import Prepared
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.lifecycle import transition
from divingbell.fleet.models import (
    Machine,
    Report,
    Revision,
    RolloutMember,
    RolloutRow,
    Setting,
    StateChange,
    utcnow,
)
from divingbell.fleet.revisions import (
    ACTIVE_REVISION,
    MachineLike,
    active_revision,
    labels_of,
    revision_document,
)


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
SELF_VIEW = select(
    _MACHINES.c.credential_hash, _ACTIVE, *_VIEW_COLUMNS,
    _ROLLOUTS.c.status, _ROLLOUTS.c.revision, _ROLLOUTS.c.rollback, _MEMBERS.c.progress,
    _MEMBERS.c.previous_revision,  # rollouts.Place, in its order
).select_from(
    _MACHINES.outerjoin(_MEMBERS, and_(_MEMBERS.c.machine_id == _MACHINES.c.id,
                                       _MEMBERS.c.rollout_id == rollouts.LATEST))
    .outerjoin(_ROLLOUTS, _ROLLOUTS.c.id == _MEMBERS.c.rollout_id)
).where(_MACHINES.c.id == bindparam("id"))
_PLACE_AT = 2 + len(_VIEW_COLUMNS)
_SELF_VIEW_RUN = Prepared(SELF_VIEW)
_REPORT_ROW = ("machine_id", "revision", "etag", "state", "modules", "drift",
               "duration_seconds", "boot_id", "received_at")
_HISTORY_ROW = ("machine_id", "from_state", "to_state", "reason", "at")
_INSERT_REPORT = Prepared(insert(_REPORTS).values({name: bindparam(name)
                                                   for name in _REPORT_ROW}))
_INSERT_HISTORY = Prepared(insert(_HISTORY).values({name: bindparam(name)
                                                    for name in _HISTORY_ROW}))
_REPORT_COLUMNS = ("last_report_at", "last_report_revision", "last_report_etag",
                   "last_report_state")
_UPDATE_AFTER_REPORT = {
    with_state: Prepared(update(_MACHINES).where(_MACHINES.c.id == bindparam("mid")).values(
        {name: bindparam(f"v_{name}") for name in (
            *_REPORT_COLUMNS, *(("state", "state_changed_at") if with_state else ()))}))
    for with_state in (False, True)}
_trims: dict[int, Prepared] = {}
_REVISION_NUMBER = Prepared(select(cast(Table, Revision.__table__).c.number).where(
    cast(Table, Revision.__table__).c.number == bindparam("number")))


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
        return own_view(credentials, _SELF_VIEW_RUN.first(connection, {"id": machine_id}))
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
    return [own_view(c, row) for c, row in zip(credentials, rows, strict=True)]


def own_view(credentials: Credentials, row: tuple[Any, ...] | None) -> Authorized:
    """A machine's own credential checked against its row of `SELF_VIEW` (401 when it does not
    match, or there is no such machine), and what the row says."""
    if row is None or not hmac.compare_digest(row[0], hash_secret(credentials.secret)):
        raise unauthorized("invalid token")
    active = int(row[1]) if row[1] else None
    place = row[_PLACE_AT:]
    return Authorized(Principal("machine", credentials.ident, "machine"),
                      View(*row[2:_PLACE_AT]), active,
                      None if place[3] is None else rollouts.Place(*place))


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


def unchanged_config(machine: MachineLike, if_none_match: str | None, active: int | None,
                     place: rollouts.Membership | None) -> Rendered | None:
    """`render_config`'s 304 without reading anything more: None when the configuration must
    be rendered (changed, no If-None-Match, or no document: `render_config` says which)."""
    active = rollouts.served_by(place, active)
    if active is None or if_none_match is None:
        return None
    etag = config_etag(active, served_name(machine), labels_of(machine))
    if etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Rendered(active, etag, None)
    return None


def render_config(connection: Connection, machine: MachineLike, if_none_match: str | None,
                  active: int | None, place: rollouts.Membership | None, *,
                  masked: bool = False) -> Rendered:
    """The document this machine is served (`place`: its place in the latest rollout).
    `masked`: secrets masked, for readers."""
    unchanged = unchanged_config(machine, if_none_match, active, place)
    if unchanged is not None:
        return unchanged
    # What this machine is served: its rollout's decision (machines wait for their wave).
    active = rollouts.served_by(place, active)
    if active is None:
        raise ApiError(404, {"error": "no-document",
                             "message": "no document pushed yet: divingbell fleet document push"})
    labels = labels_of(machine)
    name = served_name(machine)
    etag = config_etag(active, name, labels)
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


_known_revisions: set[tuple[str, int]] = set()


def revision_known(url: str, number: int) -> bool:
    """Whether revision `number` was already seen in the store at `url` (no query)."""
    return (url, number) in _known_revisions


def revision_exists(connection: Connection, number: int) -> bool:
    """Revisions are never deleted, so a number once seen in a store is remembered (an
    immutable fact, safe to keep in one process)."""
    key = (str(connection.engine.url), number)
    if key in _known_revisions:
        return True
    # On the driver (Prepared): it also answers in PostgreSQL's pipeline mode.
    found = _REVISION_NUMBER.first(connection, {"number": number}) is not None
    if found:
        _known_revisions.add(key)
    return found


class ReportEffect(NamedTuple):
    """What storing a report changes, decided from the machine's view before any write."""

    after: View
    """The machine's view once the report is stored."""
    machine: dict[str, Any]
    """The machine's new column values, by name."""
    state_change: dict[str, Any] | None
    """Its history row, when the report moves its state."""
    report: dict[str, Any]
    """The report's row."""


def report_effect(machine: View, active: int | None, place: rollouts.Membership | None,
                  body: ReportBody, now: datetime) -> ReportEffect:
    """A report's effect on its machine: its freshness, and its state (ready when it converged
    what it is served, degraded when it failed, else updating), along the allowed transitions."""
    after = replace(machine, last_report_revision=body.revision, last_report_etag=body.etag,
                    last_report_state=body.state)
    values: dict[str, Any] = {
        "last_report_at": now, "last_report_revision": body.revision,
        "last_report_etag": body.etag, "last_report_state": body.state}
    # Ready means it converged what it is served: during a rollout, that may be the previous
    # revision (outdated, but healthy and available).
    served = rollouts.served_by(place, active)
    wanted = states.DEGRADED if body.state in ("failed", "reverted") else (
        states.READY if up_to_date(after, served) else states.UPDATING)
    change = None
    if wanted != machine.state and wanted in states.TRANSITIONS.get(machine.state, frozenset()):
        values.update(state=wanted, state_changed_at=now)
        change = {"machine_id": machine.id, "from_state": machine.state, "to_state": wanted,
                  "reason": f"report: revision {body.revision} {body.state}", "at": now}
        after = replace(after, state=wanted)
    report = {"machine_id": machine.id, "revision": body.revision, "etag": body.etag,
              "state": body.state,
              "modules": {k: v.model_dump() for k, v in body.modules.items()},
              "drift": body.drift, "duration_seconds": body.duration_seconds,
              "boot_id": body.boot_id, "received_at": now}
    return ReportEffect(after, values, change, report)


def add_report(connection: Connection, machine: View, active: int | None,
               place: rollouts.Membership | None, body: ReportBody, keep: int, *,
               step_rollout: bool = True) -> View:
    """Store a report, update the machine's freshness and state, keep the last `keep`.
    Prebuilt Core statements only: this is the busiest write path of the service (they also
    run in PostgreSQL's pipeline mode). `step_rollout`: then let the report settle the
    machine's turn in the open rollout (`step_rollout`, which reads through the ORM: after
    the pipeline when there is one)."""
    if not revision_exists(connection, body.revision):
        raise ApiError(422, {"error": "unknown-revision", "field": "revision",
                             "message": f"revision {body.revision} does not exist"})
    effect = report_effect(machine, active, place, body, utcnow())
    _INSERT_REPORT.execute(connection, effect.report)
    if effect.state_change is not None:
        _INSERT_HISTORY.execute(connection, effect.state_change)
    _UPDATE_AFTER_REPORT[effect.state_change is not None].execute(
        connection, {"mid": machine.id, **{f"v_{k}": v for k, v in effect.machine.items()}})
    # Keep the newest `keep`: delete everything at or below the (keep+1)-th newest id.
    _trim_statement(keep).execute(connection, {"mid": machine.id})
    if step_rollout:
        step_rollout_after(connection, machine.id, place, body)
    return effect.after


def settles_turn(place: rollouts.Membership | None, body: ReportBody) -> bool:
    """Whether this report may settle its machine's turn in the open rollout
    (`step_rollout_after` then re-decides the rollout)."""
    # A machine waiting for its reboot is still updating.
    return body.state != "rebooting" and rollouts.settles_turn(place, body.revision)


def step_rollout_after(connection: Connection, machine_id: str,
                       place: rollouts.Membership | None, body: ReportBody) -> None:
    """A stored report's effect on the open rollout (none unless it settles the machine's
    turn: then the rollout is re-decided under its row lock)."""
    if not settles_turn(place, body):
        return
    failures = [f"{name}: {failure}" for name, module in sorted(body.modules.items())
                for failure in module.failures]
    rollouts.on_report(connection, machine_id, place, body.revision,
                       body.state == "converged", "; ".join(failures) or f"report: {body.state}")


def report_at_once(keep: int, changes_state: bool) -> Executable:
    """PostgreSQL: a report's writes (`report_effect`, then the trim to the newest `keep`) as
    one statement, one round trip in autocommit, on condition that the machine is still as it
    was read: the same credential and state. It answers the number of machines it changed:
    1 when all was written, 0 when the machine changed meanwhile (then nothing was written).
    Parameters: `mid`, `credential_hash`, `from_state`, `v_<machine column>`, `r_<report
    column>` and, when `changes_state`, `h_<history column>`. (Built once per kind by its
    caller, `api/machines.report_on_loop`.)"""
    changed = (update(_MACHINES).where(_MACHINES.c.id == bindparam("mid"),
                                       _MACHINES.c.credential_hash == bindparam("credential_hash"),
                                       _MACHINES.c.state == bindparam("from_state"))
               .values({name: bindparam(f"v_{name}") for name in (
                   *_REPORT_COLUMNS, *(("state", "state_changed_at") if changes_state else ()))})
               .returning(_MACHINES.c.id).cte("changed"))

    def rows_of(table: Table, prefix: str, names: Sequence[str]) -> Insert:
        # Typed: parameters in a SELECT list get no type from the columns they go into.
        values = select(changed.c.id, *(
            sql_cast(bindparam(f"{prefix}{name}", type_=table.c[name].type), table.c[name].type)
            for name in names[1:]))
        return insert(table).from_select(list(names), values)

    stored = rows_of(_REPORTS, "r_", _REPORT_ROW).cte("stored")
    # One snapshot for the whole statement: the trim does not see the report just stored, so
    # it keeps the newest keep - 1 of those before it.
    cutoff = (select(_REPORTS.c.id).where(_REPORTS.c.machine_id == bindparam("mid"))
              .order_by(_REPORTS.c.id.desc()).offset(keep - 1).limit(1).scalar_subquery())
    trimmed = delete(_REPORTS).where(_REPORTS.c.machine_id.in_(select(changed.c.id)),
                                     _REPORTS.c.id <= cutoff).cte("trimmed")
    ctes = [stored, trimmed]
    if changes_state:
        ctes.append(rows_of(_HISTORY, "h_", _HISTORY_ROW).cte("history"))
    return select(func.count()).select_from(changed).add_cte(*ctes)
