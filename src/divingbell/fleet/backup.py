"""Backups and replayable exports of the store.

`backup`: a consistent copy while the service runs: SQLite's online backup API, or `pg_dump`
(custom format, for pg_restore) for PostgreSQL. `export`/`import_`: machines, roles and
revisions as JSON that can be replayed into another store (SQLite to PostgreSQL, say); an
import is one transaction, all or nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from divingbell.document.api import load_document_text
from divingbell.errors import DocumentError
from divingbell.fleet import service, states
from divingbell.fleet.db import Database, normalise_url
from divingbell.fleet.models import Machine, MachineMac, Revision, StateChange, iso, utcnow
from divingbell.fleet.scheduler import rack_of

EXPORT_FORMAT = "divingbell-fleet-export/1"


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


def export(db: Database) -> dict[str, Any]:
    with db.read() as session:
        revisions = session.scalars(select(Revision).order_by(Revision.number)).all()
        machines = session.scalars(select(Machine).order_by(Machine.created_at,
                                                            Machine.uuid)).all()
        return {
            "format": EXPORT_FORMAT, "exported_at": iso(utcnow()),
            "active_revision": service.active_revision(session),
            "revisions": [{"revision": r.number, "name": r.source_name, "text": r.text,
                           "created_at": iso(r.created_at), "created_by": r.created_by}
                          for r in revisions],
            "machines": [{
                "id": m.id, "uuid": m.uuid, "hostname": m.hostname, "serial": m.serial,
                "boot_id": m.boot_id, "state": m.state, "roles": m.roles, "pinned": m.pinned,
                "interfaces": m.interfaces, "disks": m.disks, "lldp": m.lldp,
                # The hash, never a credential: machines keep working after a move.
                "credential_sha256": m.credential_hash,
                "created_at": iso(m.created_at), "discovered_at": iso(m.discovered_at),
            } for m in machines],
        }


def import_(db: Database, data: Any) -> dict[str, int]:
    """Replay an export. Existing revisions must match; machines are upserted by UUID."""
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise BackupError(f"not a {EXPORT_FORMAT} file")
    counts = {"revisions": 0, "machines": 0}
    now = utcnow()
    with db.write() as session:
        service.lock_scheduler(session)
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
        if active is not None and service.active_revision(session) is None:
            service.set_active(session, int(active))
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
