"""Pytest fixtures for the real control plane (tests/kube/controlplane.py), imported by
tests/conftest.py so every test directory can use them. Mark such tests
`@pytest.mark.kube`: `scripts/test -m kube` runs just them.

One control plane per pytest process: under xdist each worker starts its own (two workers,
two control planes of ~500 MB); a namespace per test keeps tests apart inside one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from tests.kube.controlplane import AssetsMissing, ControlPlane, Rest, assets, start

_names = itertools.count()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane. Without binaries it skips, saying how to get them,
    except in CI (`CI=true`), where a missing control plane is a failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the tests act as the kubelet, in network namespaces)")
    try:
        binaries = assets()
    except AssetsMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Kubernetes tests: {missing}")
        pytest.skip(str(missing))
    plane = start(tmp_path_factory.mktemp("kube"), binaries)
    print(f"\nkube control plane ready in {plane.started_in:.1f} s at {plane.server}")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube_kubeconfig(request: pytest.FixtureRequest) -> str:
    """An admin kubeconfig: DIVINGBELL_TEST_KUBECONFIG's cluster when set (tests then use
    names prefixed `dbtest-` and remove what they made), else the session's control plane."""
    named = os.environ.get("DIVINGBELL_TEST_KUBECONFIG")
    if named:
        return named
    plane: ControlPlane = request.getfixturevalue("kube_cluster")
    return str(plane.admin_kubeconfig)


@pytest.fixture
def kube_admin(kube_cluster: ControlPlane) -> Iterator[Rest]:
    admin = kube_cluster.admin()
    yield admin
    admin.close()


@pytest.fixture
def kube_namespace(kube_cluster: ControlPlane, kube_admin: Rest) -> Iterator[str]:
    """A namespace of the test's own, deleted (without waiting) afterwards."""
    name = f"t{os.getpid()}-{next(_names)}"
    kube_admin.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": name}})
    yield name
    kube_admin.request("DELETE", f"/api/v1/namespaces/{name}")
