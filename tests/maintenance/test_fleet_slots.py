"""The slot semaphore on the fleet service: the real service (uvicorn, SQLite) and its
stdlib client, with machine credentials. Same behaviour as the Lease backend, and agents
racing for one slot: exactly one wins."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.fleet.client import FleetClient
from divingbell.fleet.settings import FleetSettings
from divingbell.maintenance import decide
from divingbell.maintenance.slots import ClaimResult, FleetSlots, SlotError
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import facts

from .test_sequence import Node, conf


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ThreadServer]:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    with thread_server(settings) as server:
        yield server


def machine(fleet: ThreadServer, n: int) -> tuple[str, FleetSlots]:
    answer = fleet.bootstrap.discover(facts(n))
    return answer["machine_id"], FleetSlots(FleetClient(fleet.url, answer["credential"]))


def test_claim_renew_release_and_takeover(fleet: ThreadServer) -> None:
    a, slots_a = machine(fleet, 1)
    b, slots_b = machine(fleet, 2)
    first = slots_a.claim("rack1", a, 1, 60)
    assert first.slot is not None and first.slot.name == "rack1/0" and first.slot.holder == a
    assert first.slot.expires_at is not None and first.slot.expires_at > time.time() + 50
    refused = slots_b.claim("rack1", b, 1, 60)
    assert refused.slot is None and [h.holder for h in refused.holders] == [a]
    assert slots_a.renew("rack1/0", a, 60)
    assert not slots_b.renew("rack1/0", b, 60)
    with pytest.raises(SlotError, match="403"):
        slots_b.release("rack1/0", a)  # a machine acts only for itself
    assert slots_a.release("rack1/0", a)
    assert not slots_a.release("rack1/0", a)
    # A holder that stops renewing loses the slot after its TTL.
    assert slots_b.claim("quick", b, 1, 0.5).slot is not None
    while slots_a.claim("quick", a, 1, 60).slot is None:
        time.sleep(0.1)
    assert not slots_b.renew("quick/0", b, 60)
    admin = FleetSlots(fleet.admin)
    assert [(s.name, s.holder) for s in admin.list()] == [("quick/0", a)]
    before = admin.force_release("quick/0")
    assert before is not None and before.holder == a
    assert admin.list() == []


def test_the_takeover_names_the_previous_holder(fleet: ThreadServer) -> None:
    a, slots_a = machine(fleet, 1)
    b, slots_b = machine(fleet, 2)
    slots_b.claim("default", b, 1, 0.2)
    time.sleep(0.3)
    taken = slots_a.claim("default", a, 1, 60)
    assert taken.slot is not None and taken.taken_over_from == b


def test_racing_machines_exactly_one_wins(fleet: ThreadServer) -> None:
    machines = [machine(fleet, n) for n in range(1, 7)]
    barrier = threading.Barrier(len(machines))
    results: dict[str, ClaimResult] = {}

    def agent(ident: str, slots: FleetSlots) -> None:
        barrier.wait()
        results[ident] = slots.claim("default", ident, 1, 60)

    threads = [threading.Thread(target=agent, args=m) for m in machines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [ident for ident, result in results.items() if result.slot is not None]
    assert len(results) == 6 and len(winners) == 1


def watched(fleet: ThreadServer) -> list[str]:
    from sqlalchemy import select

    from divingbell.fleet.db import Database
    from divingbell.fleet.models import RebootWatch

    db = Database(fleet.settings.db_url)
    try:
        with db.read() as session:
            return list(session.scalars(select(RebootWatch.machine_id)))
    finally:
        db.dispose()


def test_a_fleet_host_without_kubernetes_reboots_through_the_sequence(
        fleet: ThreadServer, tmp_path: Path) -> None:
    from .conftest import Clock

    a, slots_a = machine(fleet, 1)
    b, slots_b = machine(fleet, 2)
    clock = Clock(time.time())
    first = Node(a, tmp_path, None, clock, slots_a, holder=a)
    second = Node(b, tmp_path, None, clock, slots_b, holder=b)
    first.needs_reboot()
    second.needs_reboot()
    config = conf()
    assert first.step(config).phase == decide.REBOOTING  # no pods to drain without k8s
    assert watched(fleet) == [a]  # the service was told: it watches the reboot (rescue.py)
    waiting = second.step(config)
    assert waiting.phase == decide.WAITING and f"default/0 by {a}" in waiting.reason
    clock.advance(1)
    assert first.step(config).phase == decide.REBOOTING  # same boot: still rebooting
    assert watched(fleet) == [a]
    first.boot()
    assert first.step(config, converged=False).phase == decide.VERIFYING
    assert watched(fleet) == []  # back: the first pass of the new boot said so
    assert first.step(config, converged=True).phase == decide.IDLE
    assert second.step(config).phase == decide.WAITING  # asked the service a moment ago
    clock.advance(15)
    assert second.step(config).phase == decide.REBOOTING
    assert [s.holder for s in FleetSlots(fleet.admin).list()] == [b]
