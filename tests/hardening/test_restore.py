"""Restores are exact (section 5): an original file comes back with its mode and owner, and
directories divingbell created go when it no longer needs them."""

from __future__ import annotations

import os
import stat

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.host import Host
from tests.conftest import write

LIMIT = "conf:\n  limits:\n    nofile: {domain: '*', type: soft, item: nofile, value: 1024}\n"


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r", lock_timeout=1)


def test_an_original_comes_back_with_its_mode_and_owner(scratch_host: Host) -> None:
    original = write(scratch_host.root / "etc/security/limits.d/60-divingbell-nofile.conf",
                     "* soft nofile 4096\n")
    original.chmod(0o640)
    os.chown(original, 123, 45)
    assert apply(scratch_host, LIMIT).ok
    assert "1024" in original.read_text()
    assert apply(scratch_host, "conf: {}\n").ok
    info = original.stat()
    assert original.read_text() == "* soft nofile 4096\n"
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 123, 45)


def test_directories_divingbell_made_are_removed_with_their_last_file(scratch_host: Host
                                                                      ) -> None:
    write(scratch_host.root / "etc/keep", "")
    assert apply(scratch_host, LIMIT + "  sysctl:\n    vm.swappiness: 10\n").ok
    assert (scratch_host.root / "etc/security/limits.d").is_dir()
    assert (scratch_host.root / "etc/sysctl.d").is_dir()
    assert apply(scratch_host, "conf: {}\n").ok
    assert not (scratch_host.root / "etc/security").exists()
    assert not (scratch_host.root / "etc/sysctl.d").exists()
    assert (scratch_host.root / "etc/keep").exists()


def test_a_directory_with_someone_elses_file_stays(scratch_host: Host) -> None:
    assert apply(scratch_host, LIMIT).ok
    other = write(scratch_host.root / "etc/security/limits.d/90-admin.conf", "* - core 0\n")
    assert apply(scratch_host, "conf: {}\n").ok
    assert other.exists()
    assert not (scratch_host.root / "etc/security/limits.d/60-divingbell-nofile.conf").exists()
