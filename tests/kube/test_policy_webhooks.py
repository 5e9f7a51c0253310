"""`divingbell policy serve` behind real Mutating/ValidatingWebhookConfigurations (as
`divingbell policy manifests` writes them, the Service reference replaced by a loopback URL
with the same caBundle): workloads created with kubectl are mutated and refused by the real
API server calling the real webhook process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.policy.config import PolicyConfig
from divingbell.policy.manifests import webhook_configurations
from tests.kube.controlplane import ApiError, ControlPlane, Rest, free_port
from tests.policy.conftest import POLICY
from tests.policy.pki import ScratchCa

pytestmark = pytest.mark.kube
REGISTRY = "docker-registry.tools.example.org"


@pytest.fixture(scope="module")
def webhook(kube_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Rest]:
    directory = tmp_path_factory.mktemp("webhook")
    ca = ScratchCa.create()
    cert, key = ca.server_cert(directory)
    config = directory / "policy.yaml"
    config.write_text(yaml.safe_dump(POLICY))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "divingbell", "policy", "serve", "--config", str(config),
         "--tls-cert", str(cert), "--tls-key", str(key), "--listen", f"127.0.0.1:{port}",
         "--kubeconfig", str(kube_cluster.admin_kubeconfig)],
        stdout=subprocess.DEVNULL, stderr=(directory / "serve.log").open("wb"))
    admin = kube_cluster.admin()
    registered = []
    try:
        for obj in webhook_configurations(PolicyConfig.model_validate(POLICY), "dbtest-policy",
                                          ca.pem):
            for hook in obj["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}",
                                        "caBundle": hook["clientConfig"]["caBundle"]}
            kind = obj["kind"].lower() + "s"
            admin.post(f"/apis/admissionregistration.k8s.io/v1/{kind}", obj)
            registered.append(f"/apis/admissionregistration.k8s.io/v1/{kind}/"
                              f"{obj['metadata']['name']}")
        for name, labels, annotations in (
                ("dbtest-tool-alice", {"tenancy": "tool"}, {"RunAsUser": "52001"}),
                ("dbtest-infra", {"team": "ops"}, {})):
            admin.post("/api/v1/namespaces", {"metadata": {
                "name": name, "labels": labels, "annotations": annotations}})
        _wait_until_serving(admin, server, directory)
        yield admin
    finally:
        for path in registered:
            admin.delete(path)
        for name in ("dbtest-tool-alice", "dbtest-infra"):
            admin.request("DELETE", f"/api/v1/namespaces/{name}")
        server.terminate()
        server.wait(timeout=10)
        admin.close()


def _pod(name: str, image: str, volumes: list[dict[str, Any]] | None = None
         ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": image}],
                     "volumes": volumes or []}}


def _wait_until_serving(admin: Rest, server: subprocess.Popen[bytes], directory: Path) -> None:
    """Until a dry-run create in the tenant namespace comes back mutated by the webhook."""
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, (directory / "serve.log").read_text()
        try:
            pod = admin.request("POST", "/api/v1/namespaces/dbtest-tool-alice/pods",
                                _pod("probe", f"{REGISTRY}/probe:1"), params={"dryRun": "All"})
            if pod["spec"].get("securityContext", {}).get("runAsUser") == 52001:
                return
        except ApiError:
            pass
        assert time.monotonic() < deadline, (directory / "serve.log").read_text()
        time.sleep(0.5)


def _kubectl_create(kube_cluster: ControlPlane, namespace: str, obj: dict[str, Any]
                    ) -> subprocess.CompletedProcess[str]:
    return kube_cluster.kubectl("-n", namespace, "create", "-o", "json", "-f", "-",
                                input_text=json.dumps(obj), check=False)


def test_a_tenant_pod_is_stored_with_its_uid_and_host_mounts(
        kube_cluster: ControlPlane, webhook: Rest) -> None:
    run = _kubectl_create(kube_cluster, "dbtest-tool-alice", _pod("web", f"{REGISTRY}/web:1"))
    assert run.returncode == 0, run.stderr
    stored = webhook.get("/api/v1/namespaces/dbtest-tool-alice/pods/web")
    assert stored["spec"]["securityContext"]["runAsUser"] == 52001
    host_paths = {v["hostPath"]["path"] for v in stored["spec"]["volumes"] if "hostPath" in v}
    assert host_paths == {"/etc/ldap.conf", "/var/run/nslcd/socket"}


def test_other_registries_and_host_paths_are_refused_with_the_webhooks_reason(
        kube_cluster: ControlPlane, webhook: Rest) -> None:
    run = _kubectl_create(kube_cluster, "dbtest-tool-alice", _pod("evil", "docker.io/evil:1"))
    assert run.returncode != 0
    assert "registry.policy.divingbell.io" in run.stderr and "docker.io/evil:1" in run.stderr
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shadow"},
        "spec": {"selector": {"matchLabels": {"app": "shadow"}},
                 "template": {"metadata": {"labels": {"app": "shadow"}},
                              "spec": copy.deepcopy(_pod("x", f"{REGISTRY}/x:1", [
                                  {"name": "s", "hostPath": {"path": "/etc/shadow"}}])["spec"])}}}
    run = _kubectl_create(kube_cluster, "dbtest-tool-alice", deployment)
    assert run.returncode != 0
    assert "hostpath.policy.divingbell.io" in run.stderr and "/etc/shadow" in run.stderr


def test_namespaces_outside_the_selector_are_left_alone(
        kube_cluster: ControlPlane, webhook: Rest) -> None:
    run = _kubectl_create(kube_cluster, "dbtest-infra", _pod("tool", "docker.io/any:1"))
    assert run.returncode == 0, run.stderr
    stored = webhook.get("/api/v1/namespaces/dbtest-infra/pods/tool")
    assert "runAsUser" not in stored["spec"].get("securityContext", {})
    assert os.path.basename(stored["spec"]["containers"][0]["image"]) == "any:1"
