"""An IPMI BMC for the tests: pyghmi's BMC server class (RMCP+ over UDP on loopback) in its
own process, for a machine whose power takes `DELAY` seconds to change.

    python -m tests.power.ipmi_bmc PORT USER PASSWORD STATE_FILE
    python -m tests.power.ipmi_bmc PORT USER PASSWORD STATE_FILE --qemu VM_JSON

The machine's state (power, pending change, next boot device) is written to STATE_FILE as
JSON after every request, so a test reads what the BMC was told without asking it.

With `--qemu`, the machine is a real qemu VM (`QemuMachine`, on the same `QemuPower` as the
Redfish emulator's): on starts its qemu, from the network once when the next boot device is
`network`; off pulls the plug and answers before the power has gone, as a BMC does (its
state says when); soft-off is the ACPI button; the power state is whether its qemu runs.
"""

from __future__ import annotations

import atexit
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pyghmi.ipmi import bmc
from pyghmi.ipmi.private import serversession

from tests.power.qemu_power import QemuPower, VmSpec

DELAY = 0.5
SYSTEM_UUID = "5d4f0c1e-6b7a-4f0e-9c1d-2a3b4c5d6e7f"
NO_MATCHING_CIPHER_SUITE = 0x11
_open_session = serversession.ServerSession.create_open_session_response


def _sha1_only(self: Any, request: bytes) -> bytearray:
    """pyghmi's server speaks cipher suite 3 (SHA-1) only but accepts a request for SHA-256
    and answers in SHA-1, which its own client cannot follow. A real SHA-1-only BMC refuses
    the request (so the client asks again with SHA-1): do that."""
    if len(request) > 12 and request[12] != 1:
        return bytearray([request[0], NO_MATCHING_CIPHER_SUITE, 0, 0]) + request[4:8] + bytes(4)
    return bytearray(_open_session(self, request))


serversession.ServerSession.create_open_session_response = _sha1_only


class Machine(bmc.Bmc):  # type: ignore[misc]
    def __init__(self, authdata: dict[str, str], port: int, state_file: Path) -> None:
        super().__init__(authdata, port=port, address="127.0.0.1")
        self.state_file = state_file
        self.state: dict[str, Any] = {"power": "off", "pending": None, "at": 0.0,
                                      "bootdev": "default", "commands": []}
        self._save()

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state))

    def _settle(self) -> None:
        if self.state["pending"] and time.monotonic() >= self.state["at"]:
            self.state["power"], self.state["pending"] = self.state["pending"], None
            self._save()

    def _change(self, command: str, wanted: str) -> None:
        self._settle()
        self.state["commands"].append(command)
        if wanted != self.state["power"]:
            self.state["pending"], self.state["at"] = wanted, time.monotonic() + DELAY
        self._save()

    def get_power_state(self) -> str:
        self._settle()
        return str(self.state["power"])

    def power_on(self) -> None:
        self._change("on", "on")

    def power_off(self) -> None:
        self._change("off", "off")

    def power_shutdown(self) -> None:
        self._change("shutdown", "off")

    def power_reset(self) -> None:
        self.state["commands"].append("reset")
        self._save()

    def get_boot_device(self) -> str:
        return str(self.state["bootdev"])

    def set_boot_device(self, bootdevice: str) -> None:
        self.state["bootdev"] = bootdevice
        self.state["commands"].append(f"bootdev {bootdevice}")
        self._save()


class QemuMachine(Machine):
    def __init__(self, authdata: dict[str, str], port: int, state_file: Path,
                 power: QemuPower) -> None:
        self.power = power
        super().__init__(authdata, port, state_file)

    def _record(self, command: str) -> None:
        self.state["commands"].append(command)
        self.state["power"] = self.get_power_state()
        self._save()

    def get_power_state(self) -> str:
        return "on" if self.power.running() else "off"

    def power_on(self) -> None:
        network = self.state["bootdev"] == "network"
        if network and not self.power.running():  # once: then from the disk again
            self.state["bootdev"] = "default"
        self.power.on(network)
        self._record("on")

    def power_off(self) -> None:
        self.power.off(wait=False)
        self._record("off")

    def power_shutdown(self) -> None:
        self.power.button()
        self._record("shutdown")


def main() -> None:
    port, user, password, state_file = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                        Path(sys.argv[4]))
    if "--qemu" not in sys.argv:
        Machine({user: password}, port, state_file).listen()
        return
    power = QemuPower(VmSpec.read(Path(sys.argv[sys.argv.index("--qemu") + 1])), SYSTEM_UUID)
    atexit.register(power.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    QemuMachine({user: password}, port, state_file, power).listen()


if __name__ == "__main__":
    main()
