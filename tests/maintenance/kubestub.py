"""An HTTP API server stub for the maintenance calls: kube-apiserver's paths and status codes
in front of a FakeKube, recording each request as the server received it. The real lightkube
client talks to it, so the contract test can compare its requests with the fake's own."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from divingbell.kube import (
    EvictionRefused,
    FakeKube,
    KubeConflict,
    KubeError,
    KubeNotFound,
    LeaseView,
    Request,
    lease_view,
    with_query,
)

LEASE = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?$")
NODE = re.compile(r"^/api/v1/nodes/([^/]+)$")
POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
EVICTION = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/eviction$")


def canonical(raw_path: str) -> str:
    """The path and the query that matters (the client's fieldManager is its own setting)."""
    parts = urlsplit(raw_path)
    params = {k: v for k, v in parse_qsl(parts.query) if k != "fieldManager"}
    return with_query(parts.path, params)


class MaintenanceApiStub:
    def __init__(self, backing: FakeKube) -> None:
        self.backing = backing
        self.received: list[Request] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = canonical(self.path)
                stub.received.append(Request(self.command, path, body))
                try:
                    code, reply = stub.answer(self.command, path, body)
                except KubeConflict as exc:
                    code, reply = 409, status(409, "Conflict", str(exc))
                except KubeNotFound as exc:
                    code, reply = 404, status(404, "NotFound", str(exc))
                except EvictionRefused as exc:
                    code, reply = 429, status(429, "TooManyRequests", str(exc))
                except KubeError as exc:
                    code, reply = 500, status(500, "InternalError", str(exc))
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        fake, route = self.backing, urlsplit(path).path
        state = fake._maint()
        if method == "GET" and route == "/api/v1/pods":
            node = dict(parse_qsl(urlsplit(path).query))["fieldSelector"].split("=", 1)[1]
            fake._reap()
            items = [p.body(fake.clock()) for _, p in sorted(state.pods.items())
                     if p.node == node]
            return 200, listing("PodList", "v1", items)
        if method == "GET" and route == "/api/v1/nodes":
            items = [{"apiVersion": "v1", "kind": "Node", **fake._node_body(n)}
                     for n in sorted(fake.node_objects)]
            return 200, listing("NodeList", "v1", items)
        if method == "GET" and route == "/apis/policy/v1/poddisruptionbudgets":
            items = [fake._budget_body(ns, n) for ns, n in sorted(state.budgets)]
            return 200, listing("PodDisruptionBudgetList", "policy/v1", items)
        if (match := NODE.match(route)) is not None:
            node = match.group(1)
            if method == "GET":
                return 200, {"apiVersion": "v1", "kind": "Node", **fake._node_body(node)}
            if method == "PATCH":
                spec = body.get("spec") or {}
                fake.patch_node(node, annotations=(body.get("metadata") or {}).get(
                    "annotations"), unschedulable=(bool(spec["unschedulable"])
                                                  if "unschedulable" in spec else None))
                return 200, {"apiVersion": "v1", "kind": "Node", **fake._node_body(node)}
            fake.delete_node(node)
            return 200, status(200, "", "deleted")
        if re.match(r"^/api/v1/namespaces/[^/]+/events(/[^/]+)?$", route):
            # Event series (create, then get/patch the count) with the fake's semantics.
            try:
                return (201 if method == "POST" else 200), fake._send_event(
                    Request(method, route, body))
            except KubeError as exc:
                code = exc.code or 500
                return code, status(code, "AlreadyExists" if code == 409 else "NotFound",
                                    str(exc))
        if (match := EVICTION.match(route)) is not None:
            fake.evict(match.group(1), match.group(2),
                       body["deleteOptions"]["gracePeriodSeconds"])
            return 201, body
        if (match := POD.match(route)) is not None and method == "DELETE":
            grace = int(dict(parse_qsl(urlsplit(path).query))["gracePeriodSeconds"])
            fake.delete_pod(match.group(1), match.group(2), grace)
            return 200, status(200, "", "deleted")
        if (match := LEASE.match(route)) is not None:
            return self._lease(method, match.group(1), match.group(2), body)
        return 404, status(404, "NotFound", f"no route {method} {path}")

    def _lease(self, method: str, namespace: str, name: str | None, body: Any
               ) -> tuple[int, dict[str, Any]]:
        fake, state = self.backing, self.backing._maint()
        if method == "GET" and name is None:
            items = [b for (ns, _), b in sorted(state.leases.items()) if ns == namespace]
            return 200, listing("LeaseList", "coordination.k8s.io/v1", items)
        if method == "GET":
            found = state.leases.get((namespace, name or ""))
            if found is None:
                raise KubeNotFound(f'leases.coordination.k8s.io "{name}" not found')
            return 200, found
        wanted: LeaseView = lease_view(body)
        act: Callable[[str, LeaseView], LeaseView] = (
            fake.create_lease if method == "POST" else fake.replace_lease)
        stored = act(namespace, wanted)
        return (201 if method == "POST" else 200), state.leases[(namespace, stored.name)]


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # agents racing connect at once; 5 would drop SYNs for a second
    daemon_threads = True


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success" if code < 400 else "Failure", "message": message,
            "reason": reason, "code": code}


def listing(kind: str, api_version: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"},
            "items": items}
