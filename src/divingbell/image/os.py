"""The operating system the default install hook writes: a Debian root with its kernel, GRUB for
BIOS and UEFI, systemd, openssh-server and divingbell (as `deploy/install` installs it, the fleet
agent's unit enabled), packed as a tarball for the hook to unpack onto a disk.

    debootstrap --variant=minbase --include=PACKAGES RELEASE root MIRROR   (.debs cached)
    pip wheel (divingbell + its run-time dependencies, pinned by requirements.lock when present)
    chroot: venv in /opt/divingbell, units, networkd DHCP, grub.cfg; per-machine state removed
    tar (sorted, numeric owners, mtimes clamped to SOURCE_DATE_EPOCH) | gzip -n
    -> DIR/root.tar.gz, DIR/root.tar.gz.sha256, DIR/os.json

A tarball rather than a filesystem image: the hook makes the filesystems the size of the disk it
finds (no resize step, no second copy of empty space over the network), and the same file serves
any partition layout an operator's own installer wants.

The build is cached by its inputs (release, mirror, packages, the divingbell wheel, the epoch).
Packing is deterministic: the same root gives the same bytes. Two debootstraps of the same
packages differ in a few generated files (see docs/boot.md, "What differs between two builds").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from divingbell import __version__
from divingbell.core.errors import DivingbellError

DEFAULT_CACHE = Path("/var/cache/divingbell/os")
DEFAULT_RELEASE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# 2024-01-01T00:00:00Z: the mtime every file is clamped to, unless SOURCE_DATE_EPOCH says else.
DEFAULT_EPOCH = 1704067200
# What every image holds. --packages adds to it.
BASE_PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "systemd", "systemd-sysv", "udev", "dbus",
    "grub-pc-bin", "grub-efi-amd64-bin", "grub2-common", "e2fsprogs", "dosfstools",
    "openssh-server", "python3", "python3-venv", "iproute2", "procps", "kmod", "ca-certificates",
    "util-linux", "mount", "less",
)
ROOT_LABEL = "dbroot"
ESP_LABEL = "DBESP"
TARBALL = "root.tar.gz"
MANIFEST = "os.json"
_RELEASE_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MIRROR_RE = re.compile(r"^(https?|file)://[^\s'\"]+$")

NETWORK_UNIT = """\
# Written by `divingbell image os`: DHCP on every wired interface, so the installed machine
# reaches the fleet service the way its discovery image did.
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""
# Host keys are made on the machine's first boot: an image must not carry any.
SSH_KEYS_DROPIN = """\
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""
GRUB_CFG = """\
# Written by `divingbell image os`; read by GRUB under BIOS (i386-pc) and UEFI (x86_64-efi).
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
search --no-floppy --label --set=root {label}
menuentry "Debian ({kernel_version})" {{
    linux /boot/vmlinuz-{kernel_version} root=LABEL={label} ro console=tty0 console=ttyS0,115200n8
    initrd /boot/initrd.img-{kernel_version}
}}
"""

# What update-grub reads on the installed machine (the kernel module, a kernel upgrade's
# zz-update-grub): the same console and timeout as GRUB_CFG above. Without it grub-mkconfig's
# defaults drop the serial console (no kernel messages, no login on ttyS0) at the first run.
DEFAULT_GRUB = """\
# Written by `divingbell image os`: update-grub keeps what the image's first grub.cfg had.
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB_DISABLE_RECOVERY=true
"""


class OsImageError(DivingbellError):
    """The OS image cannot be built; the message names the input or the step."""


@dataclass(frozen=True)
class OsImage:
    """What `build_os_image` wrote."""

    directory: Path
    tarball: Path
    sha256: str
    size: int
    kernel_version: str
    packages: dict[str, str]
    seconds: float
    reused: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {"directory": str(self.directory), "tarball": str(self.tarball),
                "sha256": self.sha256, "bytes": self.size,
                "kernel_version": self.kernel_version, "packages": len(self.packages),
                "seconds": round(self.seconds, 2), "reused": self.reused, "notes": self.notes}


def check_inputs(release: str, mirror: str, packages: Sequence[str]) -> None:
    """Every bad input named before anything runs."""
    if not _RELEASE_RE.match(release):
        raise OsImageError(f"release: {release!r} is not a Debian release name (e.g. bookworm)")
    if not _MIRROR_RE.match(mirror):
        raise OsImageError(f"mirror: {mirror!r} is not an http(s):// or file:// URL")
    for name in packages:
        if not _PACKAGE_RE.match(name):
            raise OsImageError(f"packages: {name!r} is not a Debian package name")


def source_tree() -> Path:
    """The checkout divingbell runs from (the image installs divingbell from it)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise OsImageError(f"no divingbell checkout at {root}: build the OS image from a "
                           "checkout (it installs divingbell from its source, as deploy/install)")
    return root


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                            env=env, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-1500:].strip()
        raise OsImageError(f"{what}: {argv[0]} exited {result.returncode}: {tail}")
    return result.stdout


def sha256_file(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def lock_constraints(source: Path) -> str:
    """`name==version` lines from requirements.lock (hashes dropped: pip takes no hashes in a
    constraints file), so the image's Python packages are the ones the project tests with."""
    lock = source / "requirements.lock"
    if not lock.is_file():
        return ""
    pins = re.findall(r"^([A-Za-z0-9._-]+(?:\[[^\]]*\])?==[^\s\\]+)", lock.read_text(), re.M)
    return "".join(re.sub(r"\[[^]]*\]", "", pin) + "\n" for pin in pins)


def build_wheels(source: Path, into: Path, env: dict[str, str],
                 kept: Path | None = None) -> list[Path]:
    """divingbell's wheel and its dependencies' in `into`. With `kept` (a directory of wheels
    from earlier builds) pip first tries offline from there, so a rebuild asks no index; the
    wheels it had to download are added to `kept`."""
    into.mkdir(parents=True, exist_ok=True)
    constraints = into.parent / f"{into.name}-constraints.txt"
    constraints.write_text(lock_constraints(source))
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
           "-c", str(constraints), "-w", str(into)]
    offline = kept is not None and kept.is_dir() and subprocess.run(
        [*pip, "--no-index", "--find-links", str(kept), str(source)], capture_output=True,
        env=env, stdin=subprocess.DEVNULL, check=False).returncode == 0
    if not offline:
        _run([*pip, str(source)], "building the divingbell wheels (pip wheel)", env=env)
    wheels = sorted(into.glob("*.whl"))
    if kept is not None and not offline:
        kept.mkdir(parents=True, exist_ok=True)
        for wheel in wheels:
            if not wheel.name.startswith("divingbell-") and not (kept / wheel.name).exists():
                shutil.copyfile(wheel, kept / wheel.name)
    return wheels


def pack(root: Path, tarball: Path, epoch: int) -> None:
    """`root` as a gzip'd tar whose bytes depend only on the tree: names sorted, owners numeric,
    mtimes clamped to `epoch`, no atime/ctime, gzip without name or time. /dev, /proc, /sys,
    /run and /tmp are packed empty (the running system mounts them)."""
    partial = tarball.with_name(tarball.name + ".partial")
    tar = subprocess.Popen(
        ["tar", "-C", str(root), "--format=gnu", "--sort=name", "--numeric-owner",
         f"--mtime=@{epoch}", "--clamp-mtime", "--exclude=./dev/*", "--exclude=./proc/*",
         "--exclude=./sys/*", "--exclude=./run/*", "--exclude=./tmp/*", "-cf", "-", "."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdout is not None
    with partial.open("wb") as out:
        gzip = subprocess.run(["gzip", "-n", "-6"], stdin=tar.stdout, stdout=out,
                              stderr=subprocess.PIPE, check=False)
    tar.stdout.close()
    tar_err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
    if tar.wait() != 0 or gzip.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OsImageError(f"packing {root}: tar: {tar_err[-500:]} gzip: "
                           f"{gzip.stderr.decode(errors='replace')[-300:]}")
    partial.rename(tarball)


def _chroot(root: Path, env: dict[str, str], *argv: str, what: str) -> str:
    return _run(["chroot", str(root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                 "HOME=/root", "LC_ALL=C.UTF-8", f"SOURCE_DATE_EPOCH={env['SOURCE_DATE_EPOCH']}",
                 "DEBIAN_FRONTEND=noninteractive", *argv], what)


def configure_root(root: Path, source: Path, wheels: Sequence[Path], mirror: str, release: str,
                   env: dict[str, str]) -> str:
    """divingbell and its units, networking, the boot menu; then remove what must differ per
    machine (machine-id, ssh host keys) and what only records the build (logs, apt lists).
    Returns the kernel version."""
    staged = root / "tmp" / "wheels"
    staged.mkdir(parents=True)
    for wheel in wheels:
        shutil.copy2(wheel, staged / wheel.name)
    _chroot(root, env, "python3", "-m", "venv", "/opt/divingbell", what="creating the venv")
    _chroot(root, env, "/opt/divingbell/bin/pip", "install", "--quiet",
            "--disable-pip-version-check", "--no-index", "--find-links", "/tmp/wheels",
            "divingbell", what="installing divingbell into /opt/divingbell")
    _chroot(root, env, "/opt/divingbell/bin/pip", "uninstall", "--quiet", "--yes", "setuptools",
            what="removing setuptools (not needed at run time)")
    shutil.rmtree(staged)
    for link_dir in ("usr/local/sbin", "usr/local/bin"):
        (root / link_dir).mkdir(parents=True, exist_ok=True)
        link = root / link_dir / "divingbell"
        link.unlink(missing_ok=True)
        link.symlink_to("/opt/divingbell/bin/divingbell")
    units = root / "etc/systemd/system"
    for unit in ("divingbell-agent.service", "divingbell-agent-fleet.service"):
        shutil.copyfile(source / "deploy" / unit, units / unit)
        (units / unit).chmod(0o644)
    (root / "etc/divingbell").mkdir(mode=0o755, exist_ok=True)
    (root / "var/lib/divingbell").mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "etc/systemd/network/80-divingbell-dhcp.network").write_text(NETWORK_UNIT)
    dropin = units / "ssh.service.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "divingbell-host-keys.conf").write_text(SSH_KEYS_DROPIN)
    # The fleet agent starts once the install hook has written its credential and service URL
    # (ConditionPathExists in its unit).
    _chroot(root, env, "systemctl", "enable", "systemd-networkd.service", "ssh.service",
            "divingbell-agent-fleet.service", what="enabling networkd, ssh and the fleet agent")
    (root / "etc/apt/sources.list").write_text(f"deb {mirror} {release} main\n")
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if not versions:
        raise OsImageError("the root has no /boot/vmlinuz-*: is linux-image-amd64 installed?")
    kernel_version = versions[-1]
    (root / "boot/grub").mkdir(parents=True, exist_ok=True)
    (root / "boot/grub/grub.cfg").write_text(
        GRUB_CFG.format(label=ROOT_LABEL, kernel_version=kernel_version))
    (root / "etc/default/grub").write_text(DEFAULT_GRUB)
    (root / "etc/fstab").write_text(
        f"LABEL={ROOT_LABEL} / ext4 errors=remount-ro 0 1\n"
        f"LABEL={ESP_LABEL} /boot/efi vfat umask=0077,nofail 0 2\n")
    (root / "boot/efi").mkdir(exist_ok=True)
    # Per machine: systemd makes a machine-id on first boot when the file is empty.
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/hostname").write_text("localhost\n")
    for pattern in ("var/log/**/*", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "var/cache/debconf/*-old", "var/cache/ldconfig/aux-cache",
                    "var/lib/dpkg/*-old", "root/.cache", "var/cache/apt/archives/*.deb"):
        for path in sorted(root.glob(pattern), reverse=True):
            if path.is_file() or path.is_symlink():
                path.unlink()
            elif path.is_dir() and pattern.startswith("root/"):
                shutil.rmtree(path)
    return kernel_version


def installed_packages(root: Path) -> dict[str, str]:
    listing = _run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"],
                   "listing the installed packages")
    return dict(line.split(" ", 1) for line in sorted(listing.splitlines()) if " " in line)


def wheel_digest(wheel: Path) -> str:
    """A wheel's contents (names and bytes), not its zip file: a wheel built again from the same
    source differs in its zip metadata only."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def _key(release: str, mirror: str, packages: Sequence[str], wheels: Sequence[Path],
         epoch: int) -> str:
    wheel_digests = [f"{w.name}:{wheel_digest(w)}" for w in wheels]
    text = json.dumps([release, mirror, sorted(set(packages)), wheel_digests, epoch])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _publish(built: Path, output: Path) -> None:
    """Copy the cached build's files into `output`, each replaced atomically."""
    output.mkdir(parents=True, exist_ok=True)
    for name in (TARBALL, f"{TARBALL}.sha256", MANIFEST):
        target = output / name
        if target.exists() and target.stat().st_size == (built / name).stat().st_size \
                and sha256_file(target) == sha256_file(built / name):
            continue
        partial = output / f".{name}.partial"
        shutil.copyfile(built / name, partial)
        partial.chmod(0o644)
        partial.rename(target)


def build_os_image(output: Path, *, release: str = DEFAULT_RELEASE,
                   packages: Sequence[str] = (), mirror: str = DEFAULT_MIRROR,
                   cache: Path = DEFAULT_CACHE, epoch: int | None = None) -> OsImage:
    """Build (or take from `cache`) the OS image and write it to `output`."""
    started = time.monotonic()
    check_inputs(release, mirror, packages)
    for tool in ("debootstrap", "chroot", "tar", "gzip"):
        if shutil.which(tool) is None:
            raise OsImageError(f"needs {tool} on this machine (Debian: apt-get install {tool})")
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    source = source_tree()
    wanted = sorted(set(BASE_PACKAGES) | set(packages))
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8"}
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as scratch_name:
        scratch = Path(scratch_name)
        wheels = build_wheels(source, scratch / "wheels", env, kept=cache / "wheels")
        key = _key(release, mirror, wanted, wheels, epoch)
        built = cache / f"os-{key}"
        reused = (built / MANIFEST).is_file()
        if not reused:
            root = scratch / "root"
            debs = cache / "debs"
            debs.mkdir(exist_ok=True)
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(wanted)}",
                  f"--cache-dir={debs}", release, str(root), mirror],
                 f"debootstrap {release} from {mirror}", env=env)
            kernel_version = configure_root(root, source, wheels, mirror, release, env)
            versions = installed_packages(root)
            staging = cache / f".os-{key}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            pack(root, staging / TARBALL, epoch)
            digest = sha256_file(staging / TARBALL)
            (staging / f"{TARBALL}.sha256").write_text(f"{digest}  {TARBALL}\n")
            manifest = {
                "format": "divingbell-os/1", "release": release, "mirror": mirror,
                "requested": wanted, "kernel_version": kernel_version,
                "divingbell_version": __version__, "source_date_epoch": epoch, "key": key,
                "tarball": {"name": TARBALL, "sha256": digest,
                            "bytes": (staging / TARBALL).stat().st_size},
                "labels": {"root": ROOT_LABEL, "esp": ESP_LABEL},
                "packages": versions,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(built, ignore_errors=True)
            staging.rename(built)
    _publish(built, output)
    manifest = json.loads((output / MANIFEST).read_text())
    return OsImage(directory=output, tarball=output / TARBALL,
                   sha256=manifest["tarball"]["sha256"], size=manifest["tarball"]["bytes"],
                   kernel_version=manifest["kernel_version"], packages=manifest["packages"],
                   seconds=time.monotonic() - started, reused=reused)
