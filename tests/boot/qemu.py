"""Virtual machines that network-boot over iPXE, for the boot tests (tier C in test-hosts.md).

qemu-system-x86_64 with an e1000 NIC (its option ROM is Debian's ipxe-qemu build, which holds
both the legacy PXE and the EFI driver), user-mode networking whose DHCP hands out `bootfile`
(the guest reaches this machine's loopback as 10.0.2.2), its own MAC, UUID and raw disk, and the
serial console captured to a file. Legacy BIOS (SeaBIOS, `-boot n`) by default; with
`firmware="uefi"`, OVMF on a q35 machine (its code read-only, a copy of its variable store per
VM) with the NIC first and the disk second in the boot order, as a network-booted server is set
up. Every VM is killed when its test ends; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

QEMU = "qemu-system-x86_64"
E1000_ROMS = (Path("/usr/lib/ipxe/qemu/efi-e1000.rom"), Path("/usr/share/qemu/efi-e1000.rom"))
# OVMF without Secure Boot (Debian: ovmf): (code, variable store template), newest layout first.
OVMF_FILES = ((Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
              (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")))
GUEST_HOST = "10.0.2.2"  # this machine's loopback, as the guest sees it through qemu's slirp


def missing_tools() -> str | None:
    """Why VMs cannot run here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian: qemu-system-x86; .ci/run installs it)"
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed (Debian: qemu-utils)"
    if not any(rom.exists() for rom in E1000_ROMS):
        return "the e1000 iPXE ROM is missing (Debian: ipxe-qemu)"
    return None


def ovmf_files() -> tuple[Path, Path] | None:
    """OVMF's code and variable-store template, or None when OVMF is not installed."""
    return next(((code, variables) for code, variables in OVMF_FILES
                 if code.is_file() and variables.is_file()), None)


def missing_uefi_firmware() -> str | None:
    """Why UEFI VMs cannot run here (beyond missing_tools), or None."""
    if ovmf_files() is None:
        return "OVMF (UEFI firmware for qemu) is not installed (Debian: ovmf; .ci/run installs it)"
    return None


def kvm_usable(kernel: Path, workdir: Path, seconds: float = 10.0) -> tuple[bool, str]:
    """Whether guests really run under KVM here: /dev/kvm opening is not enough (nested KVM in
    some VMs starts the guest and then stalls it, or rejects MSRs). Boots `kernel` with no root
    under -enable-kvm and waits for its panic (it reboots, and -no-reboot ends qemu)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not usable"
    log = workdir / "kvm-probe.log"
    with log.open("wb") as out:
        try:
            result = subprocess.run(
                [QEMU, "-enable-kvm", "-m", "256", "-nographic", "-no-reboot", "-kernel",
                 str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=seconds, check=False)
        except subprocess.TimeoutExpired:
            return False, f"a KVM guest did not boot within {seconds:.0f} s (nested KVM?)"
    text = log.read_text(errors="replace")
    if result.returncode == 0 and "Kernel panic" in text:
        return True, "KVM"
    return False, f"KVM guest failed (qemu exit {result.returncode}): {text[-200:].strip()}"


@dataclass
class VM:
    """One running machine. `log` is its serial console (firmware, iPXE, kernel, client)."""

    name: str
    mac: str
    uuid: str
    disk: Path | None
    log: Path
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the console from offset `after`; fails with the
        console's tail when it does not appear in time or qemu exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            found = regex.search(text, after)
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name}: qemu exited {self.process.returncode} before "
                                     f"{pattern!r}; console:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout:.0f} s; "
                                     f"console:\n{text[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def create_disk(path: Path, size: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), size], check=True)
    return path


def disk_serial(name: str) -> str:
    """The serial a virtio disk of VM `name` reports (IDE disks report QEMU's QM0000N)."""
    return "DB-" + name.upper()[-8:]


def start_vm(workdir: Path, name: str, *, mac: str, uuid: str, bootfile: str,
             disk_size: str | None = None, disk_bus: str = "ide", serial: str | None = None,
             dhcp_hostname: str | None = None, dhcp_domain: str | None = None,
             kvm: bool = False, memory_mb: int = 512,
             firmware: Literal["bios", "uefi"] = "bios",
             disk_sectors: dict[int, bytes] | None = None,
             boot: Literal["network", "disk"] = "network", qmp: Path | None = None,
             power_on_again: bool = False) -> VM:
    """Start a VM that network-boots from `bootfile` (an http URL the guest can reach);
    qemu's DHCP hands it `dhcp_hostname` and `dhcp_domain` when given; `disk_sectors` are
    written to its disk (sector number: bytes) before it starts.

    `boot="disk"` boots it from its disk instead; `qmp` is a UNIX socket for qemu's machine
    protocol (`qmp_command`); `power_on_again` starts the same machine again after its qemu
    ended (a power off): its disk and UEFI variables kept, its console appended to."""
    disk_path = workdir / f"{name}.raw"
    if power_on_again and disk_size and disk_path.exists():
        disk: Path | None = disk_path
    else:
        disk = create_disk(disk_path, disk_size) if disk_size else None
    if disk is not None and disk_sectors:
        with disk.open("r+b") as stream:
            for sector, data in disk_sectors.items():
                stream.seek(sector * 512)
                stream.write(data)
    log = workdir / f"{name}.console.log"
    uefi = firmware == "uefi"
    # SeaBIOS takes the order from -boot; OVMF from bootindex (network first, then the disk).
    nic_boot, disk_boot = (",bootindex=1", ",bootindex=2") if uefi else ("", "")
    if boot == "disk":
        nic_boot, disk_boot = disk_boot, nic_boot
    argv = [
        QEMU, "-name", name, "-m", str(memory_mb), "-nographic",
        "-uuid", uuid,
        "-netdev", f"user,id=n0,bootfile={bootfile}"
        + (f",hostname={dhcp_hostname}" if dhcp_hostname else "")
        + (f",domainname={dhcp_domain}" if dhcp_domain else ""),
        "-device", f"e1000,netdev=n0,mac={mac}{nic_boot}",
    ]
    if uefi:
        found = ovmf_files()
        if found is None:
            raise RuntimeError(missing_uefi_firmware())
        code, variables = found
        own_variables = workdir / f"{name}.vars.fd"
        if not (power_on_again and own_variables.exists()):
            shutil.copyfile(variables, own_variables)
        argv += ["-machine", "q35",
                 "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={own_variables}"]
    else:
        argv += ["-boot", "n" if boot == "network" else "c"]
    argv += ["-enable-kvm"] if kvm else ["-accel", "tcg"]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if serial:
        argv += ["-smbios", f"type=1,serial={serial}"]
    if disk is not None and disk_bus == "virtio":
        argv += ["-drive", f"file={disk},format=raw,if=none,id=disk0",
                 "-device", f"virtio-blk-pci,drive=disk0,serial={disk_serial(name)}{disk_boot}"]
    elif disk is not None and uefi:
        argv += ["-drive", f"file={disk},format=raw,if=none,id=disk0",
                 "-device", f"ide-hd,drive=disk0{disk_boot}"]
    elif disk is not None:
        argv += ["-drive", f"file={disk},format=raw,if={disk_bus}"]
    with log.open("ab" if power_on_again else "wb") as out:
        out.write(f"\n--- power on, boot from {boot} ---\n".encode())
        out.flush()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    return VM(name, mac, uuid, disk, log, process)


def qmp_command(socket_path: Path, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Run one QMP command (`system_powerdown`, `quit`, `stop`, `cont`, `query-status`) on a
    VM started with `qmp=`; its answer. Raises QmpError when qemu refuses it or is gone."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(socket_path))
        except OSError as exc:
            raise QmpError(f"qmp {socket_path}: {exc}") from None
        stream = connection.makefile("rwb")

        def answer() -> dict[str, Any]:
            while True:  # events (SHUTDOWN, STOP, ...) may come before the answer
                line = stream.readline()
                if not line:
                    raise QmpError(f"qmp {command}: qemu closed the connection")
                message: dict[str, Any] = json.loads(line)
                if "return" in message or "error" in message:
                    return message

        if b"QMP" not in stream.readline():
            raise QmpError(f"qmp {socket_path}: no greeting")
        for name in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": name}).encode() + b"\n")
            stream.flush()
            try:
                reply = answer()
            except QmpError:
                if name == "quit":  # qemu may close before answering: it is gone, as asked
                    return {"return": {}}
                raise
            if "error" in reply:
                raise QmpError(f"qmp {name}: {reply['error'].get('desc', reply['error'])}")
        return reply


class QmpError(Exception):
    pass


def read_mbr_partitions(disk: Path) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of each used MBR partition entry; [] without a signature."""
    with disk.open("rb") as stream:
        sector = stream.read(512)
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return []
    entries = []
    for index in range(4):
        entry = sector[446 + 16 * index: 462 + 16 * index]
        kind = entry[4]
        if kind:
            entries.append((kind, int.from_bytes(entry[8:12], "little"),
                            int.from_bytes(entry[12:16], "little")))
    return entries


def read_marker(disk: Path, offset: int = 1 << 20) -> dict[str, str]:
    """The installed marker the default hook writes at the first partition's start."""
    with disk.open("rb") as stream:
        stream.seek(offset)
        text = stream.read(512).split(b"\0", 1)[0].decode(errors="replace")
    lines = text.splitlines()
    if not lines or lines[0] != "DIVINGBELL-INSTALLED":
        return {}
    return dict(line.split("=", 1) for line in lines[1:] if "=" in line)
