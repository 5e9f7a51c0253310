"""Test hosts with a real Debian userland: a debootstrap root built once and cached, and a booted
node (systemd as PID 1 in systemd-nspawn) over a per-test overlay of it.

Recipes and traps: ../shared/docs/test-hosts.md. The container always gets a network namespace
made for the test (never this machine's), and its own cgroup directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUITE = "bookworm"
MIRROR = os.environ.get("DIVINGBELL_TEST_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("systemd", "systemd-sysv", "dbus", "sudo", "openssh-server", "iproute2", "ethtool",
            "procps", "kmod", "apt-utils", "util-linux", "mount")
CACHE = Path(os.environ.get("DIVINGBELL_TEST_CACHE", "/var/cache/divingbell-test"))


def debian_tarball(packages: tuple[str, ...] = PACKAGES) -> Path:
    """A tarball of a minimal Debian root, built with debootstrap once per package list."""
    key = hashlib.sha256(f"{SUITE} {' '.join(packages)}".encode()).hexdigest()[:12]
    tarball = CACHE / f"debian-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        pytest.skip("needs debootstrap (installed by .ci/run)")
    CACHE.mkdir(parents=True, exist_ok=True)
    build = CACHE / f"build-{os.getpid()}"
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
         str(build), MIRROR], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        pytest.skip(f"debootstrap failed (no Debian mirror?): {result.stderr[-300:]}")
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(build), "-cf", str(partial), "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(build, ignore_errors=True)
    return tarball


def extract(tarball: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(into), "-xf", str(tarball)], check=True)
    return into


def overlay(lower: Path, base: Path) -> Path:
    """A writable overlay of `lower` whose writes live in a tmpfs under `base`."""
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)
    for name in ("upper", "work", "merged"):
        (base / name).mkdir()
    merged = base / "merged"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work", str(merged)],
                   check=True)
    return merged


@dataclass
class BootedHost:
    """systemd as PID 1 in systemd-nspawn, over `root`, in network namespace `netns`."""

    root: Path
    name: str
    netns: str
    binds: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    leader: int = 0

    def boot(self, timeout: float = 30.0) -> None:
        nspawn_dir = Path("/run/systemd/nspawn")
        if not os.path.ismount(nspawn_dir):
            nspawn_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(nspawn_dir)], check=True)
        cgroups = [Path(f"/sys/fs/cgroup/{h}/{self.name}") for h in ("systemd", "unified")]
        for cgroup in cgroups:
            cgroup.mkdir(exist_ok=True)
        joins = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in cgroups)
        argv = ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "-M", self.name,
                "--register=no", "--keep-unit", "--console=passive",
                f"--network-namespace-path=/run/netns/{self.netns}",
                "--capability=CAP_NET_ADMIN", *[f"--bind-ro={b}" for b in self.binds]]
        self.process = subprocess.Popen(
            ["sh", "-c", f'{joins}; exec "$@"', "sh", *argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            try:
                pids = children.read_text().split()
            except FileNotFoundError:
                pids = []
            if pids:
                self.leader = int(pids[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.process.returncode}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not boot in {timeout}s")

    def run(self, *argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *map(str, argv)],
                              capture_output=True, text=True, check=check)

    def divingbell(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run(Path(sys.executable).with_name("divingbell"), *args, check=False)

    def poweroff(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        self.run("systemctl", "poweroff", "--no-block", check=False)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        for hierarchy in ("systemd", "unified"):
            remove_cgroup(Path(f"/sys/fs/cgroup/{hierarchy}/{self.name}"))


def remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            remove_cgroup(child)
    with contextlib.suppress(OSError):
        path.rmdir()
