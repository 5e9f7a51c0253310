"""Fixtures for the PKI tests: catalogs on disk and the `openssl` binary that checks results."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CATALOG = """\
certificate_authorities:
  kubernetes:
    description: Certificates for the Kubernetes control plane
    certificates:
      - document_name: apiserver
        common_name: apiserver
        hosts: [localhost, 127.0.0.1, 10.96.0.1, 192.168.77.10]
        kubernetes_service_names: [kubernetes.default.svc.cluster.local]
      - document_name: admin
        common_name: admin
        groups: [system:masters]
keypairs:
  - name: service-account
"""


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG)
    return path


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary (installed by .ci/run)")
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=check)
