"""Fixtures for the policy part: a CA and serving certificate made here, a fake API server
holding tenant namespaces, and the real webhook on loopback HTTPS."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from divingbell.kube import FakeKube
from divingbell.policy.config import PolicyConfig
from divingbell.policy.server import AdmissionServer, ClusterNamespaces, make_server
from tests.policy.pki import ScratchCa
from tests.policy.reviews import Webhook

POLICY: dict[str, Any] = {
    "uid_enforcer": {"enabled": True},
    "registry_enforcer": {"enabled": True, "registries": ["docker-registry.tools.example.org"]},
    "host_path_enforcer": {
        "enabled": True,
        "paths": ["/etc/ldap.conf", "/var/run/nslcd/socket"],
        "prefixes": ["/data/project/", "/data/scratch/", "/public/dumps/"],
    },
    "host_auto_mounter": {"enabled": True, "paths": ["/etc/ldap.conf", "/var/run/nslcd/socket"]},
    "namespace_selector": {"matchLabels": {"tenancy": "tool"}},
}


def namespace(name: str, labels: dict[str, str] | None = None,
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}}


def tenant_cluster() -> FakeKube:
    cluster = FakeKube()
    tool = {"tenancy": "tool"}
    cluster.put(namespace("tool-alice", tool, {"RunAsUser": "52001"}))
    cluster.put(namespace("tool-bob", tool, {"RunAsUser": "52002", "RunAsGroup": "600"}))
    cluster.put(namespace("tool-noanno", tool))
    cluster.put(namespace("tool-root", tool, {"RunAsUser": "0"}))
    cluster.put(namespace("tool-words", tool, {"RunAsUser": "alice"}))
    cluster.put(namespace("infra", {"team": "ops"}))
    return cluster


@pytest.fixture(scope="session")
def ca() -> ScratchCa:
    return ScratchCa.create()


@pytest.fixture(scope="session")
def tls_files(ca: ScratchCa, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ca.server_cert(tmp_path_factory.mktemp("tls"))


@dataclass
class RunningWebhook:
    server: AdmissionServer
    cluster: FakeKube
    client: Webhook
    now: list[float]


def start_webhook(config: PolicyConfig, cluster: FakeKube, ca_pem: bytes | None,
                  tls: tuple[Path, Path] | None) -> RunningWebhook:
    now = [1000.0]
    server = make_server(config, ClusterNamespaces(cluster), cert=tls[0] if tls else None,
                         key=tls[1] if tls else None, host="127.0.0.1", port=0,
                         clock=lambda: now[0])
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return RunningWebhook(server, cluster, Webhook(server.port, ca_pem), now)


@pytest.fixture
def webhook(ca: ScratchCa, tls_files: tuple[Path, Path]) -> Iterator[RunningWebhook]:
    running = start_webhook(PolicyConfig.model_validate(POLICY), tenant_cluster(), ca.pem,
                            tls_files)
    yield running
    running.client.close()
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.policy import slapd as slapd_server

    why = slapd_server.available()
    if why:
        pytest.skip(why)
    server = slapd_server.start(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()
