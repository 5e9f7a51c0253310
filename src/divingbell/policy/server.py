"""The admission webhook: HTTPS, admission.k8s.io/v1 AdmissionReview in and out.

Stack: the standard library's ThreadingHTTPServer over `ssl`, HTTP/1.1 keep-alive. A review is
a few kilobytes of JSON and a pure function of it; the per-request cost that matters is the
framework's, and here it is a header parse and one `json.loads` (well under a millisecond),
with no event loop to share with the blocking namespace lookup. The API server keeps its
connections open, so the TLS handshake is paid once per connection, not per review. The TLS
handshake runs in the connection's thread (not in `accept`), so a slow client never stalls
the listener. The certificate files are re-read when they change (cert-manager or
`divingbell pki` rotating them) for the next connection.

Answers: 200 with an AdmissionReview for every well-formed review (a refusal is `allowed:
false` with a status.message a user can act on; an object with a field of the wrong shape is
refused with code 400 naming the field); 400 with a JSON reason for a malformed review; 404,
405, 411, 413 as HTTP says. Never a 500: a policy bug is logged and the review refused.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from divingbell.kube import KubeError, ObjectApi
from divingbell.policy.admission import (
    ALLOW,
    HostAutoMounter,
    HostPathEnforcer,
    Malformed,
    Namespace,
    Policy,
    RegistryEnforcer,
    ReviewRequest,
    UidEnforcer,
    Verdict,
    refuse,
)
from divingbell.policy.config import LabelSelector, PolicyConfig

log = logging.getLogger("divingbell.policy")

MAX_BODY = 3 * 1024 * 1024  # the API server's own request limit is 3 MiB
API_VERSION = "admission.k8s.io/v1"


class NamespaceNotFound(Exception):
    pass


class NamespaceUnavailable(Exception):
    """The API server could not be asked; the message says why."""


class NamespaceReader(Protocol):
    def namespace(self, name: str) -> Namespace:
        """Raises NamespaceNotFound or NamespaceUnavailable."""


@dataclass
class ClusterNamespaces:
    """The webhook's NamespaceReader over the Kubernetes edge."""

    api: ObjectApi

    def namespace(self, name: str) -> Namespace:
        try:
            obj = self.api.get("Namespace", name)
        except KubeError as exc:
            if exc.code == 404:
                raise NamespaceNotFound(name) from None
            raise NamespaceUnavailable(str(exc)) from None
        metadata = obj.get("metadata") or {}
        return Namespace(name, dict(metadata.get("labels") or {}),
                         dict(metadata.get("annotations") or {}))


@dataclass
class NamespaceCache:
    """Namespaces by name for `ttl` seconds: one API call per namespace per TTL, not per pod.
    Failures are not cached."""

    reader: NamespaceReader
    ttl: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, tuple[float, Namespace]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str) -> Namespace:
        now = self.clock()
        with self._lock:
            cached = self._entries.get(name)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        found = self.reader.namespace(name)
        with self._lock:
            self._entries[name] = (now, found)
            if len(self._entries) > 10_000:  # bounded: drop the oldest half
                for key, _ in sorted(self._entries.items(), key=lambda kv: kv[1][0])[:5000]:
                    del self._entries[key]
        return found


@dataclass(frozen=True)
class Route:
    path: str
    policy: Policy
    selector: LabelSelector | None

    @property
    def needs_namespace(self) -> bool:
        return self.selector is not None or isinstance(self.policy, UidEnforcer)


def routes(config: PolicyConfig) -> dict[str, Route]:
    """Every enabled policy on its own path."""
    out: dict[str, Route] = {}
    if config.uid_enforcer.enabled:
        out["/mutate/uid"] = Route("/mutate/uid", UidEnforcer(config.uid_enforcer),
                                   config.selector_for(config.uid_enforcer))
    if config.host_auto_mounter.enabled:
        out["/mutate/automount"] = Route(
            "/mutate/automount", HostAutoMounter(config.host_auto_mounter),
            config.selector_for(config.host_auto_mounter))
    if config.registry_enforcer.enabled:
        out["/validate/registry"] = Route(
            "/validate/registry", RegistryEnforcer(config.registry_enforcer),
            config.selector_for(config.registry_enforcer))
    if config.host_path_enforcer.enabled:
        out["/validate/hostpath"] = Route(
            "/validate/hostpath", HostPathEnforcer(config.host_path_enforcer),
            config.selector_for(config.host_path_enforcer))
    return out


class BadReview(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        self.field_name = field_name
        super().__init__(message)


def parse_review(body: bytes) -> ReviewRequest:
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReview("", f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise BadReview("", "the body nests too deeply to be an AdmissionReview") from None
    if not isinstance(review, dict):
        raise BadReview("", "the body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise BadReview("apiVersion", f"expected apiVersion {API_VERSION} and kind "
                        f"AdmissionReview, got {review.get('apiVersion')!r} "
                        f"{review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("request", "request must be an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid", "request.uid must be a non-empty string")
    kind = request.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise BadReview("request.kind", "request.kind must be {group, version, kind}")
    obj = request.get("object")
    if obj is not None and not isinstance(obj, dict):
        raise BadReview("request.object", "request.object must be an object or null")
    strings = {}
    for key in ("operation", "namespace", "name", "subResource"):
        value = request.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise BadReview(f"request.{key}", f"request.{key} must be a string")
        strings[key] = value
    group = kind.get("group") or ""
    if not isinstance(group, str):
        raise BadReview("request.kind.group", "request.kind.group must be a string")
    return ReviewRequest(uid=uid, group=group, kind=kind["kind"],
                         operation=strings["operation"], namespace=strings["namespace"],
                         name=strings["name"], sub_resource=strings["subResource"],
                         object=obj)


def review_response(uid: str, verdict: Verdict) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": verdict.allowed}
    if not verdict.allowed:
        response["status"] = {"code": verdict.code, "message": verdict.message,
                              "reason": "BadRequest" if verdict.code == 400 else "Forbidden"}
    if verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(verdict.patch), separators=(",", ":")).encode()).decode()
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter("divingbell_policy_reviews", "Admission reviews answered",
                               ["policy", "verdict"], registry=self.registry)
        self.latency = Histogram(
            "divingbell_policy_review_seconds", "Time to answer a review, from the request "
            "line to the last byte of the answer", ["policy"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.namespace_errors = Counter(
            "divingbell_policy_namespace_lookup_errors", "Namespace lookups that failed",
            registry=self.registry)


@dataclass
class Reviewer:
    """Everything but HTTP: parse, scope, decide, encode."""

    routes: Mapping[str, Route]
    namespaces: NamespaceCache | None
    metrics: Metrics = field(default_factory=Metrics)

    def decide(self, route: Route, request: ReviewRequest) -> Verdict:
        namespace = None
        if route.needs_namespace and request.namespace:
            if self.namespaces is None:
                return refuse("this webhook has no access to namespaces; it is misconfigured")
            try:
                namespace = self.namespaces.get(request.namespace)
            except NamespaceNotFound:
                return refuse(f"namespace {request.namespace!r} does not exist")
            except NamespaceUnavailable as exc:
                self.metrics.namespace_errors.inc()
                log.warning("namespace %s: %s", request.namespace, exc)
                return refuse(f"namespace {request.namespace!r} could not be read to check "
                              "its policy; try again shortly")
        if route.selector is not None and (
                namespace is None or not route.selector.matches(namespace.labels)):
            return ALLOW  # out of this policy's scope
        try:
            return route.policy.review(request, namespace)
        except Malformed as exc:
            return Verdict(False, f"{request.what}: {exc}", 400)
        except Exception:
            log.exception("policy %s failed on review %s", route.policy.name, request.uid)
            return refuse(f"policy {route.policy.name} could not decide on this request (an "
                          "internal error, logged); it is refused")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are closed after this
    # Buffered: the status line, headers and body leave in one write when the handler
    # flushes, not as separate segments (which with Nagle and the client's delayed ACK cost
    # 40 ms per answer).
    wbufsize = 64 * 1024
    server: AdmissionServer

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif self.path == "/metrics":
            self._send(200, generate_latest(self.server.reviewer.metrics.registry),
                       "text/plain; version=0.0.4")
        elif self.path.split("?", 1)[0] in self.server.reviewer.routes:
            self._error(405, "", "reviews are POSTed")
        else:
            self._error(404, "", f"no such path {self.path!r}")

    def do_POST(self) -> None:
        started = time.perf_counter()
        path = self.path.split("?", 1)[0]  # the API server adds ?timeout=10s
        route = self.server.reviewer.routes.get(path)
        if route is None:
            self._drain()
            self._error(404, "", f"no policy answers on {path!r}; enabled: "
                        f"{', '.join(sorted(self.server.reviewer.routes)) or 'none'}")
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self._error(411, "", "a Content-Length is required", close=True)
            return
        length = int(length_text)
        if length > MAX_BODY:
            self._error(413, "", f"the review is larger than {MAX_BODY} bytes", close=True)
            return
        body = self.rfile.read(length)
        metrics = self.server.reviewer.metrics
        try:
            request = parse_review(body)
        except BadReview as exc:
            metrics.reviews.labels(route.policy.name, "bad-request").inc()
            self._error(400, exc.field_name, str(exc))
            return
        verdict = self.server.reviewer.decide(route, request)
        answer = json.dumps(review_response(request.uid, verdict)).encode()
        self._send(200, answer, "application/json")
        metrics.reviews.labels(route.policy.name, verdict.outcome).inc()
        metrics.latency.labels(route.policy.name).observe(time.perf_counter() - started)
        if not verdict.allowed:
            log.info("%s refused %s in %s (uid %s): %s", route.policy.name, request.what,
                     request.namespace or "-", request.uid, verdict.message)

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _error(self, code: int, field_name: str, reason: str, *, close: bool = False) -> None:
        body = {"error": reason}
        if field_name:
            body["field"] = field_name
        if close:
            self.close_connection = True
        self._send(code, json.dumps(body).encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _TlsFiles:
    """An SSLContext for the certificate files, rebuilt when either file changes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._stamp: tuple[float, float] | None = None
        self._checked = 0.0
        self._context = self._load()

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        self._stamp = (os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime)
        return context

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                stamp = (os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime)
                if stamp != self._stamp:
                    self._context = self._load()
                    log.info("reloaded the TLS certificate from %s", self.cert)
            except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep serving the old one
                log.warning("keeping the current TLS certificate: %s", exc)
        return self._context


class AdmissionServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], reviewer: Reviewer, tls: _TlsFiles | None
                 ) -> None:
        self.reviewer = reviewer
        self.tls = tls
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            return sock, address
        # The handshake happens on the first read, in the connection's own thread.
        return self.tls.context().wrap_socket(sock, server_side=True,
                                              do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def make_server(config: PolicyConfig, namespaces: NamespaceReader | None, *,
                cert: Path | None, key: Path | None, host: str = "0.0.0.0", port: int = 8443,
                clock: Callable[[], float] = time.monotonic) -> AdmissionServer:
    """A server ready for `serve_forever`. Without cert and key it speaks plain HTTP (tests
    and benchmarks of the decision path only; the API server requires TLS)."""
    cache = (NamespaceCache(namespaces, config.namespace_cache_seconds, clock)
             if namespaces is not None else None)
    reviewer = Reviewer(routes(config), cache)
    tls = _TlsFiles(cert, key) if cert is not None and key is not None else None
    return AdmissionServer((host, port), reviewer, tls)
