"""Fleet fixtures: the same API suite runs over SQLite and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.fleet.settings import FleetSettings
from tests.fleet.front_helpers import servers, taken  # noqa: F401  (the HTTP front's tests')
from tests.fleet.servers import PostgresCluster, ThreadServer, thread_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    reason = PostgresCluster.available()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()


@pytest.fixture
def settings(store_url: str) -> FleetSettings:
    return FleetSettings(db_url=store_url, control_plane_size=1, install_parallel=2,
                         install_ttl_seconds=600, reports_kept=3)


@pytest.fixture
def fleet(settings: FleetSettings) -> Iterator[ThreadServer]:
    with thread_server(settings) as server:
        yield server
