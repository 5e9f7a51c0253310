"""Before a rollout, per machine: what a new revision would do to its workloads (live changes
only, restart services, reboot), from the two effective configurations. Table tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from divingbell.fleet.configdiff import Target, disruption
from tests.rollout.test_configdiff import doc

SCRIPT = "#!/bin/sh\\ntrue\\n"


def conf(body: str) -> str:
    return "conf:\n" + body


CASES = [
    ("nothing changes", "  sysctl: {vm.swappiness: 10}\n", "  sysctl: {vm.swappiness: 10}\n",
     "none", {}),
    ("sysctls, limits, mounts are live", "  sysctl: {vm.swappiness: 10}\n",
     "  sysctl: {vm.swappiness: 20}\n"
     "  limits: {nofile: {domain: '*', type: soft, item: nofile, value: 9}}\n", "none", {}),
    ("a new package starts fresh", "  apt: {packages: [{name: less}]}\n",
     "  apt: {packages: [{name: less}, {name: jq}]}\n", "none", {}),
    ("a pin that moves restarts the package's services",
     "  apt: {packages: [{name: containerd, version: '1.6'}]}\n",
     "  apt: {packages: [{name: containerd, version: '1.7'}]}\n", "restart",
     {"apt": "restart: packages change or leave (containerd): the services they ship restart"}),
    ("a kernel package reboots", "  apt: {packages: [{name: less}]}\n",
     "  apt: {packages: [{name: less}, {name: linux-image-amd64}]}\n", "reboot",
     {"apt": "reboot: kernel or microcode packages change (linux-image-amd64)"}),
    ("upgrade turning on may bring a kernel", "  apt: {packages: [{name: less}]}\n",
     "  apt: {packages: [{name: less}], upgrade: true}\n", "reboot",
     {"apt": "reboot: upgrade turns on: it may bring a new kernel (the host decides)"}),
    ("a script declares its disruption", "",
     f"  exec:\n    k.sh: {{data: '{SCRIPT}', disruption: restart:kubelet.service}}\n",
     "restart", {"exec": "restart: new or changed scripts declare it "
                         "(k.sh: restart:kubelet.service)"}),
    ("an unchanged script does not run again for the rollout",
     f"  exec:\n    k.sh: {{data: '{SCRIPT}', disruption: reboot}}\n",
     f"  exec:\n    k.sh: {{data: '{SCRIPT}', disruption: reboot}}\n"
     "  sysctl: {vm.swappiness: 1}\n", "none", {}),
    ("the strongest wins",
     "  apt: {packages: [{name: containerd, version: '1.6'}]}\n",
     "  apt: {packages: [{name: containerd, version: '1.7'}]}\n"
     f"  exec:\n    r.sh: {{data: '{SCRIPT}', disruption: reboot}}\n", "reboot", None),
]


@pytest.mark.parametrize(("what", "old", "new", "kind", "modules"), CASES,
                         ids=[c[0] for c in CASES])
def test_machine_disruption(tmp_path: Path, what: str, old: str, new: str, kind: str,
                            modules: dict[str, str] | None) -> None:
    target = Target("a", "n1", {})
    found = disruption(doc(tmp_path, "old.yaml", conf(old or "  sysctl: {}\n")),
                       doc(tmp_path, "new.yaml", conf(new)), target)
    assert found.kind == kind, what
    if modules is not None:
        assert found.modules == modules


def test_overrides_make_machines_differ(tmp_path: Path) -> None:
    old = doc(tmp_path, "old.yaml", conf("  sysctl: {vm.swappiness: 10}\n"))
    new = doc(tmp_path, "new.yaml", conf(f"""\
  sysctl: {{vm.swappiness: 20}}
  overrides:
    divingbell_exec:
      labels:
        - label: {{key: role, values: [storage]}}
          conf:
            exec:
              tune.sh: {{data: '{SCRIPT}', disruption: reboot}}
"""))
    assert disruption(old, new, Target("a", "s1", {"role": "storage"})).kind == "reboot"
    assert disruption(old, new, Target("b", "c1", {"role": "compute"})).kind == "none"
    assert disruption(None, new, Target("a", "s1", {"role": "storage"})).kind == "reboot"


def test_kernel_parameters_that_leave_are_removals(tmp_path: Path) -> None:
    from divingbell.fleet.configdiff import removals

    old = doc(tmp_path, "old.yaml", conf("  kernel: {cmdline: {hugepages: 16, isolcpus: 2-7}, "
                                         "flags: [nosmt]}\n"))
    new = doc(tmp_path, "new.yaml", conf("  kernel: {cmdline: {hugepages: 16}}\n"))
    found = removals(old, new, Target("a", "n1", {}))
    assert found.modules == {"kernel": ["parameter isolcpus", "parameter nosmt"]}
    assert (found.removed, found.kept) == (2, 1)
    assert disruption(old, new, Target("a", "n1", {})).kind == "reboot"
