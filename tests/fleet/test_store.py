"""The store: migrations from an empty database and from the previous revision, on SQLite
and PostgreSQL; the schema they build matches the models; /readyz tells a stale schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from divingbell.fleet import migrations
from divingbell.fleet.db import Database
from divingbell.fleet.models import Base, Machine, utcnow
from divingbell.fleet.settings import FleetSettings
from divingbell.fleet.tokens import create_token, list_tokens
from tests.fleet.servers import thread_server


def test_migrations_from_empty_build_exactly_the_models(store_url: str) -> None:
    db = Database(store_url)
    try:
        assert migrations.current(db.engine) is None
        migrations.upgrade(db.write_engine)
        assert migrations.current(db.engine) == migrations.head()
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
        migrations.upgrade(db.write_engine)  # again: nothing to do
        assert migrations.current(db.engine) == migrations.head()
    finally:
        db.dispose()


def test_migrations_from_the_previous_revision_keep_the_data(store_url: str) -> None:
    db = Database(store_url)
    try:
        migrations.upgrade(db.write_engine, "0001")
        assert "audit_events" not in inspect(db.engine).get_table_names()
        with db.write() as session:
            session.execute(text(
                "INSERT INTO tokens (id, role, description, secret_hash, created_at) "
                "VALUES ('t1', 'admin', 'kept', :h, :now)"), {"h": "0" * 64, "now": utcnow()})
        migrations.upgrade(db.write_engine)
        assert migrations.current(db.engine) == migrations.head()
        assert "audit_events" in inspect(db.engine).get_table_names()
        assert [t["description"] for t in list_tokens(db)] == ["kept"]
        migrations.downgrade(db.write_engine, "0001")
        assert "audit_events" not in inspect(db.engine).get_table_names()
        with db.read() as session:  # the models are the head's: read the old schema by SQL
            assert session.execute(text("SELECT id FROM tokens WHERE id = 't1'")).first()
    finally:
        db.dispose()


def test_migration_0004_indexes_machines_in_the_order_listed_and_keeps_them(
        store_url: str) -> None:
    db = Database(store_url)

    def machine_indexes() -> set[str | None]:
        return {index["name"] for index in inspect(db.engine).get_indexes("machines")}

    try:
        migrations.upgrade(db.write_engine, "0003")
        assert "ix_machines_created" not in machine_indexes()
        now = utcnow()
        with db.write() as session:
            session.execute(text(
                "INSERT INTO machines (id, uuid, hostname, state, state_changed_at, roles, pinned,"
                " interfaces, disks, lldp, credential_hash, created_at, discovered_at) VALUES "
                "('m1', 'u1', 'kept', 'discovered', :now, '[]', false, '[]', '[]', '[]', '',"
                " :now, :now)"), {"now": now})
        migrations.upgrade(db.write_engine)
        assert migrations.current(db.engine) == migrations.head()
        assert "ix_machines_created" in machine_indexes()
        with db.read() as session:
            kept = session.get(Machine, "m1")
            assert kept is not None and kept.hostname == "kept" and kept.created_at == now
        migrations.downgrade(db.write_engine, "0003")
        assert "ix_machines_created" not in machine_indexes()
        with db.read() as session:
            assert session.execute(text("SELECT id FROM machines WHERE id = 'm1'")).first()
    finally:
        db.dispose()


def test_readyz_fails_while_the_schema_is_behind(store_url: str) -> None:
    db = Database(store_url)
    migrations.upgrade(db.write_engine, "0001")
    create_token(db, "admin")  # the tokens table exists since 0001
    db.dispose()
    settings = FleetSettings(db_url=store_url, migrate_at_start=False)
    with thread_server(settings) as server:
        answer = server.client().request("GET", "/readyz", ok=(503,))
        assert answer.status == 503
        assert "divingbell fleet migrate" in answer.json()["reason"]
        migrations.upgrade(Database(store_url).write_engine)
        assert server.client().call("GET", "/readyz")["ready"] is True


def test_migration_0005_drops_unbound_boot_tokens_and_accepts_unique_hostnames(
        store_url: str) -> None:
    db = Database(store_url)
    try:
        migrations.upgrade(db.write_engine, "0004")
        now = utcnow()
        with db.write() as session:
            for ident, description in (("t1", "kept"), ("t2", "network boot (issued by /v1/ipxe)")):
                session.execute(text(
                    "INSERT INTO tokens (id, role, description, secret_hash, created_at) "
                    "VALUES (:id, 'bootstrap', :d, :h, :now)"),
                    {"id": ident, "d": description, "h": "0" * 64, "now": now})
            for ident, hostname, state in (("m1", "alone", "ready"), ("m2", "twin", "ready"),
                                           ("m3", "twin", "scheduled"), ("m4", "boot", "booting")):
                session.execute(text(
                    "INSERT INTO machines (id, uuid, hostname, state, state_changed_at, roles,"
                    " pinned, interfaces, disks, lldp, credential_hash, created_at,"
                    " discovered_at) VALUES (:id, :id, :h, :s, :now, '[]', false, '[]', '[]',"
                    " '[]', '', :now, :now)"), {"id": ident, "h": hostname, "s": state,
                                                "now": now})
        migrations.upgrade(db.write_engine)
        assert [t["description"] for t in list_tokens(db)] == ["kept"]
        with db.read() as session:
            accepted = {m.id: m.hostname_accepted for m in session.query(Machine)}
        # The one name held by one active machine is accepted; a shared name waits for an
        # operator; a booting row's name is nobody's.
        assert accepted == {"m1": True, "m2": False, "m3": False, "m4": False}
        migrations.downgrade(db.write_engine, "0004")
        with db.read() as session:
            assert len(session.execute(text("SELECT id FROM machines")).all()) == 4
    finally:
        db.dispose()


def test_migration_0007_counts_existing_unaccepted_enrolments_as_unadmitted(
        store_url: str) -> None:
    db = Database(store_url)
    try:
        migrations.upgrade(db.write_engine, "0006")
        now = utcnow()
        with db.write() as session:
            for ident, accepted, credential, state in (
                    ("m1", True, "h", "ready"), ("m2", False, "h", "discovered"),
                    ("m3", False, "", "booting"), ("m4", False, "", "decommissioned")):
                session.execute(text(
                    "INSERT INTO machines (id, uuid, hostname, hostname_accepted, state,"
                    " state_changed_at, roles, pinned, interfaces, disks, lldp,"
                    " credential_hash, created_at, discovered_at) VALUES (:id, :id, :id, :a,"
                    " :s, :now, '[]', false, '[]', '[]', '[]', :c, :now, :now)"),
                    {"id": ident, "a": accepted, "s": state, "c": credential, "now": now})
        migrations.upgrade(db.write_engine)
        assert "ix_machines_unadmitted" in {
            index["name"] for index in inspect(db.engine).get_indexes("machines")}
        with db.read() as session:
            enrolled_with = {m.id: m.enrolled_with for m in session.query(Machine)}
        assert enrolled_with == {"m1": "operator", "m2": "boot", "m3": None, "m4": None}
        migrations.downgrade(db.write_engine, "0006")
        assert "ix_machines_unadmitted" not in {
            index["name"] for index in inspect(db.engine).get_indexes("machines")}
    finally:
        db.dispose()
