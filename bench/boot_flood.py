"""An anonymous flood of network-boot requests against a real `divingbell serve`: what it leaves
in the store, and what registration and /metrics cost before and after it (issue 22: 10,000
boots made a registration take 190 ms instead of 7 ms).

    sudo .venv/bin/python bench/boot_flood.py [--boots 10000] [--registrations 50]
         [--max-pending-boots N] [--store sqlite,postgresql]

Per store: the median and max time of `--registrations` new machines enrolling one after
another, and of /metrics, on a fresh service; then `--boots` requests of
`/v1/ipxe?uuid=<random>` (no token: anyone on the provisioning network can send them), the
answers by status and the rows they left (machines, boot tokens, history); then the same
measurements again and their ratio. `--max-pending-boots` defaults to the number of boots, so
every boot is stored (the worst case for the registration figure); the service's own default
(1000) caps it lower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from divingbell.fleet import migrations  # noqa: E402
from divingbell.fleet.db import Database  # noqa: E402
from divingbell.fleet.models import Machine, StateChange, Token  # noqa: E402
from divingbell.fleet.tokens import create_token  # noqa: E402


def timed(call: Any, count: int) -> dict[str, float]:
    times = []
    for n in range(count):
        started = time.perf_counter()
        call(n)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}


def measure(http: httpx.Client, bootstrap: str, count: int, offset: int) -> dict[str, Any]:
    def register(n: int) -> None:
        n += offset
        facts = {"uuid": f"00000000-0000-4000-9000-{n:012d}", "boot_id": "bench",
                 "hostname": f"new{n}", "interfaces": [{"name": "eth0", "mac": (
                     f"52:55:00:00:{n >> 8 & 255:02x}:{n & 255:02x}"), "boot": True}]}
        answer = http.post("/v1/discovery", json=facts,
                           headers={"Authorization": f"Bearer {bootstrap}"})
        assert answer.status_code == 201, answer.text

    def metrics(_n: int) -> None:
        assert http.get("/metrics").status_code == 200

    return {"registration": timed(register, count), "metrics": timed(metrics, 20)}


def rows(url: str) -> dict[str, int]:
    db = Database(url)
    try:
        with db.read() as session:
            return {"machines": session.scalar(select(func.count()).select_from(Machine)) or 0,
                    "boot tokens": session.scalar(select(func.count()).select_from(Token)
                                                  .where(Token.role == "boot")) or 0,
                    "history": session.scalar(select(func.count())
                                              .select_from(StateChange)) or 0}
    finally:
        db.dispose()


def bench_store(name: str, url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests.fleet.servers import ProcessServer

    db = Database(url)
    migrations.upgrade(db.write_engine)
    bootstrap = create_token(db, "bootstrap", "bench")[1]
    db.dispose()
    cap = args.max_pending_boots or args.boots
    server = ProcessServer(url, args=("--max-pending-boots", str(cap))).start(
        work / f"serve-{name}.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            before = measure(http, bootstrap, args.registrations, 0)
            statuses: dict[int, int] = {}
            started = time.perf_counter()
            for _ in range(args.boots):
                status = http.get(f"/v1/ipxe?uuid={uuid_module.uuid4()}").status_code
                statuses[status] = statuses.get(status, 0) + 1
            flood_seconds = time.perf_counter() - started
            left = rows(url)
            after = measure(http, bootstrap, args.registrations, args.registrations)
    finally:
        server.stop()
    ratio = after["registration"]["p50_ms"] / max(before["registration"]["p50_ms"], 0.01)
    print(f"\n[{name}] max pending boots {cap}")
    print(f"  before: registration median {before['registration']['p50_ms']} ms "
          f"(max {before['registration']['max_ms']}), /metrics median "
          f"{before['metrics']['p50_ms']} ms")
    print(f"  {args.boots} anonymous boot requests in {flood_seconds:.1f} s: statuses "
          f"{dict(sorted(statuses.items()))}; rows left (incl. {2 * args.registrations} "
          f"registered machines' rows): {left}")
    print(f"  after:  registration median {after['registration']['p50_ms']} ms "
          f"(max {after['registration']['max_ms']}), /metrics median "
          f"{after['metrics']['p50_ms']} ms; registration after/before {ratio:.2f}x")
    return {"before": before, "after": after, "statuses": statuses, "rows": left,
            "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=10_000)
    parser.add_argument("--registrations", type=int, default=50)
    parser.add_argument("--max-pending-boots", type=int, default=0,
                        help="the service's cap (default: --boots, every boot stored)")
    parser.add_argument("--store", default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="divingbell-flood-") as tmp:
        work = Path(tmp)
        for store in args.store.split(","):
            if store == "sqlite":
                bench_store(store, f"sqlite:///{work / 'fleet.db'}", args, work)
            elif store == "postgresql":
                from tests.fleet.servers import PostgresCluster

                cluster = PostgresCluster.start()
                try:
                    bench_store(store, cluster.create_database(), args, work)
                finally:
                    cluster.stop()
            else:
                parser.error(f"unknown store {store!r}: sqlite or postgresql")


if __name__ == "__main__":
    main()
