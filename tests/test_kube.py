"""The Kubernetes adapter: the real lightkube client against a recording HTTP API server stub
agrees with the fake on every request; generated manifests are valid Kubernetes objects; and
`status --kube` reads the fleet. The adapter also runs against the session's real control
plane (tests/kube/), or the cluster DIVINGBELL_TEST_KUBECONFIG names."""

from __future__ import annotations

import copy
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

from divingbell.kube import EVENTS_PATH, FakeKube, KubeError, LightkubeApi, Request

NODES = {"n1": {"role": "storage"}, "n2": {}}


class ApiStub:
    """Answers the handful of endpoints the adapter uses, like kube-apiserver, and records
    each request as the server received it."""

    def __init__(self) -> None:
        self.received: list[tuple[Request, str]] = []
        self.annotations: dict[str, dict[str, str]] = {n: {} for n in NODES}
        self.labels: dict[str, dict[str, str]] = {n: dict(v) for n, v in NODES.items()}
        self.events: dict[str, dict[str, Any]] = {}
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

            def _not_found(self, what: str) -> None:
                self._reply(404, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Failure", "message": f"{what} not found",
                                  "reason": "NotFound", "code": 404})

            def do_GET(self) -> None:
                path, _ = self._record()
                if path.startswith(EVENTS_PATH + "/"):
                    name = path.removeprefix(EVENTS_PATH + "/")
                    if name in stub.events:
                        self._reply(200, stub.events[name])
                    else:
                        self._not_found(f"events {name!r}")
                elif path == "/api/v1/nodes":
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
                assert body is not None
                if path.startswith(EVENTS_PATH + "/"):
                    name = path.removeprefix(EVENTS_PATH + "/")
                    if name not in stub.events:
                        self._not_found(f"events {name!r}")
                        return
                    stub.events[name].update(body)  # a merge patch of top-level fields
                    self._reply(200, stub.events[name])
                    return
                name = path.removeprefix("/api/v1/nodes/")
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
                name = body["metadata"]["name"]
                if name in stub.events:
                    self._reply(409, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                      "status": "Failure", "reason": "AlreadyExists",
                                      "message": f"events {name!r} already exists",
                                      "code": 409})
                    return
                stub.events[name] = copy.deepcopy(body)
                self._reply(201, body)

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
        api.node_event("n1", "Drift", "sysctl: net.ipv4.ip_forward", warning=True),  # repeat
        [(n.name, n.status) for n in api.nodes()],
    ]


def test_adapter_and_fake_agree_on_what_they_send(stub: ApiStub) -> None:
    now = [1_800_000_000.0]
    def clock() -> float:
        now[0] += 60
        return now[0]

    fake = FakeKube(clock=clock)
    for name, labels in NODES.items():
        fake.add_node(name, labels)
    adapter = LightkubeApi(server=stub.url, clock=clock)
    now[0] = 1_800_000_000.0
    from_adapter = exercise(adapter)
    now[0] = 1_800_000_000.0
    assert from_adapter == exercise(fake)
    assert [request for request, _ in stub.received] == fake.sent
    content_types = {(r.method, r.path.split("/")[3]): ctype for r, ctype in stub.received}
    assert content_types["PATCH", "nodes"] == "application/merge-patch+json"
    assert content_types["PATCH", "namespaces"] == "application/merge-patch+json"
    # Two Events, the repeated one counted: what the API server holds, for both.
    assert sorted((e["reason"], e["count"]) for e in stub.events.values()) == [
        ("Applied", 1), ("Drift", 2)]
    assert sorted((e["reason"], e["count"]) for e in fake.events("n1")) == [
        ("Applied", 1), ("Drift", 2)]
    drift = next(e for e in stub.events.values() if e["reason"] == "Drift")
    assert (drift["firstTimestamp"], drift["lastTimestamp"]) == (
        "2027-01-15T08:02:00Z", "2027-01-15T08:03:00Z")


def test_a_restarted_agent_counts_up_the_event_it_created_before(stub: ApiStub) -> None:
    """A new process knows nothing of the Event: its create is refused (409), so it reads the
    count and raises it, on the wire exactly as the fake does. An expired Event starts anew."""
    def clock() -> float:
        return 1_800_000_000.0

    fake = FakeKube(clock=clock)
    fake.add_node("n1")
    for api in (LightkubeApi(server=stub.url, clock=clock),
                LightkubeApi(server=stub.url, clock=clock)):
        api.node_event("n1", "ConvergeFailed", "sysctl: kernel rejected", warning=True)
    fake.node_event("n1", "ConvergeFailed", "sysctl: kernel rejected", warning=True)
    restarted = FakeKube(clock=clock, node_objects=fake.node_objects,
                         event_objects=fake.event_objects)
    restarted.node_event("n1", "ConvergeFailed", "sysctl: kernel rejected", warning=True)
    assert [r for r, _ in stub.received] == fake.sent + restarted.sent
    assert [r.method for r in restarted.sent] == ["POST", "GET", "PATCH"]
    assert [e["count"] for e in stub.events.values()] == [2]
    assert [e["count"] for e in restarted.events("n1")] == [2]
    restarted.expire_events()
    restarted.node_event("n1", "ConvergeFailed", "sysctl: kernel rejected", warning=True)
    assert [r.method for r in restarted.sent[3:]] == ["PATCH", "POST"]  # 404, then a new one
    assert [e["count"] for e in restarted.events("n1")] == [1]


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


@pytest.mark.kube
def test_adapter_against_a_real_cluster(kube_kubeconfig: str) -> None:
    if not os.environ.get("DIVINGBELL_TEST_KUBECONFIG"):
        from tests.kube.controlplane import Rest
        from tests.kube.kubelet import add_node

        admin = Rest.from_kubeconfig(Path(kube_kubeconfig))
        add_node(admin, "dbtest-adapter")
        admin.close()
    api = LightkubeApi(kube_kubeconfig)
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
