"""Fixtures for the agent on Kubernetes: manifests as `divingbell manifests` prints them."""

from __future__ import annotations

from typing import Any

import pytest

from divingbell.agent.manifests import build


@pytest.fixture
def objects() -> list[dict[str, Any]]:
    return build({"site.yaml": "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n"},
                 namespace="ops", image="registry.example/divingbell:1", max_unavailable="10%")


def kind(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == name]
    return found
