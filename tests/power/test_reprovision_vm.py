"""A VM installed and reinstalled through its BMC (issues 28 and 26): sushy-tools' Redfish
emulator whose system is a qemu VM of the boot tests (`QemuDriver`), a real fleet service
serving the discovery and OS images.

The VM, off, is switched on through the BMC with PXE once: it network-boots, is discovered,
installs the real Debian image and comes back `ready` from its disk. Switched off through the
fleet (confirmed), `fleet reprovision` alone (PXE once and a confirmed power-on: nobody
starts it) makes it boot from the network, install again and come back `ready` as the same
machine: same id, its history holding both installs, the operator's actions audited.

Slow (two Debian installs and boots under emulation): marked `slow`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from divingbell.image.discovery import DiscoveryImage
from divingbell.image.os import OsImage
from divingbell.power import control
from divingbell.power.bmc import Endpoint, connect
from divingbell.power.secrets import Credentials
from tests.boot.conftest import (  # noqa: F401  (the boot tests' fixtures)
    VmSupport,
    discovery_image,
    vm_support,
)
from tests.boot.qemu import GUEST_HOST
from tests.boot.test_network_boot import transitions
from tests.boot.test_os_install import (  # noqa: F401  (the session's OS image)
    DOC,
    os_image,
    os_service_settings,
)
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, thread_server
from tests.power.conftest import PASSWORD, USER, Emulator, redfish_emulator, require_qemu
from tests.power.qemu_power import VmSpec
from tests.power.redfish_bmc import SYSTEM_UUID
from tests.power.test_power_fleet import SYSTEM, audit_of, power, set_bmc

pytestmark = pytest.mark.slow


class Steps:
    """Waits on the VM's console and the fleet, each bounded, with the times of each step."""

    def __init__(self, console: Path, emulator: Emulator) -> None:
        self.console, self.emulator = console, emulator
        self.started = time.monotonic()
        self.times: dict[str, float] = {}

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def until(self, step: str, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline or self.emulator.process.poll() is not None:
                raise AssertionError(
                    f"no {step} within {timeout:.0f} s\nconsole:\n{self.text()[-3000:]}\n"
                    f"emulator:\n{self.emulator.log.read_text(errors='replace')[-1500:]}")
            time.sleep(1)
        self.times[step] = round(time.monotonic() - self.started, 1)
        return value


def installed_and_ready(fleet: ThreadServer, steps: Steps, after: int, label: str) -> str:
    """Wait for one install of the VM from power-on to `ready`; its machine id."""
    def machine_in(*states: str) -> Any:
        return next((m for m in fleet.reader.machines() if m["uuid"] == SYSTEM_UUID
                     and m["state"] in states), None)

    steps.until(f"{label}: network boot", lambda: "iPXE" in steps.text()[after:], 120)
    steps.until(f"{label}: discovered", lambda: machine_in(
        "discovered", "scheduled", "installing"), 600)
    found = steps.until(f"{label}: installed", lambda: machine_in("installed", "failed"), 1800)
    machine: str = found["id"]
    detail = fleet.reader.machine(machine)
    assert detail["state"] == "installed", detail["install_output"]
    steps.until(f"{label}: Debian from its disk", lambda: "Debian GNU/Linux 12" in
                steps.text()[after:] and "ttyS0" in steps.text()[after:], 1200)
    steps.until(f"{label}: ready", lambda: fleet.reader.machine(machine)["state"] == "ready",
                900)
    return machine


def test_a_powered_off_vm_is_installed_then_reprovisioned_through_its_bmc(
        discovery_image: DiscoveryImage, os_image: OsImage,  # noqa: F811
        vm_support: VmSupport, tmp_path: Path, cli: Cli) -> None:  # noqa: F811
    require_qemu()
    settings = os_service_settings(discovery_image, os_image, tmp_path,
                                   power_min_interval_seconds=0.2, power_timeout_seconds=60.0,
                                   bmc_request_timeout_seconds=10.0)
    with thread_server(settings) as fleet:
        fleet.admin.push_document(DOC.format(value=37, revision=1).encode())
        workdir = tmp_path / "vm"
        workdir.mkdir()
        spec = VmSpec(str(workdir), bootfile=f"http://{GUEST_HOST}:{fleet.port}/boot.ipxe",
                      name="node-bmc", disk_size="4G", memory_mb=1024, kvm=vm_support.kvm)
        with redfish_emulator(tmp_path, "redfish-vm", "--qemu",
                              str(spec.write(tmp_path / "vm.json")),
                              console=spec.console()) as emulator:
            steps = Steps(spec.console(), emulator)
            bmc_url = f"http://127.0.0.1:{emulator.port}{SYSTEM}"
            # First install: the machine is not in the fleet yet; its BMC is switched on by
            # hand (here: the same library the fleet uses), network first, once.
            bmc = connect(Endpoint("redfish", bmc_url, timeout=10.0),
                          Credentials(USER, PASSWORD))
            try:
                first_on = control.run(bmc, "on", "pxe", control.Policy(min_interval=0.2))
            finally:
                bmc.close()
            assert first_on.ok and first_on.before == "off", first_on.message
            machine = installed_and_ready(fleet, steps, 0, "install 1")

            # Its BMC in the fleet; off, confirmed (the emulator: its qemu has ended).
            set_bmc(fleet, machine, "redfish", bmc_url)
            off = power(fleet, machine, "off")
            assert off["ok"] and off["state"] == "off", off
            steps.times["off"] = round(time.monotonic() - steps.started, 1)
            before = len(steps.text())

            # Reprovision: nobody starts it but the fleet, through its BMC.
            result = cli("fleet", "reprovision", machine, "--server", fleet.url, "--format",
                         "json", env={"DIVINGBELL_TOKEN": fleet.admin_token})
            assert result.returncode == 0, result.stderr
            answer = json.loads(result.stdout)
            assert answer["actions"] == ["boot-once pxe", "on"] and answer["state"] == "on"
            assert "boot from network" in steps.text()[before:]
            again = installed_and_ready(fleet, steps, before, "install 2")

            assert again == machine and len(fleet.reader.machines()) == 1
            history = fleet.reader.machine(machine)["history"]
            states = transitions(history)
            assert states[:6] == ["booting", "discovered", "scheduled", "installing",
                                  "installed", "ready"], states
            assert states[6] == "booting" and states[-3:] == ["installing", "installed", "ready"]
            assert any(row["reason"].startswith("reprovision requested by token:")
                       for row in history)
            # Newest first: its enrolment again, the fleet's power-on, the operator's
            # reprovision, the operator's power off.
            assert [e["action"] for e in audit_of(fleet, machine)][:4] == [
                "enrol", "power cycle", "reprovision", "power off"]
            print(f"\nreprovision through a BMC, step times (s since the first power-on, "
                  f"{'KVM' if vm_support.kvm else 'TCG'}): {steps.times}")
