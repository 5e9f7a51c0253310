"""Fault injection between divingbell and a BMC: an HTTP proxy (Redfish) and a UDP relay
(IPMI) on loopback, real sockets, with switches a test flips while they run."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HttpFaults:
    unavailable: int = 0
    """Answer the next N requests 503 (Retry-After) without forwarding them."""
    hang: bool = False
    """Accept requests and never answer (the client times out)."""
    stop_after: int | None = None
    """Forward this many requests, then hang on every later one (a BMC that froze, a
    network cut)."""
    silent_after_commands: int | None = None
    """Forward this many POST/PATCH commands, then hang on every later request."""
    commands: int = 0
    lie_once: str | None = None
    """Rewrite the PowerState of the next system read to this value, once."""
    forwarded: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def posts(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] in ("POST", "PATCH")]


class HttpFaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.faults = HttpFaults()
        self.stopping = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                faults = proxy.faults
                faults.requests.append((self.command, self.path))
                faults.bodies.append(body or b"")
                if faults.hang or (faults.stop_after is not None
                                   and faults.forwarded >= faults.stop_after) or (
                        faults.silent_after_commands is not None
                        and faults.commands >= faults.silent_after_commands):
                    proxy.stopping.wait(60)
                    self.close_connection = True
                    return
                if faults.unavailable > 0:
                    faults.unavailable -= 1
                    self._answer(503, b'{"error": {"message": "busy"}}',
                                 {"Retry-After": "1"})
                    return
                faults.forwarded += 1
                if self.command in ("POST", "PATCH"):
                    faults.commands += 1
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body, headers)
                answer = upstream.getresponse()
                data = answer.read()
                if (faults.lie_once and self.command == "GET"
                        and re.search(r"/Systems/[^/]+$", self.path)):
                    document = json.loads(data)
                    document["PowerState"] = faults.lie_once
                    faults.lie_once = None
                    data = json.dumps(document).encode()
                self._answer(answer.status, data, {k: v for k, v in answer.getheaders()
                                                   if k.lower() in ("content-type", "etag",
                                                                    "location")
                                                   or k.lower().startswith("x-")})
                upstream.close()

            def _answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                # One request per connection: a kept-alive connection this server closes
                # while the client sends on it would be a fault of the proxy, not the BMC's.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class UdpFaultRelay:
    """Relays IPMI datagrams to the BMC; after `stop_after` datagrams from the client it drops
    everything (a BMC that stops answering after a burst)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listen.bind(("127.0.0.1", 0))
        self.port = self.listen.getsockname()[1]
        self.stop_after: int | None = None
        self.from_client = 0
        self.dropped = 0
        self.client: tuple[str, int] | None = None
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(self.upstream)
        self.running = True
        self.threads = [threading.Thread(target=self._forward, daemon=True),
                        threading.Thread(target=self._backward, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _forward(self) -> None:
        self.listen.settimeout(0.2)
        while self.running:
            try:
                data, client = self.listen.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.client = client
            if self.stop_after is not None and self.from_client >= self.stop_after:
                self.dropped += 1
                continue
            self.from_client += 1
            self.back.send(data)

    def _backward(self) -> None:
        self.back.settimeout(0.2)
        while self.running:
            try:
                data = self.back.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.client is not None and not (
                    self.stop_after is not None and self.from_client >= self.stop_after
                    and self.dropped):
                self.listen.sendto(data, self.client)

    def close(self) -> None:
        self.running = False
        time.sleep(0.3)
        self.listen.close()
        self.back.close()
