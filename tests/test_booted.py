"""A booted node: systemd as PID 1 in systemd-nspawn. Proves the units divingbell writes:
mounts come back and NIC settings are re-applied after the node restarts, and both go away with
their originals restored when they leave the document."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.booted import BootedHost, overlay
from tests.conftest import NetNs, write
from tests.test_ethtool import features

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def node(debian_root: Path, netns: NetNs, tmp_path: Path) -> Iterator[BootedHost]:
    subprocess.run(["ip", "-n", netns.name, "link", "add", "va", "type", "veth", "peer", "name",
                    "vb"], check=True)
    root = overlay(debian_root, tmp_path / "node")
    docs = tmp_path / "docs"
    docs.mkdir()
    python_home = Path(sys.base_prefix)
    host = BootedHost(root, f"dbt-{netns.name[-8:]}", netns.name,
                      binds=[str(python_home), str(REPO), f"{docs}:/docs"])
    host.boot()
    try:
        yield host
    finally:
        host.poweroff()
        subprocess.run(["umount", "-R", "-l", str(tmp_path / "node")], check=False)


DOC = """\
conf:
  mounts:
    boot:
      mnt_tgt: /mnt/db-boot
      device: tmpfs
      type: tmpfs
      options: 'defaults,noatime,size=8M'
  ethtool:
    va:
      tx-tcp-segmentation: off
"""
UNIT = "mnt-db\\x2dboot.mount"


def test_units_survive_a_restart_and_leave_with_the_document(node: BootedHost,
                                                             netns: NetNs, tmp_path: Path) -> None:
    write(tmp_path / "docs/doc.yaml", DOC)
    result = node.divingbell("apply", "/docs/doc.yaml", "--node", "n1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"
    assert "tmpfs" in node.run("findmnt", "-n", "-o", "FSTYPE", "/mnt/db-boot").stdout
    assert features(netns)["tx-tcp-segmentation"] is False

    node.poweroff()
    # While the node is down, someone turns TSO back on: the boot unit must put it right.
    subprocess.run(["ip", "netns", "exec", netns.name, "ethtool", "-K", "va", "tso", "on"],
                   check=True)
    assert features(netns)["tx-tcp-segmentation"] is True
    node.boot()
    assert node.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"
    assert "tmpfs" in node.run("findmnt", "-n", "-o", "FSTYPE", "/mnt/db-boot").stdout
    state = node.run("systemctl", "is-active", "divingbell-ethtool-va.service", check=False)
    assert state.stdout.strip() == "active"
    assert features(netns)["tx-tcp-segmentation"] is False

    noop = node.divingbell("apply", "/docs/doc.yaml", "--node", "n1")
    assert "No changes" in noop.stdout, noop.stdout

    write(tmp_path / "docs/doc.yaml", "conf: {}\n")
    removed = node.divingbell("apply", "/docs/doc.yaml", "--node", "n1")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert node.run("findmnt", "/mnt/db-boot", check=False).returncode == 1
    assert node.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
    assert node.run("test", "-e", f"/etc/systemd/system/{UNIT}", check=False).returncode == 1
    assert features(netns)["tx-tcp-segmentation"] is True, "original restored"
    assert node.run("test", "-e", "/etc/systemd/system/divingbell-ethtool-va.service",
                    check=False).returncode == 1
