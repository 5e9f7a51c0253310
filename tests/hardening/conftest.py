"""Fixtures for the adversarial tests: fresh Debian overlays on demand (the crash tests need
one per crash point), snapshots of a host root, and both path resolvers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.core import safepath

TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}$")


@contextlib.contextmanager
def debian_overlay(debian_root: Path, base: Path) -> Iterator[Path]:
    """A throwaway writable Debian root with /proc and /dev bound in (for chrooted tools)."""
    from tests.booted import overlay

    merged = overlay(debian_root, base)
    for name in ("proc", "dev"):
        subprocess.run(["mount", "--rbind", f"/{name}", merged / name], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-R", "-l", base], check=False)


def snapshot(root: Path, tops: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every path under `tops` with its type, mode, owner and content digest (or link)."""
    out: dict[str, str] = {}
    for top in tops:
        base = root / top.lstrip("/")
        if not base.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                rel = "/" + str(path.relative_to(root))
                if any(rel == s or rel.startswith(s + "/") for s in skip):
                    continue
                info = path.lstat()
                what = f"{stat.filemode(info.st_mode)} {info.st_uid}:{info.st_gid}"
                if stat.S_ISLNK(info.st_mode):
                    what += " -> " + os.readlink(path)
                elif stat.S_ISREG(info.st_mode):
                    what += " " + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                out[rel] = what
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the kernel's openat2 and again with the O_NOFOLLOW walk."""
    saved = safepath.openat2_available
    safepath.openat2_available = None if request.param == "openat2" else False
    try:
        yield str(request.param)
    finally:
        safepath.openat2_available = saved
