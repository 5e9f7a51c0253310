"""A Debian root with Debian's real GRUB (grub2-common, grub-pc-bin) on a real block device, so
`update-grub` runs chrooted exactly as on a node.

grub-mkconfig asks grub-probe which device holds / and /boot: an overlay or a tmpfs has none,
so the root is an ext4 filesystem on a loop device. The loop's backing file lives under
/dev/shm: grub-mkconfig follows a loop device to its backing file unless that file's path starts
with /dev/ (loopback-booted systems), and the file is outside the root. The GRUB packages are
downloaded once from the test root's Debian mirror and cached next to the debootstrap tarball.
The kernel image in /boot is a stand-in file (grub-mkconfig only lists it; nothing boots here).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from divingbell.core.host import Host
from tests.booted import CACHE, debian_tarball, overlay

GRUB_PACKAGES = ("grub2-common", "grub-pc-bin")
KERNEL = "/boot/vmlinuz-6.1.0-test-amd64"
IMAGE_SIZE = "1G"
_counter = itertools.count()


def grub_debs(debian_root: Path, scratch: Path) -> list[Path]:
    """GRUB and what it needs beyond the test root, from the root's own apt (cached)."""
    key = hashlib.sha256(" ".join(GRUB_PACKAGES).encode()).hexdigest()[:12]
    cache = CACHE / f"debs-grub-{key}"
    if not cache.is_dir():
        merged = overlay(debian_root, scratch / "grub-download")
        try:
            for name in ("proc", "dev"):
                subprocess.run(["mount", "--rbind", f"/{name}", merged / name], check=True)
            shutil.copyfile("/etc/resolv.conf", merged / "etc/resolv.conf")
            archives = merged / "var/cache/apt/archives"
            before = {p.name for p in archives.glob("*.deb")}
            steps = [["apt-get", "-q", "update"],
                     ["apt-get", "-q", "install", "-y", "--download-only",
                      "--no-install-recommends", *GRUB_PACKAGES]]
            for argv in steps:
                result = subprocess.run(["chroot", str(merged), *argv], capture_output=True,
                                        text=True, check=False)
                if result.returncode != 0:
                    pytest.skip(f"cannot download GRUB from Debian: {result.stderr[-300:]}")
            partial = CACHE / f"debs-grub-{key}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for deb in archives.glob("*.deb"):
                if deb.name not in before:
                    shutil.copyfile(deb, partial / deb.name)
            partial.rename(cache)
        finally:
            subprocess.run(["umount", "-R", "-l", scratch / "grub-download"], check=False)
    return sorted(cache.glob("*.deb"))


def _shm_image() -> Path:
    return Path(f"/dev/shm/divingbell-test-grub-{os.getpid()}-{next(_counter)}.img")


def bind_kernel_dirs(root: Path) -> None:
    for name in ("proc", "dev"):
        subprocess.run(["mount", "--rbind", f"/{name}", root / name], check=True)


@contextmanager
def mounted(image: Path, at: Path) -> Iterator[Path]:
    """`image` on a loop device, mounted at `at`, with /proc and /dev bound in (once the
    filesystem has a root in it)."""
    at.mkdir(parents=True, exist_ok=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mount", loop, at], check=True)
        if (at / "proc").is_dir():
            bind_kernel_dirs(at)
        yield at
    finally:
        subprocess.run(["umount", "-R", "-l", at], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


def build_image(debian_root: Path, scratch: Path) -> Path:
    """The prepared image: the test root, GRUB installed, a stand-in kernel, a first grub.cfg."""
    for tool in ("losetup", "mkfs.ext4", "chroot", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    debs = grub_debs(debian_root, scratch)
    image = _shm_image()
    try:
        _build(image, debs, scratch)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    return image


def _build(image: Path, debs: list[Path], scratch: Path) -> None:
    subprocess.run(["truncate", "-s", IMAGE_SIZE, image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    with mounted(image, scratch / "grub-build") as root:
        subprocess.run(["tar", "-C", root, "-xf", debian_tarball()], check=True)
        bind_kernel_dirs(root)
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        staging = root / "tmp/grub-debs"
        staging.mkdir(parents=True)
        for deb in debs:
            shutil.copyfile(deb, staging / deb.name)
        subprocess.run(["chroot", root, "sh", "-c", "dpkg -i /tmp/grub-debs/*.deb"],
                       capture_output=True, check=True)
        shutil.rmtree(staging)
        (root / KERNEL.lstrip("/")).write_text("a stand-in: grub-mkconfig only lists it\n")
        (root / "boot/grub").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chroot", root, "update-grub"], capture_output=True, check=True)


@contextmanager
def grub_root(prepared: Path, scratch: Path) -> Iterator[Path]:
    """A throwaway copy of the prepared image, mounted: one per test."""
    image = _shm_image()
    subprocess.run(["cp", "--sparse=always", prepared, image], check=True)
    try:
        with mounted(image, scratch / "grub-root") as root:
            yield root
    finally:
        image.unlink(missing_ok=True)


BOOTED = f"BOOT_IMAGE={KERNEL} root=/dev/sda1 ro quiet\n"


@pytest.fixture(scope="session")
def grub_image(debian_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    image = build_image(debian_root, tmp_path_factory.mktemp("grub"))
    yield image
    image.unlink(missing_ok=True)


@pytest.fixture
def grub_host(grub_image: Path, tmp_path: Path) -> Iterator[Host]:
    from tests.conftest import make_proc_sys

    with grub_root(grub_image, tmp_path) as root:
        proc = tmp_path / "proc"
        proc_sys = make_proc_sys(proc / "sys", {"vm/swappiness": "60"})
        (proc / "cmdline").write_text(BOOTED)
        yield Host(root=root, proc_sys=proc_sys)


def next_boot_line(host: Host) -> list[str]:
    """GRUB's default entry as the next boot gets it (the environment block's line in place of
    divingbell's variable), without root=, which names this copy's loop backing file."""
    from divingbell.core.modules.kernel import GRUB_CFG, GRUBENV, KernelObserved, default_entry

    entry = default_entry(host.read_text(GRUB_CFG) or "", host.read_text(GRUBENV))
    assert entry is not None
    env = {k: v for k, v in (line.split("=", 1) for line in
                             (host.read_text(GRUBENV) or "").splitlines()
                             if "=" in line and not line.startswith("#"))}
    observed = KernelObserved(None, None, entry, True, env=env)
    params = observed.next_params()
    assert params is not None
    return [p for p in params if not p.startswith("root=")]


def boot(host: Host, *, the_try_fails: bool = False) -> list[str]:
    """What a reboot does to the test root, GRUB's way: a line on trial (divingbell_try) is
    cleared by GRUB before it boots (save_env); if that boot fails (`the_try_fails`: a panic
    and panic=N, or a watchdog), the boot after it gets the default line. Then /proc/cmdline
    and a new boot id, and an empty /run. Returns the booted parameters."""
    import uuid

    from divingbell.core.modules.kernel import GRUBENV

    line = next_boot_line(host)
    if re.search(r"^divingbell_try=.", host.read_text(GRUBENV) or "", re.MULTILINE):
        # GRUB's `set divingbell_try=` and `save_env divingbell_try`: kept, empty.
        subprocess.run(["chroot", host.root, "grub-editenv", GRUBENV, "set",
                        "divingbell_try="], check=True)
        if the_try_fails:
            line = next_boot_line(host)
    (host.proc_sys.parent / "cmdline").write_text(
        f"BOOT_IMAGE={KERNEL} " + " ".join(line) + "\n")
    boot_id = host.proc_sys / "kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text(f"{uuid.uuid4()}\n")
    host.remove("/run/reboot-required")
    return line
