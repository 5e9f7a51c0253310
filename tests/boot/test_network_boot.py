"""Real machines (qemu VMs) network-boot from the fleet service over iPXE, are discovered, get
roles, install one at a time and then boot from their disks; a machine whose install fails is
recorded as failed with its output and gives its install slot back. Legacy BIOS machines, and
one UEFI machine (OVMF) through the same life."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet.settings import FleetSettings
from divingbell.image.discovery import DiscoveryImage
from tests.boot.conftest import VmSupport
from tests.boot.qemu import (
    GUEST_HOST,
    VM,
    disk_serial,
    missing_uefi_firmware,
    read_marker,
    read_mbr_partitions,
    start_vm,
)
from tests.fleet.servers import ThreadServer, thread_server

MiB = 1 << 20
# Holds the install slot until the test lets this machine go (a file under the assets), so the
# test decides when each install ends; then runs the image's built-in install step.
GATED_HOOK = """#!/bin/sh
echo "install of $DIVINGBELL_MACHINE_ID ($DIVINGBELL_ROLES) waits for the test"
until wget -q -O /dev/null "$DIVINGBELL_URL/v1/assets/go/$DIVINGBELL_MACHINE_ID"; do sleep 1; done
exec /usr/lib/divingbell/install-hook
"""
PROFILES = """\
discovery:
  default:
    kernel: vmlinuz
    initrd: [initrd.img]
    cmdline: console=ttyS0,115200n8 panic=10 quiet divingbell.poll=1 divingbell.hook=/v1/assets/hooks/gated.sh
install:
  default:
    kernel: vmlinuz
    initrd: [initrd.img]
    cmdline: console=ttyS0,115200n8 panic=10 quiet divingbell.poll=1 divingbell.hook=/v1/assets/hooks/gated.sh
"""


@pytest.fixture
def boot_service(discovery_image: DiscoveryImage, tmp_path: Path) -> Iterator[ThreadServer]:
    assets = tmp_path / "assets"
    (assets / "hooks").mkdir(parents=True)
    (assets / "go").mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (assets / name).symlink_to(discovery_image.directory / name)
    (assets / "hooks" / "gated.sh").write_text(GATED_HOOK)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES)
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             install_parallel=1, install_ttl_seconds=600,
                             assets_dir=str(assets), boot_profiles=str(profiles))
    with thread_server(settings) as server:
        yield server


def wait_until(what: str, predicate: Any, timeout: float, vms: list[VM]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        stopped = [vm for vm in vms if vm.process.poll() is not None]
        if stopped or time.monotonic() > deadline:
            consoles = "\n".join(f"--- {vm.name}:\n{vm.console()[-1500:]}" for vm in vms)
            why = f"qemu exited ({', '.join(vm.name for vm in stopped)})" if stopped \
                else "timed out"
            raise AssertionError(f"{why} waiting for {what}\n{consoles}")
        time.sleep(0.5)


def boot_nic(machine: dict[str, Any]) -> dict[str, Any]:
    nic: dict[str, Any] = next(i for i in machine["interfaces"] if i["boot"])
    return nic


def transitions(history: list[dict[str, Any]]) -> list[str]:
    """The states a machine went through, in order (boot requests that changed nothing are
    history rows with from == to)."""
    out: list[str] = []
    for row in history:
        if row["from"] != row["to"]:
            out.append(row["to"])
    return out


def installed_partitions(disk: Path) -> list[tuple[int, int, int]]:
    """What the default install hook writes: Linux from sector 2048, then a 1 MiB EFI system
    partition in the last 2048 sectors."""
    sectors = disk.stat().st_size // 512
    return [(0x83, 2048, sectors - 2048 - 2048), (0xEF, sectors - 2048, 2048)]


def test_vms_boot_discover_install_in_turn_and_boot_from_disk(
        boot_service: ThreadServer, vm_support: VmSupport, tmp_path: Path) -> None:
    bootfile = f"http://{GUEST_HOST}:{boot_service.port}/boot.ipxe"
    specs = {
        "node-a": dict(mac="52:54:00:d1:00:0a", uuid="8c6f0a1e-0000-4000-8000-00000000000a",
                       disk_size="64M", disk_bus="ide", serial="SER-A",
                       dhcp_hostname="node-a", dhcp_domain="example.org"),
        "node-b": dict(mac="52:54:00:d1:00:0b", uuid="8c6f0a1e-0000-4000-8000-00000000000b",
                       disk_size="96M", disk_bus="virtio"),
        "node-c": dict(mac="52:54:00:d1:00:0c", uuid="8c6f0a1e-0000-4000-8000-00000000000c"),
    }
    vms: list[VM] = []
    try:
        for name, spec in specs.items():
            vms.append(start_vm(tmp_path, name, bootfile=bootfile, kvm=vm_support.kvm,
                                **spec))  # type: ignore[arg-type]
        by_name = {vm.name: vm for vm in vms}
        reader = boot_service.reader

        def registered() -> dict[str, dict[str, Any]] | None:
            machines = {m["uuid"]: m for m in reader.machines()}
            if len(machines) == 3 and all(m["state"] != "booting" for m in machines.values()):
                return {vm.name: reader.machine(machines[vm.uuid]["id"]) for vm in vms}
            return None

        found = wait_until("three machines to register", registered, 240, vms)

        # Facts, as each machine reported them from its discovery image.
        for name, machine in found.items():
            vm, spec = by_name[name], specs[name]
            boot_nics = [i for i in machine["interfaces"] if i["boot"]]
            assert [i["mac"] for i in boot_nics] == [vm.mac], machine["interfaces"]
            assert boot_nics[0]["gateway"] == GUEST_HOST
            assert any(a["address"] == "10.0.2.15" and a["prefix"] == 24
                       for a in boot_nics[0]["addresses"])
            assert len(machine["boot_id"]) == 36
            sizes = [d["size_bytes"] for d in machine["disks"]]
            expected = {"64M": [64 * MiB], "96M": [96 * MiB]}.get(spec.get("disk_size", ""), [])
            assert sizes == expected, machine["disks"]
        assert found["node-a"]["serial"] == "SER-A"
        assert found["node-a"]["hostname"] == "node-a"
        assert boot_nic(found["node-a"])["fqdns"] == ["node-a.example.org"]
        assert found["node-a"]["disks"][0]["path"] == "/dev/sda"
        assert found["node-a"]["disks"][0]["model"] == "QEMU HARDDISK"
        assert found["node-b"]["disks"][0]["path"] == "/dev/vda"
        assert found["node-b"]["disks"][0]["serial"] == disk_serial("node-b")
        roles = sorted(tuple(m["roles"]) for m in found.values())
        assert roles == [("control-plane",), ("worker",), ("worker",)]

        # Install throttle of 1: one machine installs, the others wait for the slot until the
        # installing one reports its result.
        ids = {name: m["id"] for name, m in found.items()}
        order: list[str] = []
        while len(order) < 3:
            holder = wait_until("a machine to hold the install grant", lambda: [
                m for m in reader.machines() if m["state"] == "installing"], 120, vms)
            assert len(holder) == 1, holder
            name = next(n for n, i in ids.items() if i == holder[0]["id"])
            for other in specs:
                if other not in order and other != name:
                    by_name[other].wait_for("divingbell: waiting for an install slot", 60)
                    assert reader.machine(ids[other])["state"] == "scheduled"
            (Path(boot_service.settings.assets_dir or "") / "go" / ids[name]).touch()
            wait_until(f"{name} to report its install", lambda machine_id=ids[name]: reader.machine(
                machine_id)["state"] in ("installed", "failed"), 60, vms)
            order.append(name)

        # Installed machines reboot, are told to boot from disk, and do.
        for name in ("node-a", "node-b"):
            by_name[name].wait_for("divingbell: booted from the installed disk", 120)
            machine = reader.machine(ids[name])
            assert machine["state"] == "installed"
            assert transitions(machine["history"]) == [
                "booting", "discovered", "scheduled", "installing", "installed"]
            last = machine["history"][-1]
            assert (last["from"], last["to"]) == ("installed", "installed")
            assert "boot from the local disk" in last["reason"]
            disk = by_name[name].disk
            assert disk is not None
            assert read_mbr_partitions(disk) == installed_partitions(disk)
            marker = read_marker(disk)
            assert marker["machine"] == ids[name]
            assert marker["roles"] == " ".join(machine["roles"])
            assert marker["boot_id"] == found[name]["boot_id"]

        # The machine with no disk failed, with the hook's output kept.
        failed = reader.machine(ids["node-c"])
        assert failed["state"] == "failed"
        assert transitions(failed["history"])[-2:] == ["installing", "failed"]
        assert "no disk to install on" in (failed["install_output"] or "")
        by_name["node-c"].wait_for("install failure reported; this machine stays up", 30)

        # No grant is left held: a new machine gets one at once.
        registration = boot_service.bootstrap.discover({
            "uuid": "8c6f0a1e-0000-4000-8000-0000000000ff", "boot_id": "b" * 36,
            "interfaces": [{"name": "eth0", "mac": "52:54:00:d1:00:ff", "boot": True}],
            "disks": [{"path": "/dev/sda", "size_bytes": 64 * MiB}]})
        machine_client = boot_service.client(registration["credential"])
        grant = machine_client.call(
            "POST", f"/v1/machines/{registration['machine_id']}/install/grant", {})
        assert grant["granted"] is True
    finally:
        for vm in vms:
            vm.stop()


def test_a_uefi_vm_boots_discovers_installs_and_boots_its_disk(
        boot_service: ThreadServer, vm_support: VmSupport, tmp_path: Path) -> None:
    reason = missing_uefi_firmware()
    if reason:
        pytest.skip(reason)
    bootfile = f"http://{GUEST_HOST}:{boot_service.port}/boot.ipxe"
    vm = start_vm(tmp_path, "node-u", mac="52:54:00:d1:00:e1",
                  uuid="8c6f0a1e-0000-4000-8000-0000000000e1", bootfile=bootfile,
                  disk_size="64M", kvm=vm_support.kvm, firmware="uefi")
    reader = boot_service.reader
    try:
        def registered() -> dict[str, Any] | None:
            machines = [m for m in reader.machines() if m["uuid"] == vm.uuid]
            if machines and machines[0]["state"] != "booting":
                return reader.machine(machines[0]["id"])
            return None

        # The EFI iPXE fetched the EFI-stub kernel and its initrd, and the discovery client in
        # that initrd reported the machine's facts.
        machine = wait_until("the UEFI machine to register", registered, 240, [vm])
        assert transitions(machine["history"])[:2] == ["booting", "discovered"]
        assert "platform=efi" in machine["history"][0]["reason"]
        assert [i["mac"] for i in machine["interfaces"] if i["boot"]] == [vm.mac]
        assert [d["size_bytes"] for d in machine["disks"]] == [64 * MiB]

        (Path(boot_service.settings.assets_dir or "") / "go" / machine["id"]).touch()
        wait_until("the UEFI machine to install", lambda: reader.machine(
            machine["id"])["state"] in ("installed", "failed"), 120, [vm])
        installed = reader.machine(machine["id"])
        assert installed["state"] == "installed", installed["install_output"]

        # After its reboot the service sends it to its disk; under UEFI that is iPXE's exit back
        # to the firmware, whose next boot option is the disk: OVMF runs the EFI application the
        # hook put in the EFI system partition.
        vm.wait_for("divingbell: UEFI: back to the firmware", 120)
        vm.wait_for(r"divingbell: booted from the installed disk \(UEFI\)", 180)
        machine = reader.machine(machine["id"])
        assert machine["state"] == "installed"
        assert transitions(machine["history"]) == [
            "booting", "discovered", "scheduled", "installing", "installed"]
        last = machine["history"][-1]
        assert "boot from the local disk" in last["reason"] and "platform=efi" in last["reason"]
        assert vm.disk is not None
        assert read_mbr_partitions(vm.disk) == installed_partitions(vm.disk)
        assert read_marker(vm.disk)["machine"] == machine["id"]
    finally:
        vm.stop()
