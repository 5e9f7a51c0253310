"""A booted node: systemd as PID 1 in systemd-nspawn. Proves the units divingbell writes:
mounts come back and NIC settings are re-applied after the node restarts, and both go away with
their originals restored when they leave the document."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def test_managed_users_log_in_with_their_key_and_sudo_until_expired(
    node: BootedHost, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    public = []
    for name in ("ops", "dev"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(docs / f"id_{name}")], check=True)
        public.append((docs / f"id_{name}.pub").read_text().strip())
    both = ("conf:\n  uamlite:\n    users:\n"
            f"      - {{user_name: ops, user_sudo: true, user_sshkeys: ['{public[0]}']}}\n"
            f"      - {{user_name: dev, user_sshkeys: ['{public[1]}']}}\n")
    write(docs / "users.yaml", both)
    applied = node.divingbell("apply", "/docs/users.yaml", "--node", "n1")
    assert applied.returncode == 0, applied.stdout + applied.stderr

    def ssh(user: str, *command: str) -> subprocess.CompletedProcess[str]:
        return node.run("ssh", "-i", f"/docs/id_{user}", "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        f"{user}@127.0.0.1", *command, check=False)

    for _ in range(50):  # sshd may still be starting right after boot
        if node.run("systemctl", "is-active", "ssh", check=False).stdout.strip() == "active":
            break
        node.run("sleep", "0.1")
    as_root = ssh("ops", "sudo", "-n", "id", "-u")
    assert as_root.returncode == 0, as_root.stderr
    assert as_root.stdout.strip() == "0"
    assert ssh("dev", "true").returncode == 0
    assert ssh("dev", "sudo", "-n", "true").returncode != 0, "dev has no sudo"

    write(docs / "users.yaml", both.split("      - {user_name: dev", 1)[0])
    expired = node.divingbell("apply", "/docs/users.yaml", "--node", "n1")
    assert expired.returncode == 0, expired.stdout + expired.stderr
    refused = ssh("dev", "true")
    assert refused.returncode == 255, "an expired account cannot log in"
    assert ssh("ops", "true").returncode == 0


AGENT_DOC = """\
conf:
  limits:
    nofile: {{domain: '*', type: soft, item: nofile, value: {value}}}
"""
LIMIT = "etc/security/limits.d/60-divingbell-nofile.conf"


def agent_ready(node: BootedHost) -> bool:
    probe = ("import urllib.request\ntry:\n print(urllib.request.urlopen("
             "'http://127.0.0.1:9114/readyz', timeout=2).status)\nexcept Exception as e:\n"
             " print(getattr(e, 'code', 0))")
    return node.run(sys.executable, "-c", probe, check=False).stdout.strip() == "200"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("not reached in time")


def limit_is(node: BootedHost, value: int) -> Callable[[], bool]:
    def check() -> bool:
        path = node.root / LIMIT
        return path.exists() and f"nofile {value}" in path.read_text()
    return check


def test_the_systemd_unit_converges_survives_a_restart_and_follows_the_document(
        node: BootedHost) -> None:
    unit = (REPO / "deploy/divingbell-agent.service").read_text()
    # The test node runs divingbell from this checkout (bound in) instead of a pip install.
    unit = unit.replace("/opt/divingbell/bin/divingbell", str(Path(sys.executable).with_name(
        "divingbell")))
    write(node.root / "etc/systemd/system/divingbell-agent.service", unit)
    write(node.root / "etc/divingbell/site.yaml", AGENT_DOC.format(value=4096))
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "enable", "--now", "divingbell-agent.service")
    wait_until(limit_is(node, 4096))
    wait_until(lambda: agent_ready(node))

    node.poweroff()
    (node.root / LIMIT).unlink()  # drifted while the node was down
    node.boot()
    wait_until(limit_is(node, 4096))
    assert node.run("systemctl", "is-active", "divingbell-agent").stdout.strip() == "active"
    wait_until(lambda: agent_ready(node))

    write(node.root / "etc/divingbell/site.yaml", AGENT_DOC.format(value=8192))
    wait_until(limit_is(node, 8192))
    log = node.run("journalctl", "-u", "divingbell-agent", "--no-pager", check=False).stdout
    assert "document changed" in log
