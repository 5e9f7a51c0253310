"""Power through the fleet service against real BMC emulators on loopback: sushy-tools'
Redfish emulator and pyghmi's IPMI BMC, each its own process, with fault injection between
the service and the BMC (issue 28)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet.backup import export
from divingbell.fleet.client import FleetApiError
from divingbell.fleet.db import Database
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, wait_for
from tests.fleet.test_api import error_of, register
from tests.power.conftest import PASSWORD, USER, Emulator
from tests.power.faults import HttpFaultProxy, UdpFaultRelay

SYSTEM = "/redfish/v1/Systems/27946b59-9e44-4fa7-8e91-f3527a1ef094"


def set_bmc(fleet: ThreadServer, machine: str, protocol: str, address: str,
            **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = fleet.admin.call("PUT", f"/v1/machines/{machine}/bmc", {
        "protocol": protocol, "address": address, "username": USER, "password": PASSWORD,
        **extra})
    return result


def power(fleet: ThreadServer, machine: str, action: str, boot_once: str | None = None
          ) -> dict[str, Any]:
    body: dict[str, Any] = {"action": action}
    if boot_once:
        body["boot_once"] = boot_once
    client = fleet.admin
    client.timeout = 60
    result: dict[str, Any] = client.call("POST", f"/v1/machines/{machine}/power", body)
    return result


def refused(fleet: ThreadServer, machine: str, action: str) -> dict[str, Any]:
    failure = error_of(lambda: power(fleet, machine, action))
    assert failure.status == 502, failure
    detail: dict[str, Any] = failure.detail
    return detail


def system_posts(proxy: HttpFaultProxy) -> list[tuple[str, str]]:
    return [r for r in proxy.faults.posts() if r[1].startswith(SYSTEM)]


def emulator_boot_target(proxy: HttpFaultProxy) -> str:
    import base64
    import urllib.request

    request = urllib.request.Request(proxy.url + SYSTEM, headers={
        "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()})
    with urllib.request.urlopen(request) as answer:
        return str(json.load(answer)["Boot"]["BootSourceOverrideTarget"])


def audit_of(fleet: ThreadServer, machine: str) -> list[dict[str, Any]]:
    return [e for e in fleet.admin.call("GET", "/v1/audit?limit=100")
            if e["subject"] == machine]


def test_redfish_status_on_boot_once_cycle_off_each_confirmed(
        power_fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = power_fleet
    machine, _ = register(fleet, 1)
    shown = set_bmc(fleet, machine, "redfish", http_proxy.url + SYSTEM)
    assert shown["credentials"] == "set (encrypted)" and shown["verify_tls"] is True
    assert power(fleet, machine, "status")["state"] == "off"
    assert system_posts(http_proxy) == []  # a status query sends nothing

    on = power(fleet, machine, "on", boot_once="pxe")
    assert on["ok"] and on["before"] == "off" and on["state"] == "on"
    assert on["actions"] == ["boot-once pxe", "on"]
    # What the BMC was told (the emulator keeps the target; it shows no "Once" back).
    patch = json.loads(http_proxy.faults.bodies[http_proxy.faults.requests.index(
        ("PATCH", SYSTEM))])["Boot"]
    assert (patch["BootSourceOverrideTarget"], patch["BootSourceOverrideEnabled"]) == (
        "Pxe", "Once")
    assert emulator_boot_target(http_proxy) == "Pxe"

    again = power(fleet, machine, "on")
    assert again["actions"] == [] and "already on" in again["message"]

    cycled = power(fleet, machine, "cycle")
    assert cycled["actions"] == ["off", "on"] and cycled["state"] == "on"
    off = power(fleet, machine, "off")
    assert off["actions"] == ["off"] and off["state"] == "off"
    assert fleet.reader.call("GET", f"/v1/machines/{machine}/bmc")["power_state"] == "off"

    events = audit_of(fleet, machine)
    assert [e["action"] for e in events][:5] == [
        "power off", "power cycle", "power on", "power on", "power status"]
    assert all(e["actor"].startswith("token:") for e in events)
    assert json.loads(events[0]["detail"])["sent"] == ["off"]

    metrics = fleet.client().request("GET", "/metrics").body.decode()
    assert 'divingbell_fleet_power_state{state="off"} 1.0' in metrics

    # The credentials appear nowhere: not in the API, the audit, the logs, the store's export.
    db = Database(fleet.settings.db_url)
    try:
        dumped = json.dumps(export(db))
    finally:
        db.dispose()
    sealed = json.loads(dumped)["tables"]["bmcs"][0]["sealed_credentials"]
    assert sealed.startswith("gAAAA")  # Fernet: carried sealed, never opened
    outputs = [json.dumps(shown), json.dumps(events), dumped, caplog.text,
               json.dumps(fleet.reader.call("GET", f"/v1/machines/{machine}/bmc"))]
    for text in outputs:
        assert PASSWORD not in text and USER not in text.replace(f'"{USER}"', "")
    key = Path(fleet.settings.db_url.removeprefix("sqlite:///")).parent / "fleet-secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_bmc_that_answers_503_gets_no_power_action(
        power_fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "redfish", http_proxy.url + SYSTEM)
    http_proxy.faults.unavailable = 1000
    detail = refused(power_fleet, machine, "cycle")
    assert detail["error"] == "bmc-unconfirmed" and detail["actions"] == []
    assert "nothing sent" in detail["message"] and "503" in " ".join(detail["errors"])
    assert system_posts(http_proxy) == []
    event = audit_of(power_fleet, machine)[0]
    assert event["action"] == "power cycle" and json.loads(event["detail"])["ok"] is False


def test_a_bmc_that_times_out_gets_no_power_action(
        power_fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "redfish", http_proxy.url + SYSTEM)
    power(power_fleet, machine, "status")
    http_proxy.faults.hang = True
    detail = refused(power_fleet, machine, "on")
    assert detail["actions"] == [] and detail["state"] == "unknown"
    assert system_posts(http_proxy) == []


def test_a_power_state_that_lies_once_is_not_acted_on(
        power_fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "redfish", http_proxy.url + SYSTEM)
    power(power_fleet, machine, "on")
    before = len(system_posts(http_proxy))
    http_proxy.faults.lie_once = "Off"  # the machine is on; the BMC says off, once
    result = power(power_fleet, machine, "on")
    assert result["before"] == "on" and result["actions"] == []
    assert len(system_posts(http_proxy)) == before


def test_a_bmc_that_stops_answering_mid_change_is_reported_not_retried(
        power_fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "redfish", http_proxy.url + SYSTEM)
    power(power_fleet, machine, "on")
    # The BMC takes the off, then answers nothing more.
    http_proxy.faults.commands = 0
    http_proxy.faults.silent_after_commands = 1
    detail = refused(power_fleet, machine, "cycle")
    assert detail["actions"] == ["off"], detail  # never "on" after an unconfirmed off
    assert "off not confirmed" in detail["message"] and "nothing more sent" in detail["message"]
    assert [p for p in system_posts(http_proxy)][-1][1].endswith("ComputerSystem.Reset")
    assert power_fleet.reader.call("GET", f"/v1/machines/{machine}/bmc")["power_state"] == (
        "unknown")


def test_ipmi_status_on_boot_once_cycle_soft_off(
        power_fleet: ThreadServer, ipmi: Emulator, udp_relay: UdpFaultRelay,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "ipmi", f"127.0.0.1:{udp_relay.port}")
    assert power(power_fleet, machine, "status")["state"] == "off"
    on = power(power_fleet, machine, "on", boot_once="pxe")
    assert on["state"] == "on" and on["actions"] == ["boot-once pxe", "on"]
    assert ipmi.state()["bootdev"] == "network"
    cycled = power(power_fleet, machine, "cycle")
    assert cycled["actions"] == ["off", "on"] and cycled["state"] == "on"
    soft = power(power_fleet, machine, "soft-off")
    assert soft["state"] == "off"
    assert ipmi.state()["commands"] == ["bootdev network", "on", "off", "on", "shutdown"]
    assert PASSWORD not in caplog.text and "power soft-off" in caplog.text


def test_an_ipmi_bmc_that_goes_silent_gets_no_action(
        power_fleet: ThreadServer, ipmi: Emulator, udp_relay: UdpFaultRelay) -> None:
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "ipmi", f"127.0.0.1:{udp_relay.port}")
    assert power(power_fleet, machine, "status")["state"] == "off"
    udp_relay.stop_after = udp_relay.from_client  # nothing more reaches the BMC
    detail = refused(power_fleet, machine, "on")
    assert detail["actions"] == [] and "nothing sent" in detail["message"]
    assert f"ipmi 127.0.0.1:{udp_relay.port}: reading the power state" in detail["message"]
    assert ipmi.state()["commands"] == []


def test_wrong_credentials_are_a_clear_refusal(
        power_fleet: ThreadServer, redfish: Emulator, http_proxy: HttpFaultProxy) -> None:
    machine, _ = register(power_fleet, 1)
    power_fleet.admin.call("PUT", f"/v1/machines/{machine}/bmc", {
        "protocol": "redfish", "address": http_proxy.url + SYSTEM, "username": USER,
        "password": "wrong-password"})
    detail = refused(power_fleet, machine, "off")
    assert "401" in detail["message"] and detail["actions"] == []
    assert "wrong-password" not in json.dumps(detail)


def test_the_ui_shows_the_power_state_and_powers_for_admins_only(
        power_fleet: ThreadServer, ipmi: Emulator, udp_relay: UdpFaultRelay) -> None:
    from tests.fleet.test_ui import CHROMIUM, FLAGS, login, new_page

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.fleet.test_api import facts

    machine, _ = register(power_fleet, 1)
    other = power_fleet.bootstrap.discover(  # its discovery said where its BMC is
        {**facts(2), "bmc": {"address": "192.0.2.44", "source": "ipmitool"}})["machine_id"]
    set_bmc(power_fleet, machine, "ipmi", f"127.0.0.1:{udp_relay.port}")
    power(power_fleet, machine, "status")
    # The machine list carries each one's last confirmed power state (None: no BMC), whole
    # and paged.
    listed = {m["id"]: m["power_state"] for m in power_fleet.reader.call("GET", "/v1/machines")}
    assert listed == {machine: "off", other: None}
    page_one = power_fleet.reader.call("GET", "/v1/machines?limit=1")
    assert [m["power_state"] for m in page_one["machines"]] == ["off"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = new_page(browser)
            login(page, power_fleet, power_fleet.admin_token)
            page.goto(f"{power_fleet.url}/ui/machines/{machine}")
            page.wait_for_selector("#machine-facts .card:has-text('Power') .badge.off")
            assert "ipmi" in page.inner_text("#machine-facts")
            page.check("#boot-pxe")
            page.click("#power-actions button[data-action=on]")  # with the session's CSRF token
            page.wait_for_selector("#machine-facts .card:has-text('Power') .badge.on",
                                   timeout=30_000)
            assert ipmi.state()["bootdev"] == "network"
            page.goto(f"{power_fleet.url}/ui/machines")
            power_cell = "td:nth-child(8)"  # the Power column
            page.wait_for_selector(f"#machines tr[data-id={machine}] {power_cell} .badge.on")
            assert page.inner_text(f"#machines tr[data-id={other}] {power_cell}") == "–"
            page.goto(f"{power_fleet.url}/ui/machines/{other}")
            page.wait_for_selector("#machine-facts .card:has-text('no BMC')")
            assert page.inner_text("#machine-facts .card:has-text('BMC (reported)')") == (
                "BMC (reported)\n\n192.0.2.44 (ipmitool; not set: divingbell fleet bmc)")
            assert not page.is_visible("#power-actions")

            reader = new_page(browser)
            login(reader, power_fleet, power_fleet.reader_token)
            reader.goto(f"{power_fleet.url}/ui/machines/{machine}")
            reader.wait_for_selector("#machine-facts .card:has-text('Power') .badge.on")
            assert not reader.is_visible("#power-actions")
        finally:
            browser.close()
    event = audit_of(power_fleet, machine)[0]
    assert event["action"] == "power on" and event["actor"].startswith("token:")
    assert json.loads(event["detail"])["sent"] == ["boot-once pxe", "on"]


def test_a_qemu_vm_is_network_booted_and_switched_off_through_redfish(
        power_fleet: ThreadServer, redfish_qemu: Emulator) -> None:
    """The emulator's system is a real qemu VM: powered off (no process), it is powered on
    through its BMC with PXE once and boots from the network (iPXE on its console); a soft-off
    it ignores (no OS) is reported unconfirmed after the timeout, nothing more sent; a hard
    off ends the process, confirmed."""
    console = redfish_qemu.state_file
    assert console is not None
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "redfish", f"http://127.0.0.1:{redfish_qemu.port}{SYSTEM}")
    assert power(power_fleet, machine, "status")["state"] == "off" and not console.exists()

    try:
        on = power(power_fleet, machine, "on", boot_once="pxe")
    except FleetApiError as exc:  # say why: qemu's own words, and the emulator's
        seen = console.read_text(errors="replace") if console.exists() else "(no qemu started)"
        raise AssertionError(f"{exc}\nconsole: {seen[-2000:]}\nemulator: "
                             f"{redfish_qemu.log.read_text(errors='replace')[-3000:]}") from None
    assert on["ok"] and on["actions"] == ["boot-once pxe", "on"]
    wait_for(lambda: "iPXE" in console.read_text(errors="replace"), timeout=60)
    assert "boot from network" in console.read_text()

    ignored = refused(power_fleet, machine, "soft-off")
    assert ignored["actions"] == ["soft-off"] and "off not confirmed" in ignored["message"]
    assert power(power_fleet, machine, "status")["state"] == "on"  # still running

    off = power(power_fleet, machine, "off")
    assert off["ok"] and off["state"] == "off"
    assert power(power_fleet, machine, "status")["state"] == "off"


def test_a_qemu_vm_is_network_booted_cycled_and_switched_off_through_ipmi(
        power_fleet: ThreadServer, ipmi_qemu: Emulator) -> None:
    """IPMI drives a real VM as Redfish does: powered on with PXE once (it boots from the
    network), cycled (off confirmed before on; the next boot is from its disk: the PXE was
    once), switched off (confirmed when its qemu has gone)."""
    console = ipmi_qemu.console
    assert console is not None
    machine, _ = register(power_fleet, 1)
    set_bmc(power_fleet, machine, "ipmi", f"127.0.0.1:{ipmi_qemu.port}")
    assert power(power_fleet, machine, "status")["state"] == "off" and not console.exists()

    try:
        on = power(power_fleet, machine, "on", boot_once="pxe")
    except FleetApiError as exc:
        seen = console.read_text(errors="replace") if console.exists() else "(no qemu started)"
        raise AssertionError(f"{exc}\nconsole: {seen[-2000:]}\nemulator: "
                             f"{ipmi_qemu.log.read_text(errors='replace')[-3000:]}") from None
    assert on["ok"] and on["actions"] == ["boot-once pxe", "on"] and on["state"] == "on"
    wait_for(lambda: "iPXE" in console.read_text(errors="replace"), timeout=60)
    assert "boot from network" in console.read_text()

    cycled = power(power_fleet, machine, "cycle")
    assert cycled["actions"] == ["off", "on"] and cycled["state"] == "on"
    wait_for(lambda: "boot from disk" in console.read_text(errors="replace"), timeout=30)

    off = power(power_fleet, machine, "off")
    assert off["ok"] and off["state"] == "off"
    assert power(power_fleet, machine, "status")["state"] == "off"
    assert ipmi_qemu.state()["commands"] == ["bootdev network", "on", "off", "on", "off"]


def test_reprovision_re_enrols_the_machine_then_network_boots_it_through_its_bmc(
        power_fleet: ThreadServer, redfish_qemu: Emulator, cli: Cli) -> None:
    from tests.fleet.test_rollouts_api import fleet_of

    console = redfish_qemu.state_file
    assert console is not None
    machine = next(iter(fleet_of(power_fleet, 1)))  # ready: its boots go to its disk
    set_bmc(power_fleet, machine, "redfish", f"http://127.0.0.1:{redfish_qemu.port}{SYSTEM}")
    assert power(power_fleet, machine, "on")["state"] == "on"
    wait_for(lambda: "boot from disk" in console.read_text(errors="replace"), timeout=30)

    result = cli("fleet", "reprovision", machine, "--server", power_fleet.url, "--format",
                 "json", env={"DIVINGBELL_TOKEN": power_fleet.admin_token})
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["actions"] == ["boot-once pxe", "off", "on"] and answer["state"] == "on"
    assert answer["machine_state"] == "booting"  # its next boot enrols it again and installs
    detail = power_fleet.admin.machine(machine)
    assert detail["state"] == "booting"
    assert detail["history"][-1]["reason"].startswith("reprovision requested by token:")
    text = console.read_text(errors="replace")
    assert text.index("boot from disk") < text.index("boot from network")
    wait_for(lambda: "iPXE" in console.read_text(errors="replace").split(
        "boot from network")[-1], timeout=60)
    assert [e["action"] for e in audit_of(power_fleet, machine)][:2] == [
        "power cycle", "reprovision"]
