"""A Redfish BMC for the tests: sushy-tools' emulator with its fake systems driver, as its
own process on loopback, with HTTP basic authentication.

    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR [CERT KEY]
    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR --qemu VM_JSON

The fake driver applies a power change 1 to 11 s after it is asked (a random delay); here it
is 1 s, so a test sees the change pending, then done, within a short test.

With `--qemu`, the system is a real qemu VM instead (`QemuDriver`), started by the boot tests'
`tests/boot/qemu.py` with the settings in VM_JSON (`VmSpec`): power on starts its qemu (from
the network when the next boot is Pxe, once, then from its disk again), ForceOff is QMP `quit`,
GracefulShutdown QMP `system_powerdown` (the ACPI button: a VM without an OS, or a hung one,
ignores it), a restart is both, and the power state is whether its qemu runs. A paused VM
(QMP `stop`: the test's hung host) is on, as a hung server is to its BMC.
"""

from __future__ import annotations

import atexit
import json
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

QEMU_MAC = "52:54:00:00:00:01"
SYSTEM_UUID = "27946b59-9e44-4fa7-8e91-f3527a1ef094"


@dataclass(frozen=True)
class VmSpec:
    """The VM behind the emulator's one system (the arguments of tests.boot.qemu.start_vm)."""

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



class _OneSecond:
    @staticmethod
    def randint(low: int, high: int) -> int:
        return 1


def qemu_driver(spec: VmSpec) -> Any:
    from sushy_tools.emulator.resources.systems import fakedriver

    from tests.boot.qemu import VM, QmpError, qmp_command, start_vm

    # QMP sockets in a short directory: a UNIX socket path must be under 108 bytes, and
    # pytest's temporary directories can be longer.
    sockets = Path(tempfile.mkdtemp(prefix="bmc-"))
    qmp = Path(spec.qmp) if spec.qmp else sockets / "vm.qmp"

    class QemuDriver(fakedriver.FakeDriver):  # type: ignore[misc]
        vms: dict[str, VM] = {}  # noqa: RUF012 (one per system)
        started: set[str] = set()  # noqa: RUF012 (systems powered on once: disk kept)

        def _running(self, identity: str) -> bool:
            vm = self.vms.get(self.uuid(identity))
            return vm is not None and vm.process.poll() is None

        def get_power_state(self, identity: str) -> str:
            return "On" if self._running(identity) else "Off"

        def set_power_state(self, identity: str, state: str) -> None:
            uuid = self.uuid(identity)
            if state in ("On", "ForceOn") and not self._running(identity):
                self._start(uuid)
            elif state == "ForceOff" and self._running(identity):
                self._quit(uuid)
            elif state == "GracefulShutdown" and self._running(identity):
                qmp_command(qmp, "system_powerdown")
            elif "Restart" in state:
                if self._running(identity):
                    self._quit(uuid)
                self._start(uuid)

        def _start(self, uuid: str) -> None:
            network = self.get_boot_device(uuid) == "Pxe"
            if network:  # once: the boot after this one is from the disk again
                self.set_boot_device(uuid, "Hdd")
            self.vms[uuid] = start_vm(
                Path(spec.workdir), spec.name, mac=QEMU_MAC, uuid=uuid, bootfile=spec.bootfile,
                disk_size=spec.disk_size, kvm=spec.kvm, memory_mb=spec.memory_mb,
                firmware=spec.firmware, boot="network" if network else "disk", qmp=qmp,
                power_on_again=uuid in self.started)
            self.started.add(uuid)

        def _quit(self, uuid: str) -> None:
            vm = self.vms.pop(uuid)
            try:
                qmp_command(qmp, "quit")
                vm.process.wait(timeout=10)
            except (QmpError, OSError, TimeoutError):
                vm.process.kill()
            vm.stop()

    def stop_all() -> None:
        for vm in QemuDriver.vms.values():
            vm.stop()
        shutil.rmtree(sockets, ignore_errors=True)

    def terminated(*_: Any) -> None:
        stop_all()
        sys.exit(0)

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, terminated)
    return QemuDriver


def main() -> None:
    from sushy_tools.emulator import main as emulator
    from sushy_tools.emulator.resources.systems import fakedriver

    fakedriver.random = _OneSecond
    if "--qemu" in sys.argv:
        fakedriver.FakeDriver = qemu_driver(
            VmSpec.read(Path(sys.argv[sys.argv.index("--qemu") + 1])))
    port, auth_file, state_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    emulator.app.configure(extra_config={
        "SUSHY_EMULATOR_STATE_DIR": state_dir,  # its systems persist there: one per test
        "SUSHY_EMULATOR_FAKE_DRIVER": True, "SUSHY_EMULATOR_AUTH_FILE": auth_file,
        "SUSHY_EMULATOR_FAKE_SYSTEMS": [{
            "uuid": SYSTEM_UUID, "name": "node1",
            "power_state": "Off", "external_notifier": False,
            "nics": [{"mac": QEMU_MAC, "ip": "10.0.0.1"}]}]})
    ssl_context = None
    if len(sys.argv) > 5 and sys.argv[4] != "--qemu":
        import ssl

        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(sys.argv[4], sys.argv[5])
    emulator.app.run(host="127.0.0.1", port=port, ssl_context=ssl_context, threaded=True)


if __name__ == "__main__":
    main()
