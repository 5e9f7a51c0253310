"""An HTTP API server for the contract test: kube-apiserver's URL scheme and Status errors in
front of a `FakeKube`, recording each request exactly as it arrived on the wire."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from divingbell.kube import KINDS, FakeKube, KubeError, Request

PLURALS = {kind.plural: kind for kind in KINDS.values()}


def route(path: str) -> tuple[str, str | None, str | None, str | None]:
    """(kind, name, namespace, subresource) of an API path."""
    parts = path.strip("/").split("/")
    parts = parts[2:] if parts[0] == "api" else parts[3:]  # drop api/v1 or apis/group/v1
    namespace = None
    if parts[0] == "namespaces" and len(parts) > 2:
        namespace, parts = parts[1], parts[2:]
    kind = PLURALS[parts[0]].kind
    name = parts[1] if len(parts) > 1 else None
    sub = parts[2] if len(parts) > 2 else None
    return kind, name, namespace, sub


class ApiStub:
    def __init__(self, backend: FakeKube) -> None:
        self.backend = backend
        self.received: list[Request] = []
        self.field_managers: set[str] = set()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                selector = query.get("labelSelector", [""])[0]
                shown = parts.path + (f"?labelSelector={selector}" if selector else "")
                stub.received.append(Request(self.command, shown, body))
                stub.field_managers.update(query.get("fieldManager", []))
                try:
                    self._reply(*self._dispatch(parts.path, selector, body))
                except KubeError as exc:
                    self._reply(exc.code or 500, {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": str(exc), "reason": exc.reason,
                        "code": exc.code})

            def _dispatch(self, path: str, selector: str, body: Any
                          ) -> tuple[int, dict[str, Any]]:
                kind, name, namespace, sub = route(path)
                fake = stub.backend
                sent_before = len(fake.sent)
                try:
                    if self.command == "GET" and name is None:
                        labels = dict(p.split("=", 1) for p in selector.split(",") if p)
                        items = fake.list(kind, namespace, labels or None)
                        return 200, {"apiVersion": KINDS[kind].api_version,
                                     "kind": f"{kind}List", "metadata": {}, "items": items}
                    if self.command == "POST":
                        return 201, fake.create(body)
                    assert name is not None
                    if self.command == "GET":
                        return 200, fake.get(kind, name, namespace)
                    if self.command == "PUT" and sub == "approval":
                        return 200, fake.approve_csr(body)
                    if self.command == "PUT":
                        return 200, fake.replace(body)
                    if self.command == "PATCH":
                        assert self.headers["Content-Type"] == "application/merge-patch+json"
                        return 200, fake.merge_patch(kind, name, body, namespace)
                    if self.command == "DELETE":
                        fake.delete(kind, name, namespace)
                        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                     "status": "Success"}
                    raise AssertionError(self.command)
                finally:
                    del fake.sent[sent_before:]  # the stub's own record is `received`

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
