"""A Redfish BMC for the tests: sushy-tools' emulator with its fake systems driver, as its
own process on loopback, with HTTP basic authentication.

    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR [CERT KEY]
    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR --qemu VM_JSON

The fake driver applies a power change 1 to 11 s after it is asked (a random delay); here it
is 1 s, so a test sees the change pending, then done, within a short test.

With `--qemu`, the system is a real qemu VM instead (`QemuDriver` on `QemuPower`, shared with
the IPMI BMC), with the settings in VM_JSON (`VmSpec`): power on starts its qemu (from
the network when the next boot is Pxe, once, then from its disk again), ForceOff is QMP `quit`,
GracefulShutdown QMP `system_powerdown` (the ACPI button: a VM without an OS, or a hung one,
ignores it), a restart is both, and the power state is whether its qemu runs. A paused VM
(QMP `stop`: the test's hung host) is on, as a hung server is to its BMC.
"""

from __future__ import annotations

import atexit
import signal
import sys
from pathlib import Path
from typing import Any

from tests.power.qemu_power import QEMU_MAC, QemuPower, VmSpec

SYSTEM_UUID = "27946b59-9e44-4fa7-8e91-f3527a1ef094"


class _OneSecond:
    @staticmethod
    def randint(low: int, high: int) -> int:
        return 1


def qemu_driver(spec: VmSpec) -> Any:
    from sushy_tools.emulator.resources.systems import fakedriver

    class QemuDriver(fakedriver.FakeDriver):  # type: ignore[misc]
        machines: dict[str, QemuPower] = {}  # noqa: RUF012 (one per system)

        def _machine(self, identity: str) -> QemuPower:
            uuid = self.uuid(identity)
            if uuid not in self.machines:
                self.machines[uuid] = QemuPower(spec, uuid)
            return self.machines[uuid]

        def get_power_state(self, identity: str) -> str:
            return "On" if self._machine(identity).running() else "Off"

        def set_power_state(self, identity: str, state: str) -> None:
            machine = self._machine(identity)
            if state in ("On", "ForceOn"):
                self._on(identity, machine)
            elif state == "ForceOff":
                machine.off()
            elif state == "GracefulShutdown":
                machine.button()
            elif "Restart" in state:
                machine.off()
                self._on(identity, machine)

        def _on(self, identity: str, machine: QemuPower) -> None:
            if machine.running():
                return
            network = self.get_boot_device(identity) == "Pxe"
            if network:  # once: the boot after this one is from the disk again
                self.set_boot_device(identity, "Hdd")
            machine.on(network)

    def stop_all() -> None:
        for machine in QemuDriver.machines.values():
            machine.close()

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
