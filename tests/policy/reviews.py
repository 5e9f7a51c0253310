"""AdmissionReview requests shaped exactly like kube-apiserver's (admission.k8s.io/v1), and a
keep-alive HTTPS client for the webhook."""

from __future__ import annotations

import base64
import copy
import http.client
import itertools
import json
import ssl
from typing import Any

import jsonpatch

_uids = itertools.count(1)

RESOURCES = {  # kind -> (group, version, resource)
    "Pod": ("", "v1", "pods"),
    "Deployment": ("apps", "v1", "deployments"),
    "StatefulSet": ("apps", "v1", "statefulsets"),
    "DaemonSet": ("apps", "v1", "daemonsets"),
    "ReplicaSet": ("apps", "v1", "replicasets"),
    "Job": ("batch", "v1", "jobs"),
    "CronJob": ("batch", "v1", "cronjobs"),
}


def review(obj: dict[str, Any] | None, *, namespace: str = "tool-alice",
           operation: str = "CREATE", kind: str | None = None, sub_resource: str | None = None,
           old: dict[str, Any] | None = None) -> dict[str, Any]:
    kind = kind or (obj or {}).get("kind", "Pod")
    group, version, resource = RESOURCES[kind]
    name = ((obj or old or {}).get("metadata") or {}).get("name", "")
    request: dict[str, Any] = {
        "uid": f"705ab4f5-6393-11e8-b7cc-{next(_uids):012d}",
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": resource},
        "requestKind": {"group": group, "version": version, "kind": kind},
        "requestResource": {"group": group, "version": version, "resource": resource},
        "name": name,
        "namespace": namespace,
        "operation": operation,
        "userInfo": {"username": "alice", "uid": "014fbff9a07c",
                     "groups": ["system:authenticated"]},
        "object": obj,
        "oldObject": old,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1",
                    "kind": {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions",
                             "DELETE": "DeleteOptions"}[operation]},
    }
    if sub_resource:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    if not name:
        del request["name"]  # a Pod with generateName arrives without one
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def pod(name: str = "web", *, containers: list[dict[str, Any]] | None = None,
        init: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"containers": containers or [
        {"name": "web", "image": "docker-registry.tools.example.org/web:1"}]}
    if init is not None:
        body["initContainers"] = init
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "tool-alice"}, "spec": body}


def workload(kind: str, pod_spec: dict[str, Any], name: str = "app") -> dict[str, Any]:
    template = {"metadata": {"labels": {"app": name}}, "spec": pod_spec}
    group = RESOURCES[kind][0]
    meta = {"name": name, "namespace": "tool-alice"}
    if kind == "CronJob":
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": meta,
                "spec": {"schedule": "*/5 * * * *",
                         "jobTemplate": {"spec": {"template": {
                             **template, "spec": {**pod_spec, "restartPolicy": "OnFailure"}}}}}}
    spec: dict[str, Any] = {"template": template}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        spec["selector"] = {"matchLabels": {"app": name}}
    if kind == "Job":
        spec["template"]["spec"] = {**pod_spec, "restartPolicy": "Never"}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": f"{group}/v1", "kind": kind, "metadata": meta, "spec": spec}


class Webhook:
    """A keep-alive HTTPS connection to the webhook, like the API server's."""

    def __init__(self, port: int, ca_pem: bytes | None) -> None:
        if ca_pem is None:
            self.connection: http.client.HTTPConnection = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=10)
        else:
            context = ssl.create_default_context(cadata=ca_pem.decode())
            self.connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                                          context=context)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        self.connection.request(method, path, body=body, headers={
            "Content-Type": "application/json", **(headers or {})})
        response = self.connection.getresponse()
        data = response.read()
        if response.getheader("Connection") == "close":
            self.connection.close()
        return response.status, data

    def post(self, path: str, admission_review: dict[str, Any]) -> dict[str, Any]:
        """The response of a review, after checking it is a well-formed answer to it."""
        status, data = self.raw("POST", path + "?timeout=5s",
                                json.dumps(admission_review).encode())
        assert status == 200, data
        answer = json.loads(data)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        response: dict[str, Any] = answer["response"]
        assert response["uid"] == admission_review["request"]["uid"]
        if not response["allowed"]:
            assert response["status"]["message"]
        return response

    def close(self) -> None:
        self.connection.close()


def patched(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """`obj` with the response's JSON Patch applied (a copy; `obj` itself is untouched)."""
    if "patch" not in response:
        return copy.deepcopy(obj)
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.JsonPatch(operations).apply(copy.deepcopy(obj))
    return result


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    if "patch" not in response:
        return []
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops
