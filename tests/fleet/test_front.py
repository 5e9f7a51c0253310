"""The service's HTTP front (fleet/front.py) on the wire: a server with it and a server with
uvicorn's plain httptools protocol (the hot paths as ASGI) run on the same store, raw requests
are written to each over loopback sockets and their raw answers compared byte for byte (the
`date` header aside). Each test also checks the front itself answered the requests that are
its own (`FleetHttpProtocol._answer` counted), so none can pass with the front left out. The
`settings` fixture runs every test on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from divingbell.fleet import front, hotpath
from divingbell.fleet.settings import FleetSettings
from tests.fleet.front_helpers import (
    Connection,
    Taken,
    Twins,
    Worker,
    body_of,
    exchange,
    header,
    request,
    status_of,
    twins,
)
from tests.fleet.servers import ThreadServer, thread_server, wait_for
from tests.fleet.test_api import DOC
from tests.policy.pki import ScratchCa

# 1. Byte parity over every case of the hot paths' scenario
Step = Callable[[Worker, str], bytes]


@dataclass
class Act:
    """An operator's act between two requests, done once for both twins."""

    do: Callable[[], None]


def scenario_steps(twins_: Twins) -> list[tuple[str, Step | Act]]:
    """(name, a request made for a worker given the other machine's token, or an act of the
    operator done once for both twins) in order."""
    both = (twins_.front, twins_.plain)
    admin = twins_.front.server.admin

    def push_new_revision() -> None:
        # Both twins in one wave: each is served the new revision at once.
        admin.call("PUT", "/v1/rollout-policy", {"max_unavailable": "100%"})
        admin.push_document(DOC.replace("30", "40").encode())

    def reenroll_both() -> None:
        for worker in both:
            admin.reenroll(worker.id)

    deep = b"[" * 70 + b"]" * 70
    oversized = json.dumps({"revision": 1, "etag": "x", "state": "converged", "modules": {
        "sysctl": {"changes": 1, "failures": ["e" * 1000] * (hotpath.MAX_REPORT_BYTES // 1000)
                   }}}).encode()
    assert len(oversized) > hotpath.MAX_REPORT_BYTES
    return [
        ("poll", lambda w, _: w.config()),
        ("poll, its ETag", lambda w, _: w.config(**{"If-None-Match": w.etag})),
        ("poll, ETag in a list", lambda w, _: w.config(
            **{"If-None-Match": '"1-other", ' + w.etag})),
        ("poll, If-None-Match too long", lambda w, _: w.config(**{"If-None-Match": "x" * 1100})),
        ("report", lambda w, _: w.report()),
        ("report failed", lambda w, _: w.report(w.report_body(state="failed"))),
        ("report, charset", lambda w, _: w.report(
            headers={"Content-Type": "application/json; charset=utf-8"})),
        ("report, unknown revision", lambda w, _: w.report(w.report_body(revision=99))),
        ("report, invalid state", lambda w, _: w.report(w.report_body(state="maybe"))),
        ("report, unknown field", lambda w, _: w.report(w.report_body(extra=1))),
        ("report, not JSON", lambda w, _: w.report(b"{not json")),
        ("report, too deep", lambda w, _: w.report(deep)),
        ("report, wrong content type", lambda w, _: w.report(
            headers={"Content-Type": "text/plain"})),
        ("report, larger than the hot paths take", lambda w, _: w.report(oversized)),
        ("poll, wrong secret", lambda w, _: request(
            "GET", f"/v1/machines/{w.id}/config", w.token + "x")),
        ("report, wrong secret", lambda w, _: w.report(token=w.token + "x")),
        ("poll, another machine's credential", lambda w, other: request(
            "GET", f"/v1/machines/{w.id}/config", other)),
        ("report, another machine's credential", lambda w, other: w.report(token=other)),
        ("report, a query string", lambda w, _: request(
            "POST", f"/v1/machines/{w.id}/reports?x=1", w.token, w.report_body())),
        ("poll, a query string", lambda w, _: request(
            "GET", f"/v1/machines/{w.id}/config?x=1", w.token)),
        ("poll, the path percent-encoded", lambda w, _: request(
            "GET", f"/v1/machines/%{ord(w.id[0]):02X}{w.id[1:]}/config", w.token,
            headers={"If-None-Match": w.etag})),
        ("poll, lower-case bearer", lambda w, _: request(
            "GET", f"/v1/machines/{w.id}/config", None,
            headers={"authorization": f"bearer {w.token}", "If-None-Match": w.etag})),
        ("poll, two credentials", lambda w, _: w.config(
            Authorization=f"Bearer {w.token}")),
        ("poll, HEAD", lambda w, _: request("HEAD", f"/v1/machines/{w.id}/config", w.token)),
        ("report, no content type", lambda w, _: request(
            "POST", f"/v1/machines/{w.id}/reports", w.token, w.report_body(),
            headers={"Content-Type": ""})),
        ("a new revision", Act(push_new_revision)),
        ("poll, old ETag: the new revision", lambda w, _: w.config(
            **{"If-None-Match": w.etag})),
        ("report of the new revision", lambda w, _: w.report()),
        ("credentials revoked", Act(reenroll_both)),
        ("poll, revoked", lambda w, _: w.config(**{"If-None-Match": w.etag})),
        ("report, revoked", lambda w, _: w.report()),
    ]


FRONT_STEPS = {"poll", "poll, its ETag", "poll, ETag in a list", "report", "report failed",
               "report, charset", "report, unknown revision", "poll, wrong secret",
               "report, wrong secret", "poll, lower-case bearer",
               "poll, old ETag: the new revision", "report of the new revision",
               "poll, revoked", "report, revoked"}
"""The scenario's requests that are a machine's own well-formed poll or report (its id in its
credential, a valid body), as the front reads them: its own. The others go uvicorn's way."""
HOT_STEPS = FRONT_STEPS | {"report, a query string", "poll, the path percent-encoded"}
"""Those the hot paths serve, the front's and those the ASGI hot path takes after uvicorn
decoded the path and split the query off (the same answer: compared with the plain server's)."""


def test_the_front_answers_every_case_byte_for_byte_as_uvicorn(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken) -> None:
    twins_ = twins(*servers)
    statuses: dict[str, int] = {}
    for name, step in scenario_steps(twins_):
        if isinstance(step, Act):
            step.do()
            continue
        answers, by_front, by_lanes = [], [], []
        for worker in (twins_.front, twins_.plain):
            front_before, lanes_before = len(taken.by_front), len(taken.by_lanes)
            data = step(worker, twins_.witness_token)
            method = data.split(b" ", 1)[0].decode()
            answers.append(worker.saw(exchange(worker.server, data, method)))
            by_front.append(len(taken.by_front) - front_before)
            by_lanes.append(len(taken.by_lanes) - lanes_before)
        front_answer, plain_answer = answers
        assert twins_.front.normalised(front_answer) == twins_.plain.normalised(plain_answer), \
            name
        # The front answered exactly its own requests itself (the plain server never does),
        # and they are exactly those the ASGI hot path takes on the plain server.
        assert by_front == [int(name in FRONT_STEPS), 0], name
        assert by_lanes == [int(name in HOT_STEPS)] * 2, name
        statuses[name] = status_of(front_answer)
    assert len(statuses) == 29
    assert statuses == {**statuses, "poll": 200, "poll, its ETag": 304,
                        "poll, ETag in a list": 304, "report": 201, "report failed": 201,
                        "report, unknown revision": 422, "poll, wrong secret": 401,
                        "report, wrong secret": 401, "poll, another machine's credential": 403,
                        "poll, old ETag: the new revision": 200,
                        "report of the new revision": 201, "poll, revoked": 401,
                        "report, revoked": 401}
    # The states the two ways left are the same.
    admin = twins_.front.server.admin
    front_view, plain_view = admin.machine(twins_.front.id), admin.machine(twins_.plain.id)
    for key in ("state", "up_to_date", "revision"):
        assert front_view[key] == plain_view[key], key
    assert [h["to"] for h in front_view["history"]] == [h["to"] for h in plain_view["history"]]


# 2. Pipelining
def pipelined(worker: Worker) -> list[tuple[bytes, str]]:
    """Requests and their methods: hot and not, one after the other."""
    etag = {"If-None-Match": worker.etag}
    return [(worker.config(**etag), "GET"), (worker.report(), "POST"),
            (request("GET", "/healthz"), "GET"), (worker.config(**etag), "GET"),
            (worker.report(worker.report_body(state="maybe")), "POST"),
            (worker.report(), "POST")]


def test_pipelined_requests_are_answered_in_order_and_the_connection_stays_usable(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken) -> None:
    twins_ = twins(*servers)
    answered: list[list[bytes]] = []
    by_front = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        sent = pipelined(worker)
        connection = Connection(worker.server)
        try:
            connection.send(b"".join(data for data, _ in sent))  # one write, six requests
            answers = [connection.answer(method) for _, method in sent]
            connection.send(worker.config(**{"If-None-Match": worker.etag}))
            answers.append(connection.answer())
        finally:
            connection.close()
        answered.append([worker.normalised(answer) for answer in answers])
        by_front.append(len(taken.by_front) - before)
        assert [status_of(answer) for answer in answers] == [304, 201, 200, 304, 422, 201, 304]
        assert body_of(answers[2]) == b"ok\n"
        assert json.loads(body_of(answers[5])) == {"state": "ready", "up_to_date": True,
                                                   "revision": 1}
        assert header(answers[4], b"content-type") == b"application/json"
        admin = worker.server.admin
        assert len(admin.call("GET", f"/v1/machines/{worker.id}/reports")) == 2
    assert answered[0] == answered[1]
    # The first request and the one after the batch at least were the front's own (those
    # queued behind a request in progress go uvicorn's way: its pipeline keeps the order).
    assert by_front[0] >= 2 and by_front[1] == 0


# 3. Keep-alive: Connection: close, HTTP/1.0, Expect: 100-continue
def test_connection_close_and_http_1_0_end_the_connection_after_the_answer(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken) -> None:
    twins_ = twins(*servers)
    answered: list[list[bytes]] = []
    by_front = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        close = {"Connection": "close"}
        path = f"/v1/machines/{worker.id}/config"
        cases = [
            (worker.config(**{"If-None-Match": worker.etag}, **close), "GET"),
            (request("GET", path, worker.token, headers={"If-None-Match": worker.etag},
                     version="1.0"), "GET"),
            (request("GET", path, worker.token, headers={"If-None-Match": worker.etag,
                                                         "Connection": "keep-alive"},
                     version="1.0"), "GET"),
            (worker.report(headers=close), "POST"),
            (worker.report(worker.report_body(state="maybe"), headers=close), "POST"),
        ]
        answers = []
        for data, method in cases:
            connection = Connection(worker.server)
            try:
                connection.send(data)
                answers.append(connection.answer(method))
                assert connection.closed_by_server(), data
            finally:
                connection.close()
        assert [status_of(answer) for answer in answers] == [304, 304, 304, 201, 422]
        assert all(header(answer, b"connection") == b"close" for answer in answers)
        answered.append([worker.normalised(answer) for answer in answers])
        by_front.append(len(taken.by_front) - before)
    assert answered[0] == answered[1]
    assert by_front == [4, 0]  # all but the invalid report were the front's


def test_a_report_expecting_100_continue_goes_the_framework_way(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken) -> None:
    twins_ = twins(*servers)
    answered: list[list[bytes]] = []
    for worker in (twins_.front, twins_.plain):
        front_before, lanes_before = len(taken.by_front), len(taken.by_lanes)
        head, body = worker.report(headers={"Expect": "100-continue"}).split(b"\r\n\r\n", 1)
        connection = Connection(worker.server)
        try:
            connection.send(head + b"\r\n\r\n")
            interim = connection.answer()
            connection.send(body)
            final = connection.answer("POST")
            connection.send(worker.config(**{"If-None-Match": worker.etag}))
            after = connection.answer()  # the connection is still usable
        finally:
            connection.close()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert (status_of(final), status_of(after)) == (201, 304)
        answered.append([worker.normalised(answer) for answer in (interim, final, after)])
        # The report went through uvicorn's cycle (which sends the 100), then the ASGI hot
        # path; the poll after it was the front's own.
        assert len(taken.by_front) - front_before == (1 if worker is twins_.front else 0)
        assert len(taken.by_lanes) - lanes_before == 2
    assert answered[0] == answered[1]


# 4. A body in several writes; one too large for the hot paths
def in_writes(connection: Connection, data: bytes, parts: int) -> None:
    """The headers in one write, then the body in `parts` writes a little apart."""
    head, body = data.split(b"\r\n\r\n", 1)
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.send(head + b"\r\n\r\n")
    step = -(-len(body) // parts)
    for start in range(0, len(body), step):
        time.sleep(0.05)  # separate segments, read separately by the server
        connection.send(body[start:start + step])


def test_a_body_in_several_writes_is_answered_once_complete(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken) -> None:
    twins_ = twins(*servers)
    oversized = json.dumps({"revision": 1, "etag": "x", "state": "converged", "modules": {
        "sysctl": {"changes": 1, "failures": ["e" * 1000] * 300}}}).encode()
    assert len(oversized) > hotpath.MAX_REPORT_BYTES
    answered: list[list[bytes]] = []
    by_front = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        connection = Connection(worker.server)
        try:
            in_writes(connection, worker.report(), 3)
            good = connection.answer("POST")
            in_writes(connection, worker.report(oversized), 4)
            too_large = connection.answer("POST")
            connection.send(worker.config(**{"If-None-Match": worker.etag}))
            after = connection.answer()
        finally:
            connection.close()
        assert [status_of(good), status_of(too_large), status_of(after)] == [201, 422, 304]
        assert json.loads(body_of(good))["up_to_date"] is True
        answered.append([worker.normalised(answer) for answer in (good, too_large, after)])
        by_front.append(len(taken.by_front) - before)
    assert answered[0] == answered[1]
    assert by_front == [2, 0]  # the good report and the poll; the large one the framework's


def test_over_tls_the_front_answers_as_uvicorn(
        servers: tuple[ThreadServer, ThreadServer], settings: FleetSettings, taken: Taken,
        tmp_path: Path) -> None:
    """The same on TLS connections: pipelined requests, then one that ends the connection."""
    twins_ = twins(*servers)
    authority = ScratchCa.create()
    certificate, key = authority.server_cert(tmp_path)
    tls = ssl.create_default_context(cadata=authority.pem.decode())
    answered: list[list[bytes]] = []
    by_front = []
    for worker, http in ((twins_.front, front.HTTP_PROTOCOL), (twins_.plain, "httptools")):
        with thread_server(settings, http=http, tls=(str(certificate), str(key))) as server:
            before = len(taken.by_front)
            sent = pipelined(worker)
            connection = Connection(server, tls=tls)
            try:
                connection.send(b"".join(data for data, _ in sent))
                answers = [connection.answer(method) for _, method in sent]
                connection.send(worker.config(**{"If-None-Match": worker.etag,
                                                 "Connection": "close"}))
                answers.append(connection.answer())
                assert connection.closed_by_server()
            finally:
                connection.close()
        assert [status_of(answer) for answer in answers] == [304, 201, 200, 304, 422, 201, 304]
        answered.append([worker.normalised(answer) for answer in answers])
        by_front.append(len(taken.by_front) - before)
    assert answered[0] == answered[1]
    assert by_front[0] >= 2 and by_front[1] == 0


# 5. X-Forwarded-For in the access log
def test_the_access_log_names_the_forwarded_client_as_uvicorn_does(
        servers: tuple[ThreadServer, ThreadServer], taken: Taken,
        caplog: pytest.LogCaptureFixture) -> None:
    twins_ = twins(*servers)
    caplog.set_level(logging.INFO, logger="divingbell.fleet.access")

    def clients(worker: Worker) -> list[str | None]:
        return [line["client"] for line in (json.loads(r.getMessage()) for r in caplog.records
                                            if r.name == "divingbell.fleet.access")
                if line["path"].startswith(f"/v1/machines/{worker.id}/")]

    logged = []
    for worker in (twins_.front, twins_.plain):
        before = len(taken.by_front)
        etag = {"If-None-Match": worker.etag}
        sent = [
            (worker.config(**etag, **{"X-Forwarded-For": "203.0.113.7"}), None),
            (worker.report(headers={"X-Forwarded-For": "203.0.113.8, 127.0.0.1"}), None),
            (worker.config(**etag), None),
            # From a peer uvicorn does not trust (not 127.0.0.1): the header is ignored.
            (worker.config(**etag, **{"X-Forwarded-For": "203.0.113.9"}), "127.0.0.2"),
        ]
        for data, source in sent:
            connection = Connection(worker.server, source)
            try:
                connection.send(data)
                connection.answer(data.split(b" ", 1)[0].decode())
            finally:
                connection.close()
        count = len(sent)
        wait_for(lambda worker=worker, count=count: len(clients(worker)) == count, timeout=10)
        logged.append(clients(worker))
        assert len(taken.by_front) - before == (len(sent) if worker is twins_.front else 0)
    assert logged[0] == logged[1] == ["203.0.113.7", "203.0.113.8", "127.0.0.1", "127.0.0.2"]
