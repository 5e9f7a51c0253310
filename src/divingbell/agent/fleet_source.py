"""The agent's fleet mode: `divingbell agent --server URL --token-file F`.

The configuration comes from the fleet service instead of local files: a conditional GET
(`If-None-Match`) every `fetch_interval`, written to a cache file under the host's
`/var/lib/divingbell/fleet/` (so a restart or an unreachable service keeps the last
configuration). The cache file is the document the ordinary `Agent` loop converges, through
the same engine as `divingbell apply`; after every converge (and every `report_interval`) the
outcome is reported to `POST /v1/machines/{id}/reports`.

Standard library only (with the agent's own imports): the node needs none of the service's
dependencies.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divingbell.agent.loop import DEGRADED, Agent, AgentSettings
from divingbell.core.engine.change import REBOOT
from divingbell.core.engine.runner import ApplyReport
from divingbell.core.host import Host
from divingbell.fleet.client import (
    FleetApiError,
    FleetClient,
    machine_id_of,
    read_token,
    write_secret,
)

log = logging.getLogger("divingbell.agent.fleet")

CACHE_DIR = "/var/lib/divingbell/fleet"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass
class FleetModeSettings:
    server: str
    credential: str
    fetch_interval: float = 60.0
    report_interval: float = 60.0
    ca_file: str | None = None
    timeout: float = 10.0
    credential_file: Path | None = None
    """Re-read when the service refuses the credential: `divingbell discover` run again
    rotates it and writes the new one there."""
    revert_after: float = 900.0
    """A new revision after which the service has not been reached for this long is reverted
    to the last-known-good configuration (the one last reported converged)."""


class FleetSource:
    """The machine's configuration from the service, cached on disk with its ETag."""

    def __init__(self, client: FleetClient, machine_id: str, cache_dir: Path) -> None:
        self.client = client
        self.machine_id = machine_id
        self.document = cache_dir / "config.yaml"
        self.meta_path = cache_dir / "config.json"
        # The last-known-good configuration (converged, and reported to a service that
        # answered) and a revision reverted to it: see FleetAgent._revert_if_cut_off.
        self.good_document = cache_dir / "config.good.yaml"
        self.good_path = cache_dir / "good.json"
        self.reverted_path = cache_dir / "reverted.json"
        self.etag: str | None = None
        self.revision: int | None = None
        self.good: dict[str, Any] | None = _read_json(self.good_path)
        self.reverted: dict[str, Any] | None = _read_json(self.reverted_path)
        meta = _read_json(self.meta_path)
        if meta is not None and self.document.exists():
            self.etag, self.revision = meta.get("etag"), meta.get("revision")

    def refresh(self) -> bool:
        """Fetch if changed; True when a new configuration was written. Raises
        FleetApiError when the service cannot answer."""
        answer = self.client.config(self.machine_id, self.etag)
        if answer.status == 304 or answer.text is None:
            return False
        reverted = self.reverted
        if reverted is not None and (answer.revision, answer.etag) == (
                reverted["revision"], reverted["etag"]):
            return False  # the configuration this machine reverted: keep the good one
        if reverted is not None:
            self.reverted = None
            self.reverted_path.unlink(missing_ok=True)
        # The document holds crypt hashes: owner-only, written atomically.
        write_secret(self.document, answer.text)
        self.etag, self.revision = answer.etag, answer.revision
        write_secret(self.meta_path, json.dumps({"etag": self.etag, "revision": self.revision}))
        log.info("configuration %s (revision %s) fetched", self.etag, self.revision)
        return True

    def mark_good(self) -> None:
        """The current configuration converged and the service heard of it."""
        current = {"revision": self.revision, "etag": self.etag}
        if self.good == current or self.revision is None:
            return
        write_secret(self.good_document, self.document.read_text())
        write_secret(self.good_path, json.dumps(current))
        self.good = current

    def revert(self, reason: str, now: float) -> None:
        """Back to the last-known-good configuration; the current one is not taken again."""
        assert self.good is not None
        self.reverted = {"revision": self.revision, "etag": self.etag, "reason": reason,
                         "at": now}
        write_secret(self.reverted_path, json.dumps(self.reverted))
        write_secret(self.document, self.good_document.read_text())
        self.etag, self.revision = self.good["etag"], self.good["revision"]
        write_secret(self.meta_path, json.dumps({"etag": self.etag, "revision": self.revision}))


class FleetAgent(Agent):
    """The agent loop, fed by the fleet service and reporting back to it."""

    def __init__(self, settings: AgentSettings, fleet: FleetModeSettings,
                 source: FleetSource) -> None:
        super().__init__(settings, None)
        self.fleet = fleet
        self.source = source
        self._last_fetch = float("-inf")
        self._last_report_sent = float("-inf")
        self._last_report: dict[str, Any] | None = None
        self._apply_report: ApplyReport | None = None
        self._drift = False
        self._fleet_error: str | None = "not reached yet"
        self._fleet_reached_at: float | None = None
        self._new_applied_at: float | None = None  # a revision other than the good one

    def unhealthy(self) -> str | None:
        problem = super().unhealthy()
        if problem is None and self._fleet_error is not None:
            problem = f"the fleet service cannot be reached ({self._fleet_error})"
        return problem

    def _tick(self, now: float) -> None:
        if now - self._last_fetch >= self.fleet.fetch_interval:
            self._last_fetch = now
            try:
                self.source.refresh()
                self._reached(now)
            except FleetApiError as exc:
                log.warning("cannot fetch the configuration: %s", exc)
                self._contact_failed(exc, now)
                if exc.status == 401:
                    self._reload_credential()
                if not self.source.document.exists():
                    self._set(DEGRADED, f"no configuration from the fleet service yet: {exc}",
                              ready=False)
                    return
        if not self.source.document.exists():
            return
        self._revert_if_cut_off(now)
        super()._tick(now)
        if (self._last_report is not None
                and now - self._last_report_sent >= self.fleet.report_interval):
            self._send(self._last_report, now)

    def _reached(self, now: float) -> None:
        self._fleet_error, self._fleet_reached_at = None, now

    def _contact_failed(self, exc: FleetApiError, now: float) -> None:
        if exc.status == 0:  # no answer at all: unreachable (network, routes, DNS, TLS)
            self._fleet_error = str(exc)
        else:  # it answered (a refusal, an error of its own): this machine can reach it
            self._reached(now)

    def _revert_if_cut_off(self, now: float) -> None:
        """A new revision converged, and the service has not been reached since for
        `revert_after`: it may be what cut this machine off (its network, its routes, its
        DNS). Converge the last-known-good configuration again, keep the new one out, and
        report `reverted` once the service answers."""
        applied = self._new_applied_at
        if (applied is None or self.source.good is None or self._fleet_error is None
                or self._fleet_reached_at is not None
                or now - applied < self.fleet.revert_after):
            return
        reason = (f"the fleet service was not reached in the {now - applied:.0f}s after "
                  f"revision {self.source.revision} was applied ({self._fleet_error}): "
                  f"reverted to the last-known-good revision {self.source.good['revision']}")
        log.error("%s", reason)
        self.source.revert(reason, now)
        self._new_applied_at = None

    def _reload_credential(self) -> None:
        path = self.fleet.credential_file
        if path is None:
            return
        try:
            credential = read_token(path)
        except FleetApiError as exc:
            log.warning("cannot re-read the credential: %s", exc)
            return
        if credential != self.source.client.token and machine_id_of(credential) == (
                self.source.machine_id):
            log.info("credential in %s changed (the machine registered again): using it", path)
            self.source.client.token = credential
        else:
            # A machine's credential is issued once per enrolment: refused means revoked.
            log.warning("the fleet service refuses this machine's credential: it was revoked "
                        "(decommissioned, or an admin allowed it to enrol again: run "
                        "divingbell discover --server URL to enrol)")

    def converge(self, target: tuple[str, tuple[tuple[str, str], ...]], now: float) -> None:
        self._apply_report = None
        started = time.perf_counter()
        super().converge(target, now)
        good = self.source.good
        self._new_applied_at = (now if self.ready and good is not None and (
            good["revision"], good["etag"]) != (self.source.revision, self.source.etag)
            else None)
        if self._new_applied_at is not None:
            self._fleet_reached_at = None  # only an answer after the apply counts
        self._record(time.perf_counter() - started, now)
        self._drift = False  # reported with this converge; the next one starts clean

    def check_drift(self, now: float) -> None:
        self._drift = False
        super().check_drift(now)
        if self._drift and self._last_report is not None and not self._last_report["drift"]:
            # Drift in report-only mode leaves the host as it is: say so to the service.
            self._last_report = {**self._last_report, "drift": True}
            self._send(self._last_report, now)

    def _count(self, report: ApplyReport) -> None:
        super()._count(report)
        self._apply_report = report

    def _event(self, reason: str, message: str, *, warning: bool = False) -> None:
        if reason == "Drift":
            self._drift = True

    def _record(self, duration: float, now: float) -> None:
        if self.source.revision is None:
            return
        modules: dict[str, dict[str, Any]] = {}
        report = self._apply_report
        if report is not None:
            for planned in report.plan.modules:
                if planned.error:
                    modules.setdefault(planned.module, {"changes": 0, "failures": []})[
                        "failures"].append(planned.error[:4000])
            for result in report.results:
                entry = modules.setdefault(result.module, {"changes": 0, "failures": []})
                entry["changes"] += sum(1 for c in result.applied if c.changes_host)
                if result.error:
                    entry["failures"].append(result.error[:4000])
        elif not self.ready:
            modules["engine"] = {"changes": 0, "failures": [self.reason[:4000]]}
        why = reverted_because(report) if report is not None else None
        if why is not None:
            modules.setdefault("kernel", {"changes": 0, "failures": []})["failures"].append(
                f"reverted: {why}"[:4000])
        state = self._state(report)
        revision, etag = self.source.revision, self.source.etag
        reverted = self.source.reverted
        if reverted is not None and state == "converged":
            # Back on the last-known-good configuration: the service hears of the revision
            # that was reverted, and why.
            revision, etag, state = reverted["revision"], reverted["etag"], "reverted"
            modules.setdefault("engine", {"changes": 0, "failures": []})["failures"].append(
                str(reverted["reason"])[:4000])
        self._last_report = {
            "revision": revision, "etag": etag,
            "state": state, "modules": modules,
            "drift": self._drift, "duration_seconds": round(duration, 3),
            "boot_id": _boot_id()}
        self._send(self._last_report, now)

    def _state(self, report: ApplyReport | None) -> str:
        """converged, failed, reverted, or rebooting: applied, but a reboot is still pending
        (the plan's disruption is `reboot`: a new kernel command line the running kernel
        lacks, or a package upgrade that left /run/reboot-required). Maintenance reboots the
        node; the first pass after it reports converged. reverted: the document's kernel
        command line was tried once and did not come back healthy; the node holds its
        last-known-good line (a failure for the rollout)."""
        if not self.ready:
            return "failed"
        if report is not None and reverted_because(report) is not None:
            return "reverted"
        if report is not None and report.plan.disruption == REBOOT:
            return "rebooting"
        return "converged"

    def _send(self, report: dict[str, Any], now: float) -> None:
        self._last_report_sent = now
        try:
            answer = self.source.client.report(self.source.machine_id, report)
            self._reached(now)
            if report["state"] == "converged" and report["revision"] == self.source.revision:
                self.source.mark_good()
            log.info("reported revision %s %s: service says %s, %s", report["revision"],
                     report["state"], answer.get("state"),
                     "up to date" if answer.get("up_to_date") else "outdated")
        except FleetApiError as exc:
            log.warning("cannot report to the fleet service: %s", exc)
            self._contact_failed(exc, now)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reverted_because(report: ApplyReport) -> str | None:
    """Why the node holds its last-known-good kernel command line instead of the document's
    (the kernel module's plan says so), or None."""
    from divingbell.core.modules.kernel import Held

    for change in report.plan.changes:
        if isinstance(change.payload, Held):
            return change.payload.reason
    return None


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def build(server: str, credential: str, host: Host, *, poll_interval: float,
          fetch_interval: float, report_interval: float, drift_interval: float,
          backoff_max: float, ca_file: str | None = None,
          credential_file: Path | None = None, revert_after: float = 900.0) -> FleetAgent:
    """The fleet-mode agent for `divingbell agent --server`; raises ValueError on a credential
    that is not a machine credential."""
    machine_id = machine_id_of(credential)
    if machine_id is None:
        raise ValueError("the token file does not hold a machine credential (dbm_...): "
                         "run divingbell discover --server URL to get one")
    fleet = FleetModeSettings(server, credential, fetch_interval, report_interval, ca_file,
                              credential_file=credential_file, revert_after=revert_after)
    client = FleetClient(server, credential, ca_file=ca_file)
    cache = host.path(CACHE_DIR) if hasattr(host, "path") else Path(CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(cache, 0o700)
    source = FleetSource(client, machine_id, cache)
    settings = AgentSettings(documents=[source.document], node=machine_id, host=host,
                             poll_interval=poll_interval, drift_interval=drift_interval,
                             backoff_max=backoff_max, label_interval=3600.0,
                             # The service decides when this node gets a new revision (its
                             # rollout), and this process rewrites the cached file itself.
                             follow_document_changes=True)
    return FleetAgent(settings, fleet, source)
