"""`divingbell agent`: the long-running converger for a DaemonSet pod or a systemd service.

One loop, thin over the engine. Each tick it fingerprints the document files and, every
`label_interval`, the node's labels. It converges when the labels changed, retries a failed
converge with exponential backoff, and every `drift_interval` plans against the host to find
drift: reported always, corrected unless the document says `drift: report`.

The document is pinned: the agent converges the document it read at start, for as long as it
runs. In a pod a new document arrives with a new pod (the DaemonSet rollout, gated by
readiness), never by the kubelet re-projecting a volume under a running pod: files that change
underneath are reported and ignored. Only with `follow_document_changes` (the operator's
choice, e.g. the systemd service editing /etc/divingbell/site.yaml) are they converged.

Readiness is the rollout gate: `/readyz` is 200 only while the current document revision (and
labels) converged without error on this node, so a DaemonSet rolling update stops at the first
node a bad document fails on. Liveness is `/healthz`: it fails when the loop is stuck (a
converge or drift check running far past its time budget, or no pass for a long time), so the
kubelet restarts the pod. A failure never ends the process.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from divingbell.agent.manifests import document_digest
from divingbell.core.document.api import load_document, node_config, revision
from divingbell.core.engine.runner import ApplyReport, apply_node, plan_node
from divingbell.core.errors import DivingbellError, DocumentError
from divingbell.core.host import Host
from divingbell.kube import KubeApi, KubeError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from divingbell.core.document.validate import NodeConfig, ValidDocument

log = logging.getLogger("divingbell.agent")

DONE, WORKING, DEGRADED = "Done", "Working", "Degraded"


@dataclass
class AgentSettings:
    documents: list[Path]
    node: str
    host: Host
    static_labels: dict[str, str] = field(default_factory=dict)
    labels_file: Path | None = None
    poll_interval: float = 2.0
    label_interval: float = 30.0
    drift_interval: float = 300.0
    backoff_initial: float = 10.0
    backoff_max: float = 300.0
    lock_timeout: float = 60.0
    # Converge document files that change under the running agent. Off: the document read at
    # start is the one converged until the process (the pod) is replaced.
    follow_document_changes: bool = False
    # The digest the pod was made for (`divingbell manifests` puts it in the pod template):
    # a pinned agent refuses a mounted document with another digest.
    expected_digest: str | None = None
    # A converge running longer than this is stuck (/healthz fails). None: the document's
    # own bounds (script timeouts, lock waits) plus `stuck_margin`.
    converge_timeout: float | None = None
    stuck_margin: float = 1800.0


NOTHING_CHANGED = "Nothing was changed on this host, which keeps what it has"


def refusal(error: DocumentError) -> tuple[str, str]:
    """(event reason, message) for a document the agent will not converge. An unattended
    agent restores whatever a whole document leaves out, so it refuses only what is evidently
    not one: no `conf:` (an empty or cut file), or a document that does not parse or validate
    (a fleet revision among them)."""
    from divingbell.core.document.validate import is_missing_conf

    if is_missing_conf(error):
        return ("IncompleteDocument",
                "refusing the document: it has no `conf:`, as an empty or truncated file "
                "would (a document that means \"nothing on this node\" says `conf: {}`). "
                f"{NOTHING_CHANGED}")
    problems = "; ".join(str(p) for p in error.problems[:3]) + (
        f" (+{len(error.problems) - 3} more)" if len(error.problems) > 3 else "")
    return "InvalidDocument", f"refusing an invalid document: {problems}. {NOTHING_CHANGED}"


def configure_logging(level: str) -> None:
    """Agent logs for `kubectl logs`: one line per converge at INFO; every library below it
    (the HTTP client under lightkube logs each API request at INFO, every 30 s per node:
    drown-out noise) only at WARNING, or everything with `debug`."""
    debug = level.lower() == "debug"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("divingbell").setLevel(level.upper())


def converge_budget(config: NodeConfig, settings: AgentSettings) -> float:
    """How long a converge of `config` may take before it counts as stuck."""
    if settings.converge_timeout is not None:
        return settings.converge_timeout
    budget = settings.stuck_margin + settings.lock_timeout
    scripts = config.modules.get("exec")
    if scripts is not None:
        budget += sum(float(getattr(s, "timeout", 0)) for s in getattr(scripts, "root", {})
                      .values())
    apt = config.modules.get("apt")
    if apt is not None:
        budget += float(getattr(apt, "dpkg_lock_timeout", 0))
    return budget


def _fingerprint(paths: list[Path], contents: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(contents[str(path)])
        digest.update(b"\0")
    return digest.hexdigest()


def read_labels_file(path: Path) -> dict[str, str]:
    """KEY=VALUE per line; blank lines and # comments ignored (for hosts without Kubernetes)."""
    labels = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        labels[key.strip()] = value.strip()
    return labels


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry: CollectorRegistry = CollectorRegistry()
        r = self.registry
        self.duration = Histogram("divingbell_converge_duration_seconds",
                                  "Time to converge the node (plan and apply)", registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.changes = Counter("divingbell_changes_total", "Host changes applied",
                               ["module"], registry=r)
        self.failures = Counter("divingbell_failures_total",
                                "Converge failures, by module (document: invalid document)",
                                ["module"], registry=r)
        self.drift = Counter("divingbell_drift_total", "Settings found drifted from the document",
                             ["module"], registry=r)
        self.revision = Gauge("divingbell_document_revision_info",
                              "The document revision this agent is working on", ["revision"],
                              registry=r)
        self.last_success = Gauge("divingbell_last_success_timestamp_seconds",
                                  "When the node last converged without error", registry=r)
        self.ready = Gauge("divingbell_ready", "1 when the current revision has converged",
                           registry=r)
        self._shown_revision: str | None = None

    def set_revision(self, rev: str) -> None:
        if self._shown_revision is not None and self._shown_revision != rev:
            self.revision.remove(self._shown_revision)
        self.revision.labels(rev).set(1)
        self._shown_revision = rev

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Agent:
    def __init__(self, settings: AgentSettings, kube: KubeApi | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.kube = kube
        self.clock = clock
        self.monotonic = monotonic  # for how long things run (liveness)
        self.metrics = Metrics()
        self.ready = False
        self._labels_problem: str | None = None
        self.state = WORKING
        self.reason = "starting"
        self.revision: str | None = None
        self.labels: dict[str, str] | None = None
        self._converged: tuple[str, tuple[tuple[str, str], ...]] | None = None
        self._fingerprint: str | None = None
        self._document: ValidDocument | DocumentError | None = None
        self._ignored_fingerprint: str | None = None
        self._busy: tuple[str, float, float] | None = None  # what, since (monotonic), budget
        self._heartbeat = monotonic()
        self._labels_checked = float("-inf")
        self._last_drift_check = 0.0
        self._next_attempt = 0.0
        self._failures = 0
        self._failed_target: tuple[str, tuple[tuple[str, str], ...]] | None = None
        self._published: dict[str, str] = {}
        # Node maintenance (issue 15): stepped after every pass; see divingbell.maintenance.
        from divingbell.maintenance.sequence import AgentMaintenance, hook_for

        self.maintenance: AgentMaintenance | None = hook_for(settings, kube,
                                                             self.metrics.registry, clock)
        # How the agent gets the node back onto its last-known-good kernel command line.
        self.reboot: Callable[[], object] = lambda: settings.host.run(
            ["systemctl", "reboot", "--no-block"], check=False)

    # The loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.tick()
            stop.wait(self.settings.poll_interval)

    def stuck(self) -> str | None:
        """Why the loop counts as stuck (for /healthz), or None."""
        now = self.monotonic()
        busy = self._busy
        if busy is not None:
            what, since, budget = busy
            if now - since > budget:
                return (f"{what} running for {now - since:.0f}s, past its {budget:.0f}s "
                        "budget")
            return None
        idle_limit = max(300.0, 10 * self.settings.poll_interval)
        if now - self._heartbeat > idle_limit:
            return f"no agent pass for {now - self._heartbeat:.0f}s"
        return None

    def tick(self) -> None:
        """One pass: never raises, whatever the document, the host or the API server do."""
        now = self.clock()
        try:
            self._settle_trial(now)
            self._tick(now)
        except Exception as exc:  # the loop must outlive any bug in one pass
            log.exception("agent pass failed")
            self._set(DEGRADED, f"internal error: {exc}", ready=False)
            self._schedule_retry(now)
        finally:
            self._busy = None
            self._heartbeat = self.monotonic()
        if self.maintenance is not None:
            self.maintenance.tick(self)

    def _tick(self, now: float) -> None:
        fingerprint = self._document_fingerprint()
        if fingerprint is None:
            return
        if now - self._labels_checked >= self.settings.label_interval or self.labels is None:
            labels = self._read_labels()
            if labels is None:
                return
            self._labels_checked = now
            if labels != self.labels:
                if self.labels is not None:
                    log.info("node labels changed: %s", labels)
                self.labels = labels
        target = (fingerprint, tuple(sorted((self.labels or {}).items())))
        if target != self._converged:
            if target != self._failed_target or now >= self._next_attempt:
                self.converge(target, now)
        elif now - self._last_drift_check >= self.settings.drift_interval:
            self.check_drift(now)

    def _document_fingerprint(self) -> str | None:
        """The fingerprint of the document to converge: the pinned one, or (following
        changes) the files' current one. None: nothing to converge this pass."""
        contents = self._read_documents()
        if contents is None:
            if self._fingerprint is not None and not self.settings.follow_document_changes:
                return self._fingerprint  # pinned: the document is already in memory
            return None
        fingerprint = _fingerprint(self.settings.documents, contents)
        if fingerprint == self._fingerprint:
            return fingerprint
        if self._fingerprint is not None and not self.settings.follow_document_changes:
            if fingerprint != self._ignored_fingerprint:
                self._ignored_fingerprint = fingerprint
                digest = document_digest(contents)
                log.warning("the document files changed under the running agent (now digest "
                            "%s); ignored: this node converges a new document only when its "
                            "pod is replaced (--follow-document-changes converges such "
                            "changes)", digest)
                self._event("DocumentChangeIgnored",
                            f"document files changed under the running agent (digest "
                            f"{digest}); still converging the document this pod started "
                            "with", warning=True)
            return self._fingerprint
        # A new document: the first one, or a change the operator chose to follow.
        if self._fingerprint is None and not self._matches_expected_digest(contents):
            return None
        try:
            document: ValidDocument | DocumentError = load_document(self.settings.documents)
        except DocumentError as exc:
            document = exc
        if self._read_documents() != contents:
            return None  # swapped while it was read: take it whole on the next pass
        if self._fingerprint is not None:
            log.info("document changed")
        self._fingerprint, self._document = fingerprint, document
        return fingerprint

    def _read_documents(self) -> dict[str, bytes] | None:
        try:
            return {str(path): path.read_bytes() for path in self.settings.documents}
        except OSError as exc:
            self._set(DEGRADED, f"cannot read the document: {exc}", ready=False)
            return None

    def _matches_expected_digest(self, contents: Mapping[str, bytes]) -> bool:
        expected = self.settings.expected_digest
        if not expected or self.settings.follow_document_changes:
            return True
        found = document_digest(contents)
        if found == expected:
            return True
        message = (f"refusing the mounted document: its digest {found} is not the one this "
                   f"pod was made for ({expected}), so it is not the whole document meant "
                   "for this node. Nothing was changed on this host; waiting for the right one")
        if self.reason != message:
            log.error("%s", message)
        self._set(DEGRADED, message, ready=False)
        return False

    def _load(self) -> ValidDocument | DocumentError:
        """The document of the current fingerprint, as loaded when it was first read."""
        assert self._document is not None, "a fingerprint always comes with its document"
        return self._document

    def _read_labels(self) -> dict[str, str] | None:
        labels = dict(self.settings.static_labels)
        try:
            if self.settings.labels_file is not None:
                labels.update(read_labels_file(self.settings.labels_file))
            if self.kube is not None:
                labels.update(self.kube.node_labels(self.settings.node))
        except (OSError, ValueError, KubeError) as exc:
            # Without the labels, overrides cannot be resolved: converging now could apply
            # another role's settings. Wait instead.
            if self.ready and self.labels is not None:
                # Converged with the labels it had, and a re-read failed (the API server busy
                # or away): nothing changed on this host, so the node stays ready. Unready, a
                # rolling update would take it for unavailable and replace its pod at once,
                # past the one it halted at.
                if self._labels_problem != str(exc):
                    self._labels_problem = str(exc)
                    log.warning("cannot re-read node labels (kept the last ones; still "
                                "ready; retried on the next pass): %s", exc)
                return None
            self._set(DEGRADED, f"cannot read node labels: {exc}", ready=False)
            return None
        self._labels_problem = None
        return labels

    # Converge and drift ---------------------------------------------------------------------

    def converge(self, target: tuple[str, tuple[tuple[str, str], ...]], now: float) -> None:
        started = time.perf_counter()
        document = self._load()
        if isinstance(document, DocumentError):
            self.metrics.failures.labels("document").inc()
            self._fail(target, now, *refusal(document))
            return
        rev = revision(document)
        self.revision = rev
        self.metrics.set_revision(rev)
        self._set(WORKING, f"converging revision {rev}", ready=False)
        config = node_config(document, self.settings.node, self.labels or {})
        self._busy = (f"converge of revision {rev}", self.monotonic(),
                      converge_budget(config, self.settings))
        try:
            report = apply_node(self.settings.host, config, rev,
                                lock_timeout=self.settings.lock_timeout)
        except DivingbellError as exc:
            self.metrics.failures.labels("engine").inc()
            self._fail(target, now, "ConvergeFailed", str(exc))
            return
        finally:
            self._busy = None
            self.metrics.duration.observe(time.perf_counter() - started)
        log.info("revision %s: %s in %.1fs", rev, self._story(report),
                 time.perf_counter() - started)
        self._count(report)
        if not report.ok:
            self._fail(target, now, "ConvergeFailed", "; ".join(report.errors))
            return
        self._converged = target
        self._failed_target = None
        self._failures = 0
        self._last_drift_check = now
        self.metrics.last_success.set(now)
        changed = len(report.applied)
        self._set(DONE, f"revision {rev} converged" + (f": {changed} change(s)" if changed
                                                       else ", nothing to change"), ready=True)
        if changed:
            self._event("Applied", f"revision {rev}: {self._summary(report)}")

    def check_drift(self, now: float) -> None:
        self._last_drift_check = now
        document = self._load()
        if isinstance(document, DocumentError):
            return
        try:
            config = node_config(document, self.settings.node, self.labels or {})
            self._busy = ("drift check", self.monotonic(),
                          converge_budget(config, self.settings))
            plan = plan_node(self.settings.host, config)
        except DivingbellError as exc:
            log.warning("drift check failed: %s", exc)
            return
        finally:
            self._busy = None
        drifted: dict[str, list[str]] = {}
        for module in plan.modules:
            targets = [c.target for c in module.changes if c.changes_host]
            if targets:
                drifted[module.module] = targets
                self.metrics.drift.labels(module.module).inc(len(targets))
        if not drifted:
            return
        what = "; ".join(f"{m}: {', '.join(t[:5])}" for m, t in sorted(drifted.items()))
        mode = document.model.drift
        log.warning("drift (%s): %s", mode, what)
        self._event("Drift", f"drift ({'correcting' if mode == 'correct' else 'report only'})"
                    f": {what}", warning=True)
        if mode == "correct":
            self._converged = None
            fingerprint = self._fingerprint or ""
            self.converge((fingerprint, tuple(sorted((self.labels or {}).items()))), now)
        else:
            self._set(DONE, f"revision {self.revision} converged; drift reported: {what}",
                      ready=True)

    # Last-known-good kernel command line -------------------------------------------------------

    def unhealthy(self) -> str | None:
        """Why this node is not healthy enough to commit a kernel command line on trial
        (None: it is): converged, and its Kubernetes node Ready where it is one."""
        if not self.ready or self._converged is None:
            return f"not converged ({self.reason})"
        node_state = getattr(self.kube, "node_state", None)
        if node_state is not None:
            try:
                if not node_state(self.settings.node).ready:
                    return "the Kubernetes node is not Ready"
            except KubeError as exc:
                return f"the API server cannot be reached ({exc})"
        return None

    def _settle_trial(self, now: float) -> None:
        """After a reboot onto a kernel command line on trial: commit it once healthy, or
        revert to the last-known-good line (see modules/kernel.py)."""
        from divingbell.core.modules.kernel import settle_trial

        try:
            settled = settle_trial(self.settings.host, self.unhealthy, now)
        except DivingbellError as exc:
            log.error("cannot settle the kernel command line on trial: %s", exc)
            return
        if settled is None:
            return
        line = " ".join(settled.params)
        if settled.outcome == "committed":
            log.info("kernel command line %s committed as last-known-good", line)
            self._event("KernelCommitted", f"kernel command line {line} committed: the node "
                        "is healthy on it")
            return
        log.error("kernel command line %s reverted: %s", line, settled.reason)
        self._event("KernelReverted", f"kernel command line {line} reverted: "
                    f"{settled.reason}", warning=True)
        self._converged = None  # converge again: the plan now holds the last-known-good line
        if settled.reboot:
            self.reboot()

    def _fail(self, target: tuple[str, tuple[tuple[str, str], ...]], now: float, reason: str,
              message: str) -> None:
        log.error("%s: %s", reason, message)
        self._failed_target = target
        self._schedule_retry(now)
        self._set(DEGRADED, message, ready=False)
        self._event(reason, message, warning=True)

    def _schedule_retry(self, now: float) -> None:
        delay = min(self.settings.backoff_max,
                    self.settings.backoff_initial * 2 ** min(self._failures, 16))
        self._failures += 1
        self._next_attempt = now + delay
        log.info("retrying in %.0fs", delay)

    def _count(self, report: ApplyReport) -> None:
        for result in report.results:
            applied = [c for c in result.applied if c.changes_host]
            if applied:
                self.metrics.changes.labels(result.module).inc(len(applied))
            if result.error:
                self.metrics.failures.labels(result.module).inc()
        for module in report.plan.modules:
            if module.error:
                self.metrics.failures.labels(module.module).inc()

    @staticmethod
    def _story(report: ApplyReport) -> str:
        """One log line's worth: changes per module, and what failed."""
        parts = []
        for result in report.results:
            applied = [c for c in result.applied if c.changes_host]
            if result.error:
                parts.append(f"{result.module} failed after {len(applied)} change(s): "
                             f"{result.error}")
            elif applied:
                parts.append(f"{result.module} {len(applied)} change(s)")
        parts.extend(f"plan: {error}" for error in report.plan.errors)
        if not parts:
            return "converged, nothing to change"
        return ("converged: " if report.ok else "failed: ") + "; ".join(parts)

    @staticmethod
    def _summary(report: ApplyReport) -> str:
        counts: dict[str, int] = {}
        for change in report.applied:
            counts[change.module] = counts.get(change.module, 0) + 1
        return ", ".join(f"{module} {n}" for module, n in sorted(counts.items()))

    # Publishing -----------------------------------------------------------------------------

    def _set(self, state: str, reason: str, *, ready: bool) -> None:
        self.state, self.reason, self.ready = state, reason, ready
        self.metrics.ready.set(1 if ready else 0)
        self._publish({"state": state, "reason": reason[:512],
                       "revision": self.revision or ""})

    def _publish(self, status: Mapping[str, str]) -> None:
        changed = {k: v for k, v in status.items() if self._published.get(k) != v}
        if not changed or self.kube is None:
            return
        try:
            self.kube.annotate_node(self.settings.node, changed)
            self._published.update(changed)
        except KubeError as exc:
            log.warning("cannot annotate node %s: %s", self.settings.node, exc)

    def _event(self, reason: str, message: str, *, warning: bool = False) -> None:
        if self.kube is None:
            return
        try:
            self.kube.node_event(self.settings.node, reason, message, warning=warning)
        except KubeError as exc:
            log.warning("cannot record event %s: %s", reason, exc)

    def health(self) -> dict[str, Any]:
        return {"node": self.settings.node, "state": self.state, "reason": self.reason,
                "revision": self.revision, "ready": self.ready}


# HTTP: /healthz, /readyz, /metrics --------------------------------------------------------------

def serve(agent: Agent, address: str, port: int) -> ThreadingHTTPServer:
    """Start the probe and metrics endpoints in a daemon thread; returns the server."""
    import json

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                problem = agent.stuck()
                if problem is None:
                    self._send(200, b"ok\n", "text/plain")
                else:
                    self._send(503, f"stuck: {problem}\n".encode(), "text/plain")
            elif path == "/readyz":
                body = (json.dumps(agent.health()) + "\n").encode()
                self._send(200 if agent.ready else 503, body, "application/json")
            elif path == "/metrics":
                self._send(200, agent.metrics.render(),
                           "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, b"not found: try /healthz, /readyz, /metrics\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="divingbell-http", daemon=True).start()
    return server
