"""The rollout plan's per-machine diff goes through the real loader, validator and overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divingbell.core.document.api import load_document
from divingbell.fleet.configdiff import Target, fleet_diff, module_diff

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


SECRET_DOC = """\
conf:
  uamlite:
    users:
      - user_name: bob
        user_crypt_passwd: "{crypt}"
  apt:
    packages:
      - name: foo
        debconf:
          - {{question: foo/pw, question_type: password, answer: {answer}}}
          - {{question: foo/mode, question_type: string, answer: fast}}
    repositories:
      internal:
        url: https://deploy:{mirror}@mirror.example/debian
        distributions: [bookworm]
        components: [main]
  mounts:
    share:
      mnt_tgt: /mnt/share
      device: //fs/share
      type: cifs
      options: username=svc,password={cifs},vers=3.0
  exec:
    hello.sh:
      data: "#!/bin/sh\\necho hi\\n"
      env:
        API_TOKEN: {token}
        REGION: eu-1
"""
OLD_SECRETS = {"crypt": "$6$salt$oldhasholdhash", "answer": "old-debconf-pw",
               "mirror": "old-mirror-pw", "cifs": "old-cifs-pw", "token": "old-api-token"}
NEW_SECRETS = {"crypt": "$6$salt$newhashnewhash", "answer": "new-debconf-pw",
               "mirror": "new-mirror-pw", "cifs": "new-cifs-pw", "token": "new-api-token"}


@pytest.mark.parametrize(("secret", "module", "line"), [
    ("crypt", "uamlite", "user_crypt_passwd: '********** (sensitive, changed)'"),
    ("answer", "apt", "answer: '********** (sensitive, changed)'"),
    ("mirror", "apt", "url: https://deploy:**********@mirror.example/debian (sensitive, changed)"),
    ("cifs", "mounts", "options: username=svc,password=**********,vers=3.0 (sensitive, changed)"),
    ("token", "exec", "API_TOKEN: '********** (sensitive, changed)'"),
])
def test_a_revision_that_changes_only_a_secret_changes_the_machine_without_showing_it(
        tmp_path: Path, secret: str, module: str, line: str) -> None:
    old = doc(tmp_path, "old.yaml", SECRET_DOC.format(**OLD_SECRETS))
    new = doc(tmp_path, "new.yaml", SECRET_DOC.format(**{**OLD_SECRETS,
                                                         secret: NEW_SECRETS[secret]}))
    (diff,) = fleet_diff(old, new, [Target("a", "n1", {})])
    assert diff.changed
    assert list(diff.modules) == [module]
    added = [text for text in diff.modules[module] if text.startswith("+")]
    assert [text for text in added if text.endswith(line)] == [added[-1]], diff.modules[module]
    output = json.dumps(diff.as_dict())
    for value in (*OLD_SECRETS.values(), *NEW_SECRETS.values()):
        assert value not in output


def test_unchanged_secrets_are_no_change(tmp_path: Path) -> None:
    old = doc(tmp_path, "old.yaml", SECRET_DOC.format(**OLD_SECRETS))
    new = doc(tmp_path, "new.yaml", SECRET_DOC.format(**OLD_SECRETS) + "  sysctl: {}\n")
    (diff,) = fleet_diff(old, new, [Target("a", "n1", {})])
    assert diff.modules.keys() <= {"sysctl"}
    assert "(sensitive, changed)" not in json.dumps(diff.as_dict())


def test_a_secret_changed_by_a_label_override_changes_only_the_machines_with_that_label(
        tmp_path: Path) -> None:
    base = SECRET_DOC.format(**OLD_SECRETS) + """\
  overrides:
    divingbell_uamlite:
      labels:
        - label: {key: role, values: [storage]}
          conf:
            uamlite:
              users:
                - user_name: bob
                  user_crypt_passwd: "STORAGE-CRYPT"
"""
    old = doc(tmp_path, "old.yaml", base.replace("STORAGE-CRYPT", "$6$salt$storageoldhash"))
    new = doc(tmp_path, "new.yaml", base.replace("STORAGE-CRYPT", "$6$salt$storagenewhash"))
    diffs = {d.name: d for d in fleet_diff(old, new, [
        Target("a", "storage1", {"role": "storage"}), Target("b", "compute1", {})])}
    assert not diffs["compute1"].changed
    assert list(diffs["storage1"].modules) == ["uamlite"]
    assert "storagenewhash" not in json.dumps(diffs["storage1"].as_dict())


def test_a_hidden_change_the_shapes_cannot_place_is_still_a_change() -> None:
    shown = {"env": {"A": "**********"}}
    assert module_diff("exec", shown, shown, {"env": "a"}, {"env": "b"}) == [
        "exec: (sensitive, changed)"]
    assert module_diff("exec", shown, shown, {"env": "a"}, {"env": "a"}) == []


# What leaves a machine (issue 23): one case per module, through the real validator ---------

REMOVAL_CASES = {
    "sysctl: {} restores three originals": (
        "  sysctl: {a.b: 1, c.d: 2, e.f: 3}\n", "  sysctl: {}\n",
        {"sysctl": ["a.b", "c.d", "e.f"]}, 3, 0),
    "one mount of three leaves": (
        "  mounts:\n" + "".join(f"    m{i}: {{mnt_tgt: /mnt/m{i}, device: tmpfs, type: tmpfs}}\n"
                                for i in range(3)),
        "  mounts:\n    m0: {mnt_tgt: /mnt/m0, device: tmpfs, type: tmpfs}\n",
        {"mounts": ["m1", "m2"]}, 2, 1),
    "the only perm entry dropped from a full document": (
        "  perm:\n    paths: [{path: /etc/shadow, owner: root, group: shadow, "
        "permissions: '0640'}]\n  sysctl: {a.b: 1}\n",
        "  sysctl: {a.b: 1}\n", {"perm": ["path /etc/shadow"]}, 1, 1),
    "a user leaves and expired users are purged": (
        "  uamlite:\n    users: [{user_name: ops}, {user_name: dev}]\n",
        "  uamlite:\n    purge_expired_users: true\n    users: [{user_name: ops}]\n",
        {"uamlite": ["purge_expired_users (expired accounts and their homes are deleted)",
                     "user dev"]}, 2, 1),
    "a package and a repository leave": (
        "  apt:\n    packages: [{name: pkg-a}, {name: pkg-b}]\n    repositories:\n"
        "      r: {url: 'http://x/', distributions: [d], components: [main]}\n",
        "  apt:\n    packages: [{name: pkg-a}]\n",
        {"apt": ["package pkg-b", "repository r"]}, 2, 1),
    "NIC settings, nested ones by name": (
        "  ethtool:\n    eth0: {tx-checksumming: 'off', ring: {rx: 512}}\n",
        "  ethtool:\n    eth0: {ring: {rx: 512}}\n",
        {"ethtool": ["eth0 tx-checksumming"]}, 1, 1),
    "five exec scripts replaced by one: shown, not counted": (
        "  exec:\n" + "".join(f"    s{i}: {{data: x}}\n" for i in range(5)),
        "  exec:\n    t: {data: x}\n",
        {"exec": ["s0", "s1", "s2", "s3", "s4"]}, 0, 1),
}


@pytest.mark.parametrize("case", sorted(REMOVAL_CASES))
def test_removals_name_what_leaves_each_module(tmp_path, case):
    from divingbell.fleet.configdiff import removals

    before, after, modules, removed, kept = REMOVAL_CASES[case]
    old = doc(tmp_path, "old.yaml", "conf:\n" + before)
    new = doc(tmp_path, "new.yaml", "conf:\n" + after)
    found = removals(old, new, Target("a", "n1", {}))
    assert found.modules == modules
    assert (found.removed, found.kept) == (removed, kept)
    assert found.exceeds_kept == (removed > kept)
    assert not removals(None, old, Target("a", "n1", {})).exceeds_kept, "a first push"
