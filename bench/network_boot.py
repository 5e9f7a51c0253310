"""Print the discovery image's size and build time, and how long a VM takes from power-on to
each step of network boot against a real fleet service.

    sudo .venv/bin/python bench/network_boot.py [--cache DIR] [--cold] [--no-vm]
                                                [--firmware bios|uefi]

--cold builds with an empty cache (downloads the .debs and unpacks the kernel package);
otherwise the cache (default: the tests' /var/cache/divingbell-test/image) is reused. The VM is
qemu with an e1000 NIC whose iPXE ROM fetches /boot.ipxe from the service on loopback, under
legacy BIOS or UEFI (OVMF); KVM when a probe guest really runs under it, software emulation
otherwise. Times are from qemu's start.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.boot.qemu import (  # noqa: E402
    GUEST_HOST,
    kvm_usable,
    missing_tools,
    missing_uefi_firmware,
    start_vm,
)

from divingbell.image.discovery import build_discovery_image  # noqa: E402

PROFILES = """\
discovery:
  default:
    kernel: vmlinuz
    initrd: [initrd.img]
    cmdline: console=ttyS0,115200n8 panic=10 quiet divingbell.poll=1
"""


def build(cache: Path, out: Path) -> None:
    started = time.monotonic()
    image = build_discovery_image(out, cache=cache)
    seconds = time.monotonic() - started
    print(f"image: kernel {image.kernel.stat().st_size / 1e6:.1f} MB, initrd "
          f"{image.initrd.stat().st_size / 1e6:.2f} MB ({len(image.modules)} module files), "
          f"built in {seconds:.1f} s"
          f"{' (kernel from the cache)' if image.reused_kernel_bundle else ''}")


def boot(image_dir: Path, work: Path, firmware: Literal["bios", "uefi"]) -> None:
    import uvicorn

    from divingbell.fleet.app import create_app
    from divingbell.fleet.client import FleetClient
    from divingbell.fleet.db import Database
    from divingbell.fleet.settings import FleetSettings
    from divingbell.fleet.tokens import create_token

    reason = missing_tools() or (missing_uefi_firmware() if firmware == "uefi" else None)
    if reason:
        print(f"no VM: {reason}")
        return
    kvm, why = kvm_usable(image_dir / "vmlinuz", work)
    profiles = work / "profiles.yaml"
    profiles.write_text(PROFILES)
    settings = FleetSettings(db_url=f"sqlite:///{work / 'fleet.db'}", control_plane_size=1,
                             install_parallel=1, assets_dir=str(image_dir),
                             boot_profiles=str(profiles))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    db = Database(settings.db_url)
    reader = FleetClient(f"http://127.0.0.1:{port}", create_token(db, "reader", "bench")[1])
    db.dispose()
    vm = start_vm(work, "bench", mac="52:54:00:be:00:01",
                  uuid="8c6f0a1e-0000-4000-8000-0000000000be",
                  bootfile=f"http://{GUEST_HOST}:{port}/boot.ipxe", disk_size="64M", kvm=kvm,
                  firmware=firmware)
    marks: dict[str, float] = {}
    try:
        steps: list[tuple[str, Callable[[str], bool]]] = [
            ("iPXE asked the service (booting)", lambda s: s == "booting"),
            ("facts reported (discovered/scheduled)", lambda s: s in ("discovered", "scheduled",
                                                                      "installing",
                                                                      "installed")),
            ("install reported (installed)", lambda s: s == "installed"),
        ]
        deadline = time.monotonic() + 300
        for label, reached in steps:
            while not marks.get(label):
                machines = reader.machines()
                if machines and reached(machines[0]["state"]):
                    marks[label] = time.monotonic() - vm.started
                elif time.monotonic() > deadline:
                    sys.exit(f"no '{label}' within 300 s; console:\n{vm.console()[-2000:]}")
                time.sleep(0.2)
        after = len(vm.console())
        vm.wait_for("booting from the local disk", 120, after)
        marks["told to boot from its disk after the reboot"] = time.monotonic() - vm.started
        vm.wait_for("divingbell: booted from the installed disk", 300, after)
        marks["booted from its disk"] = time.monotonic() - vm.started
    finally:
        vm.stop()
        server.should_exit = True
        thread.join(timeout=10)
    print(f"VM ({firmware}, {'KVM' if kvm else 'software emulation: ' + why}), "
          "seconds from qemu start:")
    for label, seconds in marks.items():
        print(f"  {seconds:6.1f}  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/var/cache/divingbell-test/image"))
    parser.add_argument("--cold", action="store_true", help="build with an empty cache")
    parser.add_argument("--no-vm", action="store_true", help="only build the image")
    parser.add_argument("--firmware", choices=("bios", "uefi"), default="bios",
                        help="the VM's firmware: legacy BIOS (SeaBIOS) or UEFI (OVMF)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="divingbell-bench-") as scratch:
        work = Path(scratch)
        cache = work / "cache" if args.cold else args.cache
        build(cache, work / "image")
        if not args.no_vm:
            boot(work / "image", work, args.firmware)


if __name__ == "__main__":
    main()
