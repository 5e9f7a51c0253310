"""Real servers for the fleet tests: the service on loopback (in a thread, or as a separate
`divingbell serve` process) and a throwaway PostgreSQL cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from divingbell.fleet.app import create_app
from divingbell.fleet.client import FleetClient
from divingbell.fleet.db import Database
from divingbell.fleet.front import HTTP_PROTOCOL
from divingbell.fleet.settings import FleetSettings
from divingbell.fleet.tokens import create_token

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


@dataclass
class PostgresCluster:
    """initdb + pg_ctl as the `postgres` user in a temporary directory, on a loopback port."""

    base: Path
    port: int
    _counter: int = 0

    @classmethod
    def available(cls) -> str | None:
        if os.geteuid() != 0:
            return "needs root to run PostgreSQL as the postgres user"
        if not (PG_BIN / "initdb").exists():
            return f"PostgreSQL is not installed ({PG_BIN}/initdb missing; .ci/run installs it)"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "no postgres user (install the postgresql package)"
        return None

    @classmethod
    def start(cls) -> PostgresCluster:
        base = Path(tempfile.mkdtemp(prefix="divingbell-pg-"))
        shutil.chown(base, "postgres", "postgres")
        port = free_port()
        cluster = cls(base, port)
        cluster._as_postgres([str(PG_BIN / "initdb"), "-D", str(base / "data"), "-A", "trust",
                              "-U", "postgres", "--no-sync", "-E", "UTF8"])
        cluster._as_postgres([
            str(PG_BIN / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"), "-w",
            "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            "start"])
        return cluster

    def _as_postgres(self, argv: list[str]) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        self._counter += 1
        name = f"fleet_{os.getpid()}_{self._counter}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.base / "data"), "-m",
                               "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class ThreadServer:
    """The fleet app served by uvicorn in a thread of the test process, on loopback."""

    settings: FleetSettings
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    admin_token: str = ""
    reader_token: str = ""
    bootstrap_token: str = ""
    tls: tuple[str, str] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    http: str = HTTP_PROTOCOL
    """uvicorn's HTTP protocol: the service's own front, as `divingbell serve` runs it
    ("httptools" for uvicorn's, with the hot paths as ASGI)."""

    def start(self) -> ThreadServer:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.settings), log_config=None, access_log=False,
                                http=self.http,
                                ssl_certfile=self.tls[0] if self.tls else None,
                                ssl_keyfile=self.tls[1] if self.tls else None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        wait_for(lambda: self._server is not None and self._server.started)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://{self.host}:{self.port}"
        db = Database(self.settings.db_url)
        self.admin_token = create_token(db, "admin", "tests")[1]
        self.reader_token = create_token(db, "reader", "tests")[1]
        self.bootstrap_token = create_token(db, "bootstrap", "tests")[1]
        db.dispose()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def client(self, token: str | None = None, **kwargs) -> FleetClient:
        return FleetClient(self.url, token, **kwargs)

    @property
    def admin(self) -> FleetClient:
        return self.client(self.admin_token)

    @property
    def reader(self) -> FleetClient:
        return self.client(self.reader_token)

    @property
    def bootstrap(self) -> FleetClient:
        return self.client(self.bootstrap_token)


@contextmanager
def thread_server(settings: FleetSettings, **kwargs) -> Iterator[ThreadServer]:
    server = ThreadServer(settings, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class ProcessServer:
    """`divingbell serve` as its own process (what operators run)."""

    db_url: str
    host: str = "127.0.0.1"
    args: tuple[str, ...] = ()
    netns: str | None = None
    port: int = 0
    process: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    scheme: str = "http"
    ca_file: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self, log_path: Path) -> ProcessServer:
        # In a namespace of its own the service has every port to itself.
        self.port = self.port or (8500 if self.netns else free_port(self.host))
        argv = [sys.executable, "-m", "divingbell", "serve", "--db", self.db_url,
                "--listen", f"{self.host}:{self.port}", "--log-level", "warning", *self.args]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.log_path = log_path
        handle = log_path.open("w")
        self.process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited: {log_path.read_text()}")
            if self.netns:
                probe = subprocess.run(
                    ["ip", "netns", "exec", self.netns, sys.executable, "-c",
                     f"import urllib.request; urllib.request.urlopen('{self.url}/healthz', "
                     "timeout=1)"], capture_output=True, check=False)
                return probe.returncode == 0
            try:
                FleetClient(self.url, timeout=1, ca_file=self.ca_file).request("GET", "/healthz")
                return True
            except Exception:
                return False

        wait_for(up, timeout=60)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def fresh_store(directory: Path) -> tuple[str, dict[str, Path]]:
    """An SQLite store in `directory`, migrated, with an admin and a bootstrap token, each in a
    0600 file: what an operator has after `fleet migrate` and `fleet token create`."""
    from divingbell.fleet import migrations

    db_url = f"sqlite:///{directory / 'fleet.db'}"
    db = Database(db_url)
    migrations.upgrade(db.write_engine)
    tokens = {}
    for role in ("admin", "bootstrap"):
        path = directory / f"{role}.token"
        path.write_text(create_token(db, role)[1] + "\n")
        path.chmod(0o600)
        tokens[role] = path
    db.dispose()
    return db_url, tokens


def stop_processes(processes: list[subprocess.Popen[str]], grace: float = 15.0) -> None:
    """SIGTERM each process group (resumed first, in case a test stopped it), then SIGKILL what
    has not exited after `grace` seconds."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
