"""What the tests of the service's HTTP front (test_front.py, test_front_failures.py) share:
raw HTTP requests and answers on loopback sockets, twin machines of one store (one on the
server with the front, one on a server with uvicorn's plain httptools protocol) and what the
front answered itself. The fixtures `servers` and `taken` reach the tests through the fleet
conftest."""

from __future__ import annotations

import json
import re
import socket
import ssl
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pytest
from sqlalchemy.exc import OperationalError

from divingbell.fleet import front, hotpath, pgloop
from divingbell.fleet.api.machines import (
    report_on_loop,
    serve_configs,
    store_reports,
    unchanged_config,
    unchanged_config_on_loop,
)
from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import DOC, register

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

    monkeypatch.setattr(front.FleetHttpProtocol, "_answer", answer)
    count_hot_answers(monkeypatch, seen.by_lanes)
    return seen


def count_hot_answers(monkeypatch: pytest.MonkeyPatch, served: list[str]) -> None:
    """Count in `served` ("config", "report") every request the hot paths answered, in a
    lane's batch or on the event loop (SQLite's 304s, PostgreSQL's `pgloop`)."""
    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            served.extend([name] * len(args[1]))  # one per request in the batch
            return real(*args, **kwargs)
        return call

    def on_loop(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                found = await real(*args, **kwargs)
            except pgloop.Unavailable:
                raise
            except Exception:  # an answer (401, 404) all the same
                served.append(name)
                raise
            if found is not None:
                served.append(name)
            return found
        return call

    monkeypatch.setattr(hotpath, "serve_configs", counted("config", serve_configs))
    monkeypatch.setattr(hotpath, "store_reports", counted("report", store_reports))
    monkeypatch.setattr(hotpath, "unchanged_config", answered_at_once(served))
    monkeypatch.setattr(hotpath, "unchanged_config_on_loop",
                        on_loop("config", unchanged_config_on_loop))
    monkeypatch.setattr(hotpath, "report_on_loop", on_loop("report", report_on_loop))


def answered_at_once(served: list[str]) -> Callable[..., Any]:
    """`unchanged_config` (a 304 answered on the event loop's thread, SQLite), counted as
    "config" in `served` when it answered (the poll did not go on to its lane)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            found = unchanged_config(*args, **kwargs)
        except OperationalError:
            raise
        except Exception:
            served.append("config")
            raise
        if found is not None:
            served.append("config")
        return found
    return call
