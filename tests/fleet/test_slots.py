"""Maintenance slots on the fleet service (issue 22, finding 6): the server decides how many
slots a group has (the claimer's served document, else a fleet setting), caps the TTL, and a
holder has at most one slot. Real service on loopback, over SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from divingbell.fleet.db import Database
from divingbell.fleet.models import Lease
from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import error_of, register

CONCURRENCY_2 = """\
conf:
  maintenance:
    reboot:
      concurrency: 2
"""


@pytest.fixture
def slot_fleet(store_url: str) -> Iterator[ThreadServer]:
    settings = FleetSettings(db_url=store_url, control_plane_size=1)
    with thread_server(settings) as server:
        yield server


def lease_rows(url: str) -> int:
    db = Database(url)
    try:
        with db.read() as session:
            return int(session.scalar(select(func.count()).select_from(Lease)
                                      .where(Lease.kind == "slot")) or 0)
    finally:
        db.dispose()


def test_the_claimer_cannot_raise_its_groups_slot_count(slot_fleet: ThreadServer) -> None:
    a, ca = register(slot_fleet, 1)
    b, cb = register(slot_fleet, 2)
    assert ca.claim_slot(a, "rack9")["slot"] == "rack9/0"
    busy = error_of(lambda: cb.claim_slot(b, "rack9", slots=1000))
    assert busy.status == 409 and busy.detail["error"] == "no-free-slot"
    assert busy.detail["slots"] == 1  # no document: the fleet's default, one per group
    assert [h["holder"] for h in busy.detail["holders"]] == [a]
    assert lease_rows(slot_fleet.settings.db_url) == 1


def test_the_served_documents_concurrency_is_the_slot_count(slot_fleet: ThreadServer) -> None:
    slot_fleet.admin.push_document(CONCURRENCY_2.encode())
    clients = [register(slot_fleet, n) for n in (1, 2, 3)]
    (a, ca), (b, cb), (c, cc) = clients
    assert ca.claim_slot(a, "rack9")["slot"] == "rack9/0"
    assert cb.claim_slot(b, "rack9")["slot"] == "rack9/1"  # 2 from the document
    busy = error_of(lambda: cc.claim_slot(c, "rack9", slots=1000))
    assert busy.status == 409 and busy.detail["slots"] == 2


def test_the_ttl_is_capped_by_the_fleet(slot_fleet: ThreadServer) -> None:
    cap = timedelta(hours=4)  # FleetSettings.slot_ttl_max_seconds, serve --slot-ttl-max
    a, ca = register(slot_fleet, 1)
    held = ca.claim_slot(a, "rack9", ttl_seconds=7 * 86400)
    expires = datetime.fromisoformat(held["expires_at"].replace("Z", "+00:00"))
    assert expires <= datetime.now(UTC) + cap
    renewed = ca.renew_slot("rack9/0", a, 7 * 86400)
    expires = datetime.fromisoformat(renewed["expires_at"].replace("Z", "+00:00"))
    assert expires <= datetime.now(UTC) + cap


def test_a_holder_has_one_slot(slot_fleet: ThreadServer) -> None:
    a, ca = register(slot_fleet, 1)
    first = ca.claim_slot(a, "rack9", slots=1000)
    for _ in range(20):
        assert ca.claim_slot(a, "rack9", slots=1000)["slot"] == first["slot"]
    other = error_of(lambda: ca.claim_slot(a, "rack8"))
    assert other.status == 409 and other.detail["error"] == "holds-another-slot"
    assert other.detail["slot"] == "rack9/0"
    assert lease_rows(slot_fleet.settings.db_url) == 1
    ca.release_slot("rack9/0", a)
    assert ca.claim_slot(a, "rack8")["slot"] == "rack8/0"
