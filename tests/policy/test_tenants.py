"""The tenant controller against the fake API server (real semantics: 404, 409 AlreadyExists
and Conflict, a CSR signer), with tenant homes on disk and an injected clock."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest

from divingbell.kube import FakeKube, Obj
from divingbell.policy.server import ClusterNamespaces
from divingbell.policy.tenants import Controller
from tests.policy.conftest import namespace
from tests.policy.pki import ScratchCa
from tests.policy.tenantworld import TENANTS, World

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown tenant homes")


@pytest.fixture
def world(tmp_path: Path, ca: ScratchCa) -> Iterator[World]:
    yield World(tmp_path, ca)


def client_cert(world: World, name: str) -> x509.Certificate:
    users = world.kubeconfig(name)["users"]
    data = next(u for u in users if u["name"] == f"{name}@divingbell")["user"]
    return x509.load_pem_x509_certificate(base64.b64decode(data["client-certificate-data"]))


def status(world: World) -> dict[str, Any]:
    configmap = world.cluster.find("ConfigMap", "divingbell-tenants", "divingbell-policy")
    assert configmap is not None
    return {k: json.loads(v) for k, v in configmap["data"].items()}


def writes(cluster: FakeKube) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in cluster.sent if r.method != "GET"]


def metric(controller: Controller, event: str) -> float:
    text = generate_latest(controller.metrics.registry).decode()
    line = next(line for line in text.splitlines()
                if line.startswith(f'divingbell_tenants_accounts_total{{event="{event}"}}'))
    return float(line.split()[-1])


def test_first_run_provisions_every_tenant(world: World) -> None:
    controller = world.controller()
    report = controller.run()
    assert report.ok, report.as_dict()
    alice = world.cluster.find("Namespace", "tool-alice")
    assert alice is not None
    assert alice["metadata"]["labels"] == {"tenancy": "tool", "divingbell.io/tenant": "alice",
                                           "app.kubernetes.io/managed-by": "divingbell-tenants"}
    assert alice["metadata"]["annotations"] == {"RunAsUser": "52001", "RunAsGroup": "52001"}
    bob = world.cluster.find("Namespace", "tool-bob")
    assert bob is not None and bob["metadata"]["annotations"]["RunAsGroup"] == "600"
    quota = world.cluster.find("ResourceQuota", "tenant-quota", "tool-bob")
    assert quota is not None and quota["spec"]["hard"]["pods"] == "50"
    assert quota["spec"]["hard"]["requests.cpu"] == "2"
    limits = world.cluster.find("LimitRange", "tenant-limits", "tool-alice")
    assert limits is not None and limits["spec"]["limits"][0]["max"] == {
        "cpu": "2", "memory": "16Gi"}
    binding = world.cluster.find("RoleBinding", "tenant", "tool-alice")
    assert binding is not None and binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]
    assert binding["roleRef"]["name"] == "divingbell-tenant"
    # carol is disabled: a namespace and quota, but no binding and no credentials
    assert world.cluster.find("RoleBinding", "tenant", "tool-carol") is None
    assert world.cluster.find("Namespace", "tool-carol") is not None
    assert not (world.home("carol") / ".kube").exists()
    # alice's kubeconfig: her certificate, the cluster's CA, her namespace, her file
    config = world.kubeconfig("alice")
    assert config["contexts"][0]["context"]["namespace"] == "tool-alice"
    assert base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]
                            ) == world.ca.pem
    cert = client_cert(world, "alice")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.issuer == world.ca.cert.subject
    assert cert.not_valid_after_utc == world.now[0] + datetime.timedelta(days=365)
    info = (world.home("alice") / ".kube" / "config").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (52001, 0o600)
    assert (world.home("bob") / ".kube" / "config").stat().st_gid == 600
    # the CSR went through the API and was cleaned up
    methods = [(r.method, r.path.split("/")[-1]) for r in world.cluster.sent
               if "certificatesigningrequests" in r.path]
    assert ("PUT", "approval") in methods and methods[-1][0] == "DELETE"
    csr_create = next(r for r in world.cluster.sent if r.method == "POST"
                      and "certificatesigningrequests" in r.path)
    assert csr_create.body is not None
    assert csr_create.body["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client"
    assert status(world)["alice"]["state"] == "active"
    assert status(world)["carol"]["state"] == "disabled"
    assert metric(controller, "created") == 3
    # the webhook reads the same namespaces: alice's pods will run as 52001
    assert ClusterNamespaces(world.cluster).namespace("tool-alice").annotations[
        "RunAsUser"] == "52001"


def test_a_second_run_changes_nothing(world: World) -> None:
    world.controller().run()
    before = (world.home("alice") / ".kube" / "config").read_bytes()
    world.cluster.sent.clear()
    report = world.controller().run()
    assert report.ok
    assert [w for w in writes(world.cluster) if "configmaps" not in w[1]] == []
    assert (world.home("alice") / ".kube" / "config").read_bytes() == before
    assert all(not t.actions for t in report.tenants)


def test_certificates_are_renewed_30_days_before_expiry(world: World) -> None:
    controller = world.controller()
    controller.run()
    first = client_cert(world, "alice")
    world.now[0] += datetime.timedelta(days=365 - 31)
    controller.run()
    assert client_cert(world, "alice").serial_number == first.serial_number
    world.now[0] += datetime.timedelta(days=2)
    report = controller.run()
    renewed = client_cert(world, "alice")
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc == world.now[0] + datetime.timedelta(days=365)
    assert any("renewed client certificate" in a for t in report.tenants for a in t.actions)
    assert metric(controller, "renewed") == 2  # alice and bob
    assert status(world)["alice"]["certificate_expires"] == (
        renewed.not_valid_after_utc.isoformat())


def test_a_kubeconfig_edited_by_the_tenant_keeps_their_entries(world: World) -> None:
    world.controller().run()
    path = world.home("alice") / ".kube" / "config"
    import yaml

    data = yaml.safe_load(path.read_text())
    data["users"].append({"name": "alice-other", "user": {"token": "abc"}})
    data["users"][0]["user"]["client-key-data"] = base64.b64encode(b"garbage").decode()
    path.write_text(yaml.safe_dump(data))
    world.controller().run()  # a key that does not match: a new certificate, tenant's kept
    after = yaml.safe_load(path.read_text())
    assert [u["name"] for u in after["users"]] == ["alice-other", "alice@divingbell"]
    assert client_cert(world, "alice") is not None


def test_disabled_tenants_lose_bindings_and_credentials(world: World) -> None:
    controller = world.controller()
    controller.run()
    assert (world.home("alice") / ".kube" / "config").exists()
    world.write_tenants([{**TENANTS[0], "disabled": True}, *TENANTS[1:]])
    report = controller.run()
    assert report.ok
    assert world.cluster.find("RoleBinding", "tenant", "tool-alice") is None
    assert world.cluster.find("Namespace", "tool-alice") is not None
    assert not (world.home("alice") / ".kube" / "config").exists()
    assert status(world)["alice"]["state"] == "disabled"
    assert metric(controller, "disabled") == 1
    world.write_tenants(TENANTS)  # enabled again: binding and credentials come back
    controller.run()
    assert world.cluster.find("RoleBinding", "tenant", "tool-alice") is not None
    assert (world.home("alice") / ".kube" / "config").exists()


def test_removed_tenants_lose_their_namespace(world: World) -> None:
    controller = world.controller()
    controller.run()
    world.write_tenants([TENANTS[0], TENANTS[2]])
    report = controller.run()
    assert report.ok
    assert world.cluster.find("Namespace", "tool-bob") is None
    assert world.cluster.find("ResourceQuota", "tenant-quota", "tool-bob") is None
    assert not (world.home("bob") / ".kube" / "config").exists()
    assert "bob" not in status(world)
    assert metric(controller, "removed") == 1


def test_removed_tenants_can_keep_their_namespace(world: World) -> None:
    world.settings["removal"] = {"keep_namespace": True}
    controller = world.controller()
    controller.run()
    world.write_tenants([TENANTS[0], TENANTS[2]])
    controller.run()
    bob = world.cluster.find("Namespace", "tool-bob")
    assert bob is not None and bob["metadata"]["labels"]["divingbell.io/tenant-removed"] == "true"
    assert world.cluster.find("RoleBinding", "tenant", "tool-bob") is None
    assert world.cluster.find("ResourceQuota", "tenant-quota", "tool-bob") is not None
    world.cluster.sent.clear()
    controller.run()  # already released: nothing more to do
    assert not [w for w in writes(world.cluster) if "tool-bob" in w[1]]
    world.write_tenants(TENANTS)
    controller.run()
    bob = world.cluster.find("Namespace", "tool-bob")
    assert bob is not None and "divingbell.io/tenant-removed" not in bob["metadata"]["labels"]
    assert world.cluster.find("RoleBinding", "tenant", "tool-bob") is not None


def test_an_emptied_source_removes_nothing_beyond_the_limit(world: World) -> None:
    world.settings["removal"] = {"max_per_run": 2}
    controller = world.controller()
    controller.run()
    world.write_tenants([])
    report = controller.run()
    assert not report.ok and "more than removal.max_per_run=2" in report.errors[0]
    for name in ("alice", "bob", "carol"):
        assert world.cluster.find("Namespace", f"tool-{name}") is not None


def test_an_unreadable_source_changes_nothing(world: World) -> None:
    world.source_file.write_text("tenants:\n  - name: Bad_Name\n    uid: x\n")
    report = world.controller().run()
    assert not report.ok and "nothing was changed" in report.errors[0]
    assert "tenants[0].name" in report.errors[0] and "tenants[0].uid" in report.errors[0]
    assert world.cluster.sent == []


def test_a_foreign_namespace_is_not_taken_over(world: World) -> None:
    world.cluster.put(namespace("tool-alice", {"team": "someone"}))
    report = world.controller().run()
    alice = next(t for t in report.tenants if t.name == "alice")
    assert alice.state == "failed" and "not created by divingbell" in alice.messages[0]
    assert world.cluster.find("RoleBinding", "tenant", "tool-alice") is None
    assert next(t for t in report.tenants if t.name == "bob").state == "active"


def test_an_invalid_kubeconfig_is_reported_and_left_alone(world: World) -> None:
    kube = world.home("alice") / ".kube"
    kube.mkdir()
    os.chown(kube, 52001, 52001)
    (kube / "config").write_text("{{ nope")
    report = world.controller().run()
    alice = next(t for t in report.tenants if t.name == "alice")
    assert alice.state == "failed" and "not a valid kubeconfig" in alice.messages[0]
    assert (kube / "config").read_text() == "{{ nope"
    assert world.cluster.find("RoleBinding", "tenant", "tool-alice") is not None
    assert status(world)["alice"]["state"] == "failed"


class ConcurrentWriter:
    """Another client updates the ResourceQuota between our read and our write, once."""

    def __init__(self, cluster: FakeKube) -> None:
        self.cluster = cluster
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    def replace(self, obj: Obj) -> Obj:
        if obj["kind"] == "ResourceQuota" and not self.raced:
            self.raced = True
            current = self.cluster.find("ResourceQuota", obj["metadata"]["name"],
                                        obj["metadata"]["namespace"])
            assert current is not None
            self.cluster.put({**current, "spec": {"hard": {"pods": "1"}}})
        return self.cluster.replace(obj)


def test_a_concurrent_change_is_a_conflict_and_retried(world: World) -> None:
    world.controller().run()
    world.settings["quota"] = {"pods": "99"}
    racer = ConcurrentWriter(world.cluster)
    report = world.controller(api=racer).run()
    assert racer.raced and report.ok, report.as_dict()
    conflicts = [r for r in world.cluster.sent if r.method == "PUT" and "resourcequotas" in r.path]
    assert len(conflicts) >= 4  # the refused PUT and the retry, then the other tenants
    quota = world.cluster.find("ResourceQuota", "tenant-quota", "tool-alice")
    assert quota is not None and quota["spec"]["hard"]["pods"] == "99"


def test_a_signer_that_never_issues_fails_the_tenant_clearly(world: World) -> None:
    world.cluster.signer = None
    world.settings["credentials"] = {"csr_timeout_seconds": 0.01}
    report = world.controller().run()
    alice = next(t for t in report.tenants if t.name == "alice")
    assert alice.state == "failed" and "no certificate was issued" in alice.messages[0]
    assert not (world.home("alice") / ".kube" / "config").exists()
    assert not [r for r in world.cluster.objects if r[0] == "CertificateSigningRequest"]


def test_local_ca_signing(world: World, tmp_path: Path) -> None:
    tenant_ca = ScratchCa.create("tenant CA")
    (tmp_path / "tenant-ca.crt").write_bytes(tenant_ca.pem)
    key = tmp_path / "tenant-ca.key"
    key.write_bytes(tenant_ca.key_pem())
    world.settings["credentials"] = {"signer": "local-ca", "ca_cert": str(tmp_path / "tenant-ca.crt"),
                                     "ca_key": str(key), "groups": ["tools"],
                                     "validity_days": 90}
    assert world.controller().run().ok
    cert = client_cert(world, "alice")
    assert cert.issuer == tenant_ca.cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "tools"
    assert cert.not_valid_after_utc == world.now[0] + datetime.timedelta(days=90)
    assert not [r for r in world.cluster.sent if "certificatesigningrequests" in r.path]


def test_homes_are_created_when_configured(world: World) -> None:
    world.write_tenants([*TENANTS, {"name": "dave", "uid": 52004}])
    os.rmdir(world.home("dave"))
    report = world.controller().run()
    assert next(t for t in report.tenants if t.name == "dave").state == "failed"
    world.settings["home"] = {"create": True}
    assert world.controller().run().ok
    assert world.home("dave").stat().st_uid == 52004


def test_tenants_sharing_a_uid_are_held_back_not_removed(world: World) -> None:
    controller = world.controller()
    controller.run()
    world.write_tenants([TENANTS[0], {**TENANTS[1], "uid": 52001}, TENANTS[2]])
    report = controller.run()
    assert any("alice, bob: share uid 52001" in s for s in report.skipped)
    assert {t.name for t in report.tenants} == {"carol"}
    assert world.cluster.find("Namespace", "tool-alice") is not None
    assert world.cluster.find("Namespace", "tool-bob") is not None
    held = status(world)["bob"]
    assert held["held"] and held["home"] == str(world.home("bob")) and held["gid"] == 600


def test_the_webhook_pins_pods_to_the_uid_the_controller_set(world: World) -> None:
    """The two parts meet at the namespace annotation: after a run, a pod in bob's namespace
    is mutated to bob's uid and gid; after bob is removed, his pods are refused."""
    from divingbell.policy.config import PolicyConfig
    from divingbell.policy.server import NamespaceCache, Reviewer, parse_review, routes
    from tests.policy.conftest import POLICY
    from tests.policy.reviews import patched, pod, review

    world.controller().run()
    now = [0.0]
    reviewer = Reviewer(routes(PolicyConfig.model_validate(POLICY)),
                        NamespaceCache(ClusterNamespaces(world.cluster), 10, lambda: now[0]))

    def decide(ns: str) -> Any:
        body = review(pod(), namespace=ns)
        return reviewer.decide(reviewer.routes["/mutate/uid"],
                               parse_review(json.dumps(body).encode())), body

    verdict, body = decide("tool-bob")
    response = {"patchType": "JSONPatch",
                "patch": base64.b64encode(json.dumps(list(verdict.patch)).encode()).decode()}
    context = patched(body["request"]["object"], response)["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (52002, 600)
    world.write_tenants([TENANTS[0], TENANTS[2]])
    world.controller().run()
    now[0] += 11
    verdict, _ = decide("tool-bob")
    assert not verdict.allowed and "does not exist" in verdict.message
