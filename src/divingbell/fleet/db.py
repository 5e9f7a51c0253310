"""The SQL store's edge: engine and sessions for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with a busy timeout so readers never wait for the writer and
concurrent writers queue instead of failing. PostgreSQL URLs (`postgresql://...`) use psycopg 3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import Executable

SQLITE_BUSY_TIMEOUT_MS = 30_000
log = logging.getLogger("divingbell.fleet")
_this_thread = threading.local()


def keep_connections_in_this_thread() -> None:
    """For a long-lived thread that runs one hot statement after another (the hot paths'
    store threads): on SQLite, `read_conn` and `write_conn` in this thread reuse connections
    of its own instead of taking one from the pool and giving it back each time (that
    checkout and check-in cost about as much as a poll's statement). Closed by `dispose`."""
    _this_thread.keeps = True


class StoreReplaced(Exception):
    """The SQLite file this service opened was removed or replaced while it ran: its open
    connections still write to the old file, which nothing will read again."""


def normalise_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3; a bare path means SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if "://" not in url:
        return "sqlite:///" + str(Path(url).resolve())
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalise_url(url)).get_backend_name() == "sqlite"


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return make_url(normalise_url(url)).render_as_string(hide_password=True)


class Database:
    """Engines and sessions for one store.

    `read()` and `write()` give a session inside a transaction, committed on success. On SQLite
    a write transaction takes the write lock at BEGIN (BEGIN IMMEDIATE), so read-check-write
    sequences of two writers cannot interleave; reads stay concurrent under WAL. On PostgreSQL
    both use one pool; atomicity comes from conditional UPDATEs and row locks.
    """

    def __init__(self, url: str, *, background_checkpoints: bool = False) -> None:
        """`background_checkpoints` (the service's store): on SQLite, commits never copy the
        write-ahead log back into the database file (a checkpoint, with its fsync); a thread
        of this store does, every `CHECKPOINT_SECONDS`. A checkpoint in a commit holds the one
        write lock through an fsync: under disk load that took 100 ms to over a second, and
        every report waited behind it (bench/fleet_load.py's p99)."""
        self.url = normalise_url(url)
        self.sqlite = make_url(self.url).get_backend_name() == "sqlite"
        background_checkpoints = background_checkpoints and self.sqlite
        self.engine = _make_engine(self.url, immediate=False,
                                   autocheckpoint=not background_checkpoints)
        self.write_engine = (_make_engine(self.url, immediate=True,
                                          autocheckpoint=not background_checkpoints)
                             if self.sqlite else self.engine)
        # On SQLite an engine of their own for the autocommit reads: switching a pooled
        # connection to autocommit and back costs a PRAGMA each way, which was two thirds of
        # a configuration poll's CPU in the store (121 against 37 us a poll, measured alone).
        self._autocommit = (_make_engine(self.url, immediate=False, autocommit=True,
                                         autocheckpoint=not background_checkpoints)
                            if self.sqlite
                            else self.engine.execution_options(isolation_level="AUTOCOMMIT"))
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        # SQLite has one writer at a time anyway; queueing this process's writers on a lock
        # instead of in SQLite's busy handler (which sleeps in growing steps) keeps latency
        # flat. Other processes on the same file still wait in the busy handler: correctness
        # never depends on this lock.
        self._writer: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.sqlite else contextlib.nullcontext())
        database = make_url(self.url).database if self.sqlite else None
        self._file = Path(database) if database and database != ":memory:" else None
        self._identity = _identity(self._file) if self._file is not None else None
        self._reported = False
        self._kept_lock = threading.Lock()
        self._kept_connections: list[Connection] = []
        self._nonblocking: Connection | None = None
        self._nonblocking_busy = False
        self._checkpointer: Checkpointer | None = None
        if background_checkpoints and self._file is not None:
            self._checkpointer = Checkpointer(self._file, CHECKPOINT_SECONDS)

    def store_problem(self) -> str | None:
        """Why this SQLite store can no longer be trusted (its file removed or replaced since
        it was opened), logged once; None while it is the file it was (and for PostgreSQL)."""
        if self._file is None:
            return None
        try:
            found = _identity(self._file)
        except FileNotFoundError:
            problem = f"the store file {self._file} was removed while the service ran"
        else:
            if found == self._identity:
                return None
            problem = f"the store file {self._file} was replaced while the service ran"
        problem += ": writes are refused; restart the service (and restore the file if lost)"
        if not self._reported:
            self._reported = True
            log.error("%s", problem)
        return problem

    def _check_store(self) -> None:
        problem = self.store_problem()
        if problem is not None:
            raise StoreReplaced(problem)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._writer, self._write() as session, session.begin():
            self._check_store()
            yield session

    @contextmanager
    def read_conn(self) -> Iterator[Connection]:
        """A Core connection for the hot read paths (no ORM unit of work), in autocommit:
        each of these reads is one statement (or reads immutable rows), and BEGIN/COMMIT would
        double the round trips (PostgreSQL) or the driver calls (SQLite)."""
        kept = self._kept("read")
        if kept is None:
            with self._autocommit.connect() as connection:
                yield connection
            return
        with self._dropped_on_error(kept):
            yield kept

    @contextmanager
    def nonblocking_read(self) -> Iterator[Connection | None]:
        """On SQLite, an autocommit connection of the store's own that never waits: no busy
        timeout, so a read that would wait for a lock fails at once (and the caller goes
        the usual way instead). For reads on the event loop's thread, which must not block;
        one at a time (the loop is one thread). None on PostgreSQL (a round trip each) or
        while that connection is in use."""
        if not self.sqlite or self._nonblocking_busy:
            yield None
            return
        self._nonblocking_busy = True
        try:
            if self._nonblocking is None or self._nonblocking.closed:
                self._nonblocking = self._keep(self._autocommit)
                dbapi = self._nonblocking.connection.dbapi_connection
                assert dbapi is not None
                dbapi.execute("PRAGMA busy_timeout=0")
            with self._dropped_on_error(self._nonblocking):
                yield self._nonblocking
        finally:
            self._nonblocking_busy = False

    @contextmanager
    def write_conn(self) -> Iterator[Connection]:
        kept = self._kept("write")
        if kept is None:
            with self._writer, self.write_engine.begin() as connection:
                self._check_store()
                yield connection
            return
        with self._writer, self._dropped_on_error(kept), kept.begin():
            self._check_store()
            yield kept

    def _kept(self, kind: str) -> Connection | None:
        """This thread's own connection of `kind` when it keeps them. SQLite only: on
        PostgreSQL every connection stays in the pool, whose size bounds what each replica
        takes of the server's max_connections (kept, a poll's CPU went 178 -> 119 us, but
        each store thread would hold two connections outside that bound)."""
        if not self.sqlite or not getattr(_this_thread, "keeps", False):
            return None
        key = (id(self), kind)
        connections: dict[tuple[int, str], Connection] = _this_thread.__dict__.setdefault(
            "connections", {})
        connection = connections.get(key)
        if connection is None or connection.closed:  # closed: by dispose, or a driver error
            engine = self._autocommit if kind == "read" else self.write_engine
            connection = connections[key] = self._keep(engine)
        return connection

    def _keep(self, engine: Engine) -> Connection:
        """A connection out of `engine`'s pool for good, closed by `dispose`."""
        connection = engine.connect()
        with self._kept_lock:
            self._kept_connections.append(connection)
        return connection

    @contextmanager
    def _dropped_on_error(self, connection: Connection) -> Iterator[None]:
        """A kept connection that met a driver error is closed (its holder opens another),
        not reused."""
        try:
            yield
        except DBAPIError:
            with self._kept_lock:
                if connection in self._kept_connections:
                    self._kept_connections.remove(connection)
            connection.close()
            raise

    def pipeline(self, connection: Connection) -> contextlib.AbstractContextManager[Any]:
        """On PostgreSQL, psycopg's pipeline mode on `connection`: statements are sent without
        waiting for each answer (a write's answer comes back with the next read's), so a batch
        of reports costs a round trip per report instead of one per statement. On SQLite
        (no round trips) nothing."""
        if self.sqlite:
            return contextlib.nullcontext()
        dbapi = connection.connection.dbapi_connection
        assert dbapi is not None
        pipeline: contextlib.AbstractContextManager[Any] = dbapi.pipeline()
        return pipeline

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._kept_lock:
            kept, self._kept_connections = self._kept_connections, []
        for connection in kept:
            connection.close()
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()
        if self.sqlite:
            self._autocommit.dispose()


CHECKPOINT_SECONDS = 1.0


class Checkpointer:
    """Copies an SQLite store's write-ahead log back into its file, in a thread of its own,
    every `CHECKPOINT_SECONDS` (PASSIVE: it never blocks a reader or the writer; writers go on
    appending to the log meanwhile, and the log starts over once all of it is copied). On its
    own connection, outside the pools."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.checkpoints = 0
        """Checkpoints run so far (for tests and curiosity)."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import sqlite3

        connection: sqlite3.Connection | None = None
        while not self._stopping.wait(self.interval):
            try:
                if connection is None:
                    connection = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                 isolation_level=None, check_same_thread=False)
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            except sqlite3.Error as exc:
                log.warning("SQLite checkpoint of %s failed (retried): %s", self.path, exc)
        if connection is not None:
            connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)


def _identity(path: Path) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _make_engine(url: str, *, immediate: bool, autocheckpoint: bool = True,
                 autocommit: bool = False) -> Engine:
    """`autocommit` (SQLite): every connection in autocommit for good, never reset."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            path = Path(database)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                # The store holds token and credential hashes: never world-readable.
                path.touch(mode=0o600)
        options: dict[str, Any] = (
            {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None} if autocommit
            else {})
        engine = create_engine(
            url, connect_args={"check_same_thread": False,
                               "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=8 if immediate else 20, max_overflow=20, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        if not autocheckpoint:
            event.listen(engine, "connect", _no_autocheckpoint)
        if autocommit:
            return engine
        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        # pysqlite's own transaction handling is turned off (isolation_level None in
        # _sqlite_pragmas) so that this BEGIN is the one that runs.

        def start(connection: Connection) -> None:
            # Straight to the driver: through exec_driver_sql this costs as much as the query.
            # Autocommit connections (read_conn) run each statement on its own.
            if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                dbapi = connection.connection.dbapi_connection
                assert dbapi is not None
                dbapi.execute(begin)

        event.listen(engine, "begin", start)
        return engine
    # No pre-ping: it is one more round trip on every request. A connection that died with
    # the server fails its request with a 503 and Retry-After (app.error_response), and that
    # disconnect discards the whole pool, so the next requests reconnect.
    return create_engine(url, pool_size=20, max_overflow=20, pool_recycle=3600)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def file_mode_ok(url: str) -> bool:
    """True when an SQLite store file is readable by its owner only (or not a file)."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return True
    try:
        return os.stat(parsed.database).st_mode & 0o077 == 0
    except OSError:
        return True


def compile_for(statement: Executable, dialect: Dialect) -> Compiled:
    """`statement`'s SQL for `dialect`, with the conversions SQLAlchemy itself would apply to
    its parameters and results."""
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    binds = {}
    constants = {}
    for name, bind in compiled.binds.items():
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if convert is not None:
            binds[name] = convert
        if not bind.required:
            constants[name] = bind.effective_value
    results = [column.type.dialect_impl(dialect).result_processor(dialect, None)
               for column in compiled._result_columns]
    return Compiled(compiled.string, constants,
                     tuple(compiled.positiontup) if dialect.positional else None, binds, results)


@dataclass(frozen=True)
class Compiled:
    """A statement compiled for one dialect (`compile_for`)."""

    sql: str
    constants: dict[str, Any]
    order: Sequence[str] | None
    """Parameter names in the order of a positional driver (SQLite's `?`); None: by name."""
    binds: dict[str, Callable[[Any], Any]]
    results: list[Callable[[Any], Any] | None]

    def values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters with the statement's constants, converted for the driver."""
        values = {**self.constants, **params}
        for name, convert in self.binds.items():
            values[name] = convert(values[name])
        return values

    def row(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """A result row converted as SQLAlchemy would."""
        return tuple(value if convert is None or value is None else convert(value)
                     for value, convert in zip(row, self.results, strict=True))


class Prepared:
    """A Core statement compiled once per store and run straight on the driver's cursor, with
    the SQL, bind conversions and result conversions SQLAlchemy itself would use. For the hot
    paths only: a poll is one statement, a report four, and SQLAlchemy's per-execution work
    (cache lookup, parameter processing, events, result set-up) cost more than each statement
    (bench/fleet_profile.py). The drivers prepare them: sqlite3 keeps the statements of each
    connection, psycopg prepares a statement run often on one connection. Errors go through
    SQLAlchemy's own handling, so a lost PostgreSQL connection still invalidates the pool and
    surfaces as its OperationalError (the 503 with Retry-After)."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._by_dialect: weakref.WeakKeyDictionary[Dialect, Compiled] = (
            weakref.WeakKeyDictionary())

    def _compiled(self, dialect: Dialect) -> Compiled:
        found = self._by_dialect.get(dialect)
        if found is None:
            found = self._by_dialect[dialect] = compile_for(self.statement, dialect)
        return found

    def _run(self, connection: Connection, params: Mapping[str, Any]) -> tuple[Any, Any]:
        compiled = self._compiled(connection.dialect)
        values = compiled.values(params)
        arguments: Any = (values if compiled.order is None
                          else tuple(values[name] for name in compiled.order))
        cursor = connection.connection.cursor()
        try:
            cursor.execute(compiled.sql, arguments)
        except Exception as exc:
            cursor.close()
            if isinstance(exc, connection.dialect.loaded_dbapi.Error):
                connection._handle_dbapi_exception(exc, compiled.sql, arguments, None, None)
            raise
        return cursor, compiled

    def execute(self, connection: Connection, params: Mapping[str, Any]) -> int:
        """Run a statement that returns no rows; the number of rows it changed."""
        cursor, _ = self._run(connection, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def first(self, connection: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run a query; its first row, converted as SQLAlchemy would, or None."""
        return self.send(connection, params).first()

    def send(self, connection: Connection, params: Mapping[str, Any]) -> Sent:
        """Send a query and read its answer later (`Sent.first`): in PostgreSQL's pipeline
        mode (`Database.pipeline`) several queries sent before any answer is read travel
        together, one round trip for all."""
        cursor, compiled = self._run(connection, params)
        return Sent(cursor, compiled)


@dataclass
class Sent:
    """A query sent by `Prepared.send`, its answer not read yet."""

    cursor: Any
    compiled: Compiled

    def first(self) -> tuple[Any, ...] | None:
        """The first row, converted as SQLAlchemy would, or None."""
        try:
            row = self.cursor.fetchone()
        finally:
            self.cursor.close()
        return None if row is None else self.compiled.row(row)
