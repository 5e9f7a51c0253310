"""The service's HTTP front: uvicorn's httptools protocol, answering a machine's own poll and
report from the parser's callbacks.

After the hot paths left the framework (fleet/hotpath.py), uvicorn's ASGI machinery around
them was the largest layer py-spy saw: a task, an event, a scope and a request cycle per
request, the body through `receive`, the answer as two ASGI messages and so two socket writes
(measured end to end, the front saves a few percent of the CPU: docs/performance.md).
`FleetHttpProtocol` is uvicorn's own protocol class (its parser, keep-alive, pipelining, flow
control, TLS, graceful shutdown all unchanged) with one difference: when a request is a
machine's own well-formed poll or report, it is handed to the same lanes as the ASGI hot path
(`HotPaths.polls` / `.reports`, the same store functions; a 304 on SQLite answered at once,
`HotPaths.poll_at_once`) when its last byte arrives, and the answer is written in one
`transport.write` from the lane's future callback. Everything else, and anything that turns
out not to be ours once its body is read (not JSON, invalid, too large), becomes an ordinary
uvicorn request cycle at that moment, body included, so the framework answers it as before.
The answers are the ASGI hot path's bytes (tests/fleet/test_front.py compares them), logged
and counted by the same `record`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from divingbell.fleet.api.machines import config_response
from divingbell.fleet.api.schemas import ReportBody
from divingbell.fleet.hotpath import (
    CONFIG_ROUTE,
    MAX_REPORT_BYTES,
    REPORTS_ROUTE,
    HotPaths,
    RouteName,
    hot_route,
    is_json,
    machine_credentials,
    not_modified_headers,
    report_content,
)

log = logging.getLogger("divingbell.fleet")

HTTP_PROTOCOL = "divingbell.fleet.front:FleetHttpProtocol"
"""What `divingbell serve` gives uvicorn as its `http` protocol (an import path, so each
worker process of `--workers N` imports it)."""

_SERVER_ERROR = (b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
                 b"connection: close\r\n\r\nInternal Server Error")


class _NoEvent:
    """What uvicorn's protocol sets on its current cycle when the connection is lost: a hot
    request waits on a future, not on an event."""

    def set(self) -> None:
        pass


class HotRequest:
    """A machine's own poll or report on its way: collected by the parser callbacks, then
    waiting for its lane. It stands as the connection's current cycle (the attributes
    uvicorn's protocol reads of one), so pipelined requests behind it wait their turn."""

    message_event = _NoEvent()

    def __init__(self, route: RouteName, job: tuple[Any, ...], keep_alive: bool,
                 record_scope: dict[str, Any], previous: Any) -> None:
        self.route = route
        self.job = job
        self.keep_alive = keep_alive
        self.record_scope = record_scope
        self.previous = previous
        self.body: list[bytes] = []
        self.size = 0
        self.started = 0.0
        self.response_complete = False
        self.disconnected = False


class FleetHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a machine's own polls and reports answered directly."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.hot_paths, self.proxy = _find_hot_paths(self.app)
        self.hot: HotRequest | None = None
        """The request being parsed, when it is one of ours."""
        self.peer_trusted: bool | None = None
        """Whether the peer is a proxy whose X-Forwarded-For uvicorn trusts."""

    # Parser callbacks (uvicorn's, for every request that is not ours)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.hot = None

    def on_headers_complete(self) -> None:
        hot = self._hot_request() if self.hot_paths is not None else None
        if hot is None:
            super().on_headers_complete()
            return
        self.hot = hot
        self.cycle = hot  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        hot = self.hot
        if hot is None:
            super().on_body(body)
            return
        hot.body.append(body)
        hot.size += len(body)
        if hot.size > MAX_REPORT_BYTES:
            self._to_framework(hot, complete=False)

    def on_message_complete(self) -> None:
        hot = self.hot
        if hot is None:
            super().on_message_complete()
            return
        assert self.hot_paths is not None
        if hot.route is REPORTS_ROUTE:
            report = self._valid_report(hot)
            if report is None:
                self._to_framework(hot, complete=True)
                return
            hot.job = (*hot.job, report)
        self.hot = None
        hot.previous = None  # else each request holds the one before: a chain per connection
        hot.started = time.perf_counter()
        answer = (self.hot_paths.report(hot.job) if hot.route is REPORTS_ROUTE
                  else self.hot_paths.poll(hot.job))
        if answer.done():  # answered on the loop already
            self._answer(hot, answer)
        else:
            answer.add_done_callback(partial(self._answer, hot))

    # Ours
    def _hot_request(self) -> HotRequest | None:
        """This request as one of ours, or None: the framework's (another caller, another
        route, anything unusual about the request or the connection)."""
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.expect_100_continue or self.limit_concurrency is not None \
                or self.root_path or self.parser.should_upgrade():
            return None
        method = self.parser.get_method()
        if method not in (b"GET", b"POST"):
            return None
        try:
            path = self.url.decode("ascii")
        except UnicodeDecodeError:
            return None
        found = hot_route(path)
        if found is None:
            return None
        machine_id, what = found
        if (what == "config") != (method == b"GET"):
            return None
        credentials, if_none_match = machine_credentials(self.headers, machine_id)
        if credentials is None:
            return None
        route = CONFIG_ROUTE if what == "config" else REPORTS_ROUTE
        job: tuple[Any, ...] = ((credentials, machine_id, if_none_match) if route is CONFIG_ROUTE
                                else (credentials, machine_id))
        version = self.parser.get_http_version()
        record_scope = {"method": method.decode("ascii"), "path": path, "route": route,
                        "client": self._client(), "state": {}}
        return HotRequest(route, job, version != "1.0" and self.parser.should_keep_alive(),
                          record_scope, self.cycle)

    def _client(self) -> tuple[str, int] | None:
        """The client as uvicorn's proxy headers middleware would see it (for the log)."""
        client = self.client
        if self.proxy is None or client is None:
            return client
        if self.peer_trusted is None:  # the same for every request of the connection
            self.peer_trusted = client[0] in self.proxy.trusted_hosts
        if not self.peer_trusted:
            return client
        forwarded = [value for name, value in self.headers if name == b"x-forwarded-for"]
        if not forwarded:
            return client
        host, port = self.proxy.trusted_hosts.get_trusted_client_address(
            b", ".join(forwarded).decode("latin1"))
        return (host, port) if host else client

    def _valid_report(self, hot: HotRequest) -> ReportBody | None:
        assert self.hot_paths is not None
        body = b"".join(hot.body)
        if not is_json(self.headers) or self.hot_paths.too_deep(body):
            return None
        try:
            return ReportBody.model_validate_json(body)
        except ValidationError:
            return None

    def _to_framework(self, hot: HotRequest, *, complete: bool) -> None:
        """Hand this request to uvicorn's ordinary cycle and the framework, with the body read
        so far (the parser still holds this request's method, version and keep-alive)."""
        self.hot = None
        self.cycle = hot.previous
        super().on_headers_complete()
        if not hot.keep_alive:  # the server began stopping meanwhile (uvicorn's `shutdown`)
            self.cycle.keep_alive = False
        self.cycle.body += b"".join(hot.body)
        if complete:
            self.cycle.more_body = False
        self.cycle.message_event.set()

    def _answer(self, hot: HotRequest, future: asyncio.Future[Any]) -> None:
        assert self.hot_paths is not None
        status = 500
        try:
            status, head, body = self._rendered(hot, future)
        except Exception as exc:  # not one the app maps: what uvicorn does with an app's error
            log.error("Exception answering %s %s", hot.record_scope["method"],
                      hot.route.path, exc_info=exc)
            head, body, hot.keep_alive = [], b"", False
        finally:
            self.hot_paths.record(hot.record_scope, status,
                                  time.perf_counter() - hot.started)
        hot.response_complete = True
        if self.transport.is_closing():
            return
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        if status == 500 and not head:
            content.append(_SERVER_ERROR)
        else:
            for name, value in head:
                content += [name, b": ", value, b"\r\n"]
            if not hot.keep_alive:
                content.append(b"connection: close\r\n")
            content += [b"\r\n", body]
        self.transport.write(b"".join(content))
        if not hot.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _rendered(self, hot: HotRequest, future: asyncio.Future[Any]
                  ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body of the answer (a 500 raises)."""
        assert self.hot_paths is not None
        if future.cancelled():
            raise RuntimeError("the lane was cancelled (the service is stopping)")
        exc = future.exception()
        if exc is not None:
            mapped = self.hot_paths.error_response(exc)  # type: ignore[arg-type]
            if mapped is None:
                raise exc
            return _response_parts(mapped)
        principal, answer = future.result()
        hot.record_scope["state"]["principal"] = principal
        if hot.route is REPORTS_ROUTE:
            content = report_content(answer)
            return 201, [(b"content-length", str(len(content)).encode()),
                         (b"content-type", b"application/json")], content
        if answer.text is not None:  # a new configuration: rare, the route's response
            return _response_parts(config_response(answer))
        return 304, not_modified_headers(answer), b""


def _response_parts(response: Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return response.status_code, response.raw_headers, bytes(response.body)


def _find_hot_paths(app: Any) -> tuple[HotPaths | None, ProxyHeadersMiddleware | None]:
    """The fleet app's hot paths under uvicorn's wrappers (None for any other app), and the
    proxy headers middleware when uvicorn added one."""
    proxy = None
    for _ in range(8):
        if isinstance(app, ProxyHeadersMiddleware):
            proxy = app
        hot_paths = getattr(app, "hot_paths", None)
        if isinstance(hot_paths, HotPaths):
            return hot_paths, proxy
        app = getattr(app, "app", None)
        if app is None:
            break
    return None, proxy

