"""limits: one owned file per entry; only divingbell's own files are ever removed."""

from __future__ import annotations

from pathlib import Path

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.change import Action
from divingbell.core.engine.runner import ApplyReport, apply_node, plan_node
from divingbell.core.host import Host
from divingbell.core.modules.limits import limit_file
from tests.conftest import write

DOC = """\
conf:
  limits:
    nofile:
      domain: 'root'
      type: 'soft'
      item: 'nofile'
      value: '101'
    core_dump:
      domain: '0:'
      type: 'hard'
      item: 'core'
      value: 0
"""


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r")


def test_apply_noop_change_revert(root: Path) -> None:
    host = Host(root=root)
    foreign = write(root / "etc/security/limits.d/50-site.conf", "* soft nproc 4096\n")
    report = apply(host, DOC)
    assert report.ok
    nofile = host.read_text(limit_file("nofile"))
    assert nofile is not None and nofile.endswith("root soft nofile 101\n")
    core = host.read_text(limit_file("core_dump"))
    assert core is not None and core.endswith("0: hard core 0\n")

    assert apply(host, DOC).applied == []

    changed = apply(host, DOC.replace("'101'", "'2048'"))
    assert [(c.target, c.action) for c in changed.applied] == [
        (limit_file("nofile"), Action.WRITE)]
    assert (host.read_text(limit_file("nofile")) or "").endswith("root soft nofile 2048\n")

    gone = apply(host, "conf: {}\n")
    assert {c.action for c in gone.applied} == {Action.DELETE}
    assert sorted(p.name for p in (root / "etc/security/limits.d").iterdir()) == ["50-site.conf"]
    assert foreign.read_text() == "* soft nproc 4096\n", "never touches files it does not own"


def test_removing_one_entry_removes_only_its_file(root: Path) -> None:
    host = Host(root=root)
    apply(host, DOC)
    only_nofile = DOC.split("    core_dump:", maxsplit=1)[0]
    report = apply(host, only_nofile)
    assert [(c.target, c.action) for c in report.applied] == [
        (limit_file("core_dump"), Action.DELETE)]
    assert host.read_text(limit_file("nofile")) is not None


def test_a_file_that_was_there_before_is_put_back(root: Path) -> None:
    host = Host(root=root)
    before = write(root / limit_file("nofile").lstrip("/"), "root soft nofile 7\n")
    apply(host, DOC)
    assert "101" in before.read_text()
    apply(host, "conf: {}\n")
    assert before.read_text() == "root soft nofile 7\n"


def test_plan_describes_each_file_by_its_line(root: Path) -> None:
    plan = plan_node(Host(root=root), resolve(validate(load_text(DOC)), "n1", {}))
    assert [(c.target, c.after) for c in plan.changes] == [
        (limit_file("core_dump"), "0: hard core 0"),
        (limit_file("nofile"), "root soft nofile 101"),
    ]
