"""The maintenance calls of the Kubernetes adapter: the real lightkube client (against an HTTP
stub with kube-apiserver's paths and codes) sends exactly the requests the fake records, and
the fake keeps the API server's semantics: 409 on a stale resourceVersion, 429 when an eviction
would break a budget, pods that take time to terminate."""

from __future__ import annotations

from typing import Any

import pytest

from divingbell.kube import (
    EvictionRefused,
    FakeKube,
    KubeConflict,
    KubeError,
    KubeNotFound,
    LeaseView,
    LightkubeApi,
)

from .conftest import Clock, cluster
from .kubestub import MaintenanceApiStub


def attempt(action: Any) -> Any:
    try:
        return action()
    except KubeError as exc:
        return type(exc).__name__


def exercise(api: Any, clock: Clock) -> list[Any]:
    lease = LeaseView("divingbell-slot-default-0", "n1", 60, clock(), clock(),
                      labels={"divingbell.io/slot-group": "default"})
    out: list[Any] = [
        api.node_state("n1"),
        api.patch_node("n1", unschedulable=True,
                       annotations={"divingbell.io/cordoned-by": "divingbell-agent"}),
        api.node_state("n1").unschedulable,
        api.pods_on_node("n1"),
        api.budgets(),
        api.evict("shop", "web-1", 30),
        attempt(lambda: api.evict("shop", "web-2", 30)),  # the budget allows one disruption
        attempt(lambda: api.evict("shop", "gone", 30)),
        api.pods_on_node("n1"),
    ]
    created = api.create_lease("divingbell", lease)
    out += [
        created,
        attempt(lambda: api.create_lease("divingbell", lease)),
        api.replace_lease("divingbell", LeaseView(
            lease.name, "n1", 60, clock(), clock() + 1, 0, created.resource_version)),
        attempt(lambda: api.replace_lease("divingbell", LeaseView(
            lease.name, "n2", 60, clock(), clock(), 1, created.resource_version))),
        api.get_lease("divingbell", lease.name),
        api.get_lease("divingbell", "missing"),
        api.list_leases("divingbell"),
        api.delete_pod("shop", "web-2", 0),
        api.patch_node("n1", unschedulable=False,
                       annotations={"divingbell.io/cordoned-by": None}),
        api.node_state("n1"),
        api.node_states(),
        api.delete_node("n2"),
        attempt(lambda: api.node_state("n2")),
    ]
    return out


def test_adapter_and_fake_send_the_same_maintenance_requests(
        api_stub: MaintenanceApiStub, clock: Clock) -> None:
    fake = cluster(clock)
    adapter = LightkubeApi(server=api_stub.url, clock=clock)
    through_http = exercise(adapter, clock)
    direct = exercise(fake, clock)
    assert through_http == direct
    assert api_stub.received == fake.sent
    assert {r.method for r in fake.sent} == {"GET", "PATCH", "POST", "PUT", "DELETE"}
    assert "EvictionRefused" in direct and "KubeConflict" in direct


def test_a_stale_resource_version_is_a_conflict(kube: FakeKube, clock: Clock) -> None:
    first = kube.create_lease("ns", LeaseView("slot", "a", 30, clock(), clock()))
    with pytest.raises(KubeConflict):
        kube.create_lease("ns", LeaseView("slot", "b", 30, clock(), clock()))
    second = kube.replace_lease("ns", LeaseView("slot", "a", 30, clock(), clock() + 5, 0,
                                                first.resource_version))
    assert second.resource_version != first.resource_version
    with pytest.raises(KubeConflict, match="has been modified"):
        kube.replace_lease("ns", LeaseView("slot", "b", 30, clock(), clock(), 1,
                                           first.resource_version))
    assert kube.get_lease("ns", "slot") == second


def test_evictions_respect_budgets_and_pods_take_time_to_go(kube: FakeKube,
                                                          clock: Clock) -> None:
    kube.add_budget("shop", "web", {"matchLabels": {"app": "web"}}, max_unavailable=1,
                    expected_pods=3)
    kube.evict("shop", "web-1", 30)
    assert "shop/web-1" in kube.pod_names()  # terminating, 5 s to stop
    assert next(p for p in kube.pods_on_node("n1") if p.name == "web-1").deleting
    with pytest.raises(EvictionRefused, match="shop/web"):
        kube.evict("shop", "web-2", 30)  # one is already down
    clock.advance(5)
    assert "shop/web-1" not in kube.pod_names()
    with pytest.raises(EvictionRefused):
        kube.evict("shop", "web-2", 30)  # still one fewer ready pod than the budget wants
    kube.evict("shop", "web-1", 30)  # gone already: nothing to do, no error
    kube.evict("batch", "report-1", 30)  # a finished pod needs no budget
    kube.delete_pod("shop", "web-2", 0)  # force: no budget asked
    assert kube.pod_names() == ["kube-system/etcd-n1", "kube-system/proxy-n1", "shop/web-3"]


def test_two_budgets_on_one_pod_is_an_error(kube: FakeKube) -> None:
    kube.add_budget("shop", "all", {}, max_unavailable="50%")
    with pytest.raises(KubeError, match="more than one PodDisruptionBudget"):
        kube.evict("shop", "web-1", 30)


def test_missing_nodes_are_not_found(kube: FakeKube) -> None:
    with pytest.raises(KubeNotFound):
        kube.patch_node("nope", unschedulable=True)
    with pytest.raises(KubeNotFound):
        kube.delete_node("nope")
