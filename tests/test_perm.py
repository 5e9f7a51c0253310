"""perm: owner, group and mode from globs, on real files; originals restored on removal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.host import Host
from tests.conftest import write

PASSWD = "root:x:0:0:root:/root:/bin/bash\nsyslog:x:104:110::/home/syslog:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nshadow:x:42:\nadm:x:4:syslog\n"


@pytest.fixture
def host(root: Path) -> Host:
    write(root / "etc/passwd", PASSWD)
    write(root / "etc/group", GROUP)
    for name in ("shadow", "gshadow"):
        path = write(root / "etc" / name, "secret\n")
        path.chmod(0o644)
    for name in ("a.log", "b.log"):
        write(root / "var/log" / name, "x\n").chmod(0o644)
    return Host(root=root)


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r")


def owner_mode(host: Host, path: str) -> tuple[int, int, str]:
    info = host.path(path).stat()
    return info.st_uid, info.st_gid, f"{stat.S_IMODE(info.st_mode):04o}"


DOC = """\
conf:
  perm:
    paths:
      - {path: /etc/shadow, owner: root, group: shadow, permissions: '0640'}
      - {path: '/var/log/*.log', owner: syslog, group: adm, permissions: '0640'}
"""


def test_apply_noop_change_and_restore_when_perm_is_removed(host: Host) -> None:
    before = {p: owner_mode(host, p) for p in ("/etc/shadow", "/var/log/a.log", "/var/log/b.log")}
    report = apply(host, DOC)
    assert report.ok, report.as_dict()
    assert owner_mode(host, "/etc/shadow") == (0, 42, "0640")
    assert owner_mode(host, "/var/log/a.log") == (104, 4, "0640")
    assert owner_mode(host, "/var/log/b.log") == (104, 4, "0640")
    assert [c.after for c in report.applied][:1] == ["0640 root:shadow"]

    assert apply(host, DOC).applied == []

    changed = apply(host, DOC.replace("'0640'}\n      - {path: '/var", "'0600'}\n      - {path: '/var"))
    assert [c.target for c in changed.applied] == ["/etc/shadow"]
    assert owner_mode(host, "/etc/shadow") == (0, 42, "0600")

    restored = apply(host, "conf: {}\n")  # the whole perm key removed
    assert restored.ok
    for path, value in before.items():
        assert owner_mode(host, path) == value


def test_a_path_leaving_the_list_is_restored(host: Host) -> None:
    apply(host, DOC)
    apply(host, DOC.split("      - {path: '/var", maxsplit=1)[0])
    assert owner_mode(host, "/var/log/a.log")[2] == "0644"
    assert owner_mode(host, "/etc/shadow") == (0, 42, "0640")


def test_missing_path_is_an_error_unless_ignore_missing(host: Host) -> None:
    doc = DOC + "      - {path: /etc/nope, owner: root, group: root, permissions: '0600'}\n"
    report = apply(host, doc)
    assert not report.ok
    assert "/etc/nope: no such file" in report.plan.errors[0]
    assert owner_mode(host, "/etc/shadow")[2] == "0644", "nothing applied"
    ok = apply(host, doc.replace("  perm:\n", "  perm:\n    ignore_missing: true\n"))
    assert ok.ok
    assert owner_mode(host, "/etc/shadow")[2] == "0640"


def test_unknown_owner_and_symlink_are_refused(host: Host) -> None:
    os.symlink("/etc/shadow", host.path("/etc/link"))
    report = apply(host, """\
conf:
  perm:
    paths:
      - {path: /etc/gshadow, owner: nobody-here, group: shadow, permissions: '0640'}
      - {path: /etc/link, owner: root, group: root, permissions: '0600'}
""")
    assert not report.ok
    error = report.plan.errors[0]
    assert "user 'nobody-here' does not exist on the host" in error
    assert "/etc/link: is a symlink" in error


def test_names_resolve_from_the_host_root_not_this_machine(host: Host) -> None:
    # The test root's syslog is uid 104, whatever this machine's passwd says.
    apply(host, DOC)
    assert host.path("/var/log/a.log").stat().st_uid == 104


def test_numeric_owner_and_unquoted_octal_mode(host: Host) -> None:
    report = apply(host, "conf:\n  perm:\n    paths:\n"
                         "      - {path: /etc/gshadow, owner: 0, group: 42, permissions: 0600}\n")
    assert report.ok
    assert owner_mode(host, "/etc/gshadow") == (0, 42, "0600")
