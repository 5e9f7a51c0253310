"""apparmor on this machine, whose kernel has no AppArmor: what can be proven here is proven for
real (apparmor_parser compiles profiles, owned files are written and removed, originals come
back, a failed load rolls back); loading into a kernel cannot be, and is said so in the README."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.host import Host
from divingbell.core.modules.apparmor import profile_file
from divingbell.core.modules.apparmor_schema import AppArmorConf

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("apparmor_parser") is None,
                       reason="needs apparmor_parser (package apparmor; .ci/run installs it)"),
]

GOOD = """\
#include <tunables/global>
/usr/sbin/dbtest {
  #include <abstractions/base>
  /etc/dbtest.conf r,
}
"""
BAD = "/usr/sbin/dbtest {\n  /etc/dbtest.conf rx_not_a_mode,\n}\n"


@pytest.fixture
def host(overlay_root: Path) -> Iterator[Host]:
    yield Host(root=overlay_root)


def doc(profiles: dict[str, str], **options: str) -> str:
    lines = ["conf:", "  apparmor:"] + [f"    {k}: {v}" for k, v in options.items()]
    lines.append("    profiles:" if profiles else "    profiles: {}")
    for name, text in profiles.items():
        lines.append(f"      {name}: |")
        lines += [f"        {line}" for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r")


def test_not_enabled_fails_clearly_before_any_change(host: Host) -> None:
    report = apply(host, doc({"dbtest": GOOD}))
    assert not report.ok
    assert "AppArmor is not enabled on this host" in " ".join(report.errors)
    assert host.read_text(profile_file("dbtest")) is None


def test_parser_rejection_names_the_profile_and_the_parser_message(host: Host) -> None:
    report = apply(host, doc({"dbtest": BAD, "fine": GOOD}, load="false"))
    assert not report.ok
    errors = " ".join(report.errors)
    assert "profile dbtest: apparmor_parser rejects it" in errors
    assert "syntax error" in errors and "line 2" in errors
    assert "Cache read/write" not in errors, "the parser's noise is left out"
    assert host.read_text(profile_file("fine")) is None, "nothing changes when one is bad"


def test_staged_profiles_are_owned_files_with_originals_restored(host: Host) -> None:
    existing = host.path(profile_file("usr.bin.man"))
    original = existing.read_text() if existing.exists() else None
    text = doc({"dbtest": GOOD, "usr.bin.man": GOOD.replace("dbtest", "man")}, load="false")
    first = apply(host, text)
    assert first.ok, first.as_dict()
    assert host.read_text(profile_file("dbtest")) == GOOD
    assert not apply(host, text).applied, "a second apply is a no-op"
    changed = apply(host, text.replace("/etc/dbtest.conf r", "/etc/dbtest.conf rw"))
    assert [c.target for c in changed.applied] == [profile_file("dbtest")]

    assert apply(host, "conf: {}\n").ok
    assert host.read_text(profile_file("dbtest")) is None
    assert host.read_text(profile_file("usr.bin.man")) == original


def test_complain_mode_strings_mean_what_they_say() -> None:
    for written, meaning in (("'false'", False), ("'true'", True), ("false", False)):
        config = resolve(validate(load_text(doc({}, complain_mode=written))), "n1", {})
        conf = config.modules["apparmor"]
        assert isinstance(conf, AppArmorConf) and conf.complain_mode is meaning


def test_a_load_the_kernel_refuses_rolls_back(host: Host, tmp_path: Path) -> None:
    # Pretend the module is enabled (a tmpfs over /sys/module in the test's own root): the
    # parser then really tries to load, fails on this kernel, and the run must roll back.
    sysmod = host.path("/sys/module")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(sysmod)], check=True)
    try:
        flag = sysmod / "apparmor/parameters/enabled"
        flag.parent.mkdir(parents=True)
        flag.write_text("Y\n")
        report = apply(host, doc({"dbtest": GOOD}, complain_mode="true"))
    finally:
        subprocess.run(["umount", "-l", str(sysmod)], check=False)
    assert not report.ok
    error = " ".join(report.errors)
    assert "apparmor_parser -r -W -C /etc/apparmor.d/dbtest" in error
    rolled = [c.target for r in report.results for c in r.rolled_back]
    assert profile_file("dbtest") in rolled
    assert host.read_text(profile_file("dbtest")) is None
