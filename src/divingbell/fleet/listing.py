"""What operators read about the fleet: machine summaries, pages of machines (keyset cursors),
a machine's detail with its history and reports, audit events, slots, and the counts /metrics
shows. Dicts as the API answers them; no HTTP here.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, undefer

from divingbell.fleet import leases, states
from divingbell.fleet.models import (
    AuditEvent,
    BmcRow,
    Lease,
    Machine,
    Report,
    StateChange,
    iso,
)
from divingbell.fleet.revisions import active_revision, labels_of
from divingbell.fleet.views import VIEW_COLUMNS, View, up_to_date

HISTORY_SHOWN = 50


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
