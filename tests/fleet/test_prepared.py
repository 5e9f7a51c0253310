"""The hot paths' statements run on the driver's cursor (db.Prepared): the same rows in and
out as through SQLAlchemy, on SQLite and PostgreSQL, and a lost PostgreSQL connection is still
the 503 with Retry-After, followed by a fresh pool."""

from __future__ import annotations

import http.client

import psycopg
import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from divingbell.fleet import migrations, views
from divingbell.fleet.db import Database
from divingbell.fleet.models import Report, utcnow
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import DOC, register
from tests.fleet.test_group_commit import the_app


def test_a_prepared_statement_reads_and_writes_what_sqlalchemy_does(fleet: ThreadServer
                                                                    ) -> None:
    fleet.admin.push_document(DOC.encode())
    control, _ = register(fleet, 1)
    worker, _ = register(fleet, 2)
    fleet.admin.set_roles(worker, ["worker"])
    db = Database(fleet.settings.db_url)
    try:
        with db.read_conn() as connection:
            for machine_id in (control, worker, "unknown"):
                through_sqlalchemy = connection.execute(
                    views.SELF_VIEW, {"id": machine_id}).first()
                prepared = views._SELF_VIEW_RUN.first(connection, {"id": machine_id})
                assert prepared == (None if through_sqlalchemy is None
                                    else tuple(through_sqlalchemy)), machine_id
        # Booleans, JSON, times and NULLs written by each way read back alike.
        values = {"machine_id": worker, "revision": 1, "etag": None, "state": "failed",
                  "modules": {"sysctl": {"changes": 1, "failures": ["x"]}}, "drift": True,
                  "duration_seconds": 0.5, "boot_id": None, "received_at": utcnow()}
        with db.write_conn() as connection:
            views._INSERT_REPORT.execute(connection, values)
            connection.execute(insert(Report), values)
        with db.read() as session:
            rows = session.execute(select(Report).where(Report.machine_id == worker)
                                   .order_by(Report.id.desc()).limit(2)).scalars().all()
            pairs = [{key: getattr(row, key) for key in values} for row in rows]
        assert pairs[0] == pairs[1] == values
    finally:
        db.dispose()


def test_a_prepared_statement_that_fails_raises_sqlalchemy_errors(store_url: str) -> None:
    """What the app's error handlers map (here a conflict: 409, not a 500)."""
    db = Database(store_url)
    try:
        migrations.upgrade(db.write_engine)
        with pytest.raises(IntegrityError), db.write_conn() as connection:
            views._INSERT_REPORT.execute(connection, {  # no such machine
                "machine_id": "nobody", "revision": 1, "etag": None, "state": "converged",
                "modules": {}, "drift": False, "duration_seconds": 0.0, "boot_id": None,
                "received_at": utcnow()})
    finally:
        db.dispose()


def hot_poll(fleet: ThreadServer, machine: str, token: str, etag: str
             ) -> tuple[int, str | None, bytes]:
    connection = http.client.HTTPConnection(fleet.host, fleet.port, timeout=30)
    try:
        connection.request("GET", f"/v1/machines/{machine}/config", headers={
            "Authorization": f"Bearer {token}", "If-None-Match": etag})
        response = connection.getresponse()
        return response.status, response.getheader("Retry-After"), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_lost_postgresql_connection_is_a_503_then_the_pool_is_fresh(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The store threads' pool, which polls take when the event loop's own connections cannot
    # answer (their losses: tests/fleet/test_pgloop.py); those are switched off here, else one
    # opened after the kill below answers the poll at once.
    monkeypatch.setattr(the_app(fleet).hot_paths, "loop_connections", 0)
    fleet.admin.push_document(DOC.encode())
    machine, client = register(fleet, 1)
    etag = client.config(machine).etag
    assert etag is not None
    assert hot_poll(fleet, machine, str(client.token), etag)[0] == 304
    # PostgreSQL ends every session of the service (a restart or failover looks the same).
    url = fleet.settings.db_url
    with psycopg.connect(url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    assert ended is not None and ended[0] >= 1
    status, retry_after, body = hot_poll(fleet, machine, str(client.token), etag)
    assert (status, retry_after) == (503, "5") and b"store-unavailable" in body
    assert hot_poll(fleet, machine, str(client.token), etag)[0] == 304
