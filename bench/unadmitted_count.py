"""What the unadmitted-enrolment cap costs: `admission.count_unadmitted`, run on every
`/v1/ipxe` for an unknown machine and every anonymous enrolment, in a store holding a large
fleet (issue 22, "bounded anonymous work").

    .venv/bin/python bench/unadmitted_count.py [--machines 20000] [--unadmitted 1000]
         [--db URL] [--repeat 200]

Builds a store (a temporary SQLite file unless --db names an empty database) with --machines
operator-enrolled machines and --unadmitted anonymous ones, then prints the median and max of
--repeat counts, the count, and the plan the store chose (it should read ix_machines_unadmitted,
not the table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from sqlalchemy import func, insert, select, text  # noqa: E402

from divingbell.fleet import admission, migrations  # noqa: E402
from divingbell.fleet.db import Database  # noqa: E402
from divingbell.fleet.models import Machine, utcnow  # noqa: E402


def fill(db: Database, machines: int, unadmitted: int) -> None:
    now = utcnow()
    rows = [{"id": f"m{n:011d}", "uuid": f"u{n}", "hostname": f"n{n}",
             "hostname_accepted": n >= unadmitted, "state": "ready" if n % 3 else "discovered",
             "state_changed_at": now, "roles": ["worker"], "pinned": False, "interfaces": [],
             "disks": [], "lldp": [], "credential_hash": "h", "created_at": now,
             "discovered_at": now, "enrolled_with": "boot" if n < unadmitted else "operator"}
            for n in range(machines + unadmitted)]
    with db.write() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(Machine), rows[start:start + 5000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=20_000)
    parser.add_argument("--unadmitted", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--db", help="an empty database URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(args.db or f"sqlite:///{tmp}/fleet.db")
        try:
            migrations.upgrade(db.write_engine)
            fill(db, args.machines, args.unadmitted)
            times = []
            with db.read() as session:
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    count = admission.count_unadmitted(session)
                    times.append((time.perf_counter() - started) * 1000)
                query = select(func.count()).select_from(Machine).where(admission.UNADMITTED)
                compiled = query.compile(db.engine, compile_kwargs={"literal_binds": True})
                explain = "EXPLAIN QUERY PLAN " if db.engine.dialect.name == "sqlite" \
                    else "EXPLAIN "
                plan = [" ".join(str(c) for c in row)
                        for row in session.execute(text(explain + str(compiled)))]
        finally:
            db.dispose()
    print(f"store: {db.engine.dialect.name}; machines: {args.machines + args.unadmitted} "
          f"({args.unadmitted} unadmitted); count = {count}")
    print(f"count_unadmitted: p50 {statistics.median(times):.2f} ms, max {max(times):.2f} ms "
          f"over {args.repeat}")
    print("plan:", *plan, sep="\n  ")


if __name__ == "__main__":
    main()
