"""The engine end to end in-process, on a scratch /proc/sys tree and a scratch host root:
journal, originals, restore, rollback, crash consistency, the lock."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import NodeConfig, resolve, validate
from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.journal import JOURNAL_FILE, FileJournalStore
from divingbell.core.engine.lock import host_lock
from divingbell.core.engine.runner import apply_node, plan_node
from divingbell.core.errors import LockTimeout
from divingbell.core.host import Host
from divingbell.core.modules.sysctl import DROPIN


def config(text: str, node: str = "n1", **labels: str) -> NodeConfig:
    return resolve(validate(load_text(text)), node, labels)


def live(host: Host, key: str) -> str:
    return host.proc_sys.joinpath(*key.split(".")).read_text().strip()


def journal(host: Host) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(host.path(JOURNAL_FILE).read_text())
    return loaded


DOC = "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n    vm.swappiness: 10\n"


def test_apply_then_noop_then_restore(scratch_host: Host) -> None:
    report = apply_node(scratch_host, config(DOC), "r1")
    assert report.ok
    assert [(c.target, c.action) for c in report.applied] == [
        ("net.ipv4.ip_forward", Action.SET), ("vm.swappiness", Action.SET), (DROPIN, Action.WRITE),
    ]
    assert live(scratch_host, "net.ipv4.ip_forward") == "1"
    assert scratch_host.read_text(DROPIN) is not None
    assert journal(scratch_host)["modules"]["sysctl"]["originals"] == {
        "net.ipv4.ip_forward": "0", "vm.swappiness": "60", DROPIN: None,
    }

    again = apply_node(scratch_host, config(DOC), "r1")
    assert again.ok and again.applied == []

    gone = apply_node(scratch_host, config("conf: {}\n"), "r2")
    assert gone.ok
    assert {(c.target, c.action) for c in gone.applied} == {
        ("net.ipv4.ip_forward", Action.RESTORE), ("vm.swappiness", Action.RESTORE),
        (DROPIN, Action.DELETE),
    }
    assert live(scratch_host, "net.ipv4.ip_forward") == "0"
    assert live(scratch_host, "vm.swappiness") == "60"
    assert scratch_host.read_text(DROPIN) is None
    assert journal(scratch_host)["modules"] == {}


def test_changing_a_value_keeps_the_first_original(scratch_host: Host) -> None:
    apply_node(scratch_host, config("conf:\n  sysctl:\n    vm.swappiness: 10\n"), "r1")
    apply_node(scratch_host, config("conf:\n  sysctl:\n    vm.swappiness: 20\n"), "r2")
    assert live(scratch_host, "vm.swappiness") == "20"
    apply_node(scratch_host, config("conf: {}\n"), "r3")
    assert live(scratch_host, "vm.swappiness") == "60"


def test_plan_touches_nothing(scratch_host: Host) -> None:
    plan = plan_node(scratch_host, config(DOC))
    assert plan.summary() == {"change": 3, "restore": 0, "remove": 0, "unchanged": 0}
    assert live(scratch_host, "net.ipv4.ip_forward") == "0"
    assert not scratch_host.path("/var/lib/divingbell").exists()
    assert not scratch_host.path("/etc").exists()


def test_unknown_and_read_only_keys_fail_the_plan_and_nothing_changes(scratch_host: Host) -> None:
    doc = ("conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n    net.ipv4.no_such_key: 1\n"
           "    kernel.osrelease: x\n")
    report = apply_node(scratch_host, config(doc), "r1")
    assert not report.ok
    (error,) = report.plan.errors
    assert "net.ipv4.no_such_key: no such sysctl" in error
    assert "kernel.osrelease: is read-only" in error
    assert live(scratch_host, "net.ipv4.ip_forward") == "0"
    assert scratch_host.read_text(DROPIN) is None
    assert journal_or_empty(scratch_host) == {}


def journal_or_empty(host: Host) -> dict[str, Any]:
    if not host.path(JOURNAL_FILE).exists():
        return {}
    modules: dict[str, Any] = journal(host)["modules"]
    return modules


def test_one_module_that_cannot_plan_stops_every_module(scratch_host: Host) -> None:
    # The scratch root has no apparmor_parser: apparmor cannot check its profile.
    doc = DOC + "  apparmor:\n    profiles:\n      p1: '/usr/bin/x { }'\n"
    report = apply_node(scratch_host, config(doc), "r1")
    assert not report.ok
    assert any("apparmor_parser not found" in e for e in report.plan.errors), report.plan.errors
    assert live(scratch_host, "net.ipv4.ip_forward") == "0", "refused before any change"


def test_a_crash_midway_leaves_a_journal_that_can_restore(scratch_host: Host) -> None:
    def crash_after_first(change: Change, status: str) -> None:
        raise KeyboardInterrupt  # the process dies right after its first host change

    with pytest.raises(KeyboardInterrupt):
        apply_node(scratch_host, config(DOC), "r1", listener=crash_after_first)
    assert live(scratch_host, "net.ipv4.ip_forward") == "1"
    assert live(scratch_host, "vm.swappiness") == "60", "the crash came before this change"
    # The originals reached the disk before the host changed:
    assert journal(scratch_host)["modules"]["sysctl"]["originals"]["net.ipv4.ip_forward"] == "0"

    restored = apply_node(scratch_host, config("conf: {}\n"), "r2")
    assert restored.ok
    assert live(scratch_host, "net.ipv4.ip_forward") == "0"
    assert journal_or_empty(scratch_host) == {}


def test_a_rerun_after_a_crash_completes(scratch_host: Host) -> None:
    def crash(change: Change, status: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_node(scratch_host, config(DOC), "r1", listener=crash)
    report = apply_node(scratch_host, config(DOC), "r1")
    assert report.ok
    assert live(scratch_host, "vm.swappiness") == "10"
    assert journal(scratch_host)["modules"]["sysctl"]["originals"]["vm.swappiness"] == "60"


def test_a_second_apply_waits_for_the_lock_then_fails_clearly(scratch_host: Host) -> None:
    with host_lock(scratch_host), pytest.raises(LockTimeout) as err:
        apply_node(scratch_host, config(DOC), "r1", lock_timeout=0.2)
    assert "another divingbell run" in str(err.value)
    assert live(scratch_host, "net.ipv4.ip_forward") == "0"


def test_the_lock_is_taken_when_it_frees_within_the_timeout(scratch_host: Host) -> None:
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with host_lock(scratch_host):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    threading.Timer(0.2, release.set).start()
    report = apply_node(scratch_host, config(DOC), "r1", lock_timeout=5)
    thread.join()
    assert report.ok


def test_last_run_is_recorded_for_status(scratch_host: Host) -> None:
    apply_node(scratch_host, config(DOC), "rev123")
    last = FileJournalStore(scratch_host).load_last_run()
    assert last is not None
    assert last["revision"] == "rev123" and last["result"] == "ok"
    assert last["summary"]["change"] == 3


def test_journal_is_private(scratch_host: Host) -> None:
    apply_node(scratch_host, config(DOC), "r1")
    assert scratch_host.path(JOURNAL_FILE).stat().st_mode & 0o077 == 0
    assert scratch_host.path("/var/lib/divingbell").stat().st_mode & 0o077 == 0


def test_host_paths_stay_under_the_root(tmp_path: Path) -> None:
    host = Host(root=tmp_path)
    assert host.path("/etc/sysctl.d/x.conf") == tmp_path / "etc/sysctl.d/x.conf"
    with pytest.raises(ValueError, match="absolute"):
        host.path("etc/x")
