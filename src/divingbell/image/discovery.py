"""The network-boot discovery image: Debian's kernel and an initramfs with busybox and the
discovery client (a shell script), built from Debian packages only.

    apt-get download linux-image-amd64 busybox-static     (cached, checked against apt's SHA256)
    dpkg-deb -x: vmlinuz and the driver modules the network and the disks need, with depmod
    initramfs: busybox + applet links, modules + modules.dep, /init, the client, the hook
    -> DIR/vmlinuz, DIR/initrd.img, DIR/image.json (what went in, with checksums)

The kernel package is extracted, never installed. Everything that could vary between two builds
from the same packages (mtimes, owners, inode numbers, entry order, gzip header) is fixed, so the
same inputs give byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from divingbell import __version__
from divingbell.core.errors import CommandError, DivingbellError
from divingbell.core.host import Host
from divingbell.image.cpio import Entry, gzip_bytes, newc_archive
from divingbell.image.efi import esp_head
from divingbell.image.os import sha256_file

DEFAULT_CACHE = Path("/var/cache/divingbell/image")
KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Drivers for the NICs and disk controllers of common virtual machines and servers, and the
# filesystems the default install hook writes (ext4 root, FAT EFI system partition). Debian builds
# them as modules; modprobe pulls in what each depends on (libata, scsi_mod, virtio_ring, jbd2...),
# but not soft dependencies: ext4 needs crc32c through the crypto API, hence crc32c_generic.
DEFAULT_MODULES = (
    "e1000", "e1000e", "igb", "ixgbe", "virtio_net", "virtio_pci", "virtio_blk", "virtio_scsi",
    "ata_piix", "ahci", "sd_mod", "nvme",
    "ext4", "crc32c_generic", "vfat", "nls_cp437", "nls_ascii", "nls_utf8",
)
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200n8 panic=10 quiet"
# The files in the initramfs that are ours (src/divingbell/image/initramfs/).
_CLIENT_FILES = {
    "init": "init",
    "discovery": "usr/bin/divingbell-discovery",
    "udhcpc.script": "usr/share/divingbell/udhcpc.script",
    "install-hook": "usr/lib/divingbell/install-hook",
}
# The first sectors of the EFI system partition the default install hook writes.
ESP_HEAD_PATH = "usr/lib/divingbell/esp-head.img"
_SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
_SAFE_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")


class ImageError(DivingbellError):
    """The image cannot be built; the message says which input or step failed."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    path: Path

    def manifest(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "filename": self.filename,
                "sha256": self.sha256}


@dataclass(frozen=True)
class DiscoveryImage:
    """What `build_discovery_image` wrote."""

    directory: Path
    kernel: Path
    initrd: Path
    manifest: Path
    kernel_version: str
    packages: tuple[Package, ...]
    modules: tuple[str, ...]
    seconds: float
    reused_kernel_bundle: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "directory": str(self.directory),
            "kernel": {"path": str(self.kernel), "bytes": self.kernel.stat().st_size},
            "initrd": {"path": str(self.initrd), "bytes": self.initrd.stat().st_size},
            "manifest": str(self.manifest),
            "kernel_version": self.kernel_version,
            "packages": [p.manifest() for p in self.packages],
            "modules": list(self.modules),
            "seconds": round(self.seconds, 2),
            "reused_kernel_bundle": self.reused_kernel_bundle,
            "notes": self.notes,
        }


def _run(host: Host, argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    try:
        if cwd is None:
            return host.run(argv).stdout
        return host.run(["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(cwd), *argv]).stdout
    except CommandError as exc:
        raise ImageError(f"{what}: {exc}") from exc


def fetch_packages(host: Host, names: Sequence[str], cache: Path) -> list[Package]:
    """The candidate versions of `names` as .debs in `cache`, downloaded with apt-get only when
    the cache has no file with apt's SHA256 for them."""
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ImageError(f"{name!r} is not a Debian package name")
    uris = _run(host, ["apt-get", "download", "--print-uris", *names],
                f"asking apt where {', '.join(names)} are (in the apt lists? try apt-get update)")
    found: dict[str, tuple[str, str, str]] = {}
    for match in re.finditer(r"^'[^']+' (?P<file>\S+\.deb) \d+ SHA256:(?P<sha>[0-9a-f]{64})$",
                             uris, re.MULTILINE):
        package, version = match["file"].split("_")[:2]
        found[package] = (match["file"], version.replace("%3a", ":"), match["sha"])
    packages = []
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in found:
            raise ImageError(f"apt-get download --print-uris named no .deb for {name}: {uris!r}")
        filename, version, sha = found[name]
        target = cache / filename
        if not (target.is_file() and sha256_file(target) == sha):
            with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
                os.chmod(scratch, 0o755)  # apt's _apt user writes here when it can
                _run(host, ["apt-get", "download", "-q", f"{name}={version}"],
                     f"downloading {name} {version}", cwd=Path(scratch))
                downloaded = Path(scratch) / filename
                if not downloaded.is_file() or sha256_file(downloaded) != sha:
                    raise ImageError(f"apt-get download {name} did not give {filename} with "
                                     f"SHA256 {sha}")
                downloaded.replace(target)
        packages.append(Package(name, version, filename, sha, target))
    return packages


def _deb_field(host: Host, deb: Path, name: str) -> str:
    return _run(host, ["dpkg-deb", "-f", str(deb), name], f"reading {name} of {deb}").strip()


def follow_kernel_metapackage(host: Host, package: Package, cache: Path) -> list[Package]:
    """[package] or, for a metapackage (linux-image-amd64), [package, the image it depends on]."""
    chain = [package]
    for _ in range(3):
        depends = _deb_field(host, chain[-1].path, "Depends")
        images = re.findall(r"\b(linux-image-[0-9][\w.+-]*)", depends)
        if not images:
            return chain
        chain.extend(fetch_packages(host, [images[0]], cache))
    raise ImageError(f"{package.name}: more than three linux-image metapackages in a row")


def _extract_members(host: Host, deb: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """Regular files from a .deb's data, by path without the leading "./"."""
    wanted_set = set(wanted)
    found: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="divingbell-deb-") as scratch:
        tar_path = Path(scratch) / "data.tar"
        _run(host, ["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" > "$2"', "sh", str(deb),
                    str(tar_path)], f"reading {deb.name}")
        with tarfile.open(tar_path) as archive:
            for member in archive:
                path = member.name.removeprefix("./")
                if path in wanted_set and member.isfile():
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    found[path] = extracted.read()
    missing = wanted_set - found.keys()
    if missing:
        raise ImageError(f"{deb.name} has no {', '.join(sorted(missing))}")
    return found


def module_name(relative_path: str) -> str:
    """kernel/drivers/ata/ata_piix.ko -> ata_piix (modprobe treats - and _ alike)."""
    return Path(relative_path).name.split(".ko")[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep ("path.ko: dep.ko dep2.ko" per line) as {path: [deps]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path.strip()] = rest.split()
    return deps


def module_closure(requested: Sequence[str], deps: dict[str, list[str]],
                   builtin: set[str]) -> tuple[list[str], list[str]]:
    """(module files needed for `requested`, dependencies included, sorted; requested modules
    that are built into the kernel). Raises ImageError naming every module the kernel lacks."""
    by_name = {module_name(path): path for path in deps}
    needed: set[str] = set()
    built_in: list[str] = []
    missing: list[str] = []

    def add(path: str) -> None:
        if path not in needed:
            needed.add(path)
            for dep in deps.get(path, []):
                add(dep)

    for name in requested:
        key = name.replace("-", "_")
        if key in by_name:
            add(by_name[key])
        elif key in builtin:
            built_in.append(name)
        else:
            missing.append(name)
    if missing:
        raise ImageError(f"the kernel has no module named {', '.join(missing)}")
    return sorted(needed), built_in


@dataclass(frozen=True)
class KernelBundle:
    """Debian's vmlinuz and the chosen modules (with dependencies and depmod's index) under
    `root/lib/modules/<version>/`, cached per kernel package and module list."""

    root: Path
    version: str
    modules: tuple[str, ...]
    built_in: tuple[str, ...]

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"


@dataclass(frozen=True)
class KernelIndex:
    """What a kernel package holds, kept in the cache so module names are checked (and a new
    module list is served) without unpacking the package again."""

    version: str
    deps: dict[str, list[str]]
    builtin: set[str]


def _kernel_index(host: Host, kernel: Package, cache: Path, scratch: Path) -> KernelIndex:
    """The index from the cache, or by unpacking the whole package into `scratch/package`."""
    index_file = cache / f"kernel-index-{kernel.sha256[:16]}.json"
    if index_file.is_file():
        data = json.loads(index_file.read_text())
        return KernelIndex(data["version"], data["deps"], set(data["builtin"]))
    full = scratch / "package"
    _run(host, ["dpkg-deb", "-x", str(kernel.path), str(full)], f"unpacking {kernel.filename}")
    versions = sorted(p.name for p in (full / "lib/modules").iterdir()) \
        if (full / "lib/modules").is_dir() else []
    if len(versions) != 1:
        raise ImageError(f"{kernel.filename} should hold one kernel, has {versions or 'none'}")
    version = versions[0]
    source = full / "lib/modules" / version
    _run(host, ["depmod", "-b", str(full), version], "indexing the kernel's modules (depmod)")
    builtin_file = source / "modules.builtin"
    builtin = {module_name(line) for line in builtin_file.read_text().split()} \
        if builtin_file.is_file() else set()
    index = KernelIndex(version, parse_modules_dep((source / "modules.dep").read_text()), builtin)
    _write_atomic(index_file, json.dumps({"version": version, "deps": index.deps,
                                          "builtin": sorted(builtin)}).encode())
    return index


def kernel_bundle(host: Host, kernel: Package, modules: Sequence[str],
                  cache: Path) -> tuple[KernelBundle, bool]:
    """The bundle for `kernel` and `modules`, and whether it came from the cache."""
    for name in modules:
        if not _SAFE_MODULE.match(name):
            raise ImageError(f"{name!r} is not a kernel module name")
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256("\n".join([kernel.sha256, *sorted(set(modules))]).encode()).hexdigest()
    bundle_dir = cache / f"kernel-{key[:16]}"
    bundle_file = bundle_dir / "bundle.json"
    if bundle_file.is_file():
        data = json.loads(bundle_file.read_text())
        return KernelBundle(bundle_dir, data["version"], tuple(data["modules"]),
                            tuple(data["built_in"])), True
    with tempfile.TemporaryDirectory(dir=cache, prefix=".kernel-") as scratch_name:
        scratch = Path(scratch_name)
        index = _kernel_index(host, kernel, cache, scratch)
        version = index.version
        needed, built_in = module_closure(modules, index.deps, index.builtin)
        full = scratch / "package"
        module_dir = f"lib/modules/{version}"
        wanted = [f"boot/vmlinuz-{version}", *(f"{module_dir}/{m}" for m in needed),
                  *(f"{module_dir}/{n}" for n in ("modules.order", "modules.builtin",
                                                  "modules.builtin.modinfo"))]
        if not full.is_dir():  # the index came from the cache: take only what is needed
            full.mkdir()
            _run(host, ["sh", "-c", 'deb=$1 dir=$2; shift 2; '
                        'dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" "$@"',
                        "sh", str(kernel.path), str(full), *(f"./{w}" for w in wanted)],
                 f"unpacking the kernel and {len(needed)} modules from {kernel.filename}")
        vmlinuz = full / wanted[0]
        if not vmlinuz.is_file():
            raise ImageError(f"{kernel.filename} has no {wanted[0]}")
        staging = scratch / "bundle"
        (staging / module_dir).mkdir(parents=True)
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        for relative in wanted[1:]:
            if (full / relative).is_file():
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(full / relative, staging / relative)
        _run(host, ["depmod", "-b", str(staging), version], "indexing the chosen modules (depmod)")
        (staging / "bundle.json").write_text(json.dumps(
            {"version": version, "package": kernel.manifest(), "modules": needed,
             "built_in": built_in}, indent=2) + "\n")
        try:
            staging.rename(bundle_dir)
        except OSError:
            if not bundle_file.is_file():  # not a concurrent build that finished first
                raise
    return KernelBundle(bundle_dir, version, tuple(needed), tuple(built_in)), False


def client_file(name: str) -> bytes:
    """One of the initramfs files shipped with divingbell (init, the client, the hook)."""
    return resources.files("divingbell.image").joinpath("initramfs", name).read_bytes()


def initramfs_entries(bundle: KernelBundle, busybox: bytes, udhcpc_default: bytes,
                      modules: Sequence[str], version_line: str,
                      hook: bytes | None = None) -> list[Entry]:
    """Everything in the initramfs, as archive entries (directories included)."""
    files: list[Entry] = [
        Entry.file("bin/busybox", busybox, 0o755),
        Entry.symlink("bin/sh", "busybox"),
        Entry.char_device("dev/console", 5, 1),
        Entry.char_device("dev/null", 1, 3, 0o666),
        Entry.file("usr/share/udhcpc/default.script", udhcpc_default, 0o755),
        Entry.file("etc/divingbell/modules", "".join(f"{m}\n" for m in modules).encode()),
        Entry.file("etc/divingbell/version", f"{version_line}\n".encode()),
        Entry.file(ESP_HEAD_PATH, esp_head()),
    ]
    for source, target in _CLIENT_FILES.items():
        data = hook if (source == "install-hook" and hook is not None) else client_file(source)
        files.append(Entry.file(target, data, 0o755))
    modules_root = bundle.root / "lib/modules" / bundle.version
    for path in sorted(modules_root.rglob("*")):
        if path.is_file():
            relative = path.relative_to(bundle.root).as_posix()
            files.append(Entry.file(relative, path.read_bytes()))
    directories: dict[str, Entry] = {
        name: Entry.directory(name, perm)
        for name, perm in (("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777),
                           ("root", 0o700), ("sbin", 0o755), ("usr/sbin", 0o755))
    }
    for entry in files:
        parent = Path(entry.path).parent
        while str(parent) != ".":
            directories.setdefault(str(parent), Entry.directory(str(parent)))
            parent = parent.parent
    return [*directories.values(), *files]


def _write_atomic(path: Path, data: bytes) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_bytes(data)
    scratch.chmod(0o644)
    scratch.replace(path)


def build_discovery_image(
    output: Path,
    *,
    cache: Path = DEFAULT_CACHE,
    kernel_package: str = KERNEL_PACKAGE,
    busybox_package: str = BUSYBOX_PACKAGE,
    modules: Sequence[str] = DEFAULT_MODULES,
    hook: Path | None = None,
    host: Host | None = None,
) -> DiscoveryImage:
    """Build DIR/vmlinuz, DIR/initrd.img and DIR/image.json (see the module docstring)."""
    started = time.monotonic()
    host = host or Host()
    hook_bytes = None
    if hook is not None:
        try:
            hook_bytes = hook.read_bytes()
        except OSError as exc:
            raise ImageError(f"--hook {hook}: {exc.strerror}") from exc
        if not hook_bytes.startswith(b"#!"):
            raise ImageError(f"--hook {hook}: an install hook must start with #! (e.g. #!/bin/sh)")
    if not modules:
        raise ImageError("at least one kernel module is needed (the NIC driver)")
    debs = cache / "debs"
    kernel_pkg, busybox_pkg = fetch_packages(host, [kernel_package, busybox_package], debs)
    kernel_chain = follow_kernel_metapackage(host, kernel_pkg, debs)
    bundle, reused = kernel_bundle(host, kernel_chain[-1], modules, cache)
    udhcpc_example = "usr/share/doc/busybox-static/examples/udhcp/simple.script"
    busybox_files = _extract_members(host, busybox_pkg.path, ["bin/busybox", udhcpc_example])
    packages = (*kernel_chain, busybox_pkg)
    version_line = (f"divingbell {__version__}, {kernel_chain[-1].name} "
                    f"{kernel_chain[-1].version}, {busybox_pkg.name} {busybox_pkg.version}")
    entries = initramfs_entries(bundle, busybox_files["bin/busybox"],
                                busybox_files[udhcpc_example], modules, version_line, hook_bytes)
    initrd = gzip_bytes(newc_archive(entries))

    output.mkdir(parents=True, exist_ok=True)
    kernel_path, initrd_path, manifest_path = (output / "vmlinuz", output / "initrd.img",
                                               output / "image.json")
    _write_atomic(kernel_path, bundle.vmlinuz.read_bytes())
    _write_atomic(initrd_path, initrd)
    manifest = {
        "divingbell": __version__,
        "kernel_version": bundle.version,
        "kernel_cmdline": KERNEL_CMDLINE,
        "packages": [p.manifest() for p in packages],
        "modules": {"requested": list(modules), "files": list(bundle.modules),
                    "built_in": list(bundle.built_in)},
        "install_hook": str(hook) if hook is not None else "built-in",
        "files": {
            path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in (kernel_path, initrd_path)
        },
    }
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    notes = [f"built into the kernel: {', '.join(bundle.built_in)}"] if bundle.built_in else []
    return DiscoveryImage(output, kernel_path, initrd_path, manifest_path, bundle.version,
                          packages, bundle.modules, time.monotonic() - started, reused, notes)
