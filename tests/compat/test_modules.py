"""Module behaviour the compatibility review found wrong, each against a real host: a Debian
root (chroot into a per-test overlay) for accounts and packages, veth in a namespace for NICs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from divingbell.commands.output import plan_text
from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import plan_node
from divingbell.core.errors import DocumentError
from divingbell.core.host import Host
from divingbell.core.modules import IMPLEMENTED
from divingbell.core.modules.apt import APT_ENV
from divingbell.core.modules.ethtool import parse_features
from divingbell.core.modules.exec import STORE, Exec
from tests.aptrepo import Repo
from tests.conftest import Cli, NetNs, require_root_tools, write
from tests.test_apt import apply as apt_apply
from tests.test_apt import config as apt_config
from tests.test_apt import doc as apt_doc
from tests.test_apt import installed
from tests.test_exec import Clock
from tests.test_exec import apply as exec_apply
from tests.test_exec import doc as exec_doc
from tests.test_uamlite import apply, doc, user

pytestmark = pytest.mark.kernel

SECRET = "$6$saltsalt$" + "h" * 86


def shadow_field(host: Host, name: str) -> str:
    for line in (host.read_text("/etc/shadow") or "").splitlines():
        if line.split(":")[0] == name:
            return line.split(":")[1]
    raise KeyError(name)


def test_removing_a_password_locks_it_and_the_plan_says_so(debian_host: Host) -> None:
    with_password = doc(user("ops", None, sudo=False,
                             extra=f"        user_crypt_passwd: '{SECRET}'\n"))
    assert apply(debian_host, with_password).ok
    assert shadow_field(debian_host, "ops") == SECRET
    without = doc(user("ops", None, sudo=False))
    plan = plan_node(debian_host, resolve(validate(load_text(without)), "n1", {}))
    text = plan_text(plan)
    assert "  ~ user ops password: set -> locked" in text
    assert "hhhh" not in text
    report = apply(debian_host, without)
    assert report.ok, report.as_dict()
    assert shadow_field(debian_host, "ops") == "!", "no hash left: password login is impossible"
    assert apply(debian_host, without).applied == [], "locked once; nothing to do after"


def test_a_password_divingbell_never_set_is_left_alone(debian_host: Host) -> None:
    """root's own password (set by the installer) is not divingbell's to lock."""
    before = shadow_field(debian_host, "root")
    assert apply(debian_host, doc(user("root", None, sudo=False))).ok
    assert shadow_field(debian_host, "root") == before


# exec -----------------------------------------------------------------------------------------

def test_retry_interval_paces_a_failing_script_under_the_default_policy(
        overlay_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setitem(IMPLEMENTED, "exec", Exec(clock=clock, grace=0.5))
    host = Host(root=overlay_root)
    text = exec_doc({"fails": {"data": "#!/bin/sh\necho again >> /tmp/fails-log\nexit 1\n",
                               "retry_interval": 600}})
    assert not exec_apply(host, text).ok
    clock.now += 60
    waiting = exec_apply(host, text)
    assert waiting.ok and waiting.applied == [], "within retry_interval: not rerun"
    plan = plan_node(host, resolve(validate(load_text(text)), "n1", {}))
    assert "always: last run exit 1: next retry in 540s" in plan_text(plan, verbose=True)
    clock.now += 600
    assert not exec_apply(host, text).ok
    assert (host.read_text("/tmp/fails-log") or "").count("again") == 2


def test_a_script_runs_from_its_stored_directory(overlay_root: Path) -> None:
    host = Host(root=overlay_root)
    script = "#!/bin/sh\npwd > /tmp/where\necho hello > ./made-here\n"
    report = exec_apply(host, exec_doc({"relative": {"data": script}}))
    assert report.ok, report.as_dict()
    assert (host.read_text("/tmp/where") or "").strip() == STORE
    assert host.read_text(f"{STORE}/made-here") == "hello\n"


@pytest.mark.parametrize(("conf", "message"), [
    ({"rerun_policy": "once_successfully", "rerun_interval": 3600},
     "rerun_interval does nothing with rerun_policy once_successfully"),
    ({"rerun_policy": "never", "retry_interval": 3600},
     "retry_interval does nothing with rerun_policy never"),
    ({"rerun_policy": "never", "rerun_interval": 3600},
     "rerun_interval does nothing with rerun_policy never"),
])
def test_contradictory_exec_settings_are_refused_with_the_reason(
        conf: dict[str, object], message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        validate(load_text(exec_doc({"s": {"data": "true", **conf}}), "d.yaml"))
    problems = [str(p) for p in caught.value.problems]
    assert len(problems) == 1 and problems[0].startswith("conf.exec.s: " + message), problems


def test_contradictory_perm_settings_are_refused_with_the_reason() -> None:
    text = ("conf:\n  perm:\n    rerun_policy: once_successfully\n    rerun_interval: 600\n"
            "    paths: []\n")
    with pytest.raises(DocumentError) as caught:
        validate(load_text(text, "d.yaml"))
    assert "conf.perm: rerun_interval does nothing with rerun_policy once_successfully" in str(
        caught.value)


# ethtool --------------------------------------------------------------------------------------

def test_ethtool_settings_the_kernel_cannot_both_honour_fail_naming_both(
        netns: NetNs, ns_cli: Cli, overlay_root: Path, tmp_path: Path) -> None:
    require_root_tools("ethtool")
    subprocess.run(["ip", "-n", netns.name, "link", "add", "va", "type", "veth", "peer", "name",
                    "vb"], check=True)
    before = veth_features(netns)
    assert before["tx-tcp-segmentation"] and before["tx-checksum-ip-generic"]
    doc = write(tmp_path / "d.yaml", "conf:\n  ethtool:\n    va:\n"
                "      tx-tcp-segmentation: on\n      tx-checksum-ip-generic: off\n")
    result = ns_cli("apply", doc, "--root", overlay_root)
    assert result.returncode == 1, result.stdout
    assert "the document's settings conflict: tx-checksum-ip-generic off made the kernel turn " \
        "tx-tcp-segmentation off (the document requests on)" in result.stdout
    assert "The host matches the document" not in result.stdout
    after = veth_features(netns)
    assert (after["tx-tcp-segmentation"], after["tx-checksum-ip-generic"]) == (True, True), \
        result.stdout


def veth_features(ns: NetNs) -> dict[str, bool]:
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ethtool", "--json", "-k", "va"],
                         check=True, capture_output=True, text=True).stdout
    return {name: f.active for name, f in parse_features(out).items()}


# apt ------------------------------------------------------------------------------------------

def test_apt_removal_takes_only_the_dependencies_it_orphans(apt_host: Host, repo: Repo) -> None:
    """dbt-tool pulls in dbt-lib (auto); dbt-extra is old garbage (auto, needed by nothing) and
    dbt-needs-extra... is not installed: removing dbt-tool takes dbt-lib, never dbt-extra."""
    assert apt_apply(apt_host, apt_doc(repo, "packages: []")).ok  # the repository, lists
    apt_host.run(["apt-get", "-q", "-y", "install", "dbt-extra"], env=APT_ENV)
    apt_host.run(["apt-mark", "auto", "dbt-extra"])
    assert apt_apply(apt_host, apt_doc(repo, "packages: [{name: dbt-tool}]")).ok
    assert {"dbt-tool", "dbt-lib", "dbt-extra"} <= set(installed(apt_host))

    plan = plan_node(apt_host, apt_config(apt_doc(repo, "packages: []")))
    text = plan_text(plan)
    assert "  - package dbt-tool: 1.0 -> (absent)" in text
    assert "  - package dbt-lib: 1.0 -> (absent)" in text
    assert "dbt-extra" not in text
    report = apt_apply(apt_host, apt_doc(repo, "packages: []"))
    assert report.ok, report.as_dict()
    have = installed(apt_host)
    assert "dbt-tool" not in have and "dbt-lib" not in have
    assert "dbt-extra" in have, "garbage from before is the operator's, not this removal's"


def test_apt_removal_keeps_a_dependency_the_operator_installed_by_hand(
        apt_host: Host, repo: Repo) -> None:
    assert apt_apply(apt_host, apt_doc(repo, "packages: []")).ok
    apt_host.run(["apt-get", "-q", "-y", "install", "dbt-lib"], env=APT_ENV)  # manual
    assert apt_apply(apt_host, apt_doc(repo, "packages: [{name: dbt-tool}]")).ok
    assert apt_apply(apt_host, apt_doc(repo, "packages: []")).ok
    have = installed(apt_host)
    assert "dbt-tool" not in have and "dbt-lib" in have
