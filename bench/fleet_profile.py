"""Where a fleet service process spends its time on the hot paths: py-spy samples a real
`divingbell serve` while `bench/fleet_load.py`'s machines poll (If-None-Match) and report at
the fleet's rate, and the samples are summed by where the code lives.

    sudo .venv/bin/python bench/fleet_profile.py [--store sqlite|postgresql] [--machines 10000]
         [--rate 333] [--seconds 20] [--top 25] [--raw FILE]

Needs py-spy in the venv (`.venv/bin/pip install py-spy`: a tool for this bench only, not a
dependency of divingbell). Prints, for the service's threads that were running (not waiting):
the share of samples by package (self time: the frame on top of the stack), the share by
layer of the request (inclusive: uvicorn's HTTP handling, the ASGI middlewares, the hot
paths' store work), and the functions with the most self time. `--raw` keeps py-spy's
collapsed stacks for a flame graph.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fleet_load import poll_request, report_request, run_load, seeded_store  # noqa: E402

# Layers: a sample counts for the innermost frame on its stack that belongs to one of these.
LAYERS = (
    ("store: driver (sqlite3/psycopg)", ("sqlite3/", "psycopg/", "psycopg_binary", "psycopg_c")),
    ("store: SQLAlchemy", ("sqlalchemy/",)),
    ("store: db.Prepared (the hot statements on the driver)", ("divingbell/fleet/db.py",)),
    ("divingbell views.py (auth, decisions)", ("divingbell/fleet/views.py",
                                               "divingbell/fleet/lifecycle.py",
                                               "divingbell/fleet/rollouts.py",
                                               "divingbell/fleet/auth.py")),
    ("body validation (pydantic)", ("pydantic/", "pydantic_core")),
    ("thread hand-off (concurrent.futures, threading)", ("concurrent/futures", "threading.py",
                                                         "queue.py")),
    ("ASGI: hot paths, request log, metrics", ("divingbell/fleet/hotpath.py",
                                               "divingbell/fleet/app.py",
                                               "prometheus_client/")),
    ("framework (starlette, fastapi)", ("starlette/", "fastapi/")),
    ("HTTP server (uvicorn, httptools)", ("uvicorn/", "httptools")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop")),
)


def package_of(frame: str) -> str:
    """`function (path/to/file.py:line)` -> a short package name."""
    path = frame.rsplit("(", 1)[-1].split(":", 1)[0]
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/divingbell/" in path:
        return "divingbell/" + path.split("/divingbell/", 1)[1]
    if "/lib/python3" in path:
        return "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 2)[-1].split("/")[0]
    return path or frame


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in LAYERS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def summarise(raw: Path, top: int) -> None:
    by_package: collections.Counter[str] = collections.Counter()
    by_layer: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        total += count
        by_package[package_of(leaf)] += count
        by_function[leaf] += count
        by_layer[layer_of(frames)] += count
    if not total:
        print("no samples (is py-spy allowed to trace? run as root)")
        return
    print(f"\n{total} samples of threads holding the GIL")
    print("\nby layer (a sample counts for the innermost layer on its stack):")
    for name, count in by_layer.most_common():
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("\nby package (self time):")
    for name, count in by_package.most_common(15):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print(f"\ntop {top} functions (self time):")
    for name, count in by_function.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=333.0, help="requests/s, half reports")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy not found: .venv/bin/pip install py-spy")
    from tests.fleet.servers import PostgresCluster, ProcessServer

    with tempfile.TemporaryDirectory(prefix="fleet-profile-") as tmp:
        work = Path(tmp)
        cluster = None
        if args.store == "postgresql":
            reason = PostgresCluster.available()
            if reason:
                parser.error(reason)
            cluster = PostgresCluster.start()
            url = cluster.create_database()
        else:
            url = f"sqlite:///{work / 'fleet.db'}"
        try:
            machines, _token = seeded_store(url, args.machines)
            server = ProcessServer(url).start(work / "serve.log")
            assert server.process is not None
            try:
                mixed = [r for m in machines for r in (poll_request(m, server.host),
                                                       report_request(m, server.host))]
                asyncio.run(run_load(server.host, server.port, mixed, args.rate, 3))
                raw = args.raw or work / "stacks.txt"
                spy = subprocess.Popen(
                    [py_spy, "record", "--pid", str(server.process.pid), "--format", "raw",
                     "--rate", "250", "--subprocesses", "--gil", "--output", str(raw),
                     "--duration", str(int(args.seconds) + 1)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                result = asyncio.run(run_load(server.host, server.port, mixed, args.rate,
                                              args.seconds))
                _out, err = spy.communicate(timeout=args.seconds + 60)
                print(f"[{args.store}] {args.machines} machines at {args.rate:.0f} req/s for "
                      f"{args.seconds:.0f} s: achieved {result.achieved:.0f}/s, "
                      f"p50 {result.pct(0.5):.1f} ms, p99 {result.pct(0.99):.1f} ms, statuses "
                      f"{result.statuses} (load average {os.getloadavg()[0]:.1f})")
                if spy.returncode != 0:
                    print(f"py-spy failed: {err.strip()}")
                    return
                summarise(raw, args.top)
            finally:
                server.stop()
        finally:
            if cluster is not None:
                cluster.stop()


if __name__ == "__main__":
    main()
