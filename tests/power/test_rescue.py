"""A maintenance reboot that does not come back (issue 28): the machine's agent said it is
rebooting (its slot renewed with `rebooting: true`) and has not been heard from within the
health timeout of the document it is served. The fleet power-cycles it exactly once through its
BMC (sushy-tools' Redfish emulator, a fault proxy between), only from a confirmed power state,
reports it on the machine and in the audit, and leaves it for an operator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet import rescue
from divingbell.fleet.client import FleetClient
from divingbell.fleet.db import Database
from divingbell.fleet.models import RebootWatch, utcnow
from divingbell.power.secrets import SecretBox, open_key
from tests.fleet.servers import ThreadServer, thread_server, wait_for
from tests.fleet.test_api import register
from tests.fleet.test_rollouts_api import converge
from tests.power.conftest import Emulator, power_settings
from tests.power.faults import HttpFaultProxy
from tests.power.test_power_fleet import SYSTEM, audit_of, power, set_bmc, system_posts

HEALTH_TIMEOUT = 600.0
DOC = """\
conf:
  maintenance:
    reboot:
      health:
        timeout: {timeout:g}s
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ThreadServer]:
    """Its rescue loop off: each test runs the passes itself (`rescue.run_once`)."""
    settings = power_settings(f"sqlite:///{tmp_path / 'store' / 'fleet.db'}",
                              reboot_rescue_interval_seconds=0)
    with thread_server(settings) as server:
        yield server


def secret_box(fleet: ThreadServer) -> SecretBox | None:
    box, _ = open_key(fleet.settings.secrets_key_file, fleet.settings.db_url)
    return box


def rescue_pass(fleet: ThreadServer, after: float = 0.0) -> list[rescue.Rescue]:
    """A pass as it runs `after` seconds from now (the store's times are compared with it)."""
    db = Database(fleet.settings.db_url)
    try:
        return rescue.run_once(db, fleet.settings, secret_box(fleet),
                               utcnow() + timedelta(seconds=after))
    finally:
        db.dispose()


def watch_of(fleet: ThreadServer, machine: str) -> dict[str, Any] | None:
    db = Database(fleet.settings.db_url)
    try:
        with db.read() as session:
            row = session.get(RebootWatch, machine)
            return None if row is None else {"rescued": row.rescued_at is not None,
                                             "timeout": row.health_timeout_seconds,
                                             "outcome": row.outcome}
    finally:
        db.dispose()


def rebooting_machine(fleet: ThreadServer, timeout: float = HEALTH_TIMEOUT,
                      bmc: str | None = None) -> tuple[str, FleetClient, str]:
    """A ready machine served DOC, with its BMC at `bmc` (powered on), that holds a slot and
    told the fleet it is rebooting."""
    machine, client = register(fleet, 1)
    fleet.admin.push_document(DOC.format(timeout=timeout).encode())
    converge(client, machine)
    if bmc:
        set_bmc(fleet, machine, "redfish", bmc + SYSTEM)
        assert power(fleet, machine, "on")["state"] == "on"  # the hung host: powered, silent
    slot = client.claim_slot(machine, "default", 600)["slot"]
    client.renew_slot(slot, machine, 600, rebooting=True)
    return machine, client, slot


def reset_types(proxy: HttpFaultProxy) -> list[str]:
    """What the BMC was told to do, in order."""
    faults = proxy.faults
    return [json.loads(body)["ResetType"] for (method, path), body in zip(
        faults.requests, faults.bodies, strict=True)
        if method == "POST" and path.endswith("ComputerSystem.Reset")]


OVERDUE = HEALTH_TIMEOUT + 1
"""Seconds from now at which a watch started a moment ago is overdue."""


def test_a_hung_reboot_is_power_cycled_once_reported_and_left_for_an_operator(
        fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _, _ = rebooting_machine(fleet, bmc=http_proxy.url)
    sent_before = len(system_posts(http_proxy))
    assert watch_of(fleet, machine) == {"rescued": False, "timeout": HEALTH_TIMEOUT,
                                        "outcome": ""}

    assert rescue_pass(fleet, HEALTH_TIMEOUT - 60) == []  # within its health timeout: nothing
    [done] = rescue_pass(fleet, OVERDUE)
    assert done.machine_id == machine and done.cycled
    assert reset_types(http_proxy)[-2:] == ["ForceOff", "On"]  # off confirmed, then on

    # Never again for this reboot: later passes (this replica or another) do nothing.
    assert rescue_pass(fleet, OVERDUE) == [] and rescue_pass(fleet, 10 * OVERDUE) == []
    assert len(system_posts(http_proxy)) == sent_before + 2

    detail = fleet.admin.machine(machine)
    assert detail["state"] == "degraded"
    reason = detail["history"][-1]["reason"]
    assert reason.startswith("maintenance reboot not back: no word from its agent for ")
    assert "power-cycled once through its BMC" in reason and "left for an operator" in reason
    events = audit_of(fleet, machine)
    assert [e["action"] for e in events[:2]] == ["reboot-rescue", "power cycle"]
    assert all(e["actor"] == rescue.ACTOR for e in events[:2])
    assert json.loads(events[0]["detail"])["cycled"] is True
    assert watch_of(fleet, machine) == {"rescued": True, "timeout": HEALTH_TIMEOUT,
                                        "outcome": reason}


def test_an_unconfirmed_power_state_sends_nothing_and_is_reported_once(
        fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _, _ = rebooting_machine(fleet, bmc=http_proxy.url)
    sent_before = len(system_posts(http_proxy))
    http_proxy.faults.unavailable = 1000  # every request: 503
    [done] = rescue_pass(fleet, OVERDUE)
    assert not done.cycled and len(system_posts(http_proxy)) == sent_before
    assert "not power-cycled: " in done.message and "nothing sent to the BMC" in done.message
    assert rescue_pass(fleet, OVERDUE) == []  # no retry loop: an operator decides
    http_proxy.faults.unavailable = 0
    assert rescue_pass(fleet, 10 * OVERDUE) == []
    assert len(system_posts(http_proxy)) == sent_before
    detail = fleet.admin.machine(machine)
    assert detail["state"] == "degraded" and "nothing sent to the BMC" in detail["history"][-1][
        "reason"]
    assert json.loads(audit_of(fleet, machine)[0]["detail"])["cycled"] is False


def test_a_reboot_that_comes_back_or_releases_its_slot_is_not_touched(
        fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, client, slot = rebooting_machine(fleet, bmc=http_proxy.url)
    sent_before = len(system_posts(http_proxy))
    client.renew_slot(slot, machine, 600)  # the agent of the new boot: back
    assert watch_of(fleet, machine) is None
    client.renew_slot(slot, machine, 600, rebooting=True)  # a second reboot
    client.release_slot(slot, machine)  # the agent gave up on it itself, and said so
    assert watch_of(fleet, machine) is None
    assert rescue_pass(fleet, OVERDUE) == [] and len(system_posts(http_proxy)) == sent_before
    assert fleet.admin.machine(machine)["state"] == "ready"


def test_a_machine_without_a_bmc_is_reported_once_and_nothing_is_powered(
        fleet: ThreadServer) -> None:
    machine, _, _ = rebooting_machine(fleet)
    [done] = rescue_pass(fleet, OVERDUE)
    assert not done.cycled and "it has no BMC, so nothing was done" in done.message
    assert rescue_pass(fleet, OVERDUE) == []
    assert fleet.admin.machine(machine)["state"] == "degraded"


def test_the_service_runs_the_rescue_by_itself(tmp_path: Path, redfish: Emulator) -> None:
    settings = power_settings(f"sqlite:///{tmp_path / 'store' / 'fleet.db'}",
                              reboot_rescue_interval_seconds=0.2)
    with thread_server(settings) as fleet:
        rebooting_machine(fleet, 1.0, bmc=f"http://127.0.0.1:{redfish.port}")
        machine = fleet.admin.machines()[0]["id"]
        wait_for(lambda: fleet.admin.machine(machine)["state"] == "degraded", timeout=60)
        assert "power-cycled once" in fleet.admin.machine(machine)["history"][-1]["reason"]
        assert [e["action"] for e in audit_of(fleet, machine)].count("power cycle") == 1


def test_a_hung_vm_is_power_cycled_once_through_its_bmc_and_runs_again(
        tmp_path: Path, redfish_qemu: Emulator) -> None:
    """The BMC's system is a qemu VM (no OS to hang, so the test hangs it: QMP `stop`
    halts its CPUs, it stays powered, as a host frozen on its way down). Its reboot is overdue:
    the service's own loop cycles it once (qemu ended, started again, running) and reports."""
    from tests.boot.qemu import qmp_command

    console, qmp = redfish_qemu.state_file, redfish_qemu.qmp
    assert console is not None and qmp is not None
    settings = power_settings(f"sqlite:///{tmp_path / 'store' / 'fleet.db'}",
                              reboot_rescue_interval_seconds=0.5)
    with thread_server(settings) as fleet:
        machine, _, _ = rebooting_machine(fleet, 2.0,
                                          bmc=f"http://127.0.0.1:{redfish_qemu.port}")
        wait_for(qmp.exists, timeout=30)
        qmp_command(qmp, "stop")
        assert qmp_command(qmp, "query-status")["return"]["status"] == "paused"

        wait_for(lambda: fleet.admin.machine(machine)["state"] == "degraded", timeout=120)
        assert qmp_command(qmp, "query-status")["return"]["status"] == "running"
        text = console.read_text(errors="replace")
        assert text.count("--- power on, boot from") == 2  # the test's, the rescue's
        reason = fleet.admin.machine(machine)["history"][-1]["reason"]
        assert "power-cycled once through its BMC: on -> off -> on" in reason
        cycles = [json.loads(e["detail"]) for e in audit_of(fleet, machine)
                  if e["action"] == "power cycle"]
        assert [c["sent"] for c in cycles] == [["off", "on"]]
        watch = watch_of(fleet, machine)
        assert watch is not None and watch["rescued"]  # claimed: no later pass acts on it


def test_replicas_racing_on_postgresql_cycle_an_overdue_reboot_once(
        tmp_path: Path, postgres_url_or_skip: str, redfish: Emulator,
        http_proxy: HttpFaultProxy) -> None:
    """Four passes at once, each on its own connection pool (as four replicas): one claims
    the watch and cycles; the others find it claimed and send nothing."""
    import threading

    from divingbell.power.secrets import create_key

    key = tmp_path / "secrets.key"
    create_key(key)
    settings = power_settings(postgres_url_or_skip, secrets_key_file=str(key),
                              reboot_rescue_interval_seconds=0)
    with thread_server(settings) as fleet:
        machine, _, _ = rebooting_machine(fleet, bmc=http_proxy.url)
        sent_before = len(system_posts(http_proxy))
        barrier = threading.Barrier(4)
        results: list[list[rescue.Rescue]] = []

        def replica() -> None:
            db = Database(settings.db_url)
            try:
                barrier.wait()
                results.append(rescue.run_once(db, settings, secret_box(fleet),
                                               utcnow() + timedelta(seconds=OVERDUE)))
            finally:
                db.dispose()

        threads = [threading.Thread(target=replica) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(len(r) for r in results) == [0, 0, 0, 1]
        assert reset_types(http_proxy)[-2:] == ["ForceOff", "On"]
        assert len(system_posts(http_proxy)) == sent_before + 2
        assert [e["action"] for e in audit_of(fleet, machine)].count("reboot-rescue") == 1
