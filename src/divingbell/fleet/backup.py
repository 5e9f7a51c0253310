"""Backups and replayable exports of the store.

`backup`: a consistent copy while the service runs: SQLite's online backup API, or `pg_dump`
(custom format, for pg_restore) for PostgreSQL. `export`/`import_`: the store as JSON that can
be replayed into another store (SQLite to PostgreSQL, say); an import is one transaction, all
or nothing.

The export is generic over the tables the models declare (`Base.metadata`): every table is
carried, row for row, except those in `EXCLUDED`, each with its reason. A table added later is
carried without anyone remembering to add it here (tests/fleet/test_export.py proves the round
trip for every table and fails when a carried table has no rows in its fixture).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Integer, Table, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from divingbell.core.document.api import load_document_text
from divingbell.core.errors import DocumentError
from divingbell.fleet import lifecycle, migrations, revisions, states
from divingbell.fleet.db import Database, normalise_url
from divingbell.fleet.models import (
    Base,
    Machine,
    MachineMac,
    Revision,
    StateChange,
    iso,
    utcnow,
)
from divingbell.fleet.scheduler import rack_of, scheduling_class

EXPORT_FORMAT = "divingbell-fleet-export/2"
LEGACY_FORMAT = "divingbell-fleet-export/1"
EXCLUDED: dict[str, str] = {
    "tokens": "operator and bootstrap tokens are credentials of people and tools, not of the "
              "fleet: a moved store gets new ones (fleet token create), so a copy of an export "
              "never lets anyone in",
    "ui_sessions": "browser sessions: tied to tokens (not carried) and over within hours; "
                   "log in again",
}
"""Tables an export leaves out, and why. Every other table is carried."""


class BackupError(Exception):
    pass


def backup(db_url: str, target: Path) -> str:
    """Write a backup of the store to `target` (0600). Returns how it was made."""
    url = make_url(normalise_url(db_url))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    if url.get_backend_name() == "sqlite":
        if not url.database or not Path(url.database).exists():
            raise BackupError(f"no SQLite store at {url.database}")
        source = sqlite3.connect(f"file:{url.database}?mode=ro", uri=True)
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
            source.close()
        os.chmod(target, 0o600)
        return "sqlite online backup"
    pg_dump = shutil.which("pg_dump") or "/usr/lib/postgresql/15/bin/pg_dump"
    if not Path(pg_dump).exists():
        raise BackupError("pg_dump not found: install the postgresql-client package")
    plain = url.set(drivername="postgresql")
    env = {**os.environ}
    if plain.password:
        env["PGPASSWORD"] = plain.password
        plain = plain.set(password=None)
    result = subprocess.run(
        [pg_dump, "--format=custom", "--file", str(target),
         "--dbname", plain.render_as_string(hide_password=False)],
        capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise BackupError(f"pg_dump failed: {result.stderr.strip()}")
    os.chmod(target, 0o600)
    return "pg_dump custom format (restore with pg_restore)"


def carried_tables() -> list[Table]:
    """The tables an export carries, parents before children (foreign keys)."""
    return [t for t in Base.metadata.sorted_tables if t.name not in EXCLUDED]


def _out(table: Table, row: Any) -> dict[str, Any]:
    values = {}
    for column in table.columns:
        value = row._mapping[column]
        values[column.name] = iso(value) if isinstance(value, datetime) else value
    return values


def _in(table: Table, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise BackupError(f"{table.name}: a row is not an object")
    unknown = sorted(set(item) - {c.name for c in table.columns})
    if unknown:
        raise BackupError(f"{table.name}: unknown column(s) {', '.join(unknown)} (exported by "
                          "a newer divingbell? import with that version)")
    values = {}
    for column in table.columns:
        if column.name not in item:
            continue  # an older export: the column's default
        value = item[column.name]
        if isinstance(column.type, DateTime) and value is not None:
            value = datetime.fromisoformat(str(value).replace("Z", "+00:00")).replace(
                tzinfo=None)
        values[column.name] = value
    if table.name == "machines":
        # Derived from the roles, never taken from a file (which may predate it, or disagree).
        values["scheduling"] = scheduling_class(values.get("roles"))
    return values


def _key(table: Table, values: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(values.get(c.name) for c in table.primary_key.columns)


def _rows(session: Session, table: Table) -> list[dict[str, Any]]:
    order = list(table.primary_key.columns)
    return [_out(table, row) for row in session.execute(select(table).order_by(*order))]


def export(db: Database) -> dict[str, Any]:
    """Every carried table, row for row, in primary-key order (one read transaction, so one
    consistent snapshot)."""
    with db.read() as session:
        return {
            "format": EXPORT_FORMAT, "exported_at": iso(utcnow()),
            "schema": migrations.current(db.engine),
            "excluded": dict(EXCLUDED),
            "tables": {table.name: _rows(session, table) for table in carried_tables()},
        }


def import_(db: Database, data: Any) -> dict[str, int]:
    """Replay an export into a store: rows are inserted; a row already there (same primary
    key) must be identical (replaying the same export changes nothing), else nothing changes
    and the table and key are named. Returns the rows added per table."""
    if isinstance(data, dict) and data.get("format") == LEGACY_FORMAT:
        return import_legacy(db, data)
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise BackupError(f"not a {EXPORT_FORMAT} file")
    tables = data.get("tables")
    if not isinstance(tables, dict):
        raise BackupError("no tables in the export")
    known = {t.name: t for t in carried_tables()}
    unknown = sorted(set(tables) - set(known))
    if unknown:
        raise BackupError(f"unknown table(s) {', '.join(unknown)} (exported by a newer "
                          "divingbell? import with that version)")
    counts: dict[str, int] = {}
    with db.write() as session:
        lifecycle.lock_scheduler(session)
        for name, table in known.items():
            items = tables.get(name) or []
            if not isinstance(items, list):
                raise BackupError(f"{name}: not a list of rows")
            existing = {_key(table, row): row for row in _rows(session, table)}
            new = []
            for item in items:
                values = _in(table, item)
                key = _key(table, values)
                there = existing.get(key)
                if there is None:
                    new.append(values)
                elif any(there[k] != (iso(v) if isinstance(v, datetime) else v)
                         for k, v in values.items()):
                    raise BackupError(f"{name} {list(key)} exists here with other content: "
                                      "import into an empty store")
            if name == "revisions":
                for values in new:
                    _check_revision(values)
            for start in range(0, len(new), 500):
                session.execute(insert(table), new[start:start + 500])
            counts[name] = len(new)
        session.flush()
        _advance_sequences(session)
    return counts


def _check_revision(values: dict[str, Any]) -> None:
    """A revision is served to machines: it must still validate, and its digest be its text's."""
    number, text = values.get("number"), str(values.get("text", ""))
    if values.get("digest") != hashlib.sha256(text.encode()).hexdigest():
        raise BackupError(f"revision {number}: its digest is not its text's")
    try:
        load_document_text(text, str(values.get("source_name") or "document.yaml"))
    except DocumentError as exc:
        raise BackupError(f"revision {number} is not valid: {exc}") from None


def _advance_sequences(session: Session) -> None:
    """PostgreSQL: rows inserted with their ids leave each id sequence behind; move it past
    the largest id, or the next report or audit event would collide with an imported one."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for table in carried_tables():
        key = list(table.primary_key.columns)
        if len(key) != 1 or not isinstance(key[0].type, Integer):
            continue
        largest = session.scalar(select(func.max(key[0])))
        if largest is not None:  # no sequence (an id given by us): setval(NULL) does nothing
            session.execute(text("SELECT setval(pg_get_serial_sequence(:t, :c), :v)"),
                            {"t": table.name, "c": key[0].name, "v": largest})


def import_legacy(db: Database, data: dict[str, Any]) -> dict[str, int]:
    """Replay a `divingbell-fleet-export/1` file (machines and revisions only). Existing
    revisions must match; machines are upserted by UUID."""
    counts = {"revisions": 0, "machines": 0}
    now = utcnow()
    with db.write() as session:
        lifecycle.lock_scheduler(session)
        for item in data.get("revisions") or []:
            number, text = int(item["revision"]), str(item["text"])
            name = str(item.get("name") or "document.yaml")
            digest = hashlib.sha256(text.encode()).hexdigest()
            existing = session.get(Revision, number)
            if existing is not None:
                if existing.digest != digest:
                    raise BackupError(f"revision {number} exists here with other content")
                continue
            try:
                load_document_text(text, name)
            except DocumentError as exc:
                raise BackupError(f"revision {number} is not valid: {exc}") from None
            session.add(Revision(number=number, source_name=name, text=text, digest=digest,
                                 created_at=now, created_by=str(item.get("created_by") or
                                                                "import")[:32]))
            counts["revisions"] += 1
        session.flush()
        active = data.get("active_revision")
        if active is not None and revisions.active_revision(session) is None:
            revisions.set_active(session, int(active))
        for item in data.get("machines") or []:
            machine = session.scalars(select(Machine).where(Machine.uuid == item["uuid"])
                                      ).first()
            if machine is None:
                state = item.get("state") if item.get("state") in states.STATES else (
                    states.DISCOVERED)
                machine = Machine(id=str(item["id"]), uuid=str(item["uuid"]), state=state,
                                  state_changed_at=now, created_at=now, discovered_at=now)
                session.add(machine)
                session.add(StateChange(machine_id=machine.id, from_state=None, to_state=state,
                                        reason="imported", at=now))
            machine.hostname = str(item.get("hostname") or "")
            machine.serial = item.get("serial")
            machine.boot_id = item.get("boot_id")
            machine.roles = list(item.get("roles") or [])
            machine.pinned = bool(item.get("pinned"))
            machine.interfaces = list(item.get("interfaces") or [])
            machine.disks = list(item.get("disks") or [])
            machine.lldp = list(item.get("lldp") or [])
            machine.rack = rack_of(machine.lldp)
            machine.credential_hash = str(item.get("credential_sha256") or "")
            session.flush()
            for interface in machine.interfaces:
                mac = interface.get("mac")
                if not mac:
                    continue
                owner = session.get(MachineMac, mac)
                if owner is not None and owner.machine_id != machine.id:
                    raise BackupError(f"MAC {mac} of {machine.id} is already on machine "
                                      f"{owner.machine_id}")
                if owner is None:
                    session.add(MachineMac(mac=mac, machine_id=machine.id))
            counts["machines"] += 1
    return counts
