"""Crash injection: SIGKILL `divingbell apply` at every change boundary and between writing
every temp file and renaming it (the test hook DIVINGBELL_FAULT_KILL_AT, see host.fault_point),
then check that the next apply completes and that an empty document (--allow-empty) brings the
host back to a snapshot taken before divingbell ever ran, exactly (content, mode, owner)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_proc_sys, write
from tests.hardening.conftest import TEMP_FILE, debian_overlay, snapshot

pytestmark = pytest.mark.kernel

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGKv9eU0ZP4B9hTL2cHmy1oExGv3A0kQfJ9pA3d5m1Yh "
       "ops@crash")
DOC = f"""\
conf:
  sysctl:
    net.ipv4.ip_forward: 1
    vm.swappiness: 10
  limits:
    nofile:
      domain: '*'
      type: soft
      item: nofile
      value: 65536
    core:
      domain: '*'
      type: hard
      item: core
      value: 0
  perm:
    paths:
      - path: /etc/issue
        owner: root
        group: root
        permissions: '0600'
  mounts:
    data:
      mnt_tgt: /mnt/crash/data
      device: tmpfs
      type: tmpfs
      options: size=4M
  uamlite:
    users:
      - user_name: ops
        user_sudo: true
        user_sshkeys:
          - {KEY}
  exec:
    once:
      rerun_policy: never
      data: |
        #!/bin/sh
        echo ran >> /var/tmp/crash-ran
"""
TOPS = ("/etc", "/home", "/mnt", "/var/tmp")
# Files the shadow tools rewrite as backups, whatever divingbell does.
SKIP = ("/etc/passwd-", "/etc/shadow-", "/etc/group-", "/etc/gshadow-", "/etc/subuid-",
        "/etc/subgid-", "/var/tmp/crash-ran")
SYSCTLS = {"net/ipv4/ip_forward": "0", "vm/swappiness": "60"}


def run(root: Path, proc_sys: Path, doc: Path, *extra: str, kill_at: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if kill_at:
        env["DIVINGBELL_FAULT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "divingbell", "apply", "--root", str(root),
                           "--proc-sys", str(proc_sys), "--node", "n1", *extra, str(doc)],
                          capture_output=True, text=True, env=env, check=False)


def prepare(root: Path) -> None:
    """A host as an operator left it: an account divingbell will manage, a limits file already
    at divingbell's path with its own mode (so it is an original to put back)."""
    subprocess.run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash",
                    "ops"], check=True)
    # root can log in on the console: the lock-out guard is content when ops goes again.
    subprocess.run(["chroot", str(root), "chpasswd", "--encrypted"], check=True, text=True,
                   input="root:$6$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130MT"
                   "SuDDl3aCI6WouIL9AjRbLCelDCy.g.\n")
    original = write(root / "etc/security/limits.d/60-divingbell-core.conf",
                     "* hard core unlimited\n")
    original.chmod(0o640)


def state(root: Path, proc_sys: Path) -> tuple[dict[str, str], dict[str, str], bool]:
    sysctls = {k: (proc_sys / k).read_text().strip() for k in SYSCTLS}
    mounted = str(root / "mnt/crash/data") in Path("/proc/self/mountinfo").read_text()
    return snapshot(root, TOPS, SKIP), sysctls, mounted


def crash_then_recover(debian_root: Path, base: Path, kill_at: str) -> bool:
    """True when the kill happened (False: past the last point of that kind)."""
    with debian_overlay(debian_root, base / "root") as root:
        proc_sys = make_proc_sys(base / "proc_sys", SYSCTLS)
        prepare(root)
        before = state(root, proc_sys)
        doc = write(base / "doc.yaml", DOC)
        empty = write(base / "empty.yaml", "")
        crashed = run(root, proc_sys, doc, kill_at=kill_at)
        assert "Traceback" not in crashed.stderr, crashed.stderr
        if crashed.returncode != -9:
            assert crashed.returncode == 0, crashed.stdout + crashed.stderr
            return False
        again = run(root, proc_sys, doc)
        assert again.returncode == 0, f"after a kill at {kill_at}:\n{again.stdout}{again.stderr}"
        ran = (root / "var/tmp/crash-ran").read_text().splitlines()
        assert ran == ["ran"], f"kill at {kill_at}: the `never` script ran {len(ran)} times"
        leftovers = [p for p in snapshot(root, (*TOPS, "/var/lib/divingbell"))
                     if TEMP_FILE.match(p.rsplit("/", 1)[-1])]
        assert not leftovers, f"kill at {kill_at}: temp files left: {leftovers}"
        gone = run(root, proc_sys, empty, "--allow-empty")
        assert gone.returncode == 0, gone.stdout + gone.stderr
        after = state(root, proc_sys)
        assert after[1:] == before[1:], f"kill at {kill_at}"
        changed = {k: (before[0].get(k), after[0].get(k))
                   for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k)}
        assert not changed, f"kill at {kill_at}: not restored exactly: {changed}"
        return True


def kill_everywhere(debian_root: Path, base: Path, kind: str) -> int:
    number = 1
    while crash_then_recover(debian_root, base / f"{kind}{number}", f"{kind}:{number}"):
        number += 1
    return number - 1


def test_sigkill_at_every_change_boundary(debian_root: Path, tmp_path: Path) -> None:
    points = kill_everywhere(debian_root, tmp_path, "change")
    print(f"\ncrash points: {points} change boundaries")  # shown with `pytest -s`
    assert points >= 12  # every change of DOC: if fewer, the hook is not reached


def test_sigkill_between_every_temp_write_and_rename(debian_root: Path, tmp_path: Path
                                                     ) -> None:
    points = kill_everywhere(debian_root, tmp_path, "write")
    print(f"\ncrash points: {points} atomic writes")
    assert points >= 12
