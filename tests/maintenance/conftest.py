"""Fixtures for node maintenance: a settable clock and a FakeKube cluster with workloads."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from divingbell.kube import FakeKube, FakePod

from .kubestub import MaintenanceApiStub


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cluster(clock: Callable[[], float], stop: float = 5.0) -> FakeKube:
    """Two nodes; on n1 a web Deployment's two pods under a budget allowing one disruption,
    a DaemonSet pod, a mirror (static) pod and a finished Job pod."""
    kube = FakeKube(clock=clock)
    kube.add_node("n1", {"divingbell.io/rack": "r1"})
    kube.add_node("n2", {"divingbell.io/rack": "r1"})
    for name in ("web-1", "web-2"):
        kube.add_pod(FakePod("shop", name, "n1", {"app": "web"}, stop_seconds=stop))
    kube.add_pod(FakePod("shop", "web-3", "n2", {"app": "web"}))
    kube.add_pod(FakePod("kube-system", "proxy-n1", "n1", {"app": "proxy"},
                         owner_kind="DaemonSet"))
    kube.add_pod(FakePod("kube-system", "etcd-n1", "n1", {"tier": "control-plane"},
                         owner_kind="Node", mirror=True))
    kube.add_pod(FakePod("batch", "report-1", "n1", {"job": "report"}, owner_kind="Job",
                         phase="Succeeded", ready=False))
    kube.add_budget("shop", "web", {"matchLabels": {"app": "web"}}, min_available=2)
    return kube


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kube(clock: Clock) -> FakeKube:
    return cluster(clock)


@pytest.fixture
def api_stub(clock: Clock) -> Iterator[MaintenanceApiStub]:
    stub = MaintenanceApiStub(cluster(clock))
    yield stub
    stub.server.shutdown()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from .prometheus import prometheus_server

    with prometheus_server(tmp_path_factory.mktemp("prometheus")) as url:
        yield url
