"""Every planned change carries its disruption, decided by the module that plans it; a plan's
disruption is the strongest of them. Table tests, pure: desired x observed -> disruptions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from divingbell.core.engine.change import NONE, REBOOT, Action, Change, strongest
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.engine.runner import ModulePlan, Plan
from divingbell.core.modules.apparmor import AppArmor, AppArmorObserved
from divingbell.core.modules.apparmor_schema import AppArmorConf
from divingbell.core.modules.apt import (
    Apt,
    AptObserved,
    AptRun,
    Installed,
    Step,
    Transaction,
    package_disruption,
    package_services,
)
from divingbell.core.modules.apt_schema import AptConf
from divingbell.core.modules.ethtool import Ethtool, EthtoolObserved, NicState
from divingbell.core.modules.ethtool_schema import EthtoolConf
from divingbell.core.modules.exec import Exec, ExecObserved
from divingbell.core.modules.exec_schema import ExecConf
from divingbell.core.modules.limits import Limits, LimitsObserved, limit_file
from divingbell.core.modules.limits_schema import LimitsConf
from divingbell.core.modules.mounts import LiveMount, Mounts, MountsObserved
from divingbell.core.modules.mounts_schema import MountsConf
from divingbell.core.modules.perm import Ids, Ownership, Perm, PermObserved
from divingbell.core.modules.sysctl import Sysctl, SysctlObserved
from divingbell.core.modules.sysctl_schema import SysctlConf
from divingbell.core.modules.uamlite import Uamlite, UamliteObserved
from divingbell.core.modules.uamlite_schema import UamliteConf
from tests.conftest import Cli, write


@pytest.mark.parametrize(("disruptions", "expected"), [
    ([], NONE),
    ([NONE, NONE], NONE),
    ([NONE, "reload:nginx.service"], "reload:nginx.service"),
    (["reload:a.service", "restart:b.service"], "restart:b.service"),
    (["restart:b.service", "restart:a.service,b.service"], "restart:a.service,b.service"),
    (["restart:kubelet.service", REBOOT, NONE], REBOOT),
    ([REBOOT, "restart:kubelet.service"], REBOOT),
])
def test_strongest(disruptions: list[str], expected: str) -> None:
    assert strongest(disruptions) == expected


def test_plan_disruption_is_the_strongest_and_shown_in_json() -> None:
    plan = Plan("node-1", [
        ModulePlan("sysctl", [Change("sysctl", "vm.swappiness", Action.SET, "60", "10", "x")]),
        ModulePlan("apt", [Change("apt", "package containerd", Action.SET, "1", "2", "x",
                                  disruption="restart:containerd.service")]),
    ])
    data = plan.as_dict()
    assert data["disruption"] == "restart:containerd.service"
    assert [m["disruption"] for m in data["modules"]] == [NONE, "restart:containerd.service"]
    assert data["modules"][1]["changes"][0]["disruption"] == "restart:containerd.service"
    assert data["modules"][0]["changes"][0]["disruption"] == NONE


def _record(**state: Any) -> ModuleRecord:
    record = ModuleRecord()
    record.state.update(state)
    return record


def _disruptions(changes: list[Change]) -> dict[str, str]:
    return {c.target: c.disruption for c in changes if c.changes_host}


# The live modules: every change they plan is `none`.

def _sysctl() -> list[Change]:
    return Sysctl().plan(SysctlConf({"vm.swappiness": "10"}),
                         SysctlObserved({"vm.swappiness": "60"}, None), _record())


def _limits() -> list[Change]:
    conf = LimitsConf.model_validate(
        {"nofile": {"domain": "*", "type": "soft", "item": "nofile", "value": 4096}})
    return Limits().plan(conf, LimitsObserved({}), _record())


def _mounts_remount() -> list[Change]:
    conf = MountsConf.model_validate(
        {"data": {"mnt_tgt": "/data", "device": "/dev/sdb", "type": "ext4",
                  "options": "noatime"}})
    live = LiveMount("/dev/sdb", "ext4", ("rw", "relatime"))
    return Mounts().plan(conf, MountsObserved({"/data": live}, {}, {}), _record())


def _mounts_unmount() -> list[Change]:
    record = _record()
    record.originals["/data"] = "not mounted"
    live = LiveMount("/dev/sdb", "ext4", ("rw",))
    return Mounts().plan(None, MountsObserved({"/data": live}, {}, {}), record)


def _ethtool() -> list[Change]:
    conf = EthtoolConf.model_validate({"eth0": {"tx-checksumming": "off"}})
    from divingbell.core.modules.ethtool import Feature

    nic = NicState({"tx-checksumming": Feature(True, fixed=False)})
    return Ethtool().plan(conf, EthtoolObserved({"eth0": nic}, {}, {}, "/usr/sbin/ethtool"),
                          _record())


def _perm() -> list[Change]:
    ids = Ids({"root": 0}, {"root": 0})
    return Perm().plan(None, PermObserved(ids, {"/etc/x": Ownership(0, 0, 0o600)},
                                          {"/etc/x": Ownership(0, 0, 0o644)}, []), _record())


def _apparmor() -> list[Change]:
    conf = AppArmorConf.model_validate({"profiles": {"p": "profile p {}\n"}})
    return AppArmor().plan(conf, AppArmorObserved({}, True), _record())


def _uamlite() -> list[Change]:
    conf = UamliteConf.model_validate({"users": [{"user_name": "ops"}]})
    return Uamlite().plan(conf, UamliteObserved({}, {}, {}), _record())


LIVE = [
    ("sysctl", _sysctl),
    ("limits: new sessions get them; running processes keep theirs", _limits),
    ("mounts: remount in place", _mounts_remount),
    ("mounts: unmount on removal", _mounts_unmount),
    ("ethtool", _ethtool),
    ("perm", _perm),
    ("apparmor: profiles replaced in the kernel", _apparmor),
    ("uamlite", _uamlite),
]


@pytest.mark.parametrize(("what", "planned"), LIVE, ids=[w for w, _ in LIVE])
def test_live_modules_plan_no_disruption(what: str, planned: Any) -> None:
    changes = planned()
    assert any(c.changes_host for c in changes), what
    assert set(_disruptions(changes).values()) == {NONE}


# exec: divingbell cannot see what a script does, so the document says it.

@pytest.mark.parametrize(("declared", "expected"), [
    ({}, NONE),
    ({"disruption": "reboot"}, REBOOT),
    ({"disruption": "restart:kubelet.service"}, "restart:kubelet.service"),
])
def test_exec_disruption_is_what_the_script_declares(declared: dict[str, str],
                                                     expected: str) -> None:
    conf = ExecConf.model_validate({"s.sh": {"data": "#!/bin/sh\ntrue\n", **declared}})
    changes = Exec(clock=lambda: 100.0).plan(conf, ExecObserved(100.0), _record())
    assert _disruptions(changes) == {"script s.sh": expected}


def test_exec_script_that_does_not_run_disrupts_nothing() -> None:
    conf = ExecConf.model_validate(
        {"s.sh": {"data": "true\n", "rerun_policy": "never", "disruption": "reboot"}})
    from divingbell.core.modules.exec import script_hash

    record = _record(scripts={"s.sh": {"hash": script_hash(conf.root["s.sh"]), "exit": 0,
                                       "ran_at": 1.0, "timed_out": False}})
    changes = Exec(clock=lambda: 100.0).plan(conf, ExecObserved(100.0), record)
    assert [c.disruption for c in changes] == [NONE]


@pytest.mark.parametrize("bad", ["sometimes", "restart:", "restart:a b", "reboot:now"])
def test_exec_disruption_is_validated(bad: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="restart:<unit>"):
        ExecConf.model_validate({"s.sh": {"data": "true\n", "disruption": bad}})


# apt: what the host says: a kernel needs a reboot; a package's services restart on upgrade.

LISTING = """/.
/lib/systemd/system/containerd.service
/lib/systemd/system/containerd@.service
/usr/lib/systemd/system/cri-helper.service
/usr/lib/systemd/system/cri.socket
/usr/bin/containerd
"""


def test_package_services_are_its_non_template_service_units() -> None:
    assert package_services(LISTING) == ["containerd.service", "cri-helper.service"]
    assert package_services(None) == []


@pytest.mark.parametrize(("op", "name", "expected"), [
    ("upgrade", "linux-image-amd64", REBOOT),
    ("install", "linux-image-6.1.0-30-amd64", REBOOT),
    ("upgrade", "intel-microcode", REBOOT),
    ("upgrade", "containerd", "restart:containerd.service,cri-helper.service"),
    ("downgrade", "containerd", "restart:containerd.service,cri-helper.service"),
    ("remove", "containerd", "restart:containerd.service,cri-helper.service"),
    ("install", "containerd", NONE),
    ("upgrade", "less", NONE),
])
def test_package_disruption(op: str, name: str, expected: str) -> None:
    services = {"containerd": package_services(LISTING), "less": []}
    assert package_disruption(op, name, services) == expected


def test_apt_plan_carries_each_package_disruption_and_a_pending_reboot() -> None:
    run = AptRun(300, refresh=False)
    tx = Transaction(["apt-get", "-q", "dist-upgrade"], run)
    steps = [Step("upgrade", "containerd", "1.6", "1.7"),
             Step("install", "linux-image-6.1.0-31-amd64", None, "6.1.0-31"),
             Step("upgrade", "less", "1", "2")]
    installed = {n: Installed("1", "amd64", False, "optional") for n in ("containerd", "less")}
    observed = AptObserved(installed, {}, [], {}, {}, run, planned=[(tx, steps, {})],
                           services={"containerd": ["containerd.service"], "less": []})
    conf = AptConf.model_validate({"upgrade": True})
    changes = Apt().plan(conf, observed, _record())
    assert _disruptions(changes) == {
        "package containerd": "restart:containerd.service",
        "package linux-image-6.1.0-31-amd64": REBOOT,
        "package less": NONE,
    }
    observed.reboot_required = "*** System restart required ***\n"
    pending = [c for c in Apt().plan(conf, observed, _record()) if c.target == "reboot"]
    assert [(c.action, c.disruption) for c in pending] == [(Action.NOOP, REBOOT)]


def test_cli_plan_shows_each_change_and_the_whole_plan(cli: Cli, root: Path,
                                                       tmp_path: Path) -> None:
    document = write(tmp_path / "doc.yaml", """\
conf:
  limits:
    nofile: {domain: '*', type: soft, item: nofile, value: 4096}
  exec:
    kubelet-flags.sh:
      data: "#!/bin/sh\\ntrue\\n"
      disruption: restart:kubelet.service
""")
    result = cli("plan", "--root", root, "--node", "n1", "--format", "json", document)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["disruption"] == "restart:kubelet.service"
    shown = {c["target"]: c["disruption"] for m in data["modules"] for c in m["changes"]}
    assert shown == {limit_file("nofile"): NONE, "script kubelet-flags.sh":
                     "restart:kubelet.service"}
    text = cli("plan", "--root", root, "--node", "n1", document)
    assert "script kubelet-flags.sh: (absent) -> run  [restart:kubelet.service]" in text.stdout
    assert text.stdout.rstrip().endswith("disruption: restart:kubelet.service.")
