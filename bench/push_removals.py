"""What the removal check costs a push: a fleet of N machines (3 control-plane, the rest workers,
all converged on revision 1) seeded into SQLite, then two pushes through the service's own
`push_document`: one refused (it removes more than it keeps on the control plane) and one
with `allow_removals` (which also starts the rollout). Then `rollout plan` of that revision.

    sudo .venv/bin/python bench/push_removals.py [--machines 10000]

Prints the seconds each took. The check compares each machine's served configuration with
the new one, but machines sharing a revision, labels and (where an override names it) host
name are compared once, so the figure grows with the fleet's queries, not its diffs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402

from divingbell.fleet import documents, migrations, rollouts  # noqa: E402
from divingbell.fleet.db import Database  # noqa: E402
from divingbell.fleet.errors import ApiError  # noqa: E402
from divingbell.fleet.models import Machine, utcnow  # noqa: E402

FULL = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: 30
    net.core.somaxconn: 4096
    vm.swappiness: 10
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: divingbell.io/role, values: [worker]}
          conf:
            sysctl: {net.ipv4.tcp_keepalive_time: 600, net.ipv4.tcp_keepalive_probes: 5}
"""
# The control plane keeps 1 of 3 (refused without consent); workers keep 3 of 5.
TRIMMED = FULL.replace("    net.core.somaxconn: 4096\n    vm.swappiness: 10\n", "")


def seed(db: Database, count: int) -> None:
    """`count` machines in service, converged on revision 1 (pushed as FULL)."""
    with db.write() as session:
        documents.push_document(session, FULL.encode(), "site.yaml", "bench")
    now = utcnow()
    rows = [{"id": f"m{n:012x}", "uuid": f"00000000-0000-4000-8000-{n:012d}",
             "hostname": f"node{n}", "state": "ready", "state_changed_at": now,
             "roles": ["control-plane"] if n < 3 else ["worker"], "pinned": True,
             "interfaces": [], "disks": [], "lldp": [], "credential_hash": "",
             "created_at": now, "discovered_at": now, "last_report_revision": 1,
             "last_report_state": "converged", "last_report_at": now} for n in range(count)]
    with db.write() as session:
        for start in range(0, len(rows), 1000):
            session.execute(insert(Machine), rows[start:start + 1000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        db = Database(f"sqlite:///{directory}/fleet.db")
        migrations.upgrade(db.engine)
        seed(db, args.machines)
        started = time.perf_counter()
        try:
            with db.write() as session:
                documents.push_document(session, TRIMMED.encode(), "site.yaml", "bench")
            raise SystemExit("the push was not refused")
        except ApiError as exc:
            refused = time.perf_counter() - started
            named = sum(len(g["machines"]) for g in exc.detail["removals"])
        started = time.perf_counter()
        with db.write() as session:
            number, _, removed = documents.push_document(session, TRIMMED.encode(), "site.yaml",
                                                         "bench", allow_removals=True)
        stored = time.perf_counter() - started
        started = time.perf_counter()
        with db.read() as session:
            rollouts.plan(session, number)
        planned = time.perf_counter() - started
        db.dispose()
    print(f"{args.machines} machines: refused push {refused:.2f} s ({named} machines named), "
          f"push with --allow-removals {stored:.2f} s ({len(removed)} groups), "
          f"rollout plan {planned:.2f} s")


if __name__ == "__main__":
    main()
