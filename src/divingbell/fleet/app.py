"""The FastAPI application: routers, error handlers, request log and metrics, probes.

`create_app(settings)` builds everything from the settings; the store is opened (and migrated,
unless told not to) when the app starts. New areas add a router file in `fleet/api/` and one
`include_router` line here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from array import array
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from itertools import accumulate
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from divingbell import __version__
from divingbell.fleet import admission, listing, migrations, revisions
from divingbell.fleet.api import (
    boot,
    bootstrap,
    documents,
    machines,
    power,
    rollouts,
    slots,
    ui,
)
from divingbell.fleet.db import Database, StoreReplaced, is_sqlite, redact
from divingbell.fleet.errors import ApiError
from divingbell.fleet.hotpath import HotPaths
from divingbell.fleet.settings import FleetSettings

access_log = logging.getLogger("divingbell.fleet.access")
log = logging.getLogger("divingbell.fleet")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class RequestTally(Collector):
    """Requests counted and timed in plain Python, turned into the two request families at
    scrape time: `divingbell_fleet_requests_total{method,route,status}` and the histogram
    `divingbell_fleet_request_duration_seconds{route}`. prometheus_client's Counter and
    Histogram take a lock and walk their buckets on every request: about 45 us of a 304's
    CPU when each request comes alone (docs/performance.md). Every request is counted on the
    event loop's thread (the request log middleware and the hot paths run there); a scrape
    from a worker thread reads copies."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts: dict[tuple[str, str, int], int] = {}
        self.timings: dict[str, list[float]] = {}
        """Per route: the sum of the durations, then a count per bucket (the last: +Inf)."""

    def add(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        timing = self.timings.get(route)
        if timing is None:
            timing = self.timings[route] = [0.0] * (len(self.buckets) + 2)
        timing[0] += seconds
        timing[1 + bisect_left(self.buckets, seconds)] += 1

    def collect(self) -> Any:
        requests = CounterMetricFamily("divingbell_fleet_requests", "HTTP requests served",
                                       labels=["method", "route", "status"])
        for (method, route, status), count in self.counts.copy().items():
            requests.add_metric([method, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily("divingbell_fleet_request_duration_seconds",
                                        "Time to answer a request", labels=["route"])
        bounds = [repr(float(bound)) for bound in self.buckets] + ["+Inf"]
        for route, timing in self.timings.copy().items():
            copy = list(timing)
            latency.add_metric([route], list(zip(bounds, accumulate(copy[1:]), strict=True)),
                               sum_value=copy[0])
        yield latency


class FleetMetrics:
    def __init__(self, db_getter: Callable[[], Database | None]) -> None:
        self.registry = CollectorRegistry()
        self.tally = RequestTally()
        self.registry.register(self.tally)
        self.registry.register(_StoreCollector(db_getter))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record(self, scope: Scope, status: int, elapsed: float) -> None:
        """Count and log one answered request (the request log middleware and the hot paths,
        fleet/hotpath.py, which answer before the framework)."""
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.tally.add(scope["method"], route, status, elapsed)
        if access_log.isEnabledFor(logging.INFO):  # else do not build the line
            principal = getattr(scope.get("state", {}).get("principal"), "label", None)
            client = scope.get("client")
            access_log.info(json.dumps({
                "method": scope["method"], "route": route, "path": scope["path"],
                "status": status, "ms": round(elapsed * 1000, 2),
                "client": client[0] if client else None, "caller": principal}))


class _HotPathCollector(Collector):
    """Where a machine's own polls and reports were answered, counted at scrape time from the
    hot paths' own counters (nothing per request)."""

    def __init__(self, hot_paths: HotPaths) -> None:
        self.hot_paths = hot_paths

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "divingbell_fleet_hot_answers",
            "A machine's own polls and reports by where they were answered: on the event loop "
            "(SQLite's 304s; PostgreSQL's 304s and reports on the loop's own connections) or "
            "by the store threads' lanes (everything the loop could not decide)",
            labels=["way"])
        family.add_metric(["loop"], self.hot_paths.answered_on_loop)
        family.add_metric(["lanes"], self.hot_paths.sent_to_lanes)
        yield family


class _StoreCollector(Collector):
    """Machines by state and up to date vs outdated, read from the store at scrape time, so
    every replica reports the same fleet."""

    def __init__(self, db_getter: Callable[[], Database | None]) -> None:
        self.db_getter = db_getter

    def collect(self) -> Any:
        db = self.db_getter()
        if db is None:
            return
        try:
            with db.read() as session:
                counts = listing.counts_by_state(session)
                fresh, outdated = listing.up_to_date_counts(session)
                active = revisions.active_revision(session)
                from divingbell.fleet.power import counts_by_power_state

                power_states = counts_by_power_state(session)
                unadmitted = admission.count_unadmitted(session)
        except OperationalError:
            return
        from divingbell.fleet.states import STATES

        by_state = GaugeMetricFamily("divingbell_fleet_machines", "Machines by state",
                                     labels=["state"])
        for state in STATES:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("divingbell_fleet_machines_up_to_date",
                                "Machines whose last report converged the current configuration",
                                value=fresh)
        yield GaugeMetricFamily("divingbell_fleet_machines_outdated",
                                "Machines (not decommissioned) not up to date", value=outdated)
        yield GaugeMetricFamily("divingbell_fleet_machines_unadmitted",
                                "Machines enrolled anonymously that no operator admitted yet "
                                "(new anonymous enrolments wait at serve --max-unadmitted)",
                                value=unadmitted)
        yield GaugeMetricFamily("divingbell_fleet_active_revision",
                                "The active document revision (0: none)", value=active or 0)
        by_power = GaugeMetricFamily("divingbell_fleet_power_state",
                                     "Machines with a BMC by their last confirmed power state",
                                     labels=["state"])
        for power_state in ("on", "off", "unknown"):
            by_power.add_metric([power_state], power_states.get(power_state, 0))
        yield by_power


class RequestLog:
    """One structured line per request (JSON), and the request metrics. Never logs headers,
    so tokens cannot leak; the caller is named by token id or machine id only."""

    def __init__(self, app: ASGIApp, metrics: FleetMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.record(scope, status, time.perf_counter() - started)


MAX_JSON_DEPTH = 64
"""As deep as a document may nest (document/loader.py): no request body needs more."""
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


MAX_BODY_BYTES = 8 * 1024 * 1024
"""No route takes more (documents: 4 MiB, designs: 1 MiB): a body past it is refused as it
arrives, before authentication, never held whole in memory."""


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when a body that looks like JSON nests arrays/objects deeper than `limit`
    (brackets inside strings do not count). Python's parser would otherwise recurse until a
    RecursionError."""
    # json.loads also reads UTF-8 with a BOM, UTF-16 and UTF-32: look at what it would read.
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        try:
            body = body.decode(encoding).encode()
        except UnicodeDecodeError:
            return False  # not text json.loads can read: its own error, not a recursion
    start = body.lstrip()[:1]
    if start not in (b"[", b"{") or body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Each bracket outside strings becomes a signed step (+1 opens, -1 closes); the running
    # sum is the depth. Done by translate, array and accumulate, not a Python loop per byte.
    steps = array("b", _JSON_STRING.sub(b'""', body).translate(_DEPTH_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0) > limit


class JsonDepthGuard:
    """Every POST/PUT/PATCH body that looks like JSON is checked for depth before any route
    parses it: 422 naming `body` instead of a parser's RecursionError (a 500). One guard for
    every route, including those that parse their body themselves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        declared, received = _declared_length(scope), 0
        while max(declared, received) <= MAX_BODY_BYTES:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if not message.get("more_body", False):
                break
        size = max(declared, received)
        if size > MAX_BODY_BYTES:
            response = JSONResponse({"detail": {
                "error": "too-large", "field": "body",
                "message": f"request bodies are limited to {MAX_BODY_BYTES} bytes"}},
                status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        if json_too_deep(b"".join(chunks)):
            response = JSONResponse({"detail": {
                "error": "too-deep", "field": "body",
                "message": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}}, status_code=422)
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else 0  # the server refuses a bad one
    return 0


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or ".".join(str(p) for p in loc)


def error_response(exc: Exception) -> JSONResponse | None:
    """The answer to an exception a route may raise: a 4xx naming the problem, or a 503 with
    Retry-After when the store is away; None for anything else (a bug: the framework's 500).
    One mapping for the framework's handlers and the hot paths (fleet/hotpath.py)."""
    if isinstance(exc, ApiError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)
    if isinstance(exc, IntegrityError):
        log.warning("conflict in the store: %s", type(exc.orig).__name__)
        return JSONResponse({"detail": {"error": "conflict", "message":
                                        "a concurrent change conflicted; retry"}},
                            status_code=409)
    if isinstance(exc, DataError):
        return JSONResponse({"detail": {"error": "invalid-value", "message":
                                        "a value the store cannot hold"}}, status_code=422)
    if isinstance(exc, StoreReplaced):
        return JSONResponse({"detail": {"error": "store-replaced", "message": str(exc)}},
                            status_code=503, headers={"Retry-After": "30"})
    if isinstance(exc, OperationalError):
        log.error("store error: %s", type(exc.orig).__name__)
        return JSONResponse({"detail": {"error": "store-unavailable",
                                        "message": "the store is unavailable; retry"}},
                            status_code=503, headers={"Retry-After": "5"})
    return None


class FleetApp(FastAPI):
    """The service's application: a machine's own polls and reports are answered before the
    framework (fleet/hotpath.py); everything else, and anything those hand back, goes through
    FastAPI with its middlewares."""

    hot_paths: HotPaths | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hot_paths is not None and scope["type"] == "http":
            await self.hot_paths(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(settings: FleetSettings) -> FleetApp:
    holder: dict[str, Database] = {}
    metrics = FleetMetrics(lambda: holder.get("db"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_url, background_checkpoints=True)
        if settings.migrate_at_start:
            migrations.upgrade(db.write_engine)
        from divingbell.power.secrets import open_key

        app.state.secret_box, key_note = open_key(settings.secrets_key_file, settings.db_url)
        log.info("%s", key_note)
        holder["db"] = db
        app.state.db = db
        log.info("fleet service %s on %s", __version__, redact(settings.db_url))
        rescue_loop = None
        if settings.reboot_rescue_interval_seconds > 0:
            from divingbell.fleet.rescue import RescueLoop

            rescue_loop = RescueLoop(db, settings, app.state.secret_box).start()
        try:
            yield
        finally:
            if rescue_loop is not None:
                rescue_loop.stop()
            if isinstance(app, FleetApp) and app.hot_paths is not None:
                await app.hot_paths.stop()
            db.dispose()

    app = FleetApp(
        title="divingbell fleet", version=__version__, lifespan=lifespan,
        # OpenTelemetry is not how the service is observed (metrics, request log, audit):
        # without this, FastAPI asks OpenTelemetry's global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        description="Machines discovered, given roles and their configuration, reporting back."
                    " Authenticate with `Authorization: Bearer <token>`.")
    app.state.settings = settings
    app.state.metrics = metrics

    app.include_router(machines.router)
    app.include_router(documents.router)
    app.include_router(slots.router)
    app.include_router(rollouts.router)
    app.include_router(bootstrap.router)
    app.include_router(ui.router)
    app.include_router(boot.router)
    app.include_router(power.router)
    app.mount("/ui/static", ui.static, name="ui-static")

    @app.get("/healthz", tags=["probes"], response_class=PlainTextResponse)
    async def healthz() -> str:
        """Alive (the process answers)."""
        return "ok\n"

    @app.get("/readyz", tags=["probes"])
    def readyz(request: Request) -> JSONResponse:
        """Ready: the store answers and its schema is at the migrations' head."""
        db: Database = request.app.state.db
        problem = db.store_problem()
        if problem is not None:
            return JSONResponse({"ready": False, "reason": problem}, status_code=503)
        try:
            with db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            current = migrations.current(db.engine)
        except Exception as exc:  # any failure to reach the store means "not ready"
            return JSONResponse({"ready": False, "reason": f"store unreachable: "
                                 f"{type(exc).__name__}"}, status_code=503)
        head = migrations.head()
        if current != head:
            return JSONResponse({"ready": False, "reason": f"schema at {current}, "
                                 f"migrations at {head}: run divingbell fleet migrate"},
                                status_code=503)
        return JSONResponse({"ready": True, "schema": current})

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input is not echoed: it may be a secret (install output, a document).
        problems = [{"loc": list(e.get("loc", ())), "field": _field(e.get("loc", ())),
                     "msg": str(e.get("msg", "")), "type": e.get("type")}
                    for e in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    async def known_error(_: Request, exc: Exception) -> Response:
        response = error_response(exc)
        if response is None:  # not registered for any other type
            raise exc
        return response

    for handled in (ApiError, IntegrityError, DataError, StoreReplaced, OperationalError):
        app.add_exception_handler(handled, known_error)

    app.add_middleware(JsonDepthGuard)
    app.add_middleware(RequestLog, metrics=metrics)
    app.hot_paths = HotPaths(app.framework, app, error_response=error_response,
                             too_deep=json_too_deep, record=metrics.record,
                             sqlite=is_sqlite(settings.db_url),
                             loop_connections=settings.loop_connections)
    metrics.registry.register(_HotPathCollector(app.hot_paths))
    return app


SETTINGS_ENV = "DIVINGBELL_FLEET_SETTINGS"


def tune_gc() -> None:
    """For a service process (not for a library user): objects alive at start (modules, the
    app, the OpenAPI schema) never become garbage, so keep them out of every collection, and
    collect young objects less often; full collections over a large heap otherwise show up
    as latency spikes."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def app_from_env() -> FleetApp:
    """The app for `divingbell serve --workers N`: uvicorn imports this in each worker process
    (settings as JSON in the environment; the store is already migrated by then)."""
    import os
    from dataclasses import fields

    raw = json.loads(os.environ[SETTINGS_ENV])
    known = {f.name for f in fields(FleetSettings)}
    app = create_app(FleetSettings(**{k: v for k, v in raw.items() if k in known}))
    tune_gc()
    return app
