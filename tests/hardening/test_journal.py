"""The journal is never silently lost (issue 11, section 4): a missing journal while
divingbell's files are on the host, damage of every kind, a full disk, a disk with room for the
journal but not for last-run.json, stale temp files and the previous generation."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.journal import (
    JOURNAL_FILE,
    PREVIOUS_FILE,
    FileJournalStore,
    JournalCorrupt,
    JournalMissing,
)
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.host import Host
from tests.conftest import Cli, make_proc_sys, write

DOC = "conf:\n  sysctl:\n    vm.swappiness: 10\n"
DROPIN = "etc/sysctl.d/60-divingbell.conf"


def apply(host: Host, text: str, *, adopt: bool = False) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r", lock_timeout=1,
                      adopt=adopt)


def swappiness(host: Host) -> str:
    return (host.proc_sys / "vm/swappiness").read_text().strip()


@pytest.fixture
def host(scratch_host: Host) -> Host:
    assert apply(scratch_host, DOC).ok
    assert swappiness(scratch_host) == "10"
    return scratch_host


@pytest.mark.parametrize("lost", ["journal.json", "the state directory"])
def test_a_missing_journal_with_divingbell_files_is_a_loud_error(host: Host, lost: str) -> None:
    state = host.root / "var/lib/divingbell"
    if lost == "journal.json":
        (state / "journal.json").unlink()
    else:
        subprocess.run(["rm", "-rf", str(state)], check=True)
    with pytest.raises(JournalMissing, match=r"60-divingbell\.conf") as caught:
        apply(host, "conf: {}\n")
    assert "--adopt" in str(caught.value)
    assert swappiness(host) == "10" and (host.root / DROPIN).exists()  # nothing changed


def test_adopt_owns_the_files_so_they_are_removed_not_kept_as_originals(host: Host) -> None:
    (host.root / "var/lib/divingbell/journal.json").unlink()
    assert apply(host, DOC, adopt=True).ok
    journal = FileJournalStore(host).load().as_dict()
    assert journal["modules"]["sysctl"]["owned_files"] == ["/etc/sysctl.d/60-divingbell.conf"]
    assert "/etc/sysctl.d/60-divingbell.conf" not in journal["modules"]["sysctl"]["originals"]
    assert apply(host, "conf: {}\n").ok
    assert not (host.root / DROPIN).exists()  # divingbell's own drop-in is not an "original"


DAMAGE: dict[str, Callable[[str], str]] = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "garbled": lambda text: "\x00\xff{{{",
    "wrong type": lambda text: "[1, 2, 3]\n",
    "wrong version": lambda text: text.replace('"version": 1', '"version": 99'),
    "wrong field type": lambda text: json.dumps(
        {"version": 1, "modules": {"sysctl": {"originals": ["x"]}}}),
    "modes not numbers": lambda text: json.dumps(
        {"version": 1, "modules": {"limits": {"file_modes": {"/x": ["a", 0, 0]}}}}),
    "relative original path": lambda text: _with_module(
        text, "perm", {"originals": {"srv/x": "root:root 0644"}}),
    "relative owned file": lambda text: _with_module(
        text, "limits", {"owned_files": ["etc/security/limits.d/x.conf"]}),
    "relative created dir": lambda text: _with_module(
        text, "mounts", {"created_dirs": ["srv/x"]}),
    "relative file mode key": lambda text: _with_module(
        text, "limits", {"file_modes": {"etc/x": [33188, 0, 0]}}),
}


def _with_module(text: str, module: str, record: dict[str, object]) -> str:
    data = json.loads(text)
    data["modules"][module] = record
    return json.dumps(data)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_journal_is_a_clear_error_before_any_change(host: Host, damage: str) -> None:
    journal = host.root / "var/lib/divingbell/journal.json"
    journal.write_text(DAMAGE[damage](journal.read_text()))
    with pytest.raises(JournalCorrupt, match="Nothing was changed") as caught:
        apply(host, "conf: {}\n")
    assert "recover" in str(caught.value)
    assert swappiness(host) == "10" and (host.root / DROPIN).exists()


def test_a_relative_path_in_the_journal_is_located_and_recover_gets_past_it(
        host: Host, cli: Cli) -> None:
    """A journal entry naming a relative path (`srv/x`) once ended `apply`, and the empty apply
    meant to restore, in a traceback (`host paths are absolute`). It is journal damage: a
    located error, nothing changed, and `recover --previous` gets the host restored."""
    assert apply(host, DOC).ok  # a previous generation to recover from
    journal = host.root / JOURNAL_FILE.lstrip("/")
    journal.write_text(DAMAGE["relative original path"](journal.read_text()))
    for text in (DOC, "conf: {}\n"):
        result = cli("apply", "--root", host.root, "--proc-sys", host.proc_sys, "--node", "n1",
                     write(host.root.parent / "d.yaml", text))
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "modules.perm.originals" in result.stderr and "'srv/x'" in result.stderr
        assert str(journal) in result.stderr and "Nothing was changed" in result.stderr
        assert swappiness(host) == "10" and (host.root / DROPIN).exists()
    done = cli("recover", "--root", host.root, "--previous")
    assert done.returncode == 0, done.stderr
    assert apply(host, "conf: {}\n").ok
    assert swappiness(host) == "60" and not (host.root / DROPIN).exists()


def test_a_directory_in_place_of_the_journal_or_the_state_dir(host: Host) -> None:
    journal = host.root / "var/lib/divingbell/journal.json"
    journal.unlink()
    journal.mkdir()
    with pytest.raises(JournalCorrupt, match="not a regular file"):
        apply(host, DOC)
    subprocess.run(["rm", "-rf", str(journal.parent)], check=True)
    journal.parent.write_text("not a directory\n")
    with pytest.raises(JournalCorrupt, match=r"(?i)not a directory"):
        apply(host, DOC)


def test_recover_previous_puts_back_the_last_good_generation(host: Host, cli: Cli) -> None:
    assert apply(host, DOC).ok  # the second run keeps the first run's journal as previous
    previous = host.root / PREVIOUS_FILE.lstrip("/")
    assert json.loads(previous.read_text())["modules"]["sysctl"]
    journal = host.root / JOURNAL_FILE.lstrip("/")
    journal.write_text(journal.read_text()[:20])
    plan = cli("plan", "--root", host.root, "--proc-sys", host.proc_sys, "--node", "n1",
               write(host.root.parent / "d.yaml", DOC))
    assert plan.returncode == 1 and "recover --root ROOT --previous" in plan.stderr
    assert "Traceback" not in plan.stderr
    done = cli("recover", "--root", host.root, "--previous")
    assert done.returncode == 0, done.stderr
    assert "kept the old journal as" in done.stdout
    assert list(journal.parent.glob("journal.json.damaged-*"))
    assert apply(host, "conf: {}\n", ).ok
    assert swappiness(host) == "60" and not (host.root / DROPIN).exists()


def test_recover_adopt_through_the_cli(host: Host, cli: Cli) -> None:
    (host.root / "var/lib/divingbell/journal.json").unlink()
    done = cli("recover", "--root", host.root, "--adopt")
    assert done.returncode == 0, done.stderr
    assert "sysctl owns /etc/sysctl.d/60-divingbell.conf" in done.stdout


def test_stale_temp_files_of_killed_writes_are_cleaned_up(host: Host) -> None:
    stale = write(host.root / "etc/sysctl.d/.60-divingbell.conf.k3j2h1g0", "half")
    journal_tmp = write(host.root / "var/lib/divingbell/.journal.json.abcdefgh", "{")
    other = write(host.root / "etc/sysctl.d/.unrelated.conf.abcdefgh", "not ours")
    report = apply(host, DOC)
    assert report.ok
    assert not stale.exists() and not journal_tmp.exists() and other.exists()
    assert any("removed a temp file" in w for w in report.warnings)


@pytest.fixture
def tiny_state(tmp_path: Path, root: Path) -> Iterator[Host]:
    """A host whose /var/lib/divingbell is a 3-page tmpfs: room for the lock and the journal
    (and its temp copy while it is rewritten), not for a multi-page last-run.json."""
    keys = {f"kernel/db_test_{i}": "0" for i in range(40)}
    host = Host(root=root, proc_sys=make_proc_sys(tmp_path / "proc_sys", keys))
    state = root / "var/lib/divingbell"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k,mode=0700", "tmpfs", str(state)],
                   check=True)
    try:
        yield host
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


MANY = "conf:\n  sysctl:\n" + "".join(f"    kernel.db_test_{i}: 1\n" for i in range(40))


def test_room_for_the_journal_but_not_last_run_is_still_a_success(tiny_state: Host) -> None:
    report = apply(tiny_state, MANY)
    assert report.ok, report.errors
    assert any("last-run.json" in w and "No space" in w for w in report.warnings)
    assert (tiny_state.proc_sys / "kernel/db_test_0").read_text().strip() == "1"
    assert FileJournalStore(tiny_state).load().modules["sysctl"].originals


def test_a_full_disk_fails_before_any_change(tiny_state: Host) -> None:
    fill(tiny_state.root / "var/lib/divingbell/filler")
    report = apply(tiny_state, MANY)
    assert not report.ok
    assert "No space left" in " ".join(report.errors)
    assert (tiny_state.proc_sys / "kernel/db_test_0").read_text().strip() == "0"


def test_full_disk_through_the_cli_is_a_message_not_a_traceback(tiny_state: Host, cli: Cli,
                                                                 tmp_path: Path) -> None:
    fill(tiny_state.root / "var/lib/divingbell/filler")
    result = cli("apply", "--root", tiny_state.root, "--proc-sys", tiny_state.proc_sys,
                 "--node", "n1", write(tmp_path / "d.yaml", MANY))
    assert result.returncode == 1
    assert "No space left" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
