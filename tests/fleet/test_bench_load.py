"""bench/fleet_load.py still runs end to end (its figures are not asserted: speed lives in the
bench, never in a test): a tiny fleet on SQLite and PostgreSQL, the floor, the CPU by rate, a
short ramp and registrations, and the JSON summary a script would read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet.servers import PostgresCluster

REPO = Path(__file__).resolve().parents[2]


def test_the_load_bench_runs_and_summarises_both_stores() -> None:
    reason = PostgresCluster.available()
    if reason:
        pytest.fail(f"PostgreSQL is needed for this test: {reason}")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fleet_load.py"), "--machines", "60",
         "--duration", "1", "--cpu-rates", "fleet,40", "--cpu-seconds", "1",
         "--step-seconds", "1", "--max-rate", "100", "--processes", "1",
         "--registrations", "2", "--registration-fleets", "50", "--json"],
        check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "floor: an ASGI app that does nothing" in out
    assert "[sqlite] 60 machines" in out and "[postgresql] 60 machines" in out
    assert "mixed at 40/s" in out and "CPU ms/request, mixed at 2 / 40/s" in out
    summary = json.loads(out[out.index("\n[\n") + 1:out.rindex("\n]\n") + 2])
    loads = [entry for entry in summary if "fleet_rps" in entry]
    assert [entry["store"] for entry in loads] == ["sqlite", "postgresql"]
    for entry in loads:
        assert entry["fleet_errors"] == 0
        assert [row["rate"] for row in entry["cpu_by_rate"]] == [2.0, 40.0]
        assert all(isinstance(row["cpu_ms_per_request"], float) for row in entry["cpu_by_rate"])
        assert entry["steps"] and entry["steps"][0]["rate"] == 100
        assert entry["registration"]["count"] == 2
    assert [entry["registration_fleet"] for entry in summary
            if "registration_fleet" in entry] == [50]
