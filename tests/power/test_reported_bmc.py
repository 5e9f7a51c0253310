"""A BMC address reported by discovery (issue 28): the discovery client reads it where the image
can (`ipmitool lan print`, else a file the image fills); the fleet validates it (422 naming the
field), keeps it as reported and shows it (API, `fleet machine`), and never uses it to power
anything until an admin sets the BMC with its credentials."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import divingbell.image
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import error_of, facts
from tests.power.test_power_fleet import audit_of, power

DISCOVERY = Path(divingbell.image.__file__).parent / "initramfs" / "discovery"
LAN_PRINT = """\
Set in Progress         : Set Complete
IP Address Source       : DHCP Address
IP Address              : 192.0.2.77
Subnet Mask             : 255.255.255.0
MAC Address             : 3c:ec:ef:00:11:22
Default Gateway IP      : 192.0.2.1
"""


def shell_functions(*names: str) -> str:
    """The named functions of the discovery client, as its text has them (no main)."""
    text = DISCOVERY.read_text()
    found = [re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.M | re.S) for name in names]
    assert all(found), f"{DISCOVERY} lost one of {names}"
    return "\n".join(match.group(0) for match in found if match)


def bmc_json(tmp_path: Path, *, lan_print: str | None, address_file: Path | None) -> str:
    """Run the client's bmc_json under busybox sh with a PATH holding (or not) an ipmitool
    that prints `lan_print`, and the image's file at `address_file`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sed", "head", "tr", "cat"):
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(shutil.which("busybox") or "/bin/busybox")
    ipmitool = bin_dir / "ipmitool"
    ipmitool.unlink(missing_ok=True)
    if lan_print is not None:
        (tmp_path / "lan.txt").write_text(lan_print)
        ipmitool.write_text(f"#!/bin/sh\n[ \"$*\" = 'lan print' ] && cat {tmp_path / 'lan.txt'}\n")
        ipmitool.chmod(0o755)
    script = shell_functions("read_first_line", "bmc_json").replace(
        "/etc/divingbell/bmc-address", str(address_file or tmp_path / "absent"))
    result = subprocess.run(["busybox", "sh", "-c", f"PATH={bin_dir}\n{script}\nbmc_json"],
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (the image's shell)")
def test_the_discovery_client_reads_the_bmc_address_where_the_image_can(tmp_path: Path) -> None:
    file = tmp_path / "bmc-address"
    file.write_text("198.51.100.9\n")
    assert bmc_json(tmp_path, lan_print=LAN_PRINT, address_file=file) == (
        ', "bmc": {"address": "192.0.2.77", "source": "ipmitool"}')
    # No BMC ipmitool can reach (it prints nothing, or an unset address): the image's file.
    assert bmc_json(tmp_path, lan_print="", address_file=file) == (
        ', "bmc": {"address": "198.51.100.9", "source": "image"}')
    unset = LAN_PRINT.replace("192.0.2.77", "0.0.0.0")
    assert bmc_json(tmp_path, lan_print=unset, address_file=None) == ""
    assert bmc_json(tmp_path, lan_print=None, address_file=file) == (
        ', "bmc": {"address": "198.51.100.9", "source": "image"}')
    assert bmc_json(tmp_path, lan_print=None, address_file=None) == ""
    # Whatever the file holds, only address characters reach the JSON.
    file.write_text('10.0.0.1", "evil": "x\n')
    out = bmc_json(tmp_path, lan_print=None, address_file=file)
    assert json.loads("{" + out.lstrip(", ") + "}")["bmc"]["address"] == "10.0.0.1"


@pytest.mark.parametrize(("bmc", "message"), [
    ({"address": "bmc.example.org"}, "is not an IP address"),
    ({"address": "0.0.0.0"}, "cannot be a BMC's address"),
    ({"address": "192.0.2.7", "source": "redfish"}, "Input should be 'ipmitool' or 'image'"),
    ({"address": "192.0.2.7", "password": "x"}, "Extra inputs are not permitted"),
])
def test_a_bad_reported_bmc_is_refused_naming_the_field(
        power_fleet: ThreadServer, bmc: dict[str, Any], message: str) -> None:
    failure = error_of(lambda: power_fleet.bootstrap.discover({**facts(1), "bmc": bmc}))
    assert failure.status == 422
    assert any(d["field"].startswith("bmc") and message in d["msg"]
               for d in failure.detail), failure.detail
    assert power_fleet.admin.machines() == []  # nothing stored


def test_a_reported_bmc_is_shown_and_powers_nothing(power_fleet: ThreadServer,
                                                    cli: Cli) -> None:
    answer = power_fleet.bootstrap.discover(
        {**facts(1), "bmc": {"address": "2001:DB8::7", "source": "ipmitool"}})
    machine = answer["machine_id"]
    detail = power_fleet.reader.machine(machine)
    assert detail["reported_bmc"] == {"address": "2001:db8::7", "source": "ipmitool"}
    shown = cli("fleet", "machine", machine, "--server", power_fleet.url,
                env={"DIVINGBELL_TOKEN": power_fleet.reader_token})
    assert shown.returncode == 0, shown.stderr
    assert "bmc:      2001:db8::7 (reported by its discovery, ipmitool; powers nothing " \
           f"until: divingbell fleet bmc {machine} ...)" in shown.stdout

    # Not a BMC of the fleet's: no power command reaches it, nothing audited as power.
    for call in (lambda: power(power_fleet, machine, "status"),
                 lambda: power_fleet.reader.call("GET", f"/v1/machines/{machine}/bmc")):
        assert error_of(call).status == 404
    assert not [e for e in audit_of(power_fleet, machine) if e["action"].startswith("power")]

    # The machine's next discovery replaces what it said (here: nothing any more).
    client = power_fleet.client(answer["credential"])
    client.discover(facts(1))
    assert power_fleet.reader.machine(machine)["reported_bmc"] is None
