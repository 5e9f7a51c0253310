"""A Redfish BMC for the tests: sushy-tools' emulator with its fake systems driver, as its
own process on loopback, with HTTP basic authentication.

    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR [CERT KEY]
    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR --qemu WORKDIR

The fake driver applies a power change 1 to 11 s after it is asked (a random delay); here it
is 1 s, so a test sees the change pending, then done, within a short test.

With `--qemu`, the system is a real qemu VM instead (`QemuDriver`): power on starts the qemu
process (from the network when the next boot is Pxe, then the disk again), ForceOff kills it,
GracefulShutdown presses the ACPI power button through qemu's monitor (a VM without an OS
ignores it, like a hung one), and the power state is whether the process runs.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

QEMU_MAC = "52:54:00:00:00:01"


class _OneSecond:
    @staticmethod
    def randint(low: int, high: int) -> int:
        return 1


def qemu_driver(workdir: Path) -> Any:
    from sushy_tools.emulator.resources.systems import fakedriver

    # Monitor sockets in a short directory: a UNIX socket path must be under 108 bytes, and
    # pytest's temporary directories can be longer.
    sockets = Path(tempfile.mkdtemp(prefix="bmc-"))

    class QemuDriver(fakedriver.FakeDriver):  # type: ignore[misc]
        processes: dict[str, subprocess.Popen[bytes]] = {}  # noqa: RUF012 (one per system)

        def _running(self, identity: str) -> bool:
            process = self.processes.get(self.uuid(identity))
            return process is not None and process.poll() is None

        def get_power_state(self, identity: str) -> str:
            return "On" if self._running(identity) else "Off"

        def set_power_state(self, identity: str, state: str) -> None:
            uuid = self.uuid(identity)
            if state in ("On", "ForceOn") and not self._running(identity):
                self._start(uuid)
            elif state == "ForceOff" and self._running(identity):
                self._kill(uuid)
            elif state == "GracefulShutdown" and self._running(identity):
                with socket.socket(socket.AF_UNIX) as monitor:
                    monitor.connect(str(sockets / f"{uuid[:8]}.monitor"))
                    monitor.sendall(b"system_powerdown\n")
            elif "Restart" in state:
                self._kill(uuid)
                self._start(uuid)

        def _start(self, uuid: str) -> None:
            network = self.get_boot_device(uuid) == "Pxe"
            if network:  # once: the boot after this one is from the disk again
                self.set_boot_device(uuid, "Hdd")
            log = (workdir / f"{uuid}.console.log").open("ab")
            log.write(f"\n--- power on, boot from {'network' if network else 'disk'} ---\n"
                      .encode())
            log.flush()
            self.processes[uuid] = subprocess.Popen(
                ["qemu-system-x86_64", "-name", uuid, "-m", "64", "-nographic",
                 "-uuid", uuid, "-accel", "tcg",
                 "-netdev", "user,id=n0", "-device", f"e1000,netdev=n0,mac={QEMU_MAC}",
                 "-boot", "n" if network else "c",
                 "-monitor", f"unix:{sockets / f'{uuid[:8]}.monitor'},server,nowait"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def _kill(self, uuid: str) -> None:
            process = self.processes.pop(uuid)
            process.kill()
            process.wait()

    def kill_all() -> None:
        for process in QemuDriver.processes.values():
            process.kill()
        shutil.rmtree(sockets, ignore_errors=True)

    def terminated(*_: Any) -> None:
        kill_all()
        sys.exit(0)

    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, terminated)
    return QemuDriver


def main() -> None:
    from sushy_tools.emulator import main as emulator
    from sushy_tools.emulator.resources.systems import fakedriver

    fakedriver.random = _OneSecond
    if "--qemu" in sys.argv:
        fakedriver.FakeDriver = qemu_driver(Path(sys.argv[sys.argv.index("--qemu") + 1]))
    port, auth_file, state_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    emulator.app.configure(extra_config={
        "SUSHY_EMULATOR_STATE_DIR": state_dir,  # its systems persist there: one per test
        "SUSHY_EMULATOR_FAKE_DRIVER": True, "SUSHY_EMULATOR_AUTH_FILE": auth_file,
        "SUSHY_EMULATOR_FAKE_SYSTEMS": [{
            "uuid": "27946b59-9e44-4fa7-8e91-f3527a1ef094", "name": "node1",
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
