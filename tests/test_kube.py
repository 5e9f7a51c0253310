"""The Kubernetes adapter: the real lightkube client against a recording HTTP API server stub
agrees with the fake on every request; generated manifests are valid Kubernetes objects; and
`status --kube` reads the fleet. With DIVINGBELL_TEST_KUBECONFIG set, the adapter also runs
against that real cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.kube import FakeKube, KubeError, LightkubeApi, Request
from divingbell.manifests import build, parse_max_unavailable

NODES = {"n1": {"role": "storage"}, "n2": {}}


class ApiStub:
    """Answers the handful of endpoints the adapter uses, like kube-apiserver, and records
    each request as the server received it."""

    def __init__(self) -> None:
        self.received: list[tuple[Request, str]] = []
        self.annotations: dict[str, dict[str, str]] = {n: {} for n in NODES}
        self.labels: dict[str, dict[str, str]] = {n: dict(v) for n, v in NODES.items()}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> tuple[str, dict[str, Any] | None]:
                path = self.path.split("?", 1)[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stub.received.append((Request(self.command, path, body),
                                      self.headers.get("Content-Type", "")))
                return path, body

            def do_GET(self) -> None:
                path, _ = self._record()
                if path == "/api/v1/nodes":
                    self._reply(200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {},
                                      "items": [stub.node(n) for n in NODES]})
                elif path.removeprefix("/api/v1/nodes/") in NODES:
                    self._reply(200, stub.node(path.removeprefix("/api/v1/nodes/")))
                else:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                      "status": "Failure", "message": "nodes not found",
                                      "reason": "NotFound", "code": 404})

            def do_PATCH(self) -> None:
                path, body = self._record()
                name = path.removeprefix("/api/v1/nodes/")
                assert body is not None
                # A JSON merge patch: null removes a key.
                for kind, store in (("annotations", stub.annotations), ("labels", stub.labels)):
                    for key, value in (body["metadata"].get(kind) or {}).items():
                        if value is None:
                            store[name].pop(key, None)
                        else:
                            store[name][key] = value
                self._reply(200, stub.node(name))

            def do_POST(self) -> None:
                _, body = self._record()
                assert body is not None
                self._reply(201, {**body, "metadata": {**body["metadata"], "name": "ev1"}})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def node(self, name: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": self.labels[name],
                             "annotations": self.annotations[name]}}


@pytest.fixture
def stub() -> Iterator[ApiStub]:
    api = ApiStub()
    yield api
    api.server.shutdown()


def exercise(api: Any) -> list[Any]:
    return [
        api.node_labels("n1"),
        api.annotate_node("n1", {"state": "Done", "revision": "abc", "reason": "ok"}),
        api.node_event("n1", "Applied", "revision abc: sysctl 2"),
        api.node_event("n1", "Drift", "sysctl: net.ipv4.ip_forward", warning=True),
        [(n.name, n.status) for n in api.nodes()],
    ]


def test_adapter_and_fake_agree_on_what_they_send(stub: ApiStub) -> None:
    clock = lambda: 1_800_000_000.0  # noqa: E731
    fake = FakeKube(clock=clock)
    for name, labels in NODES.items():
        fake.add_node(name, labels)
    adapter = LightkubeApi(server=stub.url, clock=clock)
    assert exercise(adapter) == exercise(fake)
    assert [request for request, _ in stub.received] == fake.sent
    content_types = {r.method: ctype for r, ctype in stub.received}
    assert content_types["PATCH"] == "application/merge-patch+json"


def exercise_labels(api: Any) -> list[Any]:
    return [
        api.node("n1"),
        api.patch_node("n1", labels={"rack": "r1", "role": None},
                       annotations={"divingbell.io/bootstrap-labels": "rack"}),
        api.patch_node("n2", labels={"topology.kubernetes.io/zone": "a"}, annotations={}),
        api.node("n2"),
    ]


def test_adapter_and_fake_agree_on_label_patches(stub: ApiStub) -> None:
    fake = FakeKube()
    for name, labels in NODES.items():
        fake.add_node(name, labels)
    adapter = LightkubeApi(server=stub.url)
    results = exercise_labels(adapter)
    assert results == exercise_labels(fake)
    assert results[1].labels == {"rack": "r1"}, "role removed by the null in the merge patch"
    assert [request for request, _ in stub.received] == fake.sent
    assert {ctype for r, ctype in stub.received if r.method == "PATCH"} == {
        "application/merge-patch+json"}


def test_adapter_errors_are_clear(stub: ApiStub) -> None:
    adapter = LightkubeApi(server=stub.url)
    with pytest.raises(KubeError, match="404"):
        adapter.node_labels("missing")
    with pytest.raises(KubeError, match="cannot reach the API server"):
        LightkubeApi(server="http://127.0.0.1:9").node_labels("n1")


@pytest.mark.skipif(not os.environ.get("DIVINGBELL_TEST_KUBECONFIG"),
                    reason="set DIVINGBELL_TEST_KUBECONFIG to run against a real cluster")
def test_adapter_against_a_real_cluster() -> None:
    api = LightkubeApi(os.environ["DIVINGBELL_TEST_KUBECONFIG"])
    node = api.nodes()[0].name
    assert isinstance(api.node_labels(node), dict)
    api.annotate_node(node, {"test": "divingbell-adapter-test"})
    assert next(n for n in api.nodes() if n.name == node).status["test"] == (
        "divingbell-adapter-test")
    api.node_event(node, "AdapterTest", "divingbell adapter test")


def test_status_kube_lists_the_fleet(stub: ApiStub, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": stub.url}}],
        "users": [{"name": "stub", "user": {}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}]}))
    stub.annotations["n1"] = {"divingbell.io/state": "Degraded",
                              "divingbell.io/revision": "abc123",
                              "divingbell.io/reason": "sysctl: kernel rejected"}
    run = subprocess.run([sys.executable, "-m", "divingbell", "status", "--kube",
                          "--kubeconfig", str(kubeconfig)], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 1, run.stderr  # a degraded node makes it fail, for scripts
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["NODE", "REVISION", "STATE", "REASON"]
    assert lines[1].split()[:3] == ["n1", "abc123", "Degraded"]
    assert lines[2].split() == ["n2", "(no", "agent)"]
    assert lines[-1] == "2 node(s), 1 degraded."


# Manifests ----------------------------------------------------------------------------------

def test_manifests_are_valid_kubernetes_objects() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = build({"site.yaml": "conf: {}\n"}, namespace="ops", image="r.example/db:1",
                    max_unavailable="10%")
    kinds = [o["kind"] for o in objects]
    assert kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                     "ConfigMap", "DaemonSet"]
    for obj in objects:
        kubernetes_validate.validate(obj, "1.31", strict=True)


def test_daemonset_rolls_on_document_change_and_gates_on_readiness() -> None:
    first = build({"site.yaml": "conf: {}\n"})[-1]
    second = build({"site.yaml": "conf: {sysctl: {vm.swappiness: 1}}\n"})[-1]
    def digest(ds: dict[str, Any]) -> str:
        return str(ds["spec"]["template"]["metadata"]["annotations"][
            "divingbell.io/document-digest"])

    assert digest(first) != digest(second)
    spec = first["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"][:2] == ["agent", "/etc/divingbell/site.yaml"]
    assert {"name": "host", "mountPath": "/host",
            "mountPropagation": "HostToContainer"} in container["volumeMounts"]
    assert spec["hostPID"] and spec["hostNetwork"] and spec["tolerations"] == [
        {"operator": "Exists"}]
    assert first["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1


def test_rbac_is_least_privilege() -> None:
    role = next(o for o in build({"a.yaml": ""}) if o["kind"] == "ClusterRole")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == {("nodes", "get"), ("nodes", "list"), ("nodes", "watch"),
                       ("nodes", "patch"), ("events", "create"), ("events", "patch")}


def test_manifests_command_validates_first_and_prints_yaml(tmp_path: Path) -> None:
    good = tmp_path / "site.yaml"
    good.write_text("conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n")
    run = subprocess.run([sys.executable, "-m", "divingbell", "manifests", str(good),
                          "--max-unavailable", "25%"], capture_output=True, text=True,
                         check=True)
    docs = list(yaml.safe_load_all(run.stdout))
    assert docs[-1]["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "25%"
    assert docs[4]["data"]["site.yaml"] == good.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("conf:\n  sysctl: 3\n")
    run = subprocess.run([sys.executable, "-m", "divingbell", "manifests", str(bad)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "nothing was changed" in run.stderr and run.stdout == ""
    with pytest.raises(ValueError):
        parse_max_unavailable("0")
