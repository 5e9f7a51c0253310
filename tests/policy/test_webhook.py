"""The admission webhook over real HTTPS on loopback, fed AdmissionReviews shaped like the API
server's; every returned patch is applied with `jsonpatch` and the result validated against
the Kubernetes OpenAPI schema."""

from __future__ import annotations

import copy
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from divingbell.kube import KubeError
from divingbell.policy.admission import image_allowed, pointer, pointer_token
from divingbell.policy.config import PolicyConfig
from tests.policy.conftest import POLICY, RunningWebhook, start_webhook, tenant_cluster
from tests.policy.pki import ScratchCa
from tests.policy.reviews import Webhook, patch_of, patched, pod, review, workload

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REGISTRY = "docker-registry.tools.example.org"
K8S = "1.31"


def valid(obj: dict[str, Any]) -> dict[str, Any]:
    kubernetes_validate.validate(obj, K8S, strict=True)
    return obj


def mutate(webhook: RunningWebhook, obj: dict[str, Any], **kw: Any) -> tuple[dict[str, Any],
                                                                            dict[str, Any]]:
    """The pod after both mutating webhooks, as the API server would chain them."""
    response = webhook.client.post("/mutate/uid", review(obj, **kw))
    assert response["allowed"], response
    after_uid = valid(patched(obj, response))
    second = webhook.client.post("/mutate/automount", review(after_uid, **kw))
    assert second["allowed"], second
    return valid(patched(after_uid, second)), response


# UidEnforcer ----------------------------------------------------------------------------------

def test_pod_gets_the_namespace_uid_everywhere(webhook: RunningWebhook) -> None:
    submitted = valid(pod(init=[{"name": "setup", "image": f"{REGISTRY}/setup:1",
                                 "securityContext": {"runAsUser": 0}}]))
    result, response = mutate(webhook, submitted)
    spec = result["spec"]
    assert spec["securityContext"] == {"runAsUser": 52001, "runAsGroup": 52001,
                                       "fsGroup": 52001, "runAsNonRoot": True}
    for container in spec["containers"] + spec["initContainers"]:
        assert container["securityContext"] == {
            "runAsUser": 52001, "runAsGroup": 52001, "runAsNonRoot": True,
            "allowPrivilegeEscalation": False}
    assert result["metadata"]["annotations"]["policy.divingbell.io/run-as-user"] == "52001"
    # no annotations yet: the map is created whole
    assert {"op": "add", "path": "/metadata/annotations", "value": {
        "policy.divingbell.io/run-as-user": "52001"}} in patch_of(response)


def test_existing_security_context_members_are_replaced_and_others_kept(
        webhook: RunningWebhook) -> None:
    submitted = pod(securityContext={"runAsUser": 0, "supplementalGroups": [52001]},
                    containers=[{"name": "a", "image": f"{REGISTRY}/a",
                                 "securityContext": {"runAsUser": 0, "readOnlyRootFilesystem": True,
                                                     "capabilities": {"drop": ["ALL"]}}}])
    submitted["metadata"]["annotations"] = {"team": "x"}
    result, response = mutate(webhook, submitted)
    # the key holds a '/', escaped as ~1 in the pointer
    assert {"op": "add", "path": "/metadata/annotations/policy.divingbell.io~1run-as-user",
            "value": "52001"} in patch_of(response)
    assert result["spec"]["securityContext"]["supplementalGroups"] == [52001]
    assert result["spec"]["securityContext"]["runAsUser"] == 52001
    context = result["spec"]["containers"][0]["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["runAsUser"] == 52001
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert result["metadata"]["annotations"]["team"] == "x"


def test_run_as_group_annotation_sets_the_group(webhook: RunningWebhook) -> None:
    result, _ = mutate(webhook, pod(), namespace="tool-bob")
    assert result["spec"]["securityContext"]["runAsGroup"] == 600
    assert result["spec"]["securityContext"]["fsGroup"] == 600
    assert result["spec"]["securityContext"]["runAsUser"] == 52002


def test_a_compliant_pod_is_not_patched(webhook: RunningWebhook) -> None:
    once, _ = mutate(webhook, pod())
    response = webhook.client.post("/mutate/uid", review(once))
    assert response["allowed"] and "patch" not in response


@pytest.mark.parametrize(("ns", "expected"), [
    ("tool-noanno", "has no RunAsUser annotation"),
    ("tool-root", "root (0)"),
    ("tool-words", "not a numeric uid"),
    ("tool-gone", "does not exist"),
])
def test_pods_are_refused_where_the_namespace_gives_no_usable_uid(
        webhook: RunningWebhook, ns: str, expected: str) -> None:
    response = webhook.client.post("/mutate/uid", review(pod(), namespace=ns))
    assert not response["allowed"]
    assert response["status"]["code"] == 403
    assert expected in response["status"]["message"]
    if ns == "tool-noanno":
        assert "kubectl annotate namespace tool-noanno RunAsUser=<uid>" in (
            response["status"]["message"])


def test_privileged_containers_are_refused_naming_them(webhook: RunningWebhook) -> None:
    submitted = pod(containers=[
        {"name": "ok", "image": f"{REGISTRY}/a"},
        {"name": "priv", "image": f"{REGISTRY}/a", "securityContext": {"privileged": True}},
        {"name": "admin", "image": f"{REGISTRY}/a",
         "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
        {"name": "every-cap", "image": f"{REGISTRY}/a",
         "securityContext": {"capabilities": {"add": ["NET_RAW", "ALL"]}}}])
    response = webhook.client.post("/mutate/uid", review(submitted))
    message = response["status"]["message"]
    assert not response["allowed"] and "'priv'" in message and "'admin'" in message
    assert "'every-cap'" in message
    assert "'ok'" not in message


def test_namespaces_outside_the_selector_are_untouched(webhook: RunningWebhook) -> None:
    for path in ("/mutate/uid", "/mutate/automount", "/validate/registry",
                 "/validate/hostpath"):
        response = webhook.client.post(path, review(
            pod(containers=[{"name": "a", "image": "quay.io/x"}],
                volumes=[{"name": "r", "hostPath": {"path": "/"}}]), namespace="infra"))
        assert response["allowed"] and "patch" not in response, path


def test_ephemeral_containers_update_patches_only_them(webhook: RunningWebhook) -> None:
    running, _ = mutate(webhook, pod())
    debug = copy.deepcopy(running)
    debug["spec"]["ephemeralContainers"] = [{"name": "debug", "image": f"{REGISTRY}/debug"}]
    response = webhook.client.post("/mutate/uid", review(
        debug, operation="UPDATE", sub_resource="ephemeralcontainers", old=running))
    result = valid(patched(debug, response))
    assert {op["path"].split("/")[2] for op in patch_of(response)} == {"ephemeralContainers"}
    assert result["spec"]["ephemeralContainers"][0]["securityContext"]["runAsUser"] == 52001


def test_namespace_lookups_are_cached_and_failures_refuse(webhook: RunningWebhook) -> None:
    def lookups() -> int:
        return sum(1 for r in webhook.cluster.sent if r.path == "/api/v1/namespaces/tool-alice")

    for _ in range(3):
        webhook.client.post("/mutate/uid", review(pod()))
    assert lookups() == 1
    webhook.now[0] += 11  # past the 10 s cache
    webhook.cluster.fail_next.append(KubeError("cannot reach the API server: boom"))
    response = webhook.client.post("/mutate/uid", review(pod()))
    assert not response["allowed"] and "try again" in response["status"]["message"]
    assert webhook.client.post("/mutate/uid", review(pod()))["allowed"]
    assert lookups() == 3


# HostAutoMounter -----------------------------------------------------------------------------

def test_automount_creates_volumes_and_mounts_when_absent(webhook: RunningWebhook) -> None:
    submitted = pod(init=[{"name": "setup", "image": f"{REGISTRY}/s"}])
    response = webhook.client.post("/mutate/automount", review(submitted))
    result = valid(patched(submitted, response))
    paths = {v["hostPath"]["path"]: v["name"] for v in result["spec"]["volumes"]}
    assert set(paths) == {"/etc/ldap.conf", "/var/run/nslcd/socket"}
    for container in result["spec"]["containers"] + result["spec"]["initContainers"]:
        assert {(m["mountPath"], m["name"], m["readOnly"]) for m in container["volumeMounts"]} == {
            (p, n, True) for p, n in paths.items()}
    assert {op["path"] for op in patch_of(response)} == {
        "/spec/volumes", "/spec/containers/0/volumeMounts", "/spec/initContainers/0/volumeMounts"}


def test_automount_appends_reuses_and_respects_existing_mounts(webhook: RunningWebhook) -> None:
    submitted = pod(
        containers=[
            {"name": "a", "image": f"{REGISTRY}/a",
             "volumeMounts": [{"name": "own-ldap", "mountPath": "/etc/ldap.conf"}]},
            {"name": "b", "image": f"{REGISTRY}/b",
             "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}],
        volumes=[{"name": "own-ldap", "configMap": {"name": "ldap"}},
                 {"name": "scratch", "emptyDir": {}},
                 {"name": "nslcd", "hostPath": {"path": "/var/run/nslcd/socket"}}])
    response = webhook.client.post("/mutate/automount", review(submitted))
    result = valid(patched(submitted, response))
    volumes = result["spec"]["volumes"]
    assert [v["name"] for v in volumes[:3]] == ["own-ldap", "scratch", "nslcd"]
    assert len(volumes) == 4 and volumes[3]["hostPath"] == {"path": "/etc/ldap.conf"}
    first, second = result["spec"]["containers"]
    assert [m["mountPath"] for m in first["volumeMounts"]] == ["/etc/ldap.conf",
                                                               "/var/run/nslcd/socket"]
    assert first["volumeMounts"][1]["name"] == "nslcd"  # the pod's own volume is reused
    assert [m["mountPath"] for m in second["volumeMounts"]] == [
        "/tmp", "/etc/ldap.conf", "/var/run/nslcd/socket"]
    again = webhook.client.post("/mutate/automount", review(result))
    assert "patch" not in again


# RegistryEnforcer -----------------------------------------------------------------------------

BAD = [{"name": "web", "image": "nginx:1.25"},
       {"name": "ok", "image": f"{REGISTRY}/ok:1"},
       {"name": "lookalike", "image": f"{REGISTRY}.evil.example/x:1"}]


@pytest.mark.parametrize("kind", ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
                                  "Job", "CronJob"])
def test_bad_images_are_refused_in_pods_and_every_workload(webhook: RunningWebhook,
                                                           kind: str) -> None:
    init = [{"name": "init", "image": "busybox"}]
    obj = (pod(containers=BAD, init=init) if kind == "Pod"
           else workload(kind, {"containers": BAD, "initContainers": init}))
    valid(obj)
    response = webhook.client.post("/validate/registry", review(obj))
    message = response["status"]["message"]
    assert not response["allowed"] and response["status"]["code"] == 403
    assert "container 'web' uses 'nginx:1.25'" in message
    assert "init container 'init' uses 'busybox'" in message
    assert "'lookalike'" in message and "'ok'" not in message
    assert f"{REGISTRY}/..." in message
    good = json.loads(json.dumps(obj).replace("nginx:1.25", f"{REGISTRY}/nginx:1.25")
                      .replace(f"{REGISTRY}.evil.example", REGISTRY)
                      .replace('"busybox"', f'"{REGISTRY}/busybox"'))
    assert webhook.client.post("/validate/registry", review(good))["allowed"]


def test_an_images_registry_is_read_as_the_runtime_reads_it() -> None:
    # The first component is a registry only with a '.' or ':' or as 'localhost'; otherwise
    # the runtime pulls docker.io/<the whole name>.
    assert not image_allowed("internal/evil:1", ["internal"])
    assert image_allowed("localhost/x:1", ["localhost"])
    assert image_allowed("internal:5000/x", ["internal:5000"])
    assert image_allowed(f"{REGISTRY}/x", [REGISTRY])
    assert not image_allowed(f"{REGISTRY}.evil.example/x", [REGISTRY])


def test_ephemeral_container_images_are_checked(webhook: RunningWebhook) -> None:
    running = pod()
    debug = copy.deepcopy(running)
    debug["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": "docker.io/busybox"}]
    response = webhook.client.post("/validate/registry", review(
        debug, operation="UPDATE", sub_resource="ephemeralcontainers", old=running))
    assert "ephemeral container 'dbg'" in response["status"]["message"]


def test_deletes_and_other_kinds_pass(webhook: RunningWebhook) -> None:
    assert webhook.client.post("/validate/registry",
                               review(None, operation="DELETE", kind="Pod"))["allowed"]


# HostPathEnforcer -----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "allowed"), [
    ("/etc/ldap.conf", True),
    ("/data/project/alice", True),
    ("/data/project/alice/../bob/x", True),
    ("/data/project/../../etc", False),
    ("/data/project", False),
    ("/data/projectx/alice", False),
    ("//etc/ldap.conf", True),
    ("/etc/ldap.conf/../shadow", False),
    ("/", False),
    ("relative/path", False),
])
def test_host_paths_are_compared_after_normalising(webhook: RunningWebhook, path: str,
                                                   allowed: bool) -> None:
    obj = workload("Deployment", {
        "containers": [{"name": "a", "image": f"{REGISTRY}/a"}],
        "volumes": [{"name": "data", "hostPath": {"path": path}}]})
    response = webhook.client.post("/validate/hostpath", review(obj))
    assert response["allowed"] is allowed, response
    if not allowed:
        assert "volume 'data'" in response["status"]["message"]
        assert "/data/project/..." in response["status"]["message"]
    if path == "/data/project/../../etc":
        assert "(= /etc)" in response["status"]["message"]


# The protocol ---------------------------------------------------------------------------------

def test_malformed_objects_are_refused_naming_the_field(webhook: RunningWebhook) -> None:
    obj = pod()
    obj["spec"]["containers"][0]["volumeMounts"] = "oops"
    response = webhook.client.post("/mutate/automount", review(obj))
    assert response["status"]["code"] == 400
    assert "spec.containers[0].volumeMounts: must be a list" in response["status"]["message"]
    obj = pod()
    obj["spec"]["volumes"] = {"a": 1}
    response = webhook.client.post("/validate/hostpath", review(obj))
    assert "spec.volumes: must be a list" in response["status"]["message"]


@pytest.mark.parametrize(("body", "field"), [
    (b"not json", ""),
    (b"[]", ""),
    (b"[" * 200_000 + b"]" * 200_000, ""),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                 "request": {}}).encode(), "apiVersion"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
     "request"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                 "request": {"kind": {"kind": "Pod"}}}).encode(), "request.uid"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                 "request": {"uid": "u", "kind": {"kind": "Pod"}, "object": [1]}}).encode(),
     "request.object"),
])
def test_bad_requests_are_400_with_a_reason(webhook: RunningWebhook, body: bytes,
                                            field: str) -> None:
    status, data = webhook.client.raw("POST", "/mutate/uid", body)
    assert status == 400
    answer = json.loads(data)
    assert answer["error"] and answer.get("field", "") == field


def test_http_errors(webhook: RunningWebhook) -> None:
    status, data = webhook.client.raw("POST", "/validate/nothing", b"{}")
    assert status == 404 and "/validate/registry" in json.loads(data)["error"]
    assert webhook.client.raw("GET", "/mutate/uid")[0] == 405
    assert webhook.client.raw("GET", "/healthz") == (200, b"ok\n")
    status, _ = webhook.client.raw("POST", "/mutate/uid", b"x",
                                   {"Content-Length": str(4 * 1024 * 1024)})
    assert status == 413


def test_metrics_count_reviews_by_policy_and_verdict(webhook: RunningWebhook) -> None:
    webhook.client.post("/mutate/uid", review(pod()))
    webhook.client.post("/mutate/uid", review(pod(), namespace="tool-noanno"))
    webhook.client.post("/validate/registry", review(pod()))
    webhook.client.raw("POST", "/validate/registry", b"{")
    status, data = webhook.client.raw("GET", "/metrics")
    text = data.decode()
    assert status == 200
    assert 'divingbell_policy_reviews_total{policy="uid",verdict="mutated"} 1.0' in text
    assert 'divingbell_policy_reviews_total{policy="uid",verdict="refused"} 1.0' in text
    assert 'divingbell_policy_reviews_total{policy="registry",verdict="allowed"} 1.0' in text
    assert 'divingbell_policy_reviews_total{policy="registry",verdict="bad-request"} 1.0' in text
    assert 'divingbell_policy_review_seconds_count{policy="uid"} 2.0' in text


def test_tls_only_and_certificate_rotation(ca: ScratchCa, tmp_path: Path) -> None:
    cert, key = ca.server_cert(tmp_path, "first")
    running = start_webhook(PolicyConfig.model_validate(POLICY), tenant_cluster(), ca.pem,
                            (cert, key))
    try:
        plain = Webhook(running.server.port, None)
        with pytest.raises((ConnectionError, OSError)):
            plain.raw("GET", "/healthz")
        first = running.client.connection
        assert running.client.raw("GET", "/healthz")[0] == 200
        serial_before = _peer_serial(first)
        new_cert, new_key = ca.server_cert(tmp_path, "second")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        import os
        os.utime(cert, (1, 2_000_000_000))
        running.server.tls._checked = 0.0  # type: ignore[union-attr]
        fresh = Webhook(running.server.port, ca.pem)
        assert fresh.raw("GET", "/healthz")[0] == 200
        assert _peer_serial(fresh.connection) != serial_before
        fresh.close()
    finally:
        running.client.close()
        running.server.shutdown()
        running.server.server_close()


def _peer_serial(connection: Any) -> int:
    from cryptography import x509

    sock = connection.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_json_pointer_escaping() -> None:
    assert pointer_token("a/b~c") == "a~1b~0c"
    assert pointer("metadata", "annotations", "policy.divingbell.io/x") == (
        "/metadata/annotations/policy.divingbell.io~1x")
    assert pointer("spec", "containers", 0, "volumeMounts", "-") == (
        "/spec/containers/0/volumeMounts/-")
    # ~01 must decode to ~1, not to /: the order of the two replacements matters
    assert pointer_token("~1") == "~01"


def test_host_namespaces_are_refused(webhook: RunningWebhook) -> None:
    response = webhook.client.post("/mutate/uid", review(pod(hostPID=True, hostNetwork=True)))
    assert not response["allowed"]
    assert "remove hostNetwork, hostPID" in response["status"]["message"]
    assert webhook.client.post("/mutate/uid", review(pod(hostNetwork=False)))["allowed"]


def test_other_groups_are_refused(webhook: RunningWebhook) -> None:
    response = webhook.client.post("/mutate/uid", review(
        pod(securityContext={"supplementalGroups": [52001, 52002]})))
    assert not response["allowed"]
    assert "remove supplementalGroups [52002]" in response["status"]["message"]
    own = pod(securityContext={"supplementalGroups": [52001]})
    assert webhook.client.post("/mutate/uid", review(own))["allowed"]


def test_a_stalled_client_does_not_stall_the_server(webhook: RunningWebhook) -> None:
    """The TLS handshake runs in the connection's thread: a client that connects and says
    nothing (or speaks plain HTTP) holds only its own thread."""
    import socket

    silent = socket.create_connection(("127.0.0.1", webhook.server.port))
    plain = socket.create_connection(("127.0.0.1", webhook.server.port))
    plain.sendall(b"POST /mutate/uid HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert webhook.client.post("/mutate/uid", review(pod()))["allowed"]
        assert webhook.client.raw("GET", "/healthz")[0] == 200
    finally:
        silent.close()
        plain.close()


def test_a_review_without_content_length_is_411(webhook: RunningWebhook, ca: ScratchCa) -> None:
    import socket

    context = ssl.create_default_context(cadata=ca.pem.decode())
    with socket.create_connection(("127.0.0.1", webhook.server.port)) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /mutate/uid HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = tls.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 411") and "Content-Length" in answer
