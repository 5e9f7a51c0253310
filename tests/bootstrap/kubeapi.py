"""A stand-in for the handful of Kubernetes API server endpoints that node bootstrap uses.

There is no API server here, so this answers like kube-apiserver for Nodes: GET one or all,
POST (the kubelet registering its Node; 409 if it exists), PATCH as a JSON merge patch (null
removes a key), 404 for an unknown node, compact JSON as the real server writes it. A node
is Ready once registered. With TLS it requires a client certificate from the cluster CA and,
like the NodeRestriction admission plugin, lets `system:node:<name>` touch only its own Node.

Run in-process (`KubeApiStandIn(...)`) or as a process inside a test network namespace:
`python -m tests.bootstrap.kubeapi --state FILE --port-file FILE [--cert --key --ca]`; the
state file (nodes and every request with its client's name) is rewritten after each request.
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class KubeApiStandIn:
    def __init__(self, *, tls: tuple[Path, Path, Path] | None = None,
                 state_file: Path | None = None, host: str = "127.0.0.1") -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.state_file = state_file
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _client(self) -> str | None:
                if not isinstance(self.connection, ssl.SSLSocket):
                    return None
                cert: dict[str, Any] = dict(self.connection.getpeercert() or {})
                for rdn in cert.get("subject", ()):
                    for key, value in rdn:
                        if key == "commonName":
                            return str(value)
                return None

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, separators=(",", ":")).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                   "status": "Failure", "message": message, "reason": reason,
                                   "code": code})

            def _handle(self) -> None:
                path = self.path.split("?", 1)[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                client = self._client()
                with stand_in.lock:
                    stand_in.requests.append({"method": self.command, "path": path,
                                              "client": client, "body": body})
                    code, reply = stand_in.answer(self.command, path, body, client,
                                                  self.headers.get("Content-Type", ""))
                    stand_in.save()
                if code >= 400:
                    self._status(code, reply["reason"], reply["message"])
                else:
                    self._reply(code, reply)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        if tls is not None:
            cert, key, ca = tls
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_node(self, name: str, labels: dict[str, str] | None = None,
                 annotations: dict[str, str] | None = None) -> None:
        with self.lock:
            self.nodes[name] = {"labels": dict(labels or {}),
                                "annotations": dict(annotations or {})}

    def node(self, name: str) -> dict[str, Any]:
        stored = self.nodes[name]
        return {"kind": "Node", "apiVersion": "v1",
                "metadata": {"name": name, "labels": stored["labels"],
                             "annotations": stored["annotations"]},
                "status": {"conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady",
                     "message": "kubelet is posting ready status"}]}}

    def answer(self, method: str, path: str, body: Any, client: str | None,
               content_type: str) -> tuple[int, dict[str, Any]]:
        if path == "/api/v1/nodes" and method == "GET":
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {},
                         "items": [self.node(n) for n in sorted(self.nodes)]}
        if path == "/api/v1/nodes" and method == "POST":
            name = ((body or {}).get("metadata") or {}).get("name", "")
            if client is not None and client != f"system:node:{name}":
                return 403, {"reason": "Forbidden", "message": f"{client} may not create {name}"}
            if name in self.nodes:
                return 409, {"reason": "AlreadyExists", "message": f'nodes "{name}" exists'}
            self.nodes[name] = {"labels": dict(body["metadata"].get("labels") or {}),
                                "annotations": {}}
            return 201, self.node(name)
        if path.startswith("/api/v1/nodes/"):
            name = path.removeprefix("/api/v1/nodes/")
            if client is not None and client not in (f"system:node:{name}", "admin"):
                return 403, {"reason": "Forbidden", "message": f"{client} may not touch {name}"}
            if name not in self.nodes:
                return 404, {"reason": "NotFound", "message": f'nodes "{name}" not found'}
            if method == "GET":
                return 200, self.node(name)
            if method == "DELETE":
                del self.nodes[name]
                return 200, {"kind": "Status", "status": "Success", "details": {"name": name}}
            if method == "PATCH":
                if content_type != "application/merge-patch+json":
                    return 415, {"reason": "UnsupportedMediaType", "message": content_type}
                metadata = (body or {}).get("metadata") or {}
                for kind in ("labels", "annotations"):
                    for key, value in (metadata.get(kind) or {}).items():
                        if value is None:
                            self.nodes[name][kind].pop(key, None)
                        else:
                            self.nodes[name][kind][key] = value
                return 200, self.node(name)
        return 404, {"reason": "NotFound", "message": f"{method} {path}"}

    def save(self) -> None:
        if self.state_file is not None:
            partial = self.state_file.with_suffix(".partial")
            partial.write_text(json.dumps({"nodes": self.nodes, "requests": self.requests}))
            partial.replace(self.state_file)

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.server.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--ca", type=Path)
    args = parser.parse_args()
    tls = (args.cert, args.key, args.ca) if args.cert else None
    stand_in = KubeApiStandIn(tls=tls, state_file=args.state)
    stand_in.save()
    args.port_file.write_text(str(stand_in.port))
    stand_in.thread.join()


if __name__ == "__main__":
    main()
