"""The service's HTTP front (fleet/front.py) on the wire: a server with it and a server with
uvicorn's plain httptools protocol (the hot paths as ASGI) run on the same store, raw requests
are written to each over loopback sockets and their raw answers compared byte for byte (the
`date` header aside). Each test also checks the front itself answered the requests that are
its own (`FleetHttpProtocol._answer` counted), so none can pass with the front left out. The
`settings` fixture runs every test on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import gc
import json
import logging
import re
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from sqlalchemy.exc import OperationalError

from divingbell.fleet import front, hotpath
from divingbell.fleet.api.machines import serve_configs, store_reports
from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server, wait_for
from tests.fleet.test_api import DOC, register
from tests.policy.pki import ScratchCa

CONFIG = "/v1/machines/{machine_id}/config"
REPORTS = "/v1/machines/{machine_id}/reports"


# Raw HTTP on a socket
def request(method: str, path: str, token: str | None = None, body: bytes | None = None,
            headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    """One request as bytes: Host, the bearer token, and for a body a JSON content type
    (unless given) and its length."""
    lines = [f"{method} {path} HTTP/{version}", "Host: fleet.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    given = {name.lower() for name in headers or {}}
    if body is not None:
        if "content-type" not in given:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def read_answer(reader: BinaryIO, method: str = "GET") -> bytes:
    """One answer exactly as it came: the status line, the headers and the body as framed
    (Content-Length, chunks, or nothing for 1xx/304); fails on an answer cut short."""
    head = b""
    while True:
        line = reader.readline()
        if not line:
            raise AssertionError(f"the connection ended inside an answer: {head!r}")
        head += line
        if line == b"\r\n":
            break
    status = int(head.split(b" ", 2)[1])
    fields = {}
    for header in head.split(b"\r\n")[1:]:
        if b":" in header:
            name, value = header.split(b":", 1)
            fields[name.strip().lower()] = value.strip()
    if status < 200 or status in (204, 304) or method == "HEAD":
        return head
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size_line = reader.readline()
            body += size_line
            size = int(size_line.split(b";")[0], 16)
            chunk = reader.read(size + 2)
            assert len(chunk) == size + 2, "a chunk cut short"
            body += chunk
            if size == 0:
                return head + body
    if b"content-length" in fields:
        length = int(fields[b"content-length"])
        body = reader.read(length)
        assert len(body) == length, f"a body cut short: {len(body)} of {length} bytes"
        return head + body
    return head + reader.read()  # delimited by the connection's end


class Connection:
    """A client's TCP connection to one server."""

    def __init__(self, server: ThreadServer, source: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((server.host, server.port), timeout=30,
                                        source_address=(source, 0) if source else None)
        self.sock = tls.wrap_socket(sock, server_hostname=server.host) if tls else sock
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, method: str = "GET") -> bytes:
        return read_answer(self.reader, method)

    def closed_by_server(self) -> bool:
        """True when the server has closed its side (end of stream after its answer)."""
        return self.reader.read(1) == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def exchange(server: ThreadServer, data: bytes, method: str = "GET") -> bytes:
    """One request on a connection of its own: the answer."""
    connection = Connection(server)
    try:
        connection.send(data)
        return connection.answer(method)
    finally:
        connection.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def header(answer: bytes, name: bytes) -> bytes | None:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


def without_date(answer: bytes) -> bytes:
    return re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", answer)


# The two servers, their machines, what the front took
@dataclass
class Worker:
    """A machine of the fleet: the server it talks to, its id, credential and current ETag."""

    server: ThreadServer
    id: str
    token: str
    etag: str
    revision: int = 1
    etags: list[str] = field(default_factory=list)

    def config(self, **headers: str) -> bytes:
        return request("GET", f"/v1/machines/{self.id}/config", self.token, headers=headers)

    def report_body(self, **changes: Any) -> bytes:
        return json.dumps({"revision": self.revision, "etag": self.etag, "state": "converged",
                           "modules": {"sysctl": {"changes": 1, "failures": []}},
                           **changes}).encode()

    def report(self, body: bytes | None = None, *, token: str | None = None,
               headers: dict[str, str] | None = None) -> bytes:
        return request("POST", f"/v1/machines/{self.id}/reports", token or self.token,
                       self.report_body() if body is None else body, headers)

    def saw(self, answer: bytes) -> bytes:
        """Follow a new configuration's ETag and revision, as an agent does."""
        etag = header(answer, b"etag")
        if etag is not None and status_of(answer) == 200:
            self.etag = etag.decode()
            self.revision = int(header(answer, b"x-divingbell-revision") or b"0")
        if etag is not None and etag.decode() not in self.etags:
            self.etags.append(etag.decode())
        return answer

    def normalised(self, answer: bytes) -> bytes:
        """The answer with what differs between twin machines named alike: the date, the
        machine's id, its ETags, its host name."""
        text = without_date(answer).replace(self.id.encode(), b"MACHINE")
        for n, etag in enumerate(self.etags):
            text = text.replace(etag.strip('"').encode(), f"ETAG{n}".encode())
        return re.sub(rb"node\d+", b"NODE", text)


@dataclass
class Twins:
    """A worker on the front's server and its twin on the plain server (same store), and a
    third worker whose credential is another machine's for both."""

    front: Worker
    plain: Worker
    witness_token: str


@pytest.fixture
def servers(settings: FleetSettings) -> Iterator[tuple[ThreadServer, ThreadServer]]:
    """The service with its front, and with uvicorn's plain httptools protocol: one store."""
    with thread_server(settings) as with_front, \
            thread_server(settings, http="httptools") as plain:
        yield with_front, plain


def twins(with_front: ThreadServer, plain: ThreadServer) -> Twins:
    with_front.admin.push_document(DOC.encode())
    register(with_front, 1)  # the control plane: the twins below are both workers
    found = []
    for n, server in ((2, with_front), (3, plain)):
        machine, client = register(server, n)
        etag = client.config(machine).etag
        assert etag is not None and client.token
        found.append(Worker(server, machine, str(client.token), etag, etags=[etag]))
    _, witness = register(with_front, 4)
    return Twins(found[0], found[1], str(witness.token))


@dataclass
class Taken:
    """The routes of the requests the front answered itself (`_answer`), those the lanes
    served (the front's and the ASGI hot path's alike), and the front's requests, weakly."""

    by_front: list[str] = field(default_factory=list)
    by_lanes: list[str] = field(default_factory=list)
    requests: list[weakref.ref[front.HotRequest]] = field(default_factory=list)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Taken:
    seen = Taken()
    real_answer = front.FleetHttpProtocol._answer

    def answer(self: front.FleetHttpProtocol, hot: front.HotRequest, future: Any) -> None:
        real_answer(self, hot, future)
        seen.by_front.append(hot.route.path)
        seen.requests.append(weakref.ref(hot))

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.by_lanes.extend([name] * len(args[1]))  # one per request in the batch
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(front.FleetHttpProtocol, "_answer", answer)
    monkeypatch.setattr(hotpath, "serve_configs", counted("config", serve_configs))
    monkeypatch.setattr(hotpath, "store_reports", counted("report", store_reports))
    return seen


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


# 6. A client that leaves while its report is in the store
@dataclass
class Hold:
    """A store function held: `entered` once a batch called it, which then waits until
    `release` is set."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@contextmanager
def held(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[Hold]:
    """The hot paths' store function `name` (serve_configs, store_reports) held."""
    hold = Hold()
    real = getattr(hotpath, name)

    def holding(*args: Any, **kwargs: Any) -> Any:
        hold.entered.set()
        if not hold.release.wait(60):
            raise AssertionError("never released")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(hotpath, name, holding)
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


# 7. A store function that fails unexpectedly
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


# 8. Graceful shutdown
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
