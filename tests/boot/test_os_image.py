"""`divingbell image os` without a debootstrap: its inputs are checked before anything runs, its
packing depends only on the tree, and a build is found again in the cache by its inputs."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from divingbell.image.os import (
    OsImageError,
    check_inputs,
    lock_constraints,
    pack,
    source_tree,
    wheel_digest,
)


def make_tree(root: Path, order: list[str]) -> None:
    """A small root whose files are created in `order` (so directory order differs)."""
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"content of {name}\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "1").write_text("not packed")
    (root / "dev").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp" / "scratch").write_text("not packed")
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "bin" / "tool").symlink_to("../lib/tool")


def test_packing_depends_only_on_the_tree(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    make_tree(first, ["etc/hostname", "usr/lib/tool", "etc/fstab"])
    make_tree(second, ["etc/fstab", "usr/lib/tool", "etc/hostname"])
    os.utime(second / "etc" / "fstab", (2_000_000_000, 2_000_000_000))  # newer than the epoch
    pack(first, tmp_path / "a.tar.gz", epoch=1704067200)
    pack(second, tmp_path / "b.tar.gz", epoch=1704067200)
    data = (tmp_path / "a.tar.gz").read_bytes()
    assert data == (tmp_path / "b.tar.gz").read_bytes()

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as archive:
        members = archive.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "./proc" in names and "./proc/1" not in names
    assert "./tmp" in names and "./tmp/scratch" not in names
    assert {m.mtime for m in members} == {1704067200}
    assert next(m for m in members if m.name == "./usr/bin/tool").linkname == "../lib/tool"
    # gzip without a name or time in its header
    assert data[4:8] == b"\0\0\0\0"


@pytest.mark.parametrize(("release", "mirror", "packages", "field"), [
    ("bookworm; rm -rf /", "http://deb.debian.org/debian", [], "release"),
    ("bookworm", "ftp://example.org/debian", [], "mirror"),
    ("bookworm", "http://deb.debian.org/debian x", [], "mirror"),
    ("bookworm", "http://deb.debian.org/debian", ["vim", "-oops"], "packages"),
])
def test_bad_inputs_are_named(release: str, mirror: str, packages: list[str],
                              field: str) -> None:
    with pytest.raises(OsImageError, match=f"^{field}: "):
        check_inputs(release, mirror, packages)


def test_the_command_refuses_a_bad_package_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "os"
    result = subprocess.run(
        [sys.executable, "-m", "divingbell", "image", "os", "-o", str(out), "--packages",
         "vim,bad name", "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: packages: 'bad name' is not a Debian package name"
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_the_python_packages_are_pinned_by_the_lock() -> None:
    pins = lock_constraints(source_tree()).splitlines()
    assert pins, "requirements.lock gave no pins"
    assert all("==" in pin and "[" not in pin and "--hash" not in pin for pin in pins)
    names = {pin.split("==")[0].lower() for pin in pins}
    assert {"pydantic", "pyyaml", "click"} <= names


def test_a_wheel_is_known_by_its_contents_not_its_zip(tmp_path: Path) -> None:
    def wheel(path: Path, date: tuple[int, int, int, int, int, int], text: str) -> Path:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(zipfile.ZipInfo("pkg/__init__.py", date), text)
        return path

    same_a = wheel(tmp_path / "a.whl", (2020, 1, 1, 0, 0, 0), "x = 1\n")
    same_b = wheel(tmp_path / "b.whl", (2026, 5, 5, 5, 5, 4), "x = 1\n")
    other = wheel(tmp_path / "c.whl", (2020, 1, 1, 0, 0, 0), "x = 2\n")
    assert same_a.read_bytes() != same_b.read_bytes()
    assert wheel_digest(same_a) == wheel_digest(same_b) != wheel_digest(other)


def test_the_manifest_format_of_a_cached_build_is_read_back(tmp_path: Path) -> None:
    """`_publish` copies a cached build; `build_os_image` reads its manifest."""
    from divingbell.image.os import MANIFEST, TARBALL, _publish

    built = tmp_path / "cache" / "os-key"
    built.mkdir(parents=True)
    (built / TARBALL).write_bytes(b"tarball")
    (built / f"{TARBALL}.sha256").write_text(f"abc  {TARBALL}\n")
    (built / MANIFEST).write_text(json.dumps({"tarball": {"sha256": "abc", "bytes": 7}}))
    _publish(built, tmp_path / "out")
    _publish(built, tmp_path / "out")  # again: nothing changes, nothing left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [TARBALL, f"{TARBALL}.sha256", MANIFEST])
    assert (tmp_path / "out" / TARBALL).read_bytes() == b"tarball"
    assert oct((tmp_path / "out" / TARBALL).stat().st_mode & 0o777) == "0o644"
