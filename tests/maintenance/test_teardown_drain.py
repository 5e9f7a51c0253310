"""`divingbell bootstrap teardown` drains through the maintenance code: cordon recorded as
divingbell's, evictions that respect budgets, and a clear error naming what blocks."""

from __future__ import annotations

import pytest

from divingbell import maintenance
from divingbell.bootstrap.teardown import find_drainer
from divingbell.kube import FakeKube, FakePod
from tests.maintenance.conftest import Clock, cluster


def test_teardown_finds_the_maintenance_drain() -> None:
    assert find_drainer() is maintenance.drain


def test_a_drain_cordons_and_evicts_what_may_go(clock: Clock) -> None:
    kube = FakeKube(clock=clock)
    kube.add_node("n1")
    kube.add_pod(FakePod("shop", "web-1", "n1", {"app": "web"}, stop_seconds=3))
    kube.add_pod(FakePod("kube-system", "proxy-n1", "n1", {}, owner_kind="DaemonSet"))
    maintenance.drain(kube, "n1", grace_seconds=10, timeout=60, clock=clock,
                      sleep=clock.advance, poll=1.0)
    assert kube.node_state("n1").unschedulable
    assert kube.pod_names() == ["kube-system/proxy-n1"]  # DaemonSet pods are never evicted


def test_a_budget_that_never_allows_it_is_named(clock: Clock) -> None:
    kube = cluster(clock)
    with pytest.raises(maintenance.DrainIncomplete, match=r"shop/web-2.*shop/web"):
        maintenance.drain(kube, "n1", grace_seconds=10, timeout=30, clock=clock,
                          sleep=clock.advance, poll=1.0)
    assert kube.node_state("n1").unschedulable  # left cordoned, for the operator to look at
