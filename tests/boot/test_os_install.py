"""From bare metal to a managed node, in one VM: it network-boots the discovery image, registers,
gets a role and an install grant, the default install hook writes the real OS image
(`divingbell image os`) to its disk, it reboots into Debian from that disk, and the divingbell
agent there (fleet mode, with the credential the hook copied) fetches the machine's
configuration, converges it and reports: the machine becomes `ready`, up to date with the active
revision, and the `net.*` sysctl the document sets is read back on the VM's serial console. A
second revision pushed afterwards reaches it the same way.

Slow (a Debian boot under software emulation): marked `slow`, so CI can run it beside the rest.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from divingbell.fleet.settings import FleetSettings
from divingbell.image.discovery import DiscoveryImage
from divingbell.image.os import OsImage, OsImageError, build_os_image
from tests.boot.conftest import VmSupport
from tests.boot.qemu import GUEST_HOST, VM, missing_uefi_firmware, read_mbr_partitions, start_vm
from tests.boot.test_network_boot import transitions, wait_until
from tests.fleet.servers import ThreadServer, thread_server

pytestmark = pytest.mark.slow

OS_CACHE = Path(os.environ.get("DIVINGBELL_TEST_CACHE", "/var/cache/divingbell-test")) / "os"
MIRROR = os.environ.get("DIVINGBELL_TEST_MIRROR", "http://deb.debian.org/debian")
PROFILES = """\
discovery:
  default:
    kernel: vmlinuz
    initrd: [initrd.img]
    cmdline: console=ttyS0,115200n8 panic=10 quiet divingbell.poll=1
install:
  default:
    kernel: vmlinuz
    initrd: [initrd.img]
    cmdline: console=ttyS0,115200n8 panic=10 quiet divingbell.poll=1
"""
# The sysctl is what the engine converges; the script (run after it, every pass) reads the live
# value back onto the serial console, where the test sees it.
DOC = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: {value}
  exec:
    proof.sh:
      data: |
        #!/bin/sh
        echo "divingbell-proof: revision {revision} net.ipv4.tcp_fin_timeout=$(cat /proc/sys/net/ipv4/tcp_fin_timeout)" >/dev/ttyS0
"""


@pytest.fixture(scope="session")
def os_image(tmp_path_factory: pytest.TempPathFactory) -> OsImage:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("building the OS image needs root and debootstrap")
    try:
        return build_os_image(tmp_path_factory.mktemp("os-image"), mirror=MIRROR,
                              cache=OS_CACHE)
    except OsImageError as exc:
        if "debootstrap" in str(exc) or "pip wheel" in str(exc):
            pytest.skip(f"no Debian mirror or package index to build from: {exc}")
        raise


def os_service_settings(discovery_image: DiscoveryImage, os_image: OsImage, tmp_path: Path,
                        **extra: Any) -> FleetSettings:
    """A service that network-boots the discovery image and installs the OS image."""
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (assets / name).symlink_to(discovery_image.directory / name)
    (assets / "os").symlink_to(os_image.directory)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES)
    values: dict[str, Any] = {
        "db_url": f"sqlite:///{tmp_path / 'fleet.db'}", "control_plane_size": 1,
        "install_parallel": 1, "install_ttl_seconds": 1800, "assets_dir": str(assets),
        "boot_profiles": str(profiles), **extra}
    return FleetSettings(**values)


@pytest.fixture
def os_service(discovery_image: DiscoveryImage, os_image: OsImage,
               tmp_path: Path) -> Iterator[ThreadServer]:
    with thread_server(os_service_settings(discovery_image, os_image, tmp_path)) as server:
        yield server


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_a_vm_goes_from_power_on_to_a_converged_debian_node(
        os_service: ThreadServer, vm_support: VmSupport, tmp_path: Path,
        firmware: Literal["bios", "uefi"]) -> None:
    if firmware == "uefi" and (reason := missing_uefi_firmware()):
        pytest.skip(reason)
    admin, reader = os_service.admin, os_service.reader
    first = admin.push_document(DOC.format(value=37, revision=1).encode())
    bootfile = f"http://{GUEST_HOST}:{os_service.port}/boot.ipxe"
    times: dict[str, float] = {}
    vm = start_vm(tmp_path, "node-os", mac="52:54:00:d1:0e:01",
                  uuid="8c6f0a1e-0000-4000-8000-00000000e001", bootfile=bootfile,
                  disk_size="4G", kvm=vm_support.kvm, memory_mb=1024, firmware=firmware)
    vms: list[VM] = [vm]

    def machine_in(*states: str) -> Any:
        found = [m for m in reader.machines() if m["uuid"] == vm.uuid]
        if found and found[0]["state"] in states:
            return reader.machine(found[0]["id"])
        return None

    def mark(step: str) -> None:
        times[step] = round(time.monotonic() - vm.started, 1)

    try:
        machine = wait_until("the machine to register", lambda: machine_in(
            "discovered", "scheduled", "installing"), 300, vms)
        mark("discovered")
        wait_until("the install to start", lambda: machine_in("installing"), 120, vms)
        mark("installing")
        vm.wait_for("divingbell-install: unpacking the OS image", 600)
        mark("unpacking")
        machine = wait_until("the install result", lambda: machine_in("installed", "failed"),
                             1200, vms)
        mark("installed")
        assert machine["state"] == "installed", machine["install_output"]
        output = machine["install_output"]
        if firmware == "bios":
            assert "installing GRUB for BIOS on /dev/sda" in output
        else:
            assert "installing GRUB for UEFI" in output
        assert "installed Debian GNU/Linux 12 (bookworm) on /dev/sda" in output

        # The disk as the hook left it: an EFI system partition, then the root to the end.
        assert vm.disk is not None
        sectors = vm.disk.stat().st_size // 512
        assert read_mbr_partitions(vm.disk) == [(0xEF, 2048, 131072),
                                                (0x83, 133120, sectors - 133120)]

        # Debian boots from the disk: GRUB, its kernel, systemd up to the login prompt.
        after_install = len(vm.console())
        vm.wait_for(r"Debian GNU/Linux 12 \S+ ttyS0", 900, after=after_install)
        mark("login prompt")
        # The agent (fleet mode) converged revision 1 and reported it as this same machine.
        ready = wait_until("the agent's report", lambda: (
            m := reader.machine(machine["id"]))["state"] == "ready" and m, 600, vms)
        mark("ready")
        assert transitions(ready["history"]) == [
            "booting", "discovered", "scheduled", "installing", "installed", "ready"]
        assert len(reader.machines()) == 1, "the installed OS registered as a new machine"
        # After the install the machine still network-booted first and was sent to its disk:
        # the hook left the firmware's boot order alone (UEFI: no NVRAM entry of GRUB's).
        assert any("boot from the local disk" in row["reason"]
                   for row in ready["history"] if row["from"] == row["to"] == "installed")
        assert ready["up_to_date"] is True
        assert ready["revision"] == first["revision"]
        vm.wait_for("divingbell-proof: revision 1 net.ipv4.tcp_fin_timeout=37", 120,
                    after=after_install)
        mark("sysctl read back")

        # A second revision reaches the running node like any machine's.
        second = admin.push_document(DOC.format(value=41, revision=2).encode())
        vm.wait_for("divingbell-proof: revision 2 net.ipv4.tcp_fin_timeout=41", 600,
                    after=after_install)
        mark("revision 2 converged")
        wait_until("the report of revision 2", lambda: (
            m := reader.machine(machine["id"]))["revision"] == second["revision"]
            and m["up_to_date"], 240, vms)
        print(f"\n{firmware} VM step times (s since power-on, "
              f"{'KVM' if vm_support.kvm else 'TCG'}): "
              f"{times}")
    finally:
        vm.stop()


def foreign_mbr() -> bytes:
    """An MBR with one NTFS partition (type 0x07) from sector 2048: someone's data."""
    sector = bytearray(512)
    entry = bytes([0, 0xFE, 0xFF, 0xFF, 0x07, 0xFE, 0xFF, 0xFF]) \
        + (2048).to_bytes(4, "little") + (8192).to_bytes(4, "little")
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_a_disk_holding_foreign_partitions_is_refused_and_left_as_it_was(
        os_service: ThreadServer, vm_support: VmSupport, tmp_path: Path) -> None:
    reader = os_service.reader
    bootfile = f"http://{GUEST_HOST}:{os_service.port}/boot.ipxe"
    data = b"someone's data".ljust(512, b"\0")
    vm = start_vm(tmp_path, "node-foreign", mac="52:54:00:d1:0e:02",
                  uuid="8c6f0a1e-0000-4000-8000-00000000e002", bootfile=bootfile,
                  disk_size="2G", kvm=vm_support.kvm, disk_sectors={0: foreign_mbr(),
                                                                    2048: data})
    try:
        machine = wait_until("the install result", lambda: next(
            (m for m in reader.machines() if m["uuid"] == vm.uuid
             and m["state"] in ("installed", "failed")), None), 600, [vm])
        failed = reader.machine(machine["id"])
        assert failed["state"] == "failed"
        assert "/dev/sda holds partitions that are not a divingbell install: refusing" \
            in failed["install_output"]
        assert "divingbell.wipe=1" in failed["install_output"]
        vm.wait_for("install failure reported; this machine stays up", 60)
        assert vm.disk is not None
        with vm.disk.open("rb") as stream:
            assert stream.read(512) == foreign_mbr()
            stream.seek(2048 * 512)
            assert stream.read(512) == data
    finally:
        vm.stop()
