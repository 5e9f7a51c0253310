"""A registration's scheduling pass reads only what can change its outcome (the control plane
and the machines without roles) through an index, so its cost does not grow with the fleet
(issue 29; bench/fleet_load.py --registration-fleets times it). On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert, select, text

from divingbell.fleet import backup, migrations
from divingbell.fleet.db import Database
from divingbell.fleet.lifecycle import _SCHEDULER_CANDIDATES
from divingbell.fleet.models import Machine, utcnow
from divingbell.fleet.scheduler import scheduling_class
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import register

WORKERS = 3000


def scheduling_by_machine(db_url: str) -> dict[str, tuple[list[Any], str | None]]:
    db = Database(db_url)
    try:
        with db.read() as session:
            return {row.id: (list(row.roles or []), row.scheduling) for row in session.execute(
                select(Machine.id, Machine.roles, Machine.scheduling))}
    finally:
        db.dispose()


def assert_scheduling_follows_roles(db_url: str) -> None:
    for machine_id, (roles, scheduling) in scheduling_by_machine(db_url).items():
        assert scheduling == scheduling_class(roles), (machine_id, roles, scheduling)


def test_the_scheduling_column_follows_roles_through_every_change(fleet: ThreadServer) -> None:
    control, _ = register(fleet, 1)
    worker, _ = register(fleet, 2)
    pinned, _ = register(fleet, 3)
    assert_scheduling_follows_roles(fleet.settings.db_url)
    assert scheduling_by_machine(fleet.settings.db_url)[control] == (
        ["control-plane"], "control-plane")
    assert scheduling_by_machine(fleet.settings.db_url)[worker] == (["worker"], None)
    fleet.admin.set_roles(pinned, ["control-plane", "worker"])
    assert scheduling_by_machine(fleet.settings.db_url)[pinned][1] == "control-plane"
    fleet.admin.set_roles(pinned, [], pinned=False)  # unpinned: scheduled again, a worker
    assert_scheduling_follows_roles(fleet.settings.db_url)
    fleet.admin.call("POST", f"/v1/machines/{control}/decommission")
    assert scheduling_by_machine(fleet.settings.db_url)[control] == ([], "unassigned")
    replacement, _ = register(fleet, 4)  # the control plane is topped up from the index
    assert scheduling_by_machine(fleet.settings.db_url)[replacement] == (
        ["control-plane"], "control-plane")
    fleet.admin.call("POST", f"/v1/machines/{worker}/reenroll")
    assert_scheduling_follows_roles(fleet.settings.db_url)


def seed_fleet(db_url: str, workers: int) -> None:
    """A settled fleet written straight into the store by Core inserts that name no
    `scheduling` (as bench/fleet_load.py does): a control plane of 3 and `workers` workers."""
    now = utcnow()
    rows = [{"id": f"s{n:08d}", "uuid": f"seeded-{n}", "hostname": f"seeded{n}",
             "state": "ready", "state_changed_at": now,
             "roles": ["control-plane"] if n < 3 else ["worker"], "pinned": False,
             "interfaces": [], "disks": [], "lldp": [], "credential_hash": "",
             "created_at": now, "discovered_at": now} for n in range(workers + 3)]
    db = Database(db_url)
    try:
        with db.write() as session:
            for start in range(0, len(rows), 1000):
                session.execute(insert(Machine), rows[start:start + 1000])
    finally:
        db.dispose()


def candidate_plan(db_url: str) -> str:
    db = Database(db_url)
    try:
        with db.engine.connect() as connection:
            compiled = _SCHEDULER_CANDIDATES.compile(
                connection, compile_kwargs={"literal_binds": True})
            if db.sqlite:
                rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
                return "\n".join(str(row[-1]) for row in rows)
            connection.execute(text("ANALYZE machines"))  # what autovacuum does by itself
            rows = connection.exec_driver_sql(f"EXPLAIN {compiled}").all()
            return "\n".join(str(row[0]) for row in rows)
    finally:
        db.dispose()


def test_a_registration_reads_the_candidates_through_the_index_not_the_fleet(
        fleet: ThreadServer) -> None:
    seed_fleet(fleet.settings.db_url, WORKERS)
    assert_scheduling_follows_roles(fleet.settings.db_url)  # the Core insert default
    plan = candidate_plan(fleet.settings.db_url)
    assert "ix_machines_scheduling" in plan, plan
    newcomer, _ = register(fleet, 1)  # the control plane is complete: a worker
    assert fleet.admin.machine(newcomer)["roles"] == ["worker"]


def test_migration_0008_derives_the_column_from_existing_roles(store_url: str) -> None:
    db = Database(store_url)
    try:
        migrations.upgrade(db.write_engine, "0007")
        now = utcnow()
        with db.write() as session:
            for ident, roles in (("m1", "[]"), ("m2", '["control-plane"]'),
                                 ("m3", '["control-plane", "worker"]'), ("m4", '["worker"]'),
                                 ("m5", "null")):
                session.execute(text(
                    "INSERT INTO machines (id, uuid, hostname, state, state_changed_at, roles,"
                    " pinned, interfaces, disks, lldp, credential_hash, created_at,"
                    " discovered_at) VALUES (:id, :id, :id, 'ready', :now, :roles, false,"
                    " '[]', '[]', '[]', '', :now, :now)"),
                    {"id": ident, "roles": roles, "now": now})
        migrations.upgrade(db.write_engine)
        with db.read() as session:
            found = {row.id: row.scheduling for row in session.execute(
                select(Machine.id, Machine.scheduling))}
        assert found == {"m1": "unassigned", "m2": "control-plane", "m3": "control-plane",
                         "m4": None, "m5": "unassigned"}
        migrations.downgrade(db.write_engine, "0007")
        with db.read() as session:
            assert len(session.execute(text("SELECT id FROM machines")).all()) == 5
            columns = session.execute(text("SELECT * FROM machines LIMIT 1")).keys()
        assert "scheduling" not in columns
    finally:
        db.dispose()


def test_an_import_derives_the_column_whatever_the_file_says(fleet: ThreadServer,
                                                              tmp_path: Any) -> None:
    control, _ = register(fleet, 1)
    worker, _ = register(fleet, 2)
    db = Database(fleet.settings.db_url)
    try:
        data = json.loads(json.dumps(backup.export(db)))
    finally:
        db.dispose()
    rows = {row["id"]: row for row in data["tables"]["machines"]}
    del rows[control]["scheduling"]  # an export made before migration 0008
    rows[worker]["scheduling"] = "unassigned"  # a file that disagrees with its own roles
    target = f"sqlite:///{tmp_path / 'imported.db'}"
    other = Database(target)
    try:
        migrations.upgrade(other.write_engine)
        backup.import_(other, data)
    finally:
        other.dispose()
    assert scheduling_by_machine(target) == {control: (["control-plane"], "control-plane"),
                                             worker: (["worker"], None)}
