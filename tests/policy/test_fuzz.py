"""Random pod specs through the live webhook: never a 500, never a patch that fails to apply
or yields an object the Kubernetes schema rejects (for inputs the schema accepts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from divingbell.policy.config import PolicyConfig
from tests.policy.conftest import POLICY, RunningWebhook, start_webhook, tenant_cluster
from tests.policy.pki import ScratchCa
from tests.policy.reviews import patched, review

kubernetes_validate = pytest.importorskip("kubernetes_validate")

names = st.from_regex(r"\A[a-z][a-z0-9-]{0,8}\Z")
paths = st.sampled_from(["/etc/ldap.conf", "/var/run/nslcd/socket", "/data/project/x",
                         "/tmp", "/etc", "/data/project/../../etc", "/var/run/nslcd/socket/",
                         "/x/y~z", "/a/b/c"])
images = st.sampled_from(["docker-registry.tools.example.org/a:1", "nginx", "busybox:1",
                          "docker-registry.tools.example.org.evil/b", ""])
security = st.fixed_dictionaries({}, optional={
    "runAsUser": st.integers(0, 70000), "runAsNonRoot": st.booleans(),
    "allowPrivilegeEscalation": st.booleans(), "privileged": st.booleans(),
    "readOnlyRootFilesystem": st.booleans(), "runAsGroup": st.integers(0, 70000),
    "capabilities": st.fixed_dictionaries({}, optional={
        "add": st.lists(st.sampled_from(["NET_ADMIN", "SYS_ADMIN", "CAP_SYS_ADMIN"]),
                        max_size=2)})})
mounts = st.lists(st.fixed_dictionaries({"name": names, "mountPath": paths},
                                        optional={"readOnly": st.booleans()}), max_size=3)


def container() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"name": names, "image": images}, optional={
        "securityContext": st.one_of(security, st.none()), "volumeMounts": mounts})


volume = st.one_of(
    st.fixed_dictionaries({"name": names, "hostPath": st.fixed_dictionaries({"path": paths})}),
    st.fixed_dictionaries({"name": names, "emptyDir": st.just({})}))

specs = st.fixed_dictionaries(
    {"containers": st.lists(container(), min_size=1, max_size=3)},
    optional={"initContainers": st.lists(container(), max_size=2),
              "volumes": st.lists(volume, max_size=3),
              "securityContext": st.one_of(security.map(
                  lambda s: {k: v for k, v in s.items()
                             if k in ("runAsUser", "runAsNonRoot", "runAsGroup")}), st.none())})

# Shapes the API server would never send: must still get an answer, never a 500.
garbage = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["containers", "volumes", "name",
                                                          "image", "securityContext",
                                                          "volumeMounts", "hostPath", "path"]),
                                         inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def live(ca: ScratchCa, tls_files: Any) -> Iterator[RunningWebhook]:
    running = start_webhook(PolicyConfig.model_validate(POLICY), tenant_cluster(), ca.pem,
                            tls_files)
    yield running
    running.client.close()
    running.server.shutdown()
    running.server.server_close()


def pod_of(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "tool-alice"}, "spec": spec}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, namespace=st.sampled_from(["tool-alice", "tool-bob", "tool-noanno", "infra"]))
def test_random_pods_get_applicable_valid_patches(live: RunningWebhook, spec: dict[str, Any],
                                                  namespace: str) -> None:
    obj = pod_of(spec)
    try:
        kubernetes_validate.validate(obj, "1.31", strict=True)
        schema_valid = True
    except kubernetes_validate.ValidationError:
        schema_valid = False
    for path in ("/mutate/uid", "/mutate/automount", "/validate/registry", "/validate/hostpath"):
        response = live.client.post(path, review(obj, namespace=namespace))
        if not response["allowed"]:
            assert response["status"]["code"] in (400, 403)
            assert "internal error" not in response["status"]["message"]
            continue
        result = patched(obj, response)  # raises if any operation does not apply
        if schema_valid:
            kubernetes_validate.validate(result, "1.31", strict=True)
        if path.startswith("/mutate") and "patch" in response:
            again = live.client.post(path, review(result, namespace=namespace))
            assert "patch" not in again, "a second pass must find nothing to change"


@settings(max_examples=80, deadline=None)
@given(spec=garbage, kind=st.sampled_from(["Pod", "Deployment", "CronJob"]))
def test_garbage_objects_never_break_the_server(live: RunningWebhook, spec: Any,
                                                kind: str) -> None:
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "g"}, "spec": spec}
    for path in ("/mutate/uid", "/mutate/automount", "/validate/registry", "/validate/hostpath"):
        response = live.client.post(path, review(obj, kind=kind))
        if not response["allowed"]:
            assert "internal error" not in response["status"]["message"], json.dumps(obj)
        else:
            patched(obj, response)
