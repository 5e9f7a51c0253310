"""PostgreSQL from the event loop: the hot paths' statements on libpq connections the loop
drives itself, without a thread.

On PostgreSQL a machine's poll or report is a round trip or two to the server. In a store
thread (`hotpath.Lane`) each cost the hand-off to the thread and back, a checkout from
SQLAlchemy's pool and psycopg's cursor machinery: several times the CPU of the round trip
itself (a prepared one-row query: 25 us of CPU on libpq straight from the loop; 90-125 us
through psycopg's asynchronous cursors; a poll in a store thread 164 us of store CPU plus the
hand-off). A round trip needs no thread: libpq sends the statement without blocking, the loop
watches the socket and reads the answer when it arrives.

`LoopStore` keeps a few connections of its own per process (`divingbell serve
--loop-connections`, in autocommit), one statement in flight on each. It runs Core statements
compiled once with libpq's `$n` parameters (`LoopStatement`), prepared once per connection,
their parameters sent as text by psycopg's own dumpers and their rows read by psycopg's own
loaders, then converted as SQLAlchemy would (`db.compile_for`, shared with `db.Prepared`).

It is a shortcut, never the only way. When it cannot answer, `Unavailable` is raised and the
caller takes the store threads' way, which answers as it always did (a 503 when the store is
really away): no connection open yet (one is being opened meanwhile), `MAX_WAITING` requests
already waiting for one, a statement that failed, a connection lost. After a connection fails
to open it rests for `REST_SECONDS`, and the lanes serve meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.sql.expression import Executable

from divingbell.fleet.db import Compiled, compile_for

log = logging.getLogger("divingbell.fleet")

REST_SECONDS = 5.0
"""After a connection could not be opened, the loop's way is not tried for this long."""
CONNECT_TIMEOUT_SECONDS = 10
APPLICATION_NAME = "divingbell-loop"
"""How these connections show in pg_stat_activity (unless the store URL names another)."""
MAX_WAITING = 256
"""Requests waiting for a connection at most; more go the store threads' way at once."""
_DIALECT = psycopg_dialect.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
"""SQLAlchemy's psycopg dialect with libpq's own parameters ($1): it also casts each one to
its column's type, so the server needs no parameter types."""
_names = itertools.count(1)


class Unavailable(Exception):
    """The loop's way cannot answer this request: take the store threads' way."""


WARN_EVERY_SECONDS = 60.0
_warned: dict[str, float] = {}


def problem(what: str) -> Unavailable:
    """`Unavailable` for something that should not happen (a lost connection, a failed
    statement), logged as a warning at most once a minute for each kind: at thousands of
    requests a second, once per request would drown the log."""
    now = time.monotonic()
    if now - _warned.get(what, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
        _warned[what] = now
        log.warning("the event loop's store: %s; the store threads answer instead", what)
    return Unavailable(what)


class LoopStatement:
    """A Core statement compiled once for the loop's connections."""

    def __init__(self, statement: Executable) -> None:
        self.compiled: Compiled = compile_for(statement, _DIALECT)
        assert self.compiled.order is not None  # numeric_dollar is positional
        self.order: Sequence[str] = self.compiled.order
        self.sql = self.compiled.sql.encode()
        self.name = f"divingbell_loop_{next(_names)}".encode()

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        values = self.compiled.values(params)
        return [values[name] for name in self.order]


class _Connection:
    """One libpq connection the loop drives: one statement in flight at a time."""

    def __init__(self, connection: psycopg.AsyncConnection[Any],
                 loop: asyncio.AbstractEventLoop,
                 on_close: Callable[[_Connection], None] = lambda _: None) -> None:
        """`on_close` is told when it closes (the server went away, or a failure)."""
        self.connection = connection
        self.on_close = on_close
        self.pgconn = connection.pgconn
        self.loop = loop
        self.socket = self.pgconn.socket
        self.prepared: set[bytes] = set()
        self.transformer = Transformer(connection)
        self.waiting: asyncio.Future[pq.abc.PGresult] | None = None
        self.results: list[pq.abc.PGresult] = []
        self.broken = False
        self.pgconn.nonblocking = 1
        loop.add_reader(self.socket, self._readable)

    async def rows(self, statement: LoopStatement, params: Mapping[str, Any]
                   ) -> list[tuple[Any, ...]]:
        if statement.name not in self.prepared:
            self._check(await self._round_trip(
                lambda: self.pgconn.send_prepare(statement.name, statement.sql)))
            self.prepared.add(statement.name)
        arguments = statement.arguments(params)
        try:
            dumped = self.transformer.dump_sequence(arguments, [PyFormat.TEXT] * len(arguments))
        except psycopg.Error as exc:  # a value psycopg cannot send: the store threads' way
            raise problem(f"a value could not be sent ({type(exc).__name__})") from None
        result = self._check(await self._round_trip(
            lambda: self.pgconn.send_query_prepared(statement.name, dumped)))
        try:
            self.transformer.set_pgresult(result)
            rows = self.transformer.load_rows(0, result.ntuples, tuple)
        except psycopg.Error as exc:  # a value psycopg cannot read
            raise problem(f"an answer could not be read ({type(exc).__name__})") from None
        return [statement.compiled.row(row) for row in rows]

    def _round_trip(self, send: Any) -> asyncio.Future[pq.abc.PGresult]:
        future: asyncio.Future[pq.abc.PGresult] = self.loop.create_future()
        try:
            send()
            if self.pgconn.flush():  # not all of it went: the rest when the socket can take it
                self.loop.add_writer(self.socket, self._writable)
        except psycopg.Error as exc:
            self.close()
            raise problem(f"sending failed ({type(exc).__name__})") from None
        self.waiting = future
        return future

    def _check(self, result: pq.abc.PGresult) -> pq.abc.PGresult:
        if result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            # The SQLSTATE only: a message may quote the values in the statement.
            state = result.error_field(pq.DiagnosticField.SQLSTATE) or b"?"
            raise problem(f"a statement failed (SQLSTATE {state.decode()})")
        return result

    def _writable(self) -> None:
        try:
            if not self.pgconn.flush():
                self.loop.remove_writer(self.socket)
        except psycopg.Error as exc:
            self._fail(exc)

    def _readable(self) -> None:
        try:
            self.pgconn.consume_input()
            while not self.pgconn.is_busy():
                result = self.pgconn.get_result()
                if result is None:  # the answer is complete (or nothing was asked)
                    results, self.results = self.results, []
                    waiting, self.waiting = self.waiting, None
                    if waiting is not None and not waiting.done():
                        if results:
                            waiting.set_result(results[-1])
                        else:
                            waiting.set_exception(Unavailable("no answer"))
                    return
                self.results.append(result)
        except psycopg.Error as exc:  # the connection is lost (the server went away)
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        waiting, self.waiting = self.waiting, None
        self.close()
        lost = problem(f"a connection was lost ({type(exc).__name__})")
        if waiting is not None and not waiting.done():
            waiting.set_exception(lost)

    def close(self) -> None:
        """Stop watching the socket and close the connection (at once, without waiting)."""
        if self.broken:
            return
        self.broken = True
        self.loop.remove_reader(self.socket)
        self.loop.remove_writer(self.socket)
        self.pgconn.finish()
        self.on_close(self)


class LoopStore:
    """Up to `size` connections to the store's PostgreSQL, driven by the event loop it is first
    used on (`loop`). `first` runs a statement on a free connection and answers its first row;
    when every connection is busy it waits for one, first come first served (a statement
    takes a fraction of a millisecond), opening another meanwhile if it may. It raises
    `Unavailable` at once when no connection is open yet, or `MAX_WAITING` already wait."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.engine = engine
        self.url = str(engine.url)
        """The store's URL (password hidden), as `views` names the store."""
        self.size = size
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle: list[_Connection] = []
        self.busy = 0
        self.waiting: collections.deque[asyncio.Future[_Connection]] = collections.deque()
        self.opening: asyncio.Task[None] | None = None
        self.resting_until = 0.0
        self.closed = False

    async def first(self, statement: LoopStatement, params: Mapping[str, Any]
                    ) -> tuple[Any, ...] | None:
        connection = await self._take()
        try:
            rows = await connection.rows(statement, params)
        except Unavailable:
            raise
        except BaseException:  # cancelled, or a bug: its statement may still be in flight
            connection.close()
            raise
        finally:
            self._give_back(connection)
        return rows[0] if rows else None

    def usable(self) -> bool:
        """Whether the running loop may try it now (it is this store's loop, not resting, not
        closed)."""
        if self.closed or (self.resting_until and time.monotonic() < self.resting_until):
            return False
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        return self.loop is loop

    async def _take(self) -> _Connection:
        """A connection (for the loop `usable` said yes to)."""
        if self.closed:
            raise Unavailable("closed")
        while self.idle:
            connection = self.idle.pop()
            if not connection.broken:  # closed by the server while idle
                self.busy += 1
                return connection
        if self.opening is None and self.busy + len(self.idle) < self.size:
            self.opening = asyncio.ensure_future(self._open())
        if not self.busy or len(self.waiting) >= MAX_WAITING:
            raise Unavailable("no connection open yet" if not self.busy else "too many waiting")
        assert self.loop is not None
        waiter: asyncio.Future[_Connection] = self.loop.create_future()
        self.waiting.append(waiter)
        return await waiter  # handed over busy (`_hand_over`)

    def _give_back(self, connection: _Connection) -> None:
        self.busy -= 1
        if connection.broken:
            if not self.busy and not self.idle:  # nothing left to wait for
                self._fail_waiting("connection lost")
            return
        if self.closed:
            connection.close()
            return
        self._hand_over(connection)

    def _hand_over(self, connection: _Connection) -> None:
        """A free connection to the first one waiting, else to the idle ones."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(connection)
                return
        self.idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        """A connection closed while idle (the server ended it) is no longer offered."""
        if connection in self.idle:
            self.idle.remove(connection)

    def _fail_waiting(self, why: str) -> None:
        waiting, self.waiting = self.waiting, collections.deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(Unavailable(why))

    async def _open(self) -> None:
        """One more connection, in the background (the requests meanwhile take the lanes)."""
        try:
            arguments, options = self.engine.dialect.create_connect_args(self.engine.url)
            options.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
            options.setdefault("application_name", APPLICATION_NAME)
            connection = await psycopg.AsyncConnection.connect(*arguments, **options,
                                                               autocommit=True)
        except (psycopg.Error, OSError) as exc:
            self.resting_until = time.monotonic() + REST_SECONDS
            log.warning("the event loop's store connection could not be opened (%s); the store "
                        "threads answer for %.0f s", type(exc).__name__, REST_SECONDS)
            self._fail_waiting("no connection")
            return
        finally:
            self.opening = None
        assert self.loop is not None
        if self.closed:
            await connection.close()
            return
        self._hand_over(_Connection(connection, self.loop, self._forget))

    async def close(self) -> None:
        """Close the idle connections (after the last request; busy ones close when given
        back)."""
        self.closed = True
        self._fail_waiting("closed")
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()
