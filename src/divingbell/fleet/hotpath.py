"""The two requests every machine makes every minute, answered without the framework.

A machine's configuration poll (`GET /v1/machines/{id}/config`, mostly a 304) and its report
(`POST /v1/machines/{id}/reports`) are nearly all of a fleet's traffic. Through FastAPI each
costs routing over every route, dependency solving, body parsing twice and response
serialisation: several times the store work. `HotPaths` answers them as plain ASGI when the
caller is the machine itself (its own `dbm_` credential), with the very functions the routes
use (`api/machines.serve_config`, `store_report`), so both answer alike. It runs before the
framework (`app.FleetApp.__call__`), not as one of its middlewares: the framework's own
per-request work (its telemetry check, the middleware chain, the error middleware's wrapper)
and the Response objects were, measured with bench/fleet_profile.py, as much as the store
work. So it writes its answers as ASGI messages itself, and does the request log and metrics
itself (`FleetMetrics.record`, the same line and counters as every other route):

- the credential is checked against the store on every request, in the same transaction as
  the work (no cache that could outlive a revocation);
- the body is bounded, checked for depth (the app's `json_too_deep`) and validated by the same
  pydantic model, in one call from the raw bytes;
- anything else (another caller, a malformed header, an invalid or oversized body) goes on
  to the FastAPI route unchanged, body replayed, so every error keeps its one shape and the
  OpenAPI document stays complete;
- polls and reports go to the store through a `Lane` each: those that arrive while the
  previous batch is in the store go together, in one thread hand-off, and a batch of reports
  in one transaction (group commit, `api/machines.store_reports`), each committed before its
  201; a failing report fails only itself;
- on PostgreSQL, the event loop answers them itself when it can, on connections of its own
  (`fleet/pgloop.py`: no thread, one round trip for a 304, two for a report), and hands the
  rest to the lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from starlette.responses import Response

from divingbell.fleet.api.machines import (
    config_response,
    report_on_loop,
    serve_configs,
    store_reports,
    unchanged_config,
    unchanged_config_on_loop,
)
from divingbell.fleet.api.schemas import ReportBody
from divingbell.fleet.auth import MACHINE_PREFIX, Credentials, parse_token
from divingbell.fleet.db import keep_connections_in_this_thread
from divingbell.fleet.pgloop import LoopStore, Unavailable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
J = TypeVar("J")
R = TypeVar("R")

_HOT = re.compile(r"^/v1/machines/([A-Za-z0-9_-]{1,32})/(config|reports)$")
MAX_REPORT_BYTES = 256 * 1024
"""A report larger than this goes the framework's way (a real one is a few hundred bytes)."""
MAX_IF_NONE_MATCH = 1024
WORKER_THREADS = 16
POSTGRESQL_BATCHES = 8
"""Batches of one kind in PostgreSQL at once, per process: one at a time left the process idle
while each commit was flushed (bench/fleet_load.py: 500 reports/s under 100 ms and 523/s at
most with one, against 750 and 932/s without batches). SQLite has one writer: one batch."""
MAX_BATCH = 64
"""Requests of one kind handed to the store together at most (a report batch is one
transaction: bounded so a batch stays short)."""


@dataclass(frozen=True)
class RouteName:
    """What the request log and metrics read from `scope["route"]`: the route's template."""

    path: str


CONFIG_ROUTE = RouteName("/v1/machines/{machine_id}/config")
REPORTS_ROUTE = RouteName("/v1/machines/{machine_id}/reports")


def hot_route(path: str) -> tuple[str, str] | None:
    """The machine id and what ("config" or "reports") of a hot route's path, else None."""
    found = _HOT.match(path)
    return None if found is None else (found[1], found[2])


def machine_credentials(headers: Iterable[tuple[bytes, bytes]], machine_id: str
                        ) -> tuple[Credentials | None, str | None]:
    """The machine's own credential from the Authorization header (None for any other caller
    or shape), and If-None-Match (None when absent)."""
    authorization = if_none_match = None
    for name, value in headers:
        if name == b"authorization":
            if authorization is not None:
                return None, None
            authorization = value
        elif name == b"if-none-match":
            if if_none_match is not None or len(value) > MAX_IF_NONE_MATCH:
                return None, None
            if_none_match = value.decode("latin-1")
    if authorization is None or authorization[:7].lower() != b"bearer ":
        return None, None
    parsed = parse_token(authorization[7:].decode("latin-1").strip())
    if parsed is None or parsed[0] != MACHINE_PREFIX or parsed[1] != machine_id:
        return None, None
    return Credentials(*parsed), if_none_match


class StoreThreads:
    """The threads the hot paths' store work runs in: a queue of callables and the threads
    that take them, started as needed. Lighter than a ThreadPoolExecutor and an asyncio
    future per batch (its locks, work item and future, then the asyncio future chained to it:
    65 us of CPU a round trip on this VM against 22 for a bare queue and thread): the work
    itself says when it is done."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.lock = threading.Lock()

    def run(self, work: Callable[[], None]) -> None:
        """Run `work` in one of the threads (it must not raise)."""
        with self.lock:
            if self.idle:
                self.idle -= 1
            elif len(self.threads) < self.most:
                thread = threading.Thread(target=self._serve, args=(self.queue,), daemon=True,
                                          name=f"hot-{len(self.threads)}")
                thread.start()
                self.threads.append(thread)
            self.queue.put(work)

    def _serve(self, work_queue: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        keep_connections_in_this_thread()
        me = threading.current_thread()
        while True:
            work = work_queue.get()
            if work is None:
                return
            work()
            with self.lock:
                if me in self.threads:
                    self.idle += 1

    def stop(self, timeout: float = 10) -> None:
        """Let the work queued finish, then end the threads (work handed over later starts
        new ones)."""
        with self.lock:
            threads, work_queue = self.threads, self.queue
            self.threads, self.queue, self.idle = [], queue.SimpleQueue(), 0
        for _ in threads:
            work_queue.put(None)
        for thread in threads:
            thread.join(timeout)


class Lane(Generic[J, R]):
    """Requests of one kind on their way to the store, handed over in batches: while a batch
    runs in a store thread, the requests arriving meanwhile wait and go next, together.
    Under light load a batch is one request and it goes at once (no added wait); under load,
    one thread hand-off (and for reports one transaction) serves many, instead of one each
    (the hand-off and the transaction's fixed costs were a third of a report's service time,
    and SQLite's writers queued on its one write lock). `run` answers a batch in the store
    thread: a result or an exception per job, in order."""

    def __init__(self, run: Callable[[list[J]], list[R | Exception]], threads: StoreThreads,
                 parallel: int = 1) -> None:
        self.run = run
        self.threads = threads
        self.parallel = parallel
        """Batches in the store at once at most."""
        self.pending: list[tuple[J, asyncio.Future[R]]] = []
        self.running = 0

    def enqueue(self, job: J) -> asyncio.Future[R]:
        """The job's answer to come (called on the event loop's thread)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self.pending.append((job, future))
        if self.running < self.parallel:
            self._next(loop)
        return future

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
        self.running += 1

        def work() -> None:
            try:
                results: list[R | Exception] | BaseException = self.run(
                    [job for job, _ in batch])
            except BaseException as exc:  # the batch itself failed: each request gets it
                results = exc
            # A closed loop (RuntimeError): the service stopped, nobody waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._done, loop, batch, results)

        try:
            self.threads.run(work)
        except Exception as exc:  # no thread to run it: its requests get the error
            self._done(loop, batch, exc)

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[J, asyncio.Future[R]]],
              results: list[R | Exception] | BaseException) -> None:
        self.running -= 1
        if isinstance(results, BaseException):
            # Every waiting request gets the error (a 500, as any unexpected error).
            error = results if isinstance(results, Exception) else RuntimeError(
                "the service is stopping")
            results = [error] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its request was cancelled (the client went away)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self.pending and self.running < self.parallel:
            self._next(loop)


class HotPaths:
    """The machine's own polls and reports, straight to the store; everything else to `app`
    (the framework, with its middlewares). `state_app` is the application whose `state` holds
    the store and settings; `error_response` turns the exceptions the app has handlers for
    into the same responses; `too_deep` is the app's JSON depth guard; `record(scope, status,
    seconds)` logs and counts a request as the request log middleware does."""

    def __init__(self, app: ASGIApp, state_app: Any,
                 error_response: Callable[[Exception], Response | None],
                 too_deep: Callable[[bytes], bool],
                 record: Callable[[Scope, int, float], None], *, sqlite: bool = True,
                 loop_connections: int = 0) -> None:
        """`loop_connections`: on PostgreSQL, connections the event loop keeps for these
        requests (fleet/pgloop.py; 0: every one goes to the store threads)."""
        self.app = app
        self.state_app = state_app
        self.error_response = error_response
        self.too_deep = too_deep
        self.record = record
        # Threads of their own: the loop's default pool is small and shared with the framework.
        self.threads = StoreThreads(WORKER_THREADS)
        self.polls: Lane[tuple[Credentials, str, str | None], Any] = Lane(
            lambda polls: serve_configs(self.state_app.state.db, polls), self.threads,
            parallel=1 if sqlite else POSTGRESQL_BATCHES)
        self.reports: Lane[tuple[Credentials, str, ReportBody], Any] = Lane(
            lambda reports: store_reports(self.state_app.state.db, reports,
                                          self.state_app.state.settings.reports_kept),
            self.threads, parallel=1 if sqlite else POSTGRESQL_BATCHES)
        self.sqlite = sqlite
        self.loop_connections = 0 if sqlite else loop_connections
        self.loop_store: LoopStore | None = None
        self.answered_on_loop = 0
        """Requests the event loop answered itself (SQLite's 304s; PostgreSQL's 304s and
        reports, fleet/pgloop.py)."""
        self.sent_to_lanes = 0
        """Requests handed to the store threads' lanes."""

    def poll(self, job: tuple[Credentials, str, str | None]) -> asyncio.Future[Any]:
        """A machine's own poll's answer to come: on the event loop when it can (SQLite's
        `poll_at_once`, PostgreSQL's `pgloop`), else from its lane."""
        if self.sqlite:
            answered = self.poll_at_once(job)
            if answered is not None:
                self.answered_on_loop += 1
                return answered
        store = self._loop_store()
        if store is None:
            self.sent_to_lanes += 1
            return self.polls.enqueue(job)
        return asyncio.ensure_future(self._on_loop(unchanged_config_on_loop(store, *job),
                                                   self.polls, job))

    def report(self, job: tuple[Credentials, str, ReportBody]) -> asyncio.Future[Any]:
        """A machine's own report's answer to come: from the event loop on PostgreSQL when it
        can (`pgloop`), else from its lane."""
        store = self._loop_store()
        if store is None:
            self.sent_to_lanes += 1
            return self.reports.enqueue(job)
        kept = self.state_app.state.settings.reports_kept
        return asyncio.ensure_future(self._on_loop(report_on_loop(store, *job, kept),
                                                   self.reports, job))

    def _loop_store(self) -> LoopStore | None:
        if not self.loop_connections:
            return None
        store = self.loop_store
        if store is None:
            db = getattr(self.state_app.state, "db", None)
            if db is None:
                return None
            store = self.loop_store = LoopStore(db.engine, self.loop_connections)
        return store if store.usable() else None

    async def _on_loop(self, asking: Awaitable[Any], lane: Lane[Any, Any], job: Any) -> Any:
        """The loop's answer (`asking`), or the lane's when it has none."""
        try:
            found = await asking
        except Unavailable:
            found = None
        if found is None:
            self.sent_to_lanes += 1
            return await lane.enqueue(job)
        self.answered_on_loop += 1
        return found

    def poll_at_once(self, job: tuple[Credentials, str, str | None]
                     ) -> asyncio.Future[Any] | None:
        """A poll answered on the event loop's thread, done already, when that is quick and
        certain: SQLite, the machine's own credential, a configuration that did not change
        (a 304: one indexed read that never waits for a lock, 26 us of store CPU where the
        hand-off to a store thread and back cost more). None: the poll goes to its lane."""
        try:
            found = unchanged_config(self.state_app.state.db, *job)
        except OperationalError:  # the store busy (or away): the lane waits, and says so
            return None
        except Exception as exc:  # the caller's error (401, 404): as the lane would answer
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            return future
        if found is None:
            return None
        future = asyncio.get_running_loop().create_future()
        future.set_result(found)
        return future

    async def stop(self) -> None:
        """After the last request: the store threads end once their work is done, the event
        loop's connections are closed."""
        self.threads.stop()
        if self.loop_store is not None:
            await self.loop_store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = hot_route(scope["path"]) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        machine_id, what = found
        method = scope["method"]
        if what == "config" and method == "GET" and not scope.get("query_string"):
            credentials, if_none_match = machine_credentials(scope["headers"], machine_id)
            if credentials is not None:
                await self._observed(self._config(scope, receive, send, credentials,
                                                  machine_id, if_none_match), scope)
                return
        elif what == "reports" and method == "POST":
            credentials, _ = machine_credentials(scope["headers"], machine_id)
            if credentials is not None:
                await self._report(scope, receive, send, credentials, machine_id)
                return
        await self.app(scope, receive, send)

    async def _observed(self, answering: Awaitable[int], scope: Scope) -> None:
        """Await the answer, then log and count it (a 500 when it raised)."""
        started = time.perf_counter()
        status = 500
        try:
            status = await answering
        finally:
            self.record(scope, status, time.perf_counter() - started)

    async def _config(self, scope: Scope, receive: Receive, send: Send,
                      credentials: Credentials, machine_id: str,
                      if_none_match: str | None) -> int:
        scope["route"] = CONFIG_ROUTE
        scope["app"] = self.state_app
        try:
            job = (credentials, machine_id, if_none_match)
            principal, rendered = await self.poll(job)
        except Exception as exc:
            return await self._error(exc, scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        if rendered.text is not None:  # a new configuration: rare, the route's response
            response = config_response(rendered)
            await response(scope, receive, send)
            return response.status_code
        await send({"type": "http.response.start", "status": 304,
                    "headers": not_modified_headers(rendered)})
        await send({"type": "http.response.body", "body": b""})
        return 304

    async def _report(self, scope: Scope, receive: Receive, send: Send,
                      credentials: Credentials, machine_id: str) -> None:
        started = time.perf_counter()
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        complete = False
        while size <= MAX_REPORT_BYTES:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                complete = True
                break
        body = b"".join(chunks)
        report: ReportBody | None = None
        if complete and size <= MAX_REPORT_BYTES and is_json(scope["headers"]) \
                and not self.too_deep(body):
            try:
                report = ReportBody.model_validate_json(body)
            except ValidationError:
                report = None
        if report is None:
            # The framework's way, with the body as it came: its errors, its shapes.
            async def replay() -> Message:
                return messages.pop(0) if messages else await receive()

            await self.app(scope, replay, send)
            return
        scope["route"] = REPORTS_ROUTE
        scope["app"] = self.state_app
        status = 500
        try:
            try:
                principal, answer = await self.report((credentials, machine_id, report))
            except Exception as exc:
                status = await self._error(exc, scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
            content = report_content(answer)
            await send({"type": "http.response.start", "status": 201, "headers": [
                (b"content-length", str(len(content)).encode()),
                (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": content})
            status = 201
        finally:
            self.record(scope, status, time.perf_counter() - started)

    async def _error(self, exc: Exception, scope: Scope, receive: Receive, send: Send) -> int:
        response = self.error_response(exc)
        if response is None:
            raise exc
        await response(scope, receive, send)
        return response.status_code


def not_modified_headers(rendered: Any) -> list[tuple[bytes, bytes]]:
    """A 304's headers: what config_response answers, without building a Response."""
    return [(b"etag", rendered.etag.encode("latin-1")),
            (b"x-divingbell-revision", str(rendered.revision).encode())]


def report_content(answer: Any) -> bytes:
    """A stored report's answer as JSONResponse renders it (the route's), without one."""
    return _AS_JSON_RESPONSE.encode(answer).encode()


_AS_JSON_RESPONSE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None,
                                     separators=(",", ":"))
"""JSONResponse's rendering, its encoder built once (`json.dumps` with these options builds
one on every call: 2.4 against 1.7 us)."""


def is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """FastAPI reads a body as JSON only with a JSON content type (or none at all)."""
    for name, value in headers:
        if name == b"content-type":
            kind: bytes = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json"
    return False
