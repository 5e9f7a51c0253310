"""Kernel command lines on an installed Debian VM: tried once, then committed or reverted.

The VM of the OS-install test (network boot, install, Debian from its disk, the fleet agent)
gets three revisions: the first converges; the second adds `hugepages=16`, which the agent
sets to boot once on trial, the machine reboots once through a fleet maintenance slot, comes
back with it in /proc/cmdline and 16 huge pages in /proc/meminfo, and commits it; the third
adds `init=/bin/false`, which stops the boot (init exits, the kernel panics, `panic=30` on the
tried line reboots it): GRUB boots the last-known-good line, the agent reverts, reports
`reverted` and the rollout halts at the machine.

What the VM sees is read off its serial console: a script of the document prints the running
command line, /proc/meminfo's huge pages and divingbell's GRUB variables on every converge.

Slow (Debian boots under software emulation): marked `slow`. BIOS only: UEFI boots the same
GRUB configuration through another loader, and costs as much again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.boot.conftest import VmSupport
from tests.boot.qemu import GUEST_HOST, start_vm
from tests.boot.test_network_boot import wait_until
from tests.boot.test_os_install import os_image, os_service  # noqa: F401 - fixtures
from tests.fleet.servers import ThreadServer

pytestmark = pytest.mark.slow

DOC = """\
conf:
  maintenance:
    reboot: {{concurrency: 1}}
  exec:
    proof.sh:
      data: |
        #!/bin/sh
        echo "divingbell-proof: revision {revision} cmdline=[$(cat /proc/cmdline)] \\
        $(grep HugePages_Total /proc/meminfo | tr -s ' ') \\
        grubenv=[$(grep divingbell_ /boot/grub/grubenv | tr '\\n' ' ')]" >/dev/ttyS0
{kernel}"""
HUGEPAGES = "  kernel:\n    cmdline: {hugepages: 16}\n"
NO_INIT = ("  kernel:\n    cmdline: {hugepages: 16, init: /bin/false}\n"
           "    allow_unsafe: [init]\n")
BOOTED = r"Linux version \d"
PROOF = r"divingbell-proof: revision {revision} cmdline=\[([^\]]*)\] HugePages_Total: (\d+) " \
        r"grubenv=\[([^\]]*)\]"


def test_a_kernel_line_is_tried_once_then_committed_or_reverted(
        os_service: ThreadServer, vm_support: VmSupport, tmp_path: Path) -> None:  # noqa: F811
    admin, reader = os_service.admin, os_service.reader
    admin.push_document(DOC.format(revision=1, kernel="").encode())
    bootfile = f"http://{GUEST_HOST}:{os_service.port}/boot.ipxe"
    vm = start_vm(tmp_path, "node-kernel", mac="52:54:00:d1:0e:21",
                  uuid="8c6f0a1e-0000-4000-8000-00000000e021", bootfile=bootfile,
                  disk_size="4G", kvm=vm_support.kvm, memory_mb=1024)
    times: dict[str, float] = {}

    def machine() -> dict[str, Any]:
        (found,) = [m for m in reader.machines() if m["uuid"] == vm.uuid]
        result: dict[str, Any] = reader.machine(found["id"])
        return result

    def boots(after: int) -> int:
        return len(re.findall(BOOTED, vm.console()[after:]))

    try:
        vm.wait_for(PROOF.format(revision=1), 1800)
        started = time.monotonic()
        wait_until("the installed machine to be ready", lambda: (
            m := machine())["state"] == "ready" and m, 300, [vm])
        times["install to converged"] = round(started - vm.started)

        # Revision 2: hugepages=16, on trial for one boot, then committed.
        before = len(vm.console())
        started = time.monotonic()
        second = admin.push_document(DOC.format(revision=2, kernel=HUGEPAGES).encode())
        # Converged before the reboot (the script prints the old line), then after it.
        vm.wait_for(PROOF.format(revision=2), 600, after=before)
        rebooted = vm.wait_for(BOOTED, 900, after=before).end()
        times["revision 2 applied, until the reboot"] = round(time.monotonic() - started)
        found = vm.wait_for(PROOF.format(revision=2), 900, after=rebooted)
        cmdline, hugepages = found[1].split(), int(found[2])
        assert "hugepages=16" in cmdline and "panic=30" in cmdline, cmdline
        assert hugepages == 16
        assert boots(before) == 1, "one reboot"
        ready = wait_until("revision 2 reported converged", lambda: (
            m := machine())["revision"] == second["revision"] and m["state"] == "ready"
            and m, 300, [vm])
        times["hugepages=16 rolled out (reboot included)"] = round(time.monotonic() - started)
        states = [(r["revision"], r["state"]) for r in reader.call(
            "GET", f"/v1/machines/{ready['id']}/reports")]
        assert (second["revision"], "rebooting") in states, states
        rollout = reader.call("GET", "/v1/rollouts/current")
        assert rollout["revision"] == second["revision"]
        assert rollout["status"] == "completed"

        # Revision 3: init=/bin/false stops the boot; the machine comes back on revision 2's.
        before = len(vm.console())
        started = time.monotonic()
        third = admin.push_document(DOC.format(revision=3, kernel=NO_INIT).encode())
        panicked = vm.wait_for("Attempted to kill init", 1500, after=before).end()
        times["the try boots and panics"] = round(time.monotonic() - started)
        rebooted = vm.wait_for(BOOTED, 600, after=panicked).end()
        found = vm.wait_for(PROOF.format(revision=3), 900, after=rebooted)
        cmdline, hugepages, grubenv = found[1].split(), int(found[2]), found[3]
        assert "init=/bin/false" not in cmdline and "hugepages=16" in cmdline, cmdline
        assert "panic=30" not in cmdline, "the committed line, not a try"
        assert hugepages == 16
        # Revision 2's line was committed after its boot; the try was used up by GRUB.
        # (GRUB keeps a used try as `divingbell_try=`, empty.)
        assert [v for v in grubenv.split() if not v.endswith("=")] == [
            "divingbell_good=hugepages=16"], grubenv
        assert boots(before) == 2, "the try, then the last-known-good line"
        reverted = wait_until("revision 3 reported reverted", lambda: (
            m := machine())["revision"] == third["revision"]
            and m["last_report_state"] == "reverted" and m, 300, [vm])
        times["the try reverted and reported"] = round(time.monotonic() - started)
        assert reverted["state"] == "degraded"
        failures = reverted["reports"][0]["modules"]["kernel"]["failures"]
        assert "came back on the last-known-good command line" in failures[0], failures
        rollout = reader.call("GET", "/v1/rollouts/current")
        assert rollout["revision"] == third["revision"]
        assert rollout["status"] == "halted"
        assert rollout["waves"][0][0]["progress"] == "failed"
        print(f"\nkernel trial on a BIOS VM ({'KVM' if vm_support.kvm else 'TCG'}), seconds: "
              f"{times}")
    finally:
        vm.stop()
