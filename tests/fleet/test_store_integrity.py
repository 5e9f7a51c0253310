"""The service notices its SQLite file was removed or replaced under it (issue 22, finding 7):
`/readyz` fails, writes answer 503 instead of landing in a file nobody will read again, and
it says so once in the log. The real service on loopback, over a real SQLite file."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import DOC, error_of, facts


@pytest.fixture
def sqlite_fleet(tmp_path: Path) -> Iterator[ThreadServer]:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    with thread_server(settings) as server:
        yield server


def assert_refuses_writes(fleet: ThreadServer, caplog: pytest.LogCaptureFixture,
                          what: str) -> None:
    ready = httpx.get(f"{fleet.url}/readyz", timeout=10)
    assert ready.status_code == 503 and what in ready.json()["reason"]
    for n in (2, 3):
        refused = error_of(lambda n=n: fleet.bootstrap.discover(facts(n)))
        assert refused.status == 503 and refused.detail["error"] == "store-replaced"
        assert what in refused.detail["message"]
    assert error_of(lambda: fleet.admin.push_document(DOC.encode())).status == 503
    lines = [r for r in caplog.records if "fleet.db" in r.getMessage()
             and r.levelno >= logging.ERROR]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_a_removed_store_file_fails_readiness_and_refuses_writes(
        sqlite_fleet: ThreadServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sqlite_fleet.bootstrap.discover(facts(1))
    assert httpx.get(f"{sqlite_fleet.url}/readyz", timeout=10).status_code == 200
    os.unlink(tmp_path / "fleet.db")
    assert_refuses_writes(sqlite_fleet, caplog, "removed")


def test_a_replaced_store_file_fails_readiness_and_refuses_writes(
        sqlite_fleet: ThreadServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sqlite_fleet.bootstrap.discover(facts(1))
    shutil.copy(tmp_path / "fleet.db", tmp_path / "other.db")
    os.replace(tmp_path / "other.db", tmp_path / "fleet.db")
    assert_refuses_writes(sqlite_fleet, caplog, "replaced")
