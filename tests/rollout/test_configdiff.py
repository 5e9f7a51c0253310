"""The rollout plan's per-machine diff goes through the real loader, validator and overrides."""

from __future__ import annotations

from pathlib import Path

from divingbell.document.api import load_document
from divingbell.fleet.configdiff import Target, fleet_diff

BASE = """\
conf:
  sysctl:
    net.ipv4.ip_forward: "1"
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: role, values: [storage]}
          conf:
            sysctl:
              net.core.somaxconn: "1024"
"""


def doc(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return load_document([path])


def test_only_machines_whose_effective_config_changes_are_listed(tmp_path):
    old = doc(tmp_path, "old.yaml", BASE)
    new = doc(tmp_path, "new.yaml", BASE.replace('"1024"', '"2048"'))
    diffs = fleet_diff(old, new, [
        Target("a", "storage1", {"role": "storage"}),
        Target("b", "compute1", {"role": "compute"}),
    ])
    by_name = {d.name: d for d in diffs}
    assert not by_name["compute1"].changed
    assert list(by_name["storage1"].modules) == ["sysctl"]
    lines = by_name["storage1"].modules["sysctl"]
    assert "-net.core.somaxconn: '1024'" in lines and "+net.core.somaxconn: '2048'" in lines


def test_a_first_revision_shows_everything_as_added(tmp_path):
    new = doc(tmp_path, "new.yaml", BASE)
    (diff,) = fleet_diff(None, new, [Target("a", "n1", {})])
    assert diff.changed and any(line.startswith("+net.ipv4.ip_forward") for line in
                                diff.modules["sysctl"])
