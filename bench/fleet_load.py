"""Load on the fleet service: 10,000 simulated machines, each reporting every 60 s and polling
its configuration with If-None-Match, against a real `divingbell serve` on SQLite and on a
throwaway PostgreSQL; then report rates stepped up until the service no longer keeps up.

    sudo .venv/bin/python bench/fleet_load.py [--machines 10000] [--duration 30]
         [--store sqlite,postgresql] [--step-seconds 10] [--max-rate 3000]
         [--processes 1,2,4] [--registration-fleets 1000,100000]
         [--registration-stores sqlite,postgresql] [--cpu-rates fleet,1000,2000,3333]

Prints first what a do-nothing ASGI app under uvicorn costs per request at each of
`--cpu-rates` (bench/floor_app.py: the floor of any Python HTTP service on this machine that
day); then, per store: sustained requests/s, p50/p99 latency and the service's RSS at the fleet
load; its CPU per request at each of `--cpu-rates`, mixed polls and reports, beside the
floor; then each step of the ramp (it goes on while the service keeps up, achieved >= 95% of
the target: the most achieved is its throughput) and the highest report rate sustained with
p99 under 100 ms; then how long a new machine's registration takes in that
fleet. On PostgreSQL all of that runs once per service process count (`--processes`), against
the one database, with a table per count at the end; then a new machine's registration is
timed in fleets of each `--registration-fleets` size (SQLite, and PostgreSQL with
`--registration-stores sqlite,postgresql`). Open loop: every request is
sent at its scheduled time whatever the earlier ones do, and its latency counts from that
time (no coordinated omission). Bounded: the whole run stops after (duration + steps x
step-seconds) per store and process count.

The machines are written straight into the store (registration is not what is measured);
each knows its configuration's ETag already, as a settled fleet does, so polls are
conditional GETs answered 304 unless a machine's configuration changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402

from divingbell.fleet import migrations  # noqa: E402
from divingbell.fleet.auth import MACHINE_PREFIX, format_token, hash_secret  # noqa: E402
from divingbell.fleet.db import Database  # noqa: E402
from divingbell.fleet.models import Machine, Revision, Setting, utcnow  # noqa: E402
from divingbell.fleet.scheduler import node_labels  # noqa: E402
from divingbell.fleet.tokens import create_token  # noqa: E402
from divingbell.fleet.views import config_etag  # noqa: E402

DOC = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: 30
    net.core.somaxconn: 4096
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: divingbell.io/role, values: [worker]}
          conf:
            sysctl: {net.ipv4.tcp_fin_timeout: 12}
"""
CONNECTIONS = 64
RAMP = (100, 200, 300, 400, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000)


@dataclass
class SimMachine:
    id: str
    token: str
    etag: str


def seed(db: Database, count: int) -> list[SimMachine]:
    import hashlib

    now = utcnow()
    machines: list[SimMachine] = []
    rows: list[dict[str, Any]] = []
    for n in range(count):
        machine_id = f"m{n:012x}"
        secret = secrets.token_urlsafe(32)
        hostname = f"node{n}"
        roles = ["control-plane"] if n < 3 else ["worker"]
        rows.append({
            "id": machine_id, "uuid": f"00000000-0000-4000-8000-{n:012d}", "hostname": hostname,
            "state": "ready", "state_changed_at": now, "roles": roles, "pinned": False,
            "hostname_accepted": True,
            "interfaces": [{"name": "eth0", "mac": f"52:54:{n >> 24 & 255:02x}:"
                            f"{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}",
                            "addresses": [], "gateway": None, "fqdns": [], "boot": True}],
            "disks": [], "lldp": [], "credential_hash": hash_secret(secret), "created_at": now,
            "discovered_at": now, "last_report_revision": 1, "last_report_state": "converged",
            "last_report_at": now})
        # The ETag the service computes: the served name is the accepted hostname.
        etag = config_etag(1, hostname, node_labels(roles, None))
        rows[-1]["last_report_etag"] = etag
        machines.append(SimMachine(machine_id, format_token(MACHINE_PREFIX, machine_id, secret),
                                   etag))
    with db.write() as session:
        session.add(Revision(number=1, source_name="bench.yaml", text=DOC,
                             digest=hashlib.sha256(DOC.encode()).hexdigest(), created_at=now,
                             created_by="bench"))
        session.add(Setting(key="active_revision", value="1"))
        session.flush()
        for start in range(0, len(rows), 1000):
            session.execute(insert(Machine), rows[start:start + 1000])
    return machines


class Connection:
    """One keep-alive HTTP/1.1 connection (raw asyncio streams: the generator must stay much
    cheaper than the service it measures)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            self.writer = None
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if length:
            await self.reader.readexactly(length)
        return status


def poll_request(machine: SimMachine, host: str) -> bytes:
    return (f"GET /v1/machines/{machine.id}/config HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {machine.token}\r\nIf-None-Match: {machine.etag}\r\n"
            "\r\n").encode()


def report_request(machine: SimMachine, host: str) -> bytes:
    body = json.dumps({"revision": 1, "etag": machine.etag, "state": "converged",
                       "modules": {"sysctl": {"changes": 0, "failures": []}}, "drift": False,
                       "duration_seconds": 0.05, "boot_id": "bench"}).encode()
    return (f"POST /v1/machines/{machine.id}/reports HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {machine.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class Result:
    target_rps: float
    sent: int
    done: int
    errors: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]

    @property
    def achieved(self) -> float:
        return self.done / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run_load(host: str, port: int, requests: list[bytes], rate: float,
                   seconds: float) -> Result:
    """Send `requests` round-robin at `rate` per second for `seconds` (open loop)."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(Connection(host, port))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    tasks: list[asyncio.Task[None]] = []
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(raw: bytes, due: float) -> None:
        nonlocal errors
        connection = await pool.get()
        try:
            status = await connection.request(raw)
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(loop.time() - due)
        except (OSError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            errors += 1
            connection.writer = None
        finally:
            pool.put_nowait(connection)

    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(requests[i % len(requests)], due)))
    deadline = start + seconds + 10  # a bounded drain: late answers count as errors
    pending = [t for t in tasks if not t.done()]
    if pending:
        _done, still = await asyncio.wait(pending, timeout=max(0.1, deadline - loop.time()))
        for task in still:
            task.cancel()
        errors += len(still)
    elapsed = max(seconds, loop.time() - start)
    return Result(rate, total, len(latencies), errors, elapsed, latencies, statuses)


def registrations(url: str, token: str, count: int, first: int = 0) -> dict[str, float]:
    """`count` machines registering (POST /v1/discovery) one at a time: each runs the
    scheduler's pass over the fleet, under its lock, so this is what a rack powering on costs."""
    import statistics
    import time

    from divingbell.fleet.client import FleetClient

    client = FleetClient(url, token)
    times = []
    for n in range(first, first + count):
        facts = {"uuid": f"00000000-0000-4000-9000-{n:012d}", "boot_id": "bench",
                 "hostname": f"new{n}", "interfaces": [{"name": "eth0", "mac": (
                     f"52:55:00:00:{n >> 8 & 255:02x}:{n & 255:02x}"), "boot": True}],
                 "disks": [], "lldp": []}
        started = time.perf_counter()
        client.discover(facts)
        times.append((time.perf_counter() - started) * 1000)
    return {"count": count, "p50_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1)}


def registration_at(store: str, url: str, size: int, args: argparse.Namespace,
                    work: Path) -> dict[str, float]:
    """A new machine's registration timed in a fleet of `size` (nothing else running)."""
    from tests.fleet.servers import ProcessServer

    _machines, token = seeded_store(url, size)
    server = ProcessServer(url).start(work / f"serve-registration-{store}-{size}.log")
    try:
        registrations(server.url, token, 3)  # warm-up: connections, caches
        result = registrations(server.url, token, args.registrations, first=100)
    finally:
        server.stop()
    print(f"\n[{store}] registration in a fleet of {size} machines: median "
          f"{result['p50_ms']:.1f} ms, max {result['max_ms']:.1f} ms "
          f"({args.registrations} machines, one after another)")
    return result


def process_tree(pid: int) -> list[int]:
    """The service and its worker processes (with --workers)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids.extend(process_tree(int(child)))
    return pids


def rss_mb(pid: int) -> float:
    total = 0
    for one in process_tree(pid):
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_split(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of `pid` and its children (the kernel share is mostly the
    loopback's TCP stack, which the sender pays for the receiver too)."""
    user = kernel = 0
    for one in process_tree(pid):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        kernel += int(fields[12])
    return user / os.sysconf("SC_CLK_TCK"), kernel / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_per_request(host: str, port: int, pid: int, requests: list[bytes], rate: float,
                    seconds: float) -> tuple[Result, float]:
    """The load at `rate` and the CPU seconds `pid` (and its children) spent per request."""
    asyncio.run(run_load(host, port, requests, rate, 2))  # warm-up at this rate
    before = cpu_seconds(pid)
    result = asyncio.run(run_load(host, port, requests, rate, seconds))
    return result, (cpu_seconds(pid) - before) / max(1, result.done)


def cpu_by_rate(host: str, port: int, pid: int, mixed: list[bytes],
                args: argparse.Namespace) -> list[dict[str, Any]]:
    """Service CPU per request, mixed polls and reports, at each of `--cpu-rates`: at a
    fleet's rate every request wakes an idle process whose caches went cold meanwhile, which
    costs more than the work itself on a shared VM; at the rates where the CPU matters for
    sizing (a larger fleet) the wake-ups are shared."""
    rows = []
    for rate in args.cpu_rates:
        result, cpu = cpu_per_request(host, port, pid, mixed, rate, args.cpu_seconds)
        kept_up = result.errors == 0 and result.achieved >= 0.95 * rate
        floor = args.floor.get(rate)
        rows.append({"rate": rate, "achieved": round(result.achieved),
                     "cpu_ms_per_request": round(cpu * 1000, 3),
                     "floor_ms_per_request": None if floor is None else round(floor * 1000, 3),
                     "p99_ms": round(result.pct(0.99), 1), "kept_up": kept_up})
        print(f"  mixed at {rate:.0f}/s: achieved {result.achieved:.0f}/s, p99 "
              f"{result.pct(0.99):.1f} ms, service CPU {cpu * 1000:.3f} ms/request"
              + (f" (floor {floor * 1000:.3f} ms: {cpu / floor:.1f}x)" if floor else "")
              + ("" if kept_up else "  <- did not keep up"))
    return rows


def measure_floor(args: argparse.Namespace, work: Path) -> dict[float, float]:
    """CPU per request of bench/floor_app.py under uvicorn at each of `--cpu-rates`."""
    import subprocess

    from tests.fleet.servers import free_port, stop_processes, wait_for

    port = free_port()
    log_path = work / "floor.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(REPO / "bench"),
             "floor_app:app", "--host", "127.0.0.1", "--port", str(port), "--http",
             "httptools", "--loop", "uvloop", "--log-level", "warning", "--no-access-log"],
            stdout=subprocess.DEVNULL, stderr=log_file, text=True, start_new_session=True)
    floor = {}
    try:
        try:
            wait_for(lambda: _listening(port))
        except Exception:
            print(f"the floor app did not start:\n{log_path.read_text()}", file=sys.stderr)
            raise
        # The same mix as the service's: a poll, then a report with its body.
        stand_in = SimMachine("floor", "dbm_floor_x", '"1-x"')
        requests = [poll_request(stand_in, "127.0.0.1"), report_request(stand_in, "127.0.0.1")]
        print("\nfloor: an ASGI app that does nothing, under uvicorn (bench/floor_app.py), "
              "mixed polls and reports:")
        for rate in args.cpu_rates:
            result, cpu = cpu_per_request("127.0.0.1", port, server.pid, requests, rate,
                                          args.cpu_seconds)
            floor[rate] = cpu
            print(f"  at {rate:.0f}/s: achieved {result.achieved:.0f}/s, "
                  f"{cpu * 1000:.3f} ms of CPU a request")
    finally:
        stop_processes([server], grace=10)
    return floor


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def seeded_store(url: str, count: int) -> tuple[list[SimMachine], str]:
    """A migrated store with `count` machines and a bootstrap token."""
    db = Database(url)
    migrations.upgrade(db.write_engine)
    machines = seed(db, count)
    if not db.sqlite:
        # A fleet that grew to this size has table statistics (autovacuum analyzes as rows
        # arrive); one written in a few seconds would be planned without them for a minute.
        with db.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "ANALYZE")
    bootstrap_token = create_token(db, "bootstrap", "bench")[1]
    db.dispose()
    return machines, bootstrap_token


def bench_store(name: str, url: str, args: argparse.Namespace, work: Path, workers: int,
                machines: list[SimMachine], bootstrap_token: str) -> dict[str, Any]:
    from tests.fleet.servers import ProcessServer

    server = ProcessServer(url, args=("--workers", str(workers), *args.serve_args.split())).start(
        work / f"serve-{name}-{workers}.log")
    assert server.process is not None
    host, port = server.host, server.port
    try:
        polls = [poll_request(m, host) for m in machines]
        reports = [report_request(m, host) for m in machines]
        mixed = [r for pair in zip(polls, reports, strict=True) for r in pair]
        # The fleet load: every machine polls and reports once a minute.
        fleet_rate = 2 * args.machines / 60
        asyncio.run(run_load(host, port, mixed, fleet_rate, 3))  # warm-up (pools, caches)
        user_before, kernel_before = cpu_split(server.process.pid)
        fleet = asyncio.run(run_load(host, port, mixed, fleet_rate, args.duration))
        user_after, kernel_after = cpu_split(server.process.pid)
        user_per_request = (user_after - user_before) / max(1, fleet.done)
        kernel_per_request = (kernel_after - kernel_before) / max(1, fleet.done)
        cpu_per_request = user_per_request + kernel_per_request
        fleet_rss = rss_mb(server.process.pid)
        print(f"\n[{name}] {args.machines} machines, each polling (If-None-Match) and "
              f"reporting every 60 s, for {args.duration:.0f} s ({workers} service "
              f"process(es); load average {os.getloadavg()[0]:.1f}):")
        print(f"  sustained {fleet.achieved:.0f} req/s (target {fleet_rate:.0f}), "
              f"p50 {fleet.pct(0.5):.1f} ms, p99 {fleet.pct(0.99):.1f} ms, "
              f"errors {fleet.errors}, statuses {fleet.statuses}, service RSS {fleet_rss:.0f} MB")
        print(f"  service CPU per request (mixed poll/report): {cpu_per_request * 1000:.2f} ms "
              f"(user {user_per_request * 1000:.2f}, kernel {kernel_per_request * 1000:.2f})")
        if fleet.statuses.get(200):
            print("  WARNING: polls answered 200, not 304: the seeded ETags do not match the "
                  "service's, so this measured full renders")
        by_rate = cpu_by_rate(host, port, server.process.pid, mixed, args)
        best = 0.0
        steps = []
        for rate in RAMP:
            if rate > args.max_rate:
                break
            step = asyncio.run(run_load(host, port, reports, rate, args.step_seconds))
            # Kept up: every report answered 201 at (nearly) the rate sent. The ramp goes on
            # while it keeps up, so the most achieved is the throughput; ok adds p99 <= 100 ms.
            kept_up = (step.errors == 0 and step.achieved >= 0.95 * rate
                       and set(step.statuses) == {201})
            ok = kept_up and step.pct(0.99) <= 100
            steps.append({"rate": rate, "achieved": round(step.achieved),
                          "p50_ms": round(step.pct(0.5), 1), "p99_ms": round(step.pct(0.99), 1),
                          "errors": step.errors, "ok": ok})
            print(f"  reports at {rate}/s: achieved {step.achieved:.0f}/s, "
                  f"p50 {step.pct(0.5):.1f} ms, p99 {step.pct(0.99):.1f} ms, "
                  f"errors {step.errors}, load average {os.getloadavg()[0]:.1f}"
                  f"{'' if ok else '  <- p99 past 100 ms' if kept_up else '  <- past the limit'}")
            if ok:
                best = rate
            elif not kept_up:
                break  # the service no longer keeps up: its throughput is found
        registration: dict[str, float] = {}
        if args.registrations:
            registration = registrations(server.url, bootstrap_token, args.registrations,
                                         first=1000 * workers)
            print(f"  {args.registrations} new machines registering one after another into the "
                  f"fleet (each runs a scheduling pass): median {registration['p50_ms']:.1f} ms, "
                  f"max {registration['max_ms']:.1f} ms")
        rss = rss_mb(server.process.pid)
        print(f"  highest sustained report rate with p99 <= 100 ms: {best:.0f}/s "
              f"(service RSS after the ramp {rss:.0f} MB)")
        return {"store": name, "workers": workers, "fleet_rps": round(fleet.achieved),
                "cpu_ms_per_request": round(cpu_per_request * 1000, 2),
                "cpu_ms_per_request_user": round(user_per_request * 1000, 2),
                "cpu_ms_per_request_kernel": round(kernel_per_request * 1000, 2),
                "fleet_p50_ms": round(fleet.pct(0.5), 1), "fleet_p99_ms": round(fleet.pct(0.99), 1),
                "fleet_errors": fleet.errors, "rss_mb": round(fleet_rss),
                "max_report_rate": best, "steps": steps, "registration": registration,
                "cpu_by_rate": by_rate}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds at the fleet load")
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--max-rate", type=float, default=3000.0)
    parser.add_argument("--store", default="sqlite,postgresql",
                        help="stores to load ('' for only the registration timings)")
    parser.add_argument("--processes", default="1,2,4",
                        help="service process counts to run against one PostgreSQL, one after "
                             "another (SQLite: always 1)")
    parser.add_argument("--registration-fleets", default="1000,100000",
                        help="fleet sizes (SQLite) at which a new machine's registration is "
                             "timed on its own ('' to skip)")
    parser.add_argument("--registration-stores", default="sqlite",
                        help="stores in which --registration-fleets are timed "
                             "(sqlite,postgresql)")
    parser.add_argument("--registrations", type=int, default=50,
                        help="new machines registered one at a time after the ramp")
    parser.add_argument("--serve-args", default="",
                        help="more arguments for `divingbell serve`, e.g. '--reports-kept 5'")
    parser.add_argument("--cpu-rates", default="fleet,1000,2000,3333",
                        help="mixed request rates at which the service's CPU per request is "
                             "measured ('fleet': the fleet's own; 3333/s is a fleet of "
                             "100,000 machines; '' to skip)")
    parser.add_argument("--cpu-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args()
    args.cpu_rates = [2 * args.machines / 60 if rate == "fleet" else float(rate)
                      for rate in args.cpu_rates.split(",") if rate]
    summary = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        args.floor = measure_floor(args, work) if args.cpu_rates and args.store else {}
        for store in (s for s in args.store.split(",") if s):
            if store == "sqlite":
                url = f"sqlite:///{work / 'fleet.db'}"
                summary.append(bench_store("sqlite", url, args, work, 1,
                                           *seeded_store(url, args.machines)))
            elif store == "postgresql":
                from tests.fleet.servers import PostgresCluster

                reason = PostgresCluster.available()
                if reason:
                    print(f"\n[postgresql] skipped: {reason}")
                    continue
                cluster = PostgresCluster.start()
                try:
                    url = cluster.create_database()
                    machines, token = seeded_store(url, args.machines)
                    per_count = []
                    for count in (int(n) for n in args.processes.split(",")):
                        result = bench_store("postgresql", url, args, work, count, machines,
                                             token)
                        summary.append(result)
                        per_count.append(result)
                    print(f"\n[postgresql] {args.machines} machines, by service processes "
                          "(one PostgreSQL, same machine):")
                    rates = " / ".join(f"{rate:.0f}" for rate in args.cpu_rates)
                    print("  processes | fleet req/s | fleet p50/p99 ms | CPU ms/request | "
                          "reports/s with p99 <= 100 ms | most reports/s achieved (p99 ms)"
                          + (f" | CPU ms/request, mixed at {rates}/s" if rates else ""))
                    for result in per_count:
                        peak = max(result["steps"], key=lambda step: step["achieved"],
                                   default=None)
                        print(f"  {result['workers']:9d} | {result['fleet_rps']:11d} | "
                              f"{result['fleet_p50_ms']:7.1f} / {result['fleet_p99_ms']:6.1f} | "
                              f"{result['cpu_ms_per_request']:14.2f} | "
                              f"{result['max_report_rate']:28.0f} | "
                              + (f"{peak['achieved']} ({peak['p99_ms']})" if peak else "-")
                              + "".join(f"{' | ' if i == 0 else ' / '}"
                                        f"{row['cpu_ms_per_request']:.2f}"
                                        f"{'' if row['kept_up'] else '*'}"
                                        for i, row in enumerate(result["cpu_by_rate"])))
                finally:
                    cluster.stop()
            else:
                parser.error(f"unknown store {store!r}")
        sizes = [int(n) for n in args.registration_fleets.split(",") if n]
        for store in (s for s in args.registration_stores.split(",") if s and sizes):
            if store == "sqlite":
                for size in sizes:
                    url = f"sqlite:///{work / f'registration-{size}.db'}"
                    summary.append({"registration_fleet": size, "store": store,
                                    **registration_at(store, url, size, args, work)})
            elif store == "postgresql":
                from tests.fleet.servers import PostgresCluster

                reason = PostgresCluster.available()
                if reason:
                    print(f"\n[postgresql] registration skipped: {reason}")
                    continue
                cluster = PostgresCluster.start()
                try:
                    for size in sizes:
                        summary.append({"registration_fleet": size, "store": store,
                                        **registration_at(store, cluster.create_database(),
                                                          size, args, work)})
                finally:
                    cluster.stop()
            else:
                parser.error(f"unknown store {store!r}")
    if args.json:
        print(json.dumps(summary, indent=2))
    print(f"\n(cpu: {os.cpu_count()} cores, shared; load generator in this process)")


if __name__ == "__main__":
    main()
