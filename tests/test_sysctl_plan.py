"""sysctl planning as data: desired x observed x journal -> changes. Pure: nothing is touched."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from divingbell.core.document.keys import canonical_sysctl_key, sysctl_components
from divingbell.core.engine.change import Action
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.modules.sysctl import DROPIN, Sysctl, SysctlObserved, render_dropin
from divingbell.core.modules.sysctl_schema import SysctlConf

A = Action


@dataclass
class Case:
    name: str
    desired: dict[str, object] | None
    live: dict[str, str | None]
    originals: dict[str, str | None] = field(default_factory=dict)
    owned: list[str] = field(default_factory=list)
    dropin: str | None = None
    expect: list[tuple[str, Action, str | None, str | None]] = field(default_factory=list)


DROPIN_1 = render_dropin({"net.ipv4.ip_forward": "1"})

CASES = [
    Case("first apply sets and creates the drop-in",
         {"net.ipv4.ip_forward": 1}, {"net.ipv4.ip_forward": "0"},
         expect=[("net.ipv4.ip_forward", A.SET, "0", "1"), (DROPIN, A.WRITE, None, "1 setting")]),
    Case("already right: no-op, original still captured",
         {"net.ipv4.ip_forward": 1}, {"net.ipv4.ip_forward": "1"},
         expect=[("net.ipv4.ip_forward", A.NOOP, "1", "1"), (DROPIN, A.WRITE, None, "1 setting")]),
    Case("second apply changes nothing",
         {"net.ipv4.ip_forward": 1}, {"net.ipv4.ip_forward": "1"},
         originals={"net.ipv4.ip_forward": "0", DROPIN: None}, owned=[DROPIN], dropin=DROPIN_1,
         expect=[("net.ipv4.ip_forward", A.NOOP, "1", "1"), (DROPIN, A.NOOP, None, None)]),
    Case("whitespace differences are not changes",
         {"net.ipv4.tcp_rmem": "4096  87380 6291456"},
         {"net.ipv4.tcp_rmem": "4096 87380 6291456"},
         expect=[("net.ipv4.tcp_rmem", A.NOOP, "4096 87380 6291456", "4096 87380 6291456"),
                 (DROPIN, A.WRITE, None, "1 setting")]),
    Case("drift is corrected, original kept",
         {"net.ipv4.ip_forward": 1}, {"net.ipv4.ip_forward": "0"},
         originals={"net.ipv4.ip_forward": "0", DROPIN: None}, owned=[DROPIN], dropin=DROPIN_1,
         expect=[("net.ipv4.ip_forward", A.SET, "0", "1"), (DROPIN, A.NOOP, None, None)]),
    Case("a key that left the document is restored and the drop-in removed",
         {}, {"net.ipv4.ip_forward": "1"},
         originals={"net.ipv4.ip_forward": "0", DROPIN: None}, owned=[DROPIN], dropin=DROPIN_1,
         expect=[("net.ipv4.ip_forward", A.RESTORE, "1", "0"), (DROPIN, A.DELETE, "1 setting", None)]),
    Case("module removed from the document entirely",
         None, {"net.ipv4.ip_forward": "1"},
         originals={"net.ipv4.ip_forward": "0", DROPIN: None}, owned=[DROPIN], dropin=DROPIN_1,
         expect=[("net.ipv4.ip_forward", A.RESTORE, "1", "0"), (DROPIN, A.DELETE, "1 setting", None)]),
    Case("left the document but already at its original: just forgotten",
         {}, {"net.ipv4.ip_forward": "0"},
         originals={"net.ipv4.ip_forward": "0"},
         expect=[("net.ipv4.ip_forward", A.NOOP, "0", "0")]),
    Case("a key whose sysctl vanished (interface gone) is forgotten",
         {}, {"net.ipv4.conf.veth0.forwarding": None},
         originals={"net.ipv4.conf.veth0.forwarding": "0"},
         expect=[("net.ipv4.conf.veth0.forwarding", A.NOOP, None, "0")]),
    Case("a drop-in someone edited is rewritten",
         {"net.ipv4.ip_forward": 1}, {"net.ipv4.ip_forward": "1"},
         originals={"net.ipv4.ip_forward": "0", DROPIN: None}, owned=[DROPIN],
         dropin=DROPIN_1 + "vm.swappiness = 1\n",
         expect=[("net.ipv4.ip_forward", A.NOOP, "1", "1"),
                 (DROPIN, A.WRITE, "2 settings", "1 setting")]),
    Case("a drop-in that was there before divingbell is put back, not deleted",
         {}, {}, originals={DROPIN: "kernel.foo = 1\n"}, owned=[DROPIN], dropin=DROPIN_1,
         expect=[(DROPIN, A.DELETE, "1 setting", "original content")]),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan(case: Case) -> None:
    desired = SysctlConf.model_validate(case.desired) if case.desired is not None else None
    record = ModuleRecord(originals=dict(case.originals), owned_files=list(case.owned))
    changes = Sysctl().plan(desired, SysctlObserved(case.live, case.dropin), record)
    assert [(c.target, c.action, c.before, c.after) for c in changes] == case.expect
    assert all(c.reason for c in changes), "every change says why"


def test_originals_are_captured_only_once() -> None:
    desired = SysctlConf.model_validate({"net.ipv4.ip_forward": 1})
    fresh = Sysctl().plan(desired, SysctlObserved({"net.ipv4.ip_forward": "0"}, None),
                          ModuleRecord())
    assert fresh[0].capture_original
    known = Sysctl().plan(desired, SysctlObserved({"net.ipv4.ip_forward": "0"}, None),
                          ModuleRecord(originals={"net.ipv4.ip_forward": "5"}))
    assert not known[0].capture_original


def test_dropin_is_sorted_with_an_ownership_header() -> None:
    text = render_dropin({"vm.swappiness": "10", "net.core.somaxconn": "1024"})
    lines = text.splitlines()
    assert lines[0].startswith("# Managed by divingbell")
    assert lines[-2:] == ["net.core.somaxconn = 1024", "vm.swappiness = 10"]


@pytest.mark.parametrize(("key", "components", "canonical"), [
    ("net.ipv4.ip_forward", ["net", "ipv4", "ip_forward"], "net.ipv4.ip_forward"),
    ("net/ipv4/ip_forward", ["net", "ipv4", "ip_forward"], "net.ipv4.ip_forward"),
    ("net/ipv4/conf/eth0.100/forwarding", ["net", "ipv4", "conf", "eth0.100", "forwarding"],
     "net.ipv4.conf.eth0/100.forwarding"),
    ("net.ipv4.conf.eth0/100.forwarding", ["net", "ipv4", "conf", "eth0.100", "forwarding"],
     "net.ipv4.conf.eth0/100.forwarding"),
])
def test_key_forms(key: str, components: list[str], canonical: str) -> None:
    assert sysctl_components(key) == components
    assert canonical_sysctl_key(key) == canonical
