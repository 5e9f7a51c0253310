"""Print how long the maintenance slot operations take, on both backends, and how a race for
one slot resolves.

    .venv/bin/python bench/maintenance_slots.py [--runs N] [--racers N]

Leases: the real lightkube client against the test API server stub (kube-apiserver's paths and
409s over loopback HTTP, state in the in-memory fake), so the figure is the client's and the
protocol's cost, not a real API server's. Fleet: `divingbell.fleet.client` against the real
fleet service (uvicorn in a thread, SQLite WAL in a temporary directory), with a machine
credential. For each: claim (slot free), renew, release, as medians of N; then N racers claim
one slot at the same instant: the time until all have an answer, and how many won (always 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from divingbell.kube import LightkubeApi
from divingbell.maintenance.slots import ClaimResult, LeaseSlots, SlotBackend


def median_ms(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def cycle(backend: SlotBackend, holder: str, runs: int) -> dict[str, float]:
    claim = median_ms(lambda: (backend.claim("bench", holder, 1, 60),
                               backend.release("bench/0", holder)), runs)
    backend.claim("bench", holder, 1, 60)
    renew = median_ms(lambda: backend.renew("bench/0", holder, 60), runs)
    backend.release("bench/0", holder)
    release = median_ms(lambda: backend.release("bench/0", holder), runs)  # not held: a no
    return {"claim+release": claim, "renew": renew, "release (not held)": release}


def race(make: Callable[[int], tuple[str, SlotBackend]], racers: int
         ) -> tuple[float, int, int]:
    agents = [make(i) for i in range(racers)]
    barrier = threading.Barrier(racers + 1)
    results: list[ClaimResult] = []

    def agent(holder: str, backend: SlotBackend) -> None:
        barrier.wait()
        results.append(backend.claim("race", holder, 1, 60))

    threads = [threading.Thread(target=agent, args=a) for a in agents]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - started) * 1000, sum(1 for r in results if r.slot), racers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--racers", type=int, default=8)
    args = parser.parse_args()

    from tests.maintenance.conftest import cluster
    from tests.maintenance.kubestub import MaintenanceApiStub

    stub = MaintenanceApiStub(cluster(time.time))
    try:
        leases = LeaseSlots(LightkubeApi(server=stub.url), "divingbell")
        report("Leases (lightkube over loopback HTTP)", cycle(leases, "n1", args.runs),
               race(lambda i: (f"r{i}", LeaseSlots(LightkubeApi(server=stub.url),
                                                   "divingbell")), args.racers))
    finally:
        stub.server.shutdown()

    from tests.fleet.servers import thread_server
    from tests.fleet.test_api import facts

    from divingbell.fleet.client import FleetClient
    from divingbell.fleet.settings import FleetSettings
    from divingbell.maintenance.slots import FleetSlots

    with tempfile.TemporaryDirectory() as tmp, thread_server(
            FleetSettings(db_url=f"sqlite:///{tmp}/fleet.db", control_plane_size=1)) as fleet:
        def machine(n: int) -> tuple[str, SlotBackend]:
            answer = fleet.bootstrap.discover(facts(1000 + n))
            return answer["machine_id"], FleetSlots(FleetClient(fleet.url,
                                                                answer["credential"]))

        holder, backend = machine(999)
        report("Fleet service (urllib, uvicorn, SQLite)", cycle(backend, holder, args.runs),
               race(machine, args.racers))


def report(title: str, medians: dict[str, float], raced: tuple[float, int, int]) -> None:
    print(title)
    for name, value in medians.items():
        print(f"  {name:<20} {value:7.2f} ms (median)")
    print(f"  {raced[2]} racers, 1 slot   {raced[0]:7.1f} ms until all answered, "
          f"{raced[1]} winner(s)")


if __name__ == "__main__":
    main()
