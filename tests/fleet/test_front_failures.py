"""The service's HTTP front (fleet/front.py) when things go wrong, beside uvicorn's plain
httptools protocol on the same store (as in test_front.py, whose helpers these tests share): a
client gone mid-request, a store function that fails or a store away, a server stopping with
requests in flight; and the front's own bookkeeping on a long keep-alive connection. Each test
checks how many requests the front answered itself. The `settings` fixture runs every test on
SQLite and on a real PostgreSQL."""

from __future__ import annotations

import gc
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from divingbell.fleet import hotpath, pgloop
from divingbell.fleet.settings import FleetSettings
from tests.fleet.front_helpers import (
    CONFIG,
    REPORTS,
    Connection,
    Taken,
    Worker,
    body_of,
    exchange,
    header,
    status_of,
    twins,
)
from tests.fleet.servers import ThreadServer, thread_server, wait_for


# 1. A client that leaves while its report is in the store
@dataclass
class Hold:
    """A store function held: `entered` once a batch called it, which then waits until
    `release` is set."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def without_the_loop(patch: pytest.MonkeyPatch) -> None:
    """PostgreSQL's event-loop way (fleet/pgloop.py) made unavailable: requests go to the
    lanes, whose store functions the test holds or breaks."""
    async def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise pgloop.Unavailable("switched off by the test")

    patch.setattr(hotpath, "unchanged_config_on_loop", unavailable)
    patch.setattr(hotpath, "report_on_loop", unavailable)


@contextmanager
def held(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[Hold]:
    """The hot paths' store function `name` (serve_configs, store_reports) held. On
    PostgreSQL the event loop's own way (fleet/pgloop.py) is made unavailable meanwhile, so
    the requests go to the held lanes."""
    hold = Hold()
    real = getattr(hotpath, name)

    def holding(*args: Any, **kwargs: Any) -> Any:
        hold.entered.set()
        if not hold.release.wait(60):
            raise AssertionError("never released")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(hotpath, name, holding)
        without_the_loop(patch)
        try:
            yield hold
        finally:
            hold.release.set()


def access_lines(caplog: pytest.LogCaptureFixture, worker: Worker) -> list[dict[str, Any]]:
    lines = (json.loads(r.getMessage()) for r in caplog.records
             if r.name == "divingbell.fleet.access")
    return [line for line in lines if line["path"].startswith(f"/v1/machines/{worker.id}/")]


def connections_of(server: ThreadServer) -> int:
    assert server._server is not None
    return len(server._server.server_state.connections)


def test_a_client_gone_while_its_report_is_stored_leaves_it_stored_and_counted(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    twins_ = twins(*servers)
    caplog.set_level(logging.INFO, logger="divingbell.fleet.access")
    outcome = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        with held(monkeypatch, "store_reports") as hold:
            connection = Connection(worker.server)
            connection.send(worker.report())
            assert hold.entered.wait(30)
            # Reset, not a polite close: the server sees the connection fail at once.
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            connection.close()
            wait_for(lambda worker=worker: connections_of(worker.server) == 0, timeout=10)
            hold.release.set()
            wait_for(lambda worker=worker: len(access_lines(caplog, worker)) == 1, timeout=10)
        # The report was stored and is counted as answered (it was; nobody was there to read
        # it); the service goes on.
        stored = worker.server.admin.call("GET", f"/v1/machines/{worker.id}/reports")
        after = exchange(worker.server, worker.config(**{"If-None-Match": worker.etag}))
        outcome.append((len(stored), access_lines(caplog, worker)[0]["status"],
                        worker.server.admin.machine(worker.id)["state"], status_of(after)))
        assert len(taken.by_front) - before == (2 if worker is twins_.front else 0)
    assert outcome[0] == outcome[1] == (1, 201, "ready", 304)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_gone_before_its_report_arrived_leaves_nothing(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        caplog: pytest.LogCaptureFixture) -> None:
    """Gone with its body half sent: nothing stored, the server goes on. (The front never
    answered it, so it logs and counts nothing for it; through ASGI the framework logs a 400
    for the body it could not read.)"""
    twins_ = twins(*servers)
    caplog.set_level(logging.INFO, logger="divingbell.fleet.access")
    outcome = []
    for worker in (twins_.front, twins_.plain):
        data = worker.report()
        connection = Connection(worker.server)
        connection.send(data[:-20])  # the headers and most of the body
        time.sleep(0.2)  # read by the server before the client goes (not a bound on it)
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        connection.close()
        wait_for(lambda worker=worker: connections_of(worker.server) == 0, timeout=10)
        after = exchange(worker.server, worker.config(**{"If-None-Match": worker.etag}))
        stored = worker.server.admin.call("GET", f"/v1/machines/{worker.id}/reports")
        outcome.append((len(stored), status_of(after)))
    assert outcome[0] == outcome[1] == (0, 304)
    # For the front's machine: the poll after and the admin's read, no POST.
    wait_for(lambda: len(access_lines(caplog, twins_.front)) >= 2, timeout=10)
    assert [(line["method"], line["route"]) for line in access_lines(caplog, twins_.front)
            ] == [("GET", CONFIG), ("GET", REPORTS)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# 2. A store function that fails unexpectedly
@pytest.mark.parametrize("what", ["config", "reports"])
def test_an_unexpected_error_is_a_500_that_closes_the_connection_and_is_counted(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, what: str) -> None:
    twins_ = twins(*servers)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the store broke")

    answered: list[list[bytes]] = []
    by_front = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        data = worker.config(**{"If-None-Match": worker.etag}) if what == "config" \
            else worker.report()
        with monkeypatch.context() as patch:
            patch.setattr(hotpath, "serve_configs" if what == "config" else "store_reports",
                          broken)
            patch.setattr(hotpath, "unchanged_config", broken)
            connection = Connection(worker.server)
            try:
                connection.send(data)
                failed = connection.answer(data.split(b" ", 1)[0].decode())
                assert connection.closed_by_server()
            finally:
                connection.close()
        assert status_of(failed) == 500
        assert body_of(failed) == b"Internal Server Error"
        assert header(failed, b"connection") == b"close"
        after = exchange(worker.server, worker.config(**{"If-None-Match": worker.etag}))
        assert status_of(after) == 304  # the server goes on
        answered.append([worker.normalised(answer) for answer in (failed, after)])
        by_front.append(len(taken.by_front) - before)
        metrics = worker.server.client(None).request("GET", "/metrics").body.decode()
        method, route = ("GET", CONFIG) if what == "config" else ("POST", REPORTS)
        assert (f'divingbell_fleet_requests_total{{method="{method}",route="{route}",'
                f'status="500"}} 1.0') in metrics
    assert answered[0] == answered[1]
    assert by_front == [2, 0]
    # Logged with its traceback, once per server (the front's own line, uvicorn's for ASGI).
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info
              and isinstance(r.exc_info[1], RuntimeError)
              and str(r.exc_info[1]) == "the store broke"]
    assert [r.name for r in errors] == ["divingbell.fleet", "uvicorn.error"]


@pytest.mark.parametrize("what", ["config", "reports"])
def test_the_store_away_is_a_503_to_retry_on_the_same_connection(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """An error the app maps (here the store unreachable) is the app's answer, and the
    connection stays open for the retry."""
    twins_ = twins(*servers)

    def away(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the store is away"))

    answered: list[list[bytes]] = []
    by_front = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        data = worker.config(**{"If-None-Match": worker.etag}) if what == "config" \
            else worker.report()
        method = data.split(b" ", 1)[0].decode()
        connection = Connection(worker.server)
        try:
            with monkeypatch.context() as patch:
                patch.setattr(hotpath, "serve_configs" if what == "config" else "store_reports",
                              away)
                patch.setattr(hotpath, "unchanged_config", away)
                without_the_loop(patch)
                connection.send(data)
                unavailable = connection.answer(method)
            connection.send(data)
            retried = connection.answer(method)
        finally:
            connection.close()
        assert status_of(unavailable) == 503
        assert header(unavailable, b"retry-after") == b"5"
        assert json.loads(body_of(unavailable))["detail"]["error"] == "store-unavailable"
        assert status_of(retried) == (304 if what == "config" else 201)
        answered.append([worker.normalised(answer) for answer in (unavailable, retried)])
        by_front.append(len(taken.by_front) - before)
    assert answered[0] == answered[1]
    assert by_front == [2, 0]


# 3. Graceful shutdown
def test_a_hot_request_in_flight_is_answered_before_the_server_stops(
        servers: tuple[ThreadServer, ThreadServer], settings: FleetSettings, taken: Taken,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    twins_ = twins(*servers)
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    answered: list[bytes] = []
    by_front = []
    for n, worker in enumerate((twins_.front, twins_.plain), start=1):
        before = len(taken.by_front)
        server = worker.server
        assert server._server is not None and server._thread is not None
        with held(monkeypatch, "store_reports") as hold:
            connection = Connection(server)
            try:
                connection.send(worker.report())
                assert hold.entered.wait(30)
                server._server.should_exit = True
                # uvicorn has asked every connection to finish and waits for them.
                wait_for(lambda n=n: caplog.text.count(
                    "Waiting for connections to close") == n, timeout=10)
                hold.release.set()
                answer = connection.answer("POST")
                assert connection.closed_by_server()
            finally:
                connection.close()
        server._thread.join(30)
        assert not server._thread.is_alive()
        assert status_of(answer) == 201
        assert header(answer, b"connection") == b"close"
        answered.append(worker.normalised(answer))
        by_front.append(len(taken.by_front) - before)
    assert answered[0] == answered[1]
    assert by_front == [1, 0]
    with thread_server(settings) as again:  # both reports were stored
        for worker in (twins_.front, twins_.plain):
            assert len(again.admin.call("GET", f"/v1/machines/{worker.id}/reports")) == 1


def test_a_report_the_framework_answers_after_shutdown_began_closes_the_connection(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        caplog: pytest.LogCaptureFixture) -> None:
    """A report whose headers arrived before the server began stopping and whose body, once
    complete, is not valid: the framework answers it, with `connection: close` (uvicorn told
    the request in progress to end its connection), and the server stops."""
    twins_ = twins(*servers)
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    answered: list[bytes] = []
    before = len(taken.by_front)
    for n, worker in enumerate((twins_.front, twins_.plain), start=1):
        server = worker.server
        assert server._server is not None and server._thread is not None
        head, body = worker.report(worker.report_body(state="maybe")).split(b"\r\n\r\n", 1)
        connection = Connection(server)
        try:
            connection.send(head + b"\r\n\r\n" + body[:10])
            server._server.should_exit = True
            wait_for(lambda n=n: caplog.text.count(
                "Waiting for connections to close") == n, timeout=10)
            connection.send(body[10:])
            answer = connection.answer("POST")
        finally:
            connection.close()
        server._thread.join(30)
        assert not server._thread.is_alive()
        assert status_of(answer) == 422
        assert header(answer, b"connection") == b"close"
        answered.append(worker.normalised(answer))
    assert answered[0] == answered[1]
    assert len(taken.by_front) == before


# The front's own bookkeeping
def test_a_keep_alive_connection_holds_only_its_current_request(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken) -> None:
    """A connection polling for hours keeps one request's state, not every one it made."""
    twins_ = twins(*servers)
    worker = twins_.front
    before = len(taken.requests)
    connection = Connection(worker.server)
    try:
        for _ in range(5):
            connection.send(worker.config(**{"If-None-Match": worker.etag}))
            assert status_of(connection.answer()) == 304
        gc.collect()
        alive = [ref() is not None for ref in taken.requests[before:]]
    finally:
        connection.close()
    assert len(alive) == 5
    assert alive[:4] == [False] * 4  # only the last may still be the connection's current one


# 4. A poll answered on the event loop never waits there for the store
def test_a_poll_the_store_cannot_answer_at_once_waits_in_its_lane_not_on_the_loop(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite a 304 is answered on the event loop's thread (`HotPaths.poll_at_once`), on
    a connection that never waits for a lock. When that read fails as a locked store fails it
    (SQLite answers BUSY at once there: a process holding the file in exclusive locking mode),
    the poll goes to its lane and waits there, held here: the event loop keeps answering
    (/healthz), and the poll is answered when its lane is. On PostgreSQL the same when the
    loop's own connections cannot ask (fleet/pgloop.py)."""
    with_front, _ = servers
    worker = twins(*servers).front
    poll = worker.config(**{"If-None-Match": worker.etag})
    before = len(taken.by_lanes)
    assert status_of(exchange(with_front, poll)) == 304
    assert taken.by_lanes[before:] == ["config"]  # answered on the event loop, or by its lane

    def locked(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(hotpath, "unchanged_config", locked)
    with held(monkeypatch, "serve_configs") as hold:
        waiting = Connection(with_front)
        try:
            waiting.send(poll)
            assert hold.entered.wait(30)
            assert status_of(exchange(with_front, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")) \
                == 200  # the loop is free while the poll waits
            hold.release.set()
            assert status_of(waiting.answer("GET")) == 304
        finally:
            waiting.close()
