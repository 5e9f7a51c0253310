"""FakeKube's object half (what the tenant controller and the webhook use: namespaces, quotas,
limit ranges, config maps, role bindings, CSRs and their approval) against LightkubeApi: the
same tenant scenario run on the fake directly and through lightkube to an HTTP API server
backed by another fake must send identical requests and reach identical results. Then the
adapter against the session's real control plane (tests/kube/, or the cluster
DIVINGBELL_TEST_KUBECONFIG names), and the fake against it: the same errors (class, code and
reason) and the same tenant reports. The nodes, events and maintenance half of the contract
is tests/kube/test_fake_contract.py."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.kube import FakeKube, KubeError, LightkubeApi, ObjectApi, Request
from divingbell.policy import FIELD_MANAGER
from divingbell.policy.server import ClusterNamespaces, NamespaceNotFound, NamespaceUnavailable
from tests.policy.apistub import ApiStub
from tests.policy.pki import ScratchCa, csr_signer
from tests.policy.tenantworld import TENANTS, World

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown tenant homes")


@pytest.fixture(scope="module")
def ca() -> ScratchCa:
    """The tenants' scratch CA (as tests/policy's fixture)."""
    return ScratchCa.create()


def normalised(requests: list[Request]) -> list[Request]:
    """Requests with the random parts (a fresh key in every CSR) replaced."""
    out = []
    for request in requests:
        body = copy.deepcopy(request.body)
        if body and body.get("kind") == "CertificateSigningRequest":
            body["spec"]["request"] = "<csr>"
        out.append(Request(request.method, request.path, body))
    return out


@pytest.fixture
def stub(ca: ScratchCa, tmp_path: Path) -> Iterator[tuple[ApiStub, World]]:
    world = World(tmp_path, ca)
    backend = FakeKube(signer=csr_signer(ca, lambda: world.now[0]), clock=world.timestamp)
    backend.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "divingbell-policy"}})
    api = ApiStub(backend)
    yield api, world
    api.close()


def reset_homes(world: World) -> None:
    for tenant in TENANTS:
        shutil.rmtree(world.home(str(tenant["name"])) / ".kube", ignore_errors=True)


def scenario(world: World, api: Any) -> list[Any]:
    """Provision, renew, disable one, remove one: every kind of request the controller makes."""
    outcomes = []
    world.write_tenants(TENANTS)
    outcomes.append(world.controller(api=api).run().as_dict())
    world.now[0] = world.now[0].replace(year=world.now[0].year + 1)  # past renewal
    world.write_tenants([{**TENANTS[0], "disabled": True}, {**TENANTS[1], "uid": 52012}])
    outcomes.append(world.controller(api=api).run().as_dict())
    for outcome in outcomes:
        outcome.pop("seconds")
        outcome.pop("source")
    return outcomes


def test_lightkube_and_the_fake_send_the_same_requests(stub: tuple[ApiStub, World]) -> None:
    api, world = stub
    start = world.now[0]
    direct = world.cluster
    expected = scenario(world, direct)
    reset_homes(world)
    world.now[0] = start
    real = LightkubeApi(server=api.url, field_manager=FIELD_MANAGER)
    got = scenario(world, real)
    assert got == expected
    assert normalised(api.received) == normalised(direct.sent)
    assert api.field_managers == {"divingbell-policy"}
    assert {r.method for r in api.received} == {"GET", "POST", "PUT", "PATCH", "DELETE"}
    assert any(r.path.endswith("/approval") for r in api.received)
    assert any("labelSelector=" in r.path for r in api.received)


def test_errors_keep_their_code_and_reason(stub: tuple[ApiStub, World]) -> None:
    api, _ = stub
    real = LightkubeApi(server=api.url, field_manager=FIELD_MANAGER)
    with pytest.raises(KubeError) as caught:
        real.get("Namespace", "nope")
    assert (caught.value.code, caught.value.reason) == (404, "NotFound")
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dup"}}
    real.create(namespace)
    with pytest.raises(KubeError) as caught:
        real.create(namespace)
    assert (caught.value.code, caught.value.reason) == (409, "AlreadyExists")
    current = real.get("Namespace", "dup")
    real.merge_patch("Namespace", "dup", {"metadata": {"labels": {"a": "b"}}})
    with pytest.raises(KubeError) as caught:
        real.replace(current)  # a stale resourceVersion
    assert (caught.value.code, caught.value.reason) == (409, "Conflict")
    with pytest.raises(NamespaceNotFound):
        ClusterNamespaces(real).namespace("nope")
    assert ClusterNamespaces(real).namespace("dup").labels == {"a": "b"}
    with pytest.raises(NamespaceUnavailable, match="cannot reach"):
        unreachable = LightkubeApi(server="http://127.0.0.1:9", field_manager=FIELD_MANAGER)
        ClusterNamespaces(unreachable).namespace("x")


def _kubectl(kubeconfig: Path, *args: str, input_text: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    from tests.kube.controlplane import assets

    return subprocess.run([str(assets() / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
                          capture_output=True, text=True, check=False, timeout=60,
                          input=input_text)


def _as_tenant_controller(kube_kubeconfig: str, tmp_path: Path) -> LightkubeApi:
    """The tenant controller's own credentials: its ServiceAccount's token, with the RBAC
    objects `divingbell policy manifests` ships applied."""
    from divingbell.policy.manifests import tenant_rbac
    from tests.kube.controlplane import Rest, kubeconfig

    namespace = "dbtest-tenants"
    manifests = yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": namespace}}, *tenant_rbac(namespace)])
    applied = _kubectl(Path(kube_kubeconfig), "apply", "-f", "-", input_text=manifests)
    assert applied.returncode == 0, applied.stderr
    admin = Rest.from_kubeconfig(Path(kube_kubeconfig))
    answer = admin.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/divingbell-tenants/token",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 3600}})
    admin.close()
    path = kubeconfig(tmp_path / "tenants-controller.kubeconfig", admin.server, admin.ca,
                      token=answer["status"]["token"])
    return LightkubeApi(str(path), field_manager=FIELD_MANAGER)


@pytest.mark.kube
def test_tenants_against_a_real_cluster(tmp_path: Path, ca: ScratchCa,
                                        kube_kubeconfig: str) -> None:
    """The same provisioning against a real API server: its CSR signer issues the
    certificates. Uses the prefix `dbtest-` and removes what it created."""
    api = LightkubeApi(kube_kubeconfig, field_manager=FIELD_MANAGER)
    world = World(tmp_path, ca)
    world.settings.update({"namespace_prefix": "dbtest-",
                           "status": {"namespace": "default",
                                      "configmap": "divingbell-tenants-test"}})
    cluster = yaml.safe_load(Path(kube_kubeconfig).read_text())["clusters"][0]["cluster"]
    if "certificate-authority" in cluster:
        # The session's own control plane: the controller runs as its ServiceAccount with
        # RBAC as `divingbell policy manifests` ships it, and the kubeconfigs it writes
        # point at this cluster.
        api = _as_tenant_controller(kube_kubeconfig, tmp_path)
        world.settings["cluster"] = {"server": cluster["server"],
                                     "ca_file": cluster["certificate-authority"]}
        world.settings["status"] = {"namespace": "dbtest-tenants",
                                    "configmap": "divingbell-tenants-test"}
    try:
        report = world.controller(api=api).run()
        assert report.ok, report.as_dict()
        assert api.get("RoleBinding", "tenant", "dbtest-alice")["subjects"][0]["name"] == "alice"
        tenant_config = world.home("alice") / ".kube" / "config"
        if "certificate-authority" in cluster:
            whoami = _kubectl(tenant_config, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
            assert whoami.stdout == "alice", whoami.stderr
            assert _kubectl(tenant_config, "-n", "dbtest-alice", "get", "pods").returncode == 0
            refused = _kubectl(tenant_config, "-n", "default", "get", "pods")
            assert refused.returncode != 0 and "forbidden" in refused.stderr, refused.stderr
    finally:
        world.write_tenants([])
        world.settings["removal"] = {"max_per_run": 10}
        world.controller(api=api).run()


@pytest.mark.kube
def test_webhook_namespace_lookups_against_a_real_cluster(kube_kubeconfig: str) -> None:
    """The webhook's decisions with namespaces read from a real API server."""
    import json

    from divingbell.policy.config import PolicyConfig
    from divingbell.policy.server import NamespaceCache, Reviewer, parse_review, routes
    from tests.policy.conftest import POLICY
    from tests.policy.reviews import pod, review

    api = LightkubeApi(kube_kubeconfig, field_manager=FIELD_MANAGER)
    name = "dbtest-webhook"
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"tenancy": "tool"}, "annotations": {"RunAsUser": "52001"}}})
    try:
        reviewer = Reviewer(routes(PolicyConfig.model_validate(POLICY)),
                            NamespaceCache(ClusterNamespaces(api)))
        request = parse_review(json.dumps(review(pod(), namespace=name)).encode())
        verdict = reviewer.decide(reviewer.routes["/mutate/uid"], request)
        assert verdict.allowed and verdict.patch
    finally:
        api.delete("Namespace", name)


def _refusal(action: Callable[[], object]) -> Any:
    try:
        action()
    except KubeError as error:
        return (type(error).__name__, error.code, error.reason)
    return "ok"


def _answers(api: ObjectApi, name: str) -> list[Any]:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    found: list[Any] = [_refusal(lambda: api.get("Namespace", "dbtest-nope")),
                        _refusal(lambda: api.create(namespace)),
                        _refusal(lambda: api.create(namespace))]
    current = api.get("Namespace", name)
    api.merge_patch("Namespace", name, {"metadata": {"labels": {"a": "b"}}})
    found.append(_refusal(lambda: api.replace(current)))
    found.append(ClusterNamespaces(api).namespace(name).labels.get("a"))
    found.append(_refusal(lambda: api.create({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": "dbtest-nope"}})))
    for index, labels in enumerate(({"pick": "yes"}, {"pick": "no"}, {})):
        api.create({"apiVersion": "v1", "kind": "ConfigMap", "data": {"n": str(index)},
                    "metadata": {"name": f"map-{index}", "namespace": name, "labels": labels}})
    found.append([o["data"] for o in api.list("ConfigMap", name, {"pick": "yes"})])
    rbac = "rbac.authorization.k8s.io"
    binding: dict[str, Any] = {
        "apiVersion": f"{rbac}/v1", "kind": "RoleBinding",
        "metadata": {"name": "tenant", "namespace": name},
        "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "view"},
        "subjects": [{"apiGroup": rbac, "kind": "User", "name": "alice"}]}
    stored = api.create(binding)
    found.append(_refusal(lambda: api.replace(
        {**stored, "roleRef": {**binding["roleRef"], "name": "edit"}})))
    api.delete("Namespace", name)
    return found


@pytest.mark.kube
def test_the_fake_cluster_keeps_the_real_servers_codes(kube_kubeconfig: str) -> None:
    """FakeKube's errors, against the real API server's: the same class, code and reason for
    a missing object, an existing name, a stale resourceVersion, a namespace that is not
    there and a RoleBinding whose roleRef changes; label selectors pick the same objects."""
    real = LightkubeApi(kube_kubeconfig, field_manager=FIELD_MANAGER)
    outcomes = [_answers(api, "dbtest-codes") for api in (real, FakeKube())]
    assert outcomes[0] == outcomes[1] == [
        ("KubeNotFound", 404, "NotFound"), "ok", ("KubeConflict", 409, "AlreadyExists"),
        ("KubeConflict", 409, "Conflict"), "b", ("KubeNotFound", 404, "NotFound"),
        [{"n": "0"}], ("KubeError", 422, "Invalid")]


def _wait_until_no_tenant_namespaces(kube_kubeconfig: str) -> None:
    """Tenant namespaces another test removed may still be terminating; the controller would
    report removing them again."""
    from divingbell.policy.tenants import MANAGED_BY, MANAGER

    admin = LightkubeApi(kube_kubeconfig, field_manager=FIELD_MANAGER)
    deadline = time.monotonic() + 60
    while admin.list("Namespace", labels={MANAGED_BY: MANAGER}):
        assert time.monotonic() < deadline, "tenant namespaces still there after 60 s"
        time.sleep(0.5)


def _timeless(reports: list[Any], root: Path) -> list[Any]:
    """Reports without what the real signer decides by its own clock (the scenario moves the
    world's clock a year on; the server's cannot move): certificate expiry dates."""
    text = json.dumps(reports).replace(str(root), "<root>")
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:]+\+00:00", "<time>", text)
    return list(json.loads(re.sub(r"valid until \d{4}-\d\d-\d\d", "valid until <date>", text)))


@pytest.mark.kube
def test_the_fake_cluster_and_the_real_server_agree_on_a_tenant_scenario(
        tmp_path: Path, ca: ScratchCa, kube_kubeconfig: str) -> None:
    """The provision, renew, disable and remove scenario, through lightkube to the real API
    server (as the controller's own ServiceAccount) and on FakeKube: the same reports."""
    cluster = yaml.safe_load(Path(kube_kubeconfig).read_text())["clusters"][0]["cluster"]
    if "certificate-authority" not in cluster:
        pytest.skip("needs the session's own control plane (its controller credentials)")
    _wait_until_no_tenant_namespaces(kube_kubeconfig)
    outcomes = []
    for use_real in (True, False):
        root = tmp_path / ("real" if use_real else "fake")
        root.mkdir()
        world = World(root, ca)
        # A prefix of its own: namespaces another test removed may still be terminating.
        world.settings.update({"namespace_prefix": "dbscenario-",
                               "status": {"namespace": "dbtest-tenants",
                                          "configmap": "divingbell-tenants-scenario"}})
        if use_real:
            api: Any = _as_tenant_controller(kube_kubeconfig, tmp_path)
        else:
            api = world.cluster
            api.put({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "dbtest-tenants"}})
        outcomes.append(_timeless(scenario(world, api), root))
        world.write_tenants([])
        world.settings["removal"] = {"max_per_run": 10}
        world.controller(api=api).run()
    for real_report, fake_report in zip(outcomes[0], outcomes[1], strict=True):
        assert json.dumps(real_report, indent=1) == json.dumps(fake_report, indent=1)
