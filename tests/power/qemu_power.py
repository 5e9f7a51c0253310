"""One qemu VM of the boot tests as its BMC sees it, shared by the Redfish and IPMI emulators:
on while its qemu runs, powered on from the network once (then from its disk again), off by
QMP `quit`, the ACPI button by QMP `system_powerdown` (a VM without an OS, or a hung one,
ignores it), its disk, UEFI variables and console kept across power cycles."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tests.boot.qemu import VM, QmpError, qmp_command, start_vm

QEMU_MAC = "52:54:00:00:00:01"


@dataclass(frozen=True)
class VmSpec:
    """The VM behind an emulator's one system (the arguments of tests.boot.qemu.start_vm)."""

    workdir: str
    bootfile: str = "http://10.0.2.2:9/none.ipxe"
    name: str = "bmc-vm"
    disk_size: str | None = None
    memory_mb: int = 64
    kvm: bool = False
    firmware: Literal["bios", "uefi"] = "bios"
    qmp: str | None = None
    """Its QMP socket (short: a UNIX socket path must be under 108 bytes); default: in a
    temporary directory of the emulator's."""

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> VmSpec:
        return cls(**json.loads(path.read_text()))

    def console(self) -> Path:
        return Path(self.workdir) / f"{self.name}.console.log"


class QemuPower:
    """The power of one VM, by its BMC's verbs."""

    def __init__(self, spec: VmSpec, uuid: str) -> None:
        self.spec, self.uuid = spec, uuid
        # QMP sockets in a short directory: a UNIX socket path must be under 108 bytes, and
        # pytest's temporary directories can be longer.
        self._sockets = Path(tempfile.mkdtemp(prefix="bmc-"))
        self.qmp = Path(spec.qmp) if spec.qmp else self._sockets / "vm.qmp"
        self.vm: VM | None = None
        self._powered_before = False

    def running(self) -> bool:
        return self.vm is not None and self.vm.process.poll() is None

    def on(self, network: bool) -> None:
        """Start its qemu, from the network (`network`) or its disk; a no-op when running."""
        if self.running():
            return
        spec = self.spec
        self.vm = start_vm(
            Path(spec.workdir), spec.name, mac=QEMU_MAC, uuid=self.uuid, bootfile=spec.bootfile,
            disk_size=spec.disk_size, kvm=spec.kvm, memory_mb=spec.memory_mb,
            firmware=spec.firmware, boot="network" if network else "disk", qmp=self.qmp,
            power_on_again=self._powered_before)
        self._powered_before = True

    def off(self, wait: bool = True) -> None:
        """Pull the plug (QMP `quit`); `wait=False` returns at once, as a BMC that answers
        before the power has gone does (its state says when)."""
        if not self.running() or self.vm is None:
            return
        vm = self.vm
        try:
            qmp_command(self.qmp, "quit")
            if wait:
                vm.process.wait(timeout=10)
        except (QmpError, OSError, TimeoutError):
            vm.process.kill()
        if wait:
            self.stop()

    def button(self) -> None:
        """The ACPI power button: an OS may shut down; none, or a hung one, ignores it."""
        if self.running():
            qmp_command(self.qmp, "system_powerdown")

    def stop(self) -> None:
        """Everything ended (the test is over, or the VM was switched off)."""
        if self.vm is not None:
            self.vm.stop()
            self.vm = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._sockets, ignore_errors=True)
