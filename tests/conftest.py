"""Shared fixtures: real network namespaces, scratch host roots and kernel-tunable trees.

Nothing here touches this machine's own settings: kernel tests run divingbell inside a
network namespace created per test (net.* sysctls are the namespace's own), and in-process
tests point the host's /proc/sys at a scratch directory.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from divingbell.core.host import Host
from tests.kube.fixtures import (  # noqa: F401
    kube_admin,
    kube_cluster,
    kube_kubeconfig,
    kube_namespace,
)
from tests.skip_summary import pytest_terminal_summary  # noqa: F401  (the skip summary hook)

REPO = Path(__file__).resolve().parent.parent
_names = itertools.count()
CLONE_NEWNS = 0x00020000


def pytest_configure(config: pytest.Config) -> None:
    """Run the whole session in a private mount namespace: every mount a test makes (overlay
    roots, tmpfs mounts under test) lives and dies with this process and its children, and
    none can ever reach this machine's own mount table."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


def require_root_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (kernel namespaces)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (install with scripts/test-deps)")


@dataclass
class NetNs:
    name: str

    def sysctl(self, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        out = subprocess.run(["ip", "netns", "exec", self.name, "cat", path],
                             check=True, capture_output=True, text=True)
        return " ".join(out.stdout.split())

    def set_sysctl(self, key: str, value: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-qw", f"{key}={value}"],
                       check=True)


@pytest.fixture
def netns() -> Iterator[NetNs]:
    require_root_tools("ip", "sysctl")
    name = f"dbt-{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield NetNs(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@dataclass
class Cli:
    """Runs the real `divingbell` command in a fresh process, optionally inside a netns."""

    netns: NetNs | None = None

    def __call__(self, *args: str | Path, env: Mapping[str, str] | None = None,
                 input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "divingbell", *map(str, args)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns.name, *argv]
        full_env = {**os.environ, **(env or {})}
        full_env.pop("NODE_NAME", None)
        if env and "NODE_NAME" in env:
            full_env["NODE_NAME"] = env["NODE_NAME"]
        return subprocess.run(argv, capture_output=True, text=True, env=full_env,
                              input=input_text, check=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def ns_cli(netns: NetNs) -> Cli:
    return Cli(netns)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty host root filesystem for divingbell's files and journal."""
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def overlay_root(tmp_path: Path) -> Iterator[Path]:
    """A host root that is this machine's own userland seen through an overlay: real binaries
    (ethtool, mount, systemd-escape) for chrooted commands, every write kept in a tmpfs that
    disappears after the test. /proc, /dev and /sys are bound in for the tools that need them."""
    require_root_tools("mount", "umount", "chroot")
    base = tmp_path / "overlay"
    base.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", base], check=True)
    for name in ("upper", "work", "merged"):
        (base / name).mkdir()
    merged = base / "merged"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", merged], check=True)
    for name in ("proc", "dev", "sys"):
        subprocess.run(["mount", "--rbind", f"/{name}", merged / name], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-R", "-l", merged], check=False)
        subprocess.run(["umount", "-l", base], check=False)


def make_proc_sys(base: Path, values: Mapping[str, str], read_only: tuple[str, ...] = ()) -> Path:
    """A scratch /proc/sys: one file per key (slash form), like the kernel's."""
    for key, value in values.items():
        path = base.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
        if key in read_only:
            path.chmod(0o444)
    return base


@pytest.fixture
def scratch_host(tmp_path: Path, root: Path) -> Host:
    proc_sys = make_proc_sys(tmp_path / "proc_sys", {
        "net/ipv4/ip_forward": "0",
        "net/core/somaxconn": "4096",
        "net/ipv4/tcp_rmem": "4096\t131072\t6291456",
        "fs/file-max": "9223372036854775807",
        "vm/swappiness": "60",
        "kernel/osrelease": "6.18.0",
    }, read_only=("kernel/osrelease",))
    return Host(root=root, proc_sys=proc_sys)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal Debian root (debootstrap, cached as a tarball), never modified: tests use
    overlays of it."""
    from tests.booted import debian_tarball, extract

    require_root_tools("systemd-nspawn", "nsenter", "tar", "chroot")
    return extract(debian_tarball(), tmp_path_factory.mktemp("debian") / "root")


@pytest.fixture
def debian_host(debian_root: Path, tmp_path: Path) -> Iterator[Host]:
    """A throwaway Debian host root: an overlay of the cached root, entered with chroot."""
    from tests.booted import overlay

    merged = overlay(debian_root, tmp_path / "debian")
    for name in ("proc", "dev"):
        subprocess.run(["mount", "--rbind", f"/{name}", merged / name], check=True)
    try:
        yield Host(root=merged)
    finally:
        subprocess.run(["umount", "-R", "-l", tmp_path / "debian"], check=False)


# Debian's GRUB on a loop-device root, for the kernel module (fixtures defined there).
from tests.grubroot import grub_host, grub_image  # noqa: E402, F401
