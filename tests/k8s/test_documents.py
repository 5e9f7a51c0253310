"""`divingbell documents`: which document Secrets the DaemonSet can still go back to, and
pruning the rest. The cluster is what `kubectl apply` of three document versions leaves: three
Secrets, the DaemonSet on the third, and the ControllerRevisions the DaemonSet controller keeps
(the first already dropped by revisionHistoryLimit). The real adapter (lightkube, over HTTP to
a stub serving those objects) and the fake send the same requests and agree."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from divingbell.agent.manifests import build
from divingbell.kube import FakeKube, KubeError, LightkubeApi, Request

NS = "ops"


def cluster_objects() -> list[dict[str, Any]]:
    """Three documents applied in turn; revisions 2 and 3 kept."""
    objects: list[dict[str, Any]] = []
    for version in (1, 2, 3):
        built = build({"site.yaml": f"conf:\n  sysctl:\n    vm.swappiness: {version}\n"},
                      namespace=NS)
        secret = copy.deepcopy(next(o for o in built if o["kind"] == "Secret"))
        secret["metadata"]["creationTimestamp"] = f"2026-11-0{version}T10:00:00Z"
        secret["data"] = {"site.yaml": ""}
        daemonset = next(o for o in built if o["kind"] == "DaemonSet")
        objects.append(secret)
        if version > 1:
            objects.append({
                "apiVersion": "apps/v1", "kind": "ControllerRevision", "revision": version,
                "metadata": {"name": f"divingbell-{version}abc", "namespace": NS,
                             "ownerReferences": [{"apiVersion": "apps/v1",
                                                  "kind": "DaemonSet", "name": "divingbell",
                                                  "uid": "u1", "controller": True}]},
                "data": {"spec": {"template": {**daemonset["spec"]["template"],
                                               "$patch": "replace"}}}})
    objects.append(daemonset)
    # Someone else's revision in the namespace is never counted.
    objects.append({"apiVersion": "apps/v1", "kind": "ControllerRevision", "revision": 1,
                    "metadata": {"name": "other-1", "namespace": NS, "ownerReferences": [
                        {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "other",
                         "uid": "u2"}]},
                    "data": {"spec": {"template": {"spec": {"volumes": [
                        {"name": "document", "secret": {"secretName": secrets()[0]}}]}}}}})
    return objects


def secrets() -> list[str]:
    return [next(o for o in build({"site.yaml": f"conf:\n  sysctl:\n    vm.swappiness: {v}\n"},
                                  namespace=NS) if o["kind"] == "Secret")["metadata"]["name"]
            for v in (1, 2, 3)]


class ObjectsStub:
    """The API server's list/get/delete for the stored objects; records each request with its
    label selector (the rest of a query, like fieldManager, is not part of the contract)."""

    PLURAL: ClassVar[dict[str, tuple[str, str]]] = {
        "Secret": ("/api/v1", "secrets"), "DaemonSet": ("/apis/apps/v1", "daemonsets"),
              "ControllerRevision": ("/apis/apps/v1", "controllerrevisions")}

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = {self.path_of(o): o for o in objects}
        self.received: list[Request] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _path(self) -> tuple[str, str]:
                path, _, query = self.path.partition("?")
                selector = urllib.parse.parse_qs(query).get("labelSelector", [""])[0]
                shown = path + ("?labelSelector=" + urllib.parse.quote(selector, safe="")
                                if selector else "")
                stub.received.append(Request(self.command, shown))
                return path, selector

            def do_GET(self) -> None:
                path, selector = self._path()
                if path in stub.objects:
                    self._reply(200, stub.objects[path])
                    return
                items = [o for p, o in sorted(stub.objects.items())
                         if p.rsplit("/", 1)[0] == path and stub.selected(o, selector)]
                if items or path.endswith(("/secrets", "/controllerrevisions")):
                    self._reply(200, {"apiVersion": "v1", "kind": "List", "metadata": {},
                                      "items": items})
                else:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                      "status": "Failure", "reason": "NotFound",
                                      "message": f"{path} not found", "code": 404})

            def do_DELETE(self) -> None:
                path, _ = self._path()
                stub.objects.pop(path)
                self._reply(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Success"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def path_of(self, obj: dict[str, Any]) -> str:
        prefix, plural = self.PLURAL[obj["kind"]]
        meta = obj["metadata"]
        return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"

    @staticmethod
    def selected(obj: dict[str, Any], selector: str) -> bool:
        if not selector:
            return True
        key, _, value = selector.partition("=")
        return bool(obj["metadata"].get("labels", {}).get(key) == value)


@pytest.fixture
def stub() -> Iterator[ObjectsStub]:
    api = ObjectsStub(cluster_objects())
    yield api
    api.server.shutdown()


def test_what_each_document_secret_is_used_by_and_pruning(stub: ObjectsStub) -> None:
    fake = FakeKube()
    for obj in cluster_objects():
        fake.put(obj)
    adapter = LightkubeApi(server=stub.url)
    first, second, third = secrets()
    for api in (adapter, fake):
        found = api.document_secrets(NS, "divingbell")
        assert [(s.name, s.used_by) for s in found] == [
            (first, ()), (second, ("revision 2",)), (third, ("current", "revision 3"))]
        assert found[0].digest and first.endswith(found[0].digest)
        api.delete_secret(NS, first)
    assert stub.received == fake.sent
    assert [r.method for r in fake.sent] == ["GET", "GET", "GET", "DELETE"]
    assert "labelSelector=divingbell.io%2Fdocument%3Dtrue" in fake.sent[0].path
    assert [s.name for s in fake.document_secrets(NS, "divingbell")] == [second, third]
    with pytest.raises(KubeError, match="404"):
        fake.document_secrets("elsewhere", "divingbell")


def test_the_documents_command_lists_and_prunes(stub: ObjectsStub, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": stub.url}}],
        "users": [{"name": "stub", "user": {}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}]}))

    def documents(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "divingbell", "documents", "--namespace",
                               NS, "--kubeconfig", str(kubeconfig), *args],
                              capture_output=True, text=True, check=False)

    first, second, third = secrets()
    run = documents()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DIGEST", "CREATED", "USED", "BY"]
    assert lines[1].split()[0] == first and lines[1].split()[-1] == "-"
    assert lines[3].endswith("current, revision 3")
    assert lines[-1] == "3 document Secret(s), 1 unused (divingbell documents --prune deletes them)."
    run = documents("--prune", "--format", "json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [(d["name"], d["deleted"]) for d in report["documents"]] == [
        (first, True), (second, False), (third, False)]
    assert [s for s in secrets() if f"/secrets/{s}" in " ".join(stub.objects)] == [second, third]
    run = documents("--namespace", "Bad_NS")
    assert run.returncode == 2 and "not a namespace name" in run.stderr


def test_commands_without_a_usable_kubeconfig_say_so(tmp_path: Path) -> None:
    # No kubeconfig (an operator's shell) or a file that is not one: one line naming what
    # was tried and what to give, never lightkube's traceback.
    env = {key: value for key, value in os.environ.items()
           if key not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
    env["HOME"] = str(tmp_path)
    not_a_kubeconfig = tmp_path / "site.yaml"
    not_a_kubeconfig.write_text("conf: {}\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "divingbell", *args], capture_output=True,
                              text=True, env=env, check=False, timeout=60)

    for args, where in [
            (("documents",), "~/.kube/config"),
            (("documents", "--kubeconfig", str(not_a_kubeconfig)), str(not_a_kubeconfig)),
            (("status", "--kube"), "~/.kube/config"),
            (("agent", str(not_a_kubeconfig), "--root", str(tmp_path), "--listen",
              "127.0.0.1:0", "--kubeconfig", str(not_a_kubeconfig)), str(not_a_kubeconfig))]:
        answer = run(*args)
        assert answer.returncode == 1, (args, answer.stderr)
        assert "Traceback" not in answer.stderr, args
        assert "cannot configure the Kubernetes client from" in answer.stderr, args
        assert where in answer.stderr and "--kubeconfig" in answer.stderr, args
