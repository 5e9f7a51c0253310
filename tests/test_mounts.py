"""mounts for real: tmpfs mounts inside the session's private mount namespace, under an overlay
root with this machine's own `mount`; nothing reaches this machine's mount table."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.host import Host
from divingbell.core.modules.mounts import (
    LiveMount,
    normalise_options,
    parse_mountinfo,
    render_unit,
)
from divingbell.core.modules.systemd import escape_path

pytestmark = pytest.mark.kernel

DOC = """\
conf:
  mounts:
    scratch:
      mnt_tgt: /mnt/db-scratch
      device: tmpfs
      type: tmpfs
      options: 'defaults,noatime,nosuid,nodev,noexec,mode=1777,size=16M'
"""
UNIT = "etc/systemd/system/mnt-db\\x2dscratch.mount"
WANTS = "etc/systemd/system/local-fs.target.wants/mnt-db\\x2dscratch.mount"


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r")


def live(host: Host, target: str) -> LiveMount | None:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text()).get(str(host.path(target)))


@pytest.fixture
def host(overlay_root: Path) -> Host:
    return Host(root=overlay_root)


def test_apply_noop_remount_in_place_and_revert(host: Host) -> None:
    report = apply(host, DOC)
    assert report.ok, report.as_dict()
    mounted = live(host, "/mnt/db-scratch")
    assert mounted is not None and mounted.fstype == "tmpfs"
    assert {"noatime", "nosuid", "nodev", "noexec", "size=16384k"} <= set(mounted.options)
    unit = (host.root / UNIT).read_text()
    assert "What=tmpfs\nWhere=/mnt/db-scratch\nType=tmpfs\n" in unit
    assert "Before=docker.service\nAfter=network-online.target" in unit
    assert (host.root / WANTS).is_symlink()

    assert apply(host, DOC).applied == [], "defaults and mode=1777 normalised, size in k"

    (host.path("/mnt/db-scratch") / "keep").write_text("contents survive a remount\n")
    bigger = apply(host, DOC.replace("size=16M", "size=32M"))
    assert bigger.ok
    assert [c.reason for c in bigger.applied if c.target == "/mnt/db-scratch"] == [
        "remount in place"]
    remounted = live(host, "/mnt/db-scratch")
    assert remounted is not None and "size=32768k" in remounted.options
    assert (host.path("/mnt/db-scratch") / "keep").exists()

    gone = apply(host, "conf: {}\n")
    assert gone.ok, gone.as_dict()
    assert live(host, "/mnt/db-scratch") is None
    assert not (host.root / UNIT).exists()
    assert not (host.root / WANTS).is_symlink()
    assert not host.path("/mnt/db-scratch").exists(), "divingbell created it, so it goes"


def test_a_mount_point_that_existed_is_kept(host: Host) -> None:
    host.path("/mnt/db-scratch").mkdir(parents=True)
    apply(host, DOC)
    apply(host, "conf: {}\n")
    assert host.path("/mnt/db-scratch").is_dir()


@pytest.fixture
def squatter(host: Host) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_busy_mount_names_the_holder_and_is_retried(
    host: Host, squatter: list[subprocess.Popen[bytes]]
) -> None:
    apply(host, DOC)
    holder = subprocess.Popen(["sleep", "60"], cwd=host.path("/mnt/db-scratch"))
    squatter.append(holder)
    time.sleep(0.05)
    busy = apply(host, "conf: {}\n")
    assert not busy.ok
    (error,) = [r.error for r in busy.results if r.error]
    assert error is not None
    assert f"/mnt/db-scratch is busy, held by pid {holder.pid} (sleep)" in error
    assert live(host, "/mnt/db-scratch") is not None
    assert (host.root / UNIT).exists(), "still owned: the next run retries"
    holder.kill()
    holder.wait()
    retried = apply(host, "conf: {}\n")
    assert retried.ok, retried.as_dict()
    assert live(host, "/mnt/db-scratch") is None


def test_a_mount_that_fails_is_rolled_back(host: Host) -> None:
    doc = DOC.replace("type: tmpfs", "type: nosuchfs")
    report = apply(host, doc)
    assert not report.ok
    assert not (host.root / UNIT).exists()
    assert not (host.root / WANTS).is_symlink()


@pytest.mark.parametrize("path", ["/mnt/db-scratch", "/var/lib/a b", "/srv/.hidden/x", "/",
                                  "/data//x/", "/mnt/ünï"])
def test_escape_matches_systemd_escape(path: str) -> None:
    expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert escape_path(path) == expected


def test_normalise_options() -> None:
    assert normalise_options("tmpfs", "defaults,mode=1777,size=1024M") == {"size=1048576k"}
    assert normalise_options("tmpfs", ("rw", "relatime", "size=1048576k")) == {"size=1048576k"}
    assert normalise_options("tmpfs", "size=1G,nr_inodes=1k") == {"size=1048576k",
                                                                 "nr_inodes=1024"}
    assert normalise_options("ext4", "defaults,noatime") == {"noatime"}


def test_parse_mountinfo_unescapes_paths() -> None:
    line = ("87 68 0:43 / /srv/a\\040b rw,relatime shared:1 - tmpfs tmpfs rw,size=1024k\n"
            "88 68 0:44 / /srv/a\\040b rw,noatime - tmpfs other rw,size=2048k\n")
    parsed = parse_mountinfo(line)
    assert parsed["/srv/a b"] == LiveMount("other", "tmpfs", ("rw", "noatime", "size=2048k"))


def test_unit_without_options_has_no_options_line() -> None:
    from divingbell.core.modules.mounts_schema import Mount

    unit = render_unit("m", Mount(mnt_tgt="/m", device="/dev/sdb1", type="ext4"))
    assert "Options=" not in unit
    assert "WantedBy=local-fs.target" in unit
