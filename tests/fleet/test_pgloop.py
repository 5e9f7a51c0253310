"""PostgreSQL from the event loop (fleet/pgloop.py): a machine's own polls and reports answered
on the loop's own connections, and every case it cannot answer handed to the store threads'
way (the lanes), which then answers as it always did. Against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, func, literal_column, select

from divingbell.fleet import pgloop, views
from divingbell.fleet.db import normalise_url
from divingbell.fleet.settings import FleetSettings
from tests.fleet.front_helpers import count_hot_answers
from tests.fleet.servers import PostgresCluster, ProcessServer, ThreadServer, thread_server
from tests.fleet.test_group_commit import machines, report_of, the_app
from tests.fleet.test_hotpath import send


@pytest.fixture
def pg_fleet(postgres: PostgresCluster) -> Iterator[ThreadServer]:
    settings = FleetSettings(db_url=postgres.create_database(), control_plane_size=1,
                             reports_kept=3)
    with thread_server(settings) as server:
        yield server


def on_loop(fleet: ThreadServer) -> int:
    hot_paths = the_app(fleet).hot_paths
    assert hot_paths is not None
    return hot_paths.answered_on_loop


def poll(fleet: ThreadServer | ProcessServer, machine: str, token: str, etag: str) -> int:
    return send(fleet, "GET", f"/v1/machines/{machine}/config", token,
                headers={"If-None-Match": etag})[0]


def report(fleet: ThreadServer | ProcessServer, machine: str, token: str, body: bytes) -> tuple[int, Any]:
    status, _, content = send(fleet, "POST", f"/v1/machines/{machine}/reports", token, body)
    return status, content


def warm(fleet: ThreadServer, machine: str, token: str, etag: str) -> None:
    """Until the loop has a connection and knows revision 1 (the first requests take the
    lanes while its first connection opens)."""
    for _ in range(200):
        before = on_loop(fleet)
        assert report(fleet, machine, token, report_of(etag))[0] == 201
        if on_loop(fleet) > before:
            return
    raise AssertionError("the event loop never answered a report")


def loop_pids(fleet: ThreadServer) -> list[int]:
    with psycopg.connect(plain_url(fleet), autocommit=True) as connection:
        return [pid for (pid,) in connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (pgloop.APPLICATION_NAME,))]


def plain_url(fleet: ThreadServer) -> str:
    return fleet.settings.db_url.replace("postgresql+psycopg://", "postgresql://")


def test_polls_and_reports_are_answered_on_the_loop_as_the_lanes_would(
        pg_fleet: ThreadServer) -> None:
    (machine, token, etag), = machines(pg_fleet, 1)
    warm(pg_fleet, machine, token, etag)
    before = on_loop(pg_fleet)
    assert poll(pg_fleet, machine, token, etag) == 304
    failed = report_of(etag, state="failed",
                       modules={"sysctl": {"changes": 0, "failures": ["x: denied"]}})
    assert report(pg_fleet, machine, token, failed) == (
        201, {"state": "degraded", "up_to_date": False, "revision": 1})
    assert report(pg_fleet, machine, token, report_of(etag)) == (
        201, {"state": "ready", "up_to_date": True, "revision": 1})
    assert on_loop(pg_fleet) - before == 3
    metrics = pg_fleet.admin.request("GET", "/metrics").body.decode()
    assert f'divingbell_fleet_hot_answers_total{{way="loop"}} {on_loop(pg_fleet)}.0' in metrics
    detail = pg_fleet.admin.machine(machine)
    assert detail["state"] == "ready"
    assert [(h["from"], h["to"], h["reason"]) for h in detail["history"][-2:]] == [
        ("ready", "degraded", "report: revision 1 failed"),
        ("degraded", "ready", "report: revision 1 converged")]
    stored = pg_fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
    assert [r["state"] for r in stored[:2]] == ["converged", "failed"]
    assert stored[1]["modules"] == {"sysctl": {"changes": 0, "failures": ["x: denied"]}}


def test_the_loop_keeps_the_newest_reports_only(pg_fleet: ThreadServer) -> None:
    (machine, token, etag), = machines(pg_fleet, 1)
    warm(pg_fleet, machine, token, etag)
    before = on_loop(pg_fleet)
    for boot in range(5):
        assert report(pg_fleet, machine, token, report_of(etag, boot_id=f"b{boot}"))[0] == 201
    assert on_loop(pg_fleet) - before == 5
    stored = pg_fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
    assert [r["boot_id"] for r in stored] == ["b4", "b3", "b2"]  # reports_kept=3


def test_what_the_loop_cannot_decide_goes_to_the_lanes(pg_fleet: ThreadServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (machine, token, etag), = machines(pg_fleet, 1)
    warm(pg_fleet, machine, token, etag)
    served: list[str] = []
    count_hot_answers(monkeypatch, served)
    before = on_loop(pg_fleet)
    # A revision this process never saw: the lane's transaction checks it (422).
    status, content = report(pg_fleet, machine, token, report_of(etag, revision=99))
    assert status == 422 and content["detail"]["error"] == "unknown-revision"
    # A configuration to render (no If-None-Match): the lane renders it.
    status, _, text = send(pg_fleet, "GET", f"/v1/machines/{machine}/config", token)
    assert status == 200 and "divingbell revision 1" in text
    assert on_loop(pg_fleet) == before
    assert served == ["report", "config"]  # each answered once, by its lane
    # A wrong secret is refused on the loop itself, as the lane would (401).
    assert report(pg_fleet, machine, token + "x", report_of(etag))[0] == 401
    assert poll(pg_fleet, machine, token + "x", etag) == 401


def test_a_machine_changed_between_the_read_and_the_write_is_never_overwritten(
        pg_fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's write is conditional on the machine as it read it: revoked in between, the
    report is not stored by the loop, and the lane (which reads again) refuses it."""
    (machine, token, etag), = machines(pg_fleet, 1)
    warm(pg_fleet, machine, token, etag)
    real_effect = views.report_effect
    revoked: list[str] = []

    def revoke_in_between(*args: Any, **kwargs: Any) -> Any:
        if not revoked:  # as `fleet reenroll` would, straight in the store (on the loop's thread)
            revoked.append(machine)
            with psycopg.connect(plain_url(pg_fleet), autocommit=True) as connection:
                connection.execute("UPDATE machines SET credential_hash = 'revoked' "
                                   "WHERE id = %s", (machine,))
        return real_effect(*args, **kwargs)

    monkeypatch.setattr(views, "report_effect", revoke_in_between)
    count_before = len(pg_fleet.admin.call("GET", f"/v1/machines/{machine}/reports"))
    before = on_loop(pg_fleet)
    status, _ = report(pg_fleet, machine, token, report_of(etag))
    assert revoked == [machine]
    assert status == 401
    assert on_loop(pg_fleet) == before
    assert len(pg_fleet.admin.call("GET", f"/v1/machines/{machine}/reports")) == count_before


def test_a_lost_connection_costs_no_request_and_is_replaced(
        pg_fleet: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="divingbell.fleet")
    pgloop._warned.clear()
    (machine, token, etag), = machines(pg_fleet, 1)
    warm(pg_fleet, machine, token, etag)
    pids = loop_pids(pg_fleet)
    assert pids
    with psycopg.connect(plain_url(pg_fleet), autocommit=True) as connection:
        for pid in pids:
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # Every request is answered (the lanes meanwhile), and the loop answers again after.
    statuses = [poll(pg_fleet, machine, token, etag) for _ in range(20)]
    assert statuses == [304] * 20
    before = on_loop(pg_fleet)
    for _ in range(100):
        assert poll(pg_fleet, machine, token, etag) == 304
        if on_loop(pg_fleet) > before:
            break
    assert on_loop(pg_fleet) > before
    assert set(loop_pids(pg_fleet)).isdisjoint(pids)
    lost = [r.getMessage() for r in caplog.records if "connection was lost" in r.getMessage()]
    assert len(lost) == 1  # once a minute at most, however many were lost


def test_many_machines_at_once_are_all_answered(pg_fleet: ThreadServer) -> None:
    fleet_machines = machines(pg_fleet, 12)
    warm(pg_fleet, *fleet_machines[0])
    before = on_loop(pg_fleet)
    jobs = [(m, t, e) for m, t, e in fleet_machines] * 4

    def both(job: tuple[str, str, str]) -> tuple[int, int]:
        machine, token, etag = job
        return poll(pg_fleet, machine, token, etag), report(pg_fleet, machine, token,
                                                           report_of(etag))[0]

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(both, jobs)) == {(304, 201)}
    assert on_loop(pg_fleet) - before >= len(jobs)  # most, if not all, on the loop
    for machine, _, _ in fleet_machines:
        assert pg_fleet.admin.machine(machine)["state"] == "ready"


def test_switched_off_everything_takes_the_lanes(postgres: PostgresCluster) -> None:
    settings = FleetSettings(db_url=postgres.create_database(), control_plane_size=1,
                             loop_connections=0)
    with thread_server(settings) as fleet:
        (machine, token, etag), = machines(fleet, 1)
        for _ in range(3):
            assert report(fleet, machine, token, report_of(etag))[0] == 201
            assert poll(fleet, machine, token, etag) == 304
        assert on_loop(fleet) == 0
        assert loop_pids(fleet) == []
        metrics = fleet.admin.request("GET", "/metrics").body.decode()
        assert 'divingbell_fleet_hot_answers_total{way="loop"} 0.0' in metrics
        # Its first fetch (machines()), then three reports and three polls.
        assert 'divingbell_fleet_hot_answers_total{way="lanes"} 7.0' in metrics


# The store itself, on a loop of this test's own ------------------------------------------------

def loop_store(url: str, size: int = 2) -> pgloop.LoopStore:
    return pgloop.LoopStore(create_engine(normalise_url(url)), size)


async def opened(store: pgloop.LoopStore) -> None:
    """Until its first connection is open (the first call starts opening it)."""
    for _ in range(500):
        assert store.usable()
        if store.idle:
            return
        if store.opening is None and not store.idle:
            with pytest.raises(pgloop.Unavailable):
                await store.first(ONE, {})
        await asyncio.sleep(0.01)
    raise AssertionError("no connection opened")


ONE = pgloop.LoopStatement(select(1))


def test_a_failing_statement_is_unavailable_and_its_connection_goes_on(
        postgres: PostgresCluster) -> None:
    store = loop_store(postgres.create_database())
    division = pgloop.LoopStatement(select(literal_column("1") / literal_column("0")))

    async def scenario() -> None:
        await opened(store)
        assert await store.first(ONE, {}) == (1,)
        with pytest.raises(pgloop.Unavailable, match="SQLSTATE"):
            await store.first(pgloop.LoopStatement(select(func.pg_sleep("x"))), {})
        with pytest.raises(pgloop.Unavailable):
            await store.first(division, {})
        assert await store.first(ONE, {}) == (1,)  # the same connection, still good
        await store.close()
        assert not store.usable()

    asyncio.run(scenario())


def test_a_store_that_cannot_be_reached_rests_and_sends_everything_to_the_lanes() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    store = loop_store(f"postgresql://nobody@127.0.0.1:{port}/none")

    async def scenario() -> None:
        with pytest.raises(pgloop.Unavailable, match="no connection open yet"):
            await store.first(ONE, {})
        assert store.opening is not None
        await store.opening
        assert store.resting_until > 0
        assert not store.usable()  # the lanes answer meanwhile (they will say 503)

    asyncio.run(scenario())


def test_waiting_requests_get_a_connection_in_turn(postgres: PostgresCluster) -> None:
    store = loop_store(postgres.create_database(), size=1)
    slow = pgloop.LoopStatement(select(func.pg_sleep(0.05), literal_column("1")))

    async def scenario() -> None:
        await opened(store)
        answers = await asyncio.gather(*(store.first(slow, {}) for _ in range(5)))
        assert [row[1] for row in answers if row] == [1] * 5
        assert len(store.idle) == 1 and store.busy == 0 and not store.waiting
        await store.close()

    asyncio.run(scenario())


def test_the_hot_paths_use_the_loop_only_on_postgresql(tmp_path: Any) -> None:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    with thread_server(settings) as fleet:
        hot_paths = the_app(fleet).hot_paths
        assert hot_paths is not None and hot_paths.loop_connections == 0
        (machine, token, etag), = machines(fleet, 1)
        assert report(fleet, machine, token, report_of(etag))[0] == 201
        assert hot_paths.loop_store is None and hot_paths.answered_on_loop == 0


def test_serve_keeps_at_most_loop_connections_per_process(postgres: PostgresCluster,
                                                          tmp_path: Any) -> None:
    """`divingbell serve --loop-connections 1`: under concurrent polls and reports, one
    connection of the loop's, never more (the rest wait for it, or take the lanes)."""
    url = postgres.create_database()
    with thread_server(FleetSettings(db_url=url, control_plane_size=1)) as setup:
        fleet_machines = machines(setup, 6)
    server = ProcessServer(url, args=("--loop-connections", "1")).start(tmp_path / "serve.log")
    try:
        def both(job: tuple[str, str, str]) -> tuple[int, int]:
            machine, token, etag = job
            return (poll(server, machine, token, etag),
                    report(server, machine, token, report_of(etag))[0])

        with ThreadPoolExecutor(12) as pool:
            for _ in range(3):
                assert set(pool.map(both, fleet_machines * 4)) == {(304, 201)}
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as connection:
            (count,), = connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (pgloop.APPLICATION_NAME,)).fetchall()
        assert count == 1
    finally:
        server.stop()
