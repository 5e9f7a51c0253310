"""The slot semaphore on Kubernetes Leases: exclusive, renewed, released, taken over after the
TTL; and agents racing for one slot, through the fake and through the real client over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from divingbell.kube import FakeKube, LightkubeApi, MaintenanceKube
from divingbell.maintenance.slots import ClaimResult, LeaseSlots, SlotError

from .conftest import Clock
from .kubestub import MaintenanceApiStub

NS = "divingbell"


def test_one_slot_one_holder_until_released(kube: FakeKube, clock: Clock) -> None:
    slots = LeaseSlots(kube, NS, clock)
    first = slots.claim("default", "n1", 1, 60)
    assert first.slot is not None and first.slot.name == "default/0"
    assert first.slot.holder == "n1" and first.slot.expires_at == clock() + 60
    again = slots.claim("default", "n1", 1, 60)  # claiming while holding returns the slot
    assert again.slot is not None and again.slot.name == "default/0"
    refused = slots.claim("default", "n2", 1, 60)
    assert refused.slot is None
    assert [(s.name, s.holder) for s in refused.holders] == [("default/0", "n1")]
    assert not slots.release("default/0", "n2")  # not n2's to release
    assert slots.release("default/0", "n1")
    second = slots.claim("default", "n2", 1, 60)
    assert second.slot is not None and second.slot.holder == "n2"
    assert second.taken_over_from is None


def test_concurrency_and_groups(kube: FakeKube, clock: Clock) -> None:
    slots = LeaseSlots(kube, NS, clock)
    got = [slots.claim("r1", node, 2, 60).slot for node in ("a", "b", "c")]
    assert [s.name if s else None for s in got] == ["r1/0", "r1/1", None]
    other = slots.claim("r2", "c", 2, 60).slot  # another rack has its own semaphore
    assert other is not None and other.name == "r2/0"
    assert sorted((s.name, s.holder) for s in slots.list()) == [
        ("r1/0", "a"), ("r1/1", "b"), ("r2/0", "c")]
    lease = kube.get_lease(NS, "divingbell-slot-r1-0")
    assert lease is not None and lease.duration_seconds == 60


def test_a_holder_that_stops_renewing_loses_its_slot_after_the_ttl(kube: FakeKube,
                                                                   clock: Clock) -> None:
    slots = LeaseSlots(kube, NS, clock)
    assert slots.claim("default", "n1", 1, 30).slot is not None
    clock.advance(20)
    assert slots.renew("default/0", "n1", 30)  # now held until +50
    clock.advance(29.9)
    assert slots.claim("default", "n2", 1, 30).slot is None
    clock.advance(0.1)  # n1 stopped renewing 30 s ago
    taken = slots.claim("default", "n2", 1, 30)
    assert taken.slot is not None and taken.slot.holder == "n2"
    assert taken.taken_over_from == "n1"
    assert not slots.renew("default/0", "n1", 30)  # n1 learns it lost the slot
    assert not slots.release("default/0", "n1")
    lease = kube.get_lease(NS, "divingbell-slot-default-0")
    assert lease is not None and lease.transitions == 1


def test_an_operator_frees_a_stuck_slot(kube: FakeKube, clock: Clock) -> None:
    slots = LeaseSlots(kube, NS, clock)
    slots.claim("default", "dead-node", 1, 3600)
    before = slots.force_release("default/0")
    assert before is not None and before.holder == "dead-node"
    assert slots.claim("default", "n2", 1, 60).slot is not None
    assert slots.force_release("default/7") is None
    with pytest.raises(SlotError, match="GROUP/INDEX"):
        slots.renew("default", "n2", 60)


def race(make_api: Callable[[], MaintenanceKube], clock: Clock, agents: int) -> list[str]:
    """`agents` threads claim the one slot at the same moment; returns the winners."""
    barrier = threading.Barrier(agents)
    results: dict[str, ClaimResult] = {}

    def agent(name: str) -> None:
        slots = LeaseSlots(make_api(), NS, clock)
        barrier.wait()
        results[name] = slots.claim("default", name, 1, 60)

    threads = [threading.Thread(target=agent, args=(f"n{i}",)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == agents
    return sorted(name for name, result in results.items() if result.slot is not None)


@pytest.mark.parametrize("round_", range(5))
def test_racing_agents_through_the_fake_exactly_one_wins(kube: FakeKube, clock: Clock,
                                                         round_: int) -> None:
    winners = race(lambda: kube, clock, 8)
    assert len(winners) == 1
    lease = kube.get_lease(NS, "divingbell-slot-default-0")
    assert lease is not None and [lease.holder] == winners
    # The slot expires; they race again for the takeover (every attempt a PUT with the
    # resourceVersion they read): still exactly one.
    clock.advance(60)
    again = race(lambda: kube, clock, 8)
    assert len(again) == 1


def test_racing_agents_over_http_exactly_one_wins(api_stub: MaintenanceApiStub,
                                                  clock: Clock) -> None:
    winners = race(lambda: LightkubeApi(server=api_stub.url, clock=clock), clock, 6)
    assert len(winners) == 1
    lease = api_stub.backing.get_lease(NS, "divingbell-slot-default-0")
    assert lease is not None and [lease.holder] == winners
    clock.advance(61)
    assert len(race(lambda: LightkubeApi(server=api_stub.url, clock=clock), clock, 6)) == 1
