"""A tenant world for tests: a fake API server with a CSR signer, tenant homes owned by their
uids, a YAML source file, and a clock the test moves."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from divingbell.kube import FakeKube, ObjectApi
from divingbell.policy.tenant_sources import TenantSource, YamlSource
from divingbell.policy.tenants import Controller, TenantsConfig, make_signer
from tests.policy.pki import NOW, ScratchCa, csr_signer

TENANTS = [
    {"name": "alice", "uid": 52001},
    {"name": "bob", "uid": 52002, "gid": 600, "quota": {"pods": 50}},
    {"name": "carol", "uid": 52003, "disabled": True},
]


@dataclass
class World:
    root: Path
    ca: ScratchCa
    now: list[datetime.datetime] = field(default_factory=lambda: [NOW])
    cluster: FakeKube = field(init=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cluster = FakeKube(signer=csr_signer(self.ca, lambda: self.now[0]),
                                   clock=self.timestamp)
        self.cluster.put({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "divingbell-policy"}})
        (self.root / "home").mkdir(exist_ok=True)
        self.ca_file = self.root / "cluster-ca.crt"
        self.ca_file.write_bytes(self.ca.pem)
        self.source_file = self.root / "tenants.yaml"
        self.write_tenants(TENANTS)

    def timestamp(self) -> float:
        return self.now[0].timestamp()

    def home(self, name: str) -> Path:
        return self.root / "home" / name

    def make_home(self, name: str, uid: int) -> Path:
        home = self.home(name)
        home.mkdir(exist_ok=True)
        os.chown(home, uid, uid)
        return home

    def write_tenants(self, tenants: list[dict[str, Any]]) -> None:
        for tenant in tenants:
            if not self.home(tenant["name"]).exists():
                self.make_home(tenant["name"], tenant["uid"])
        self.source_file.write_text(yaml.safe_dump({"tenants": tenants}))

    def config(self) -> TenantsConfig:
        base: dict[str, Any] = {
            "cluster": {"server": "https://k8s.example:6443", "ca_file": str(self.ca_file)},
            "home": {"pattern": str(self.root / "home" / "{name}")},
            "overrides": {"alice": {"limits": {"max": {"memory": "16Gi"}}}},
        }
        for key, value in self.settings.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return TenantsConfig.model_validate(base)

    def controller(self, source: TenantSource | None = None, api: ObjectApi | None = None
                   ) -> Controller:
        config = self.config()
        api = api if api is not None else self.cluster
        signer = make_signer(config, api, lambda: self.now[0])
        if hasattr(signer, "sleep"):
            signer.sleep = lambda _seconds: None
        return Controller(api, source or YamlSource(self.source_file, config.namespace_prefix),
                          config, signer, lambda: self.now[0])

    def kubeconfig(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load((self.home(name) / ".kube" / "config").read_text())
        return data
