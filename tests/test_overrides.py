"""Override resolution, checked against the seed's own example and each of its caveats."""

from textwrap import dedent
from typing import Any

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate

# Verbatim from seed 000 ("Overrides example with sysctl daemonset").
SEED_EXAMPLE = dedent("""\
    conf:
      sysctl:
        net.ipv4.ip_forward: 1
        net.ipv6.conf.all.forwarding: 1
        fs.file-max: 9999
      overrides:
        divingbell_sysctl:
          labels:
          - label:
              key: compute_type
              values:
              - "dpdk"
              - "sriov"
            conf:
              sysctl:
                net.ipv4.ip_forward: 0
          - label:
              key: another_label
              values:
              - "another_value"
            conf:
              sysctl:
                net.ipv6.conf.all.forwarding: 0
          hosts:
          - name: superhost
            conf:
              sysctl:
                net.ipv4.ip_forward: 0
                fs.file-max: 12345
          - name: superhost2
            conf:
              sysctl:
                fs.file-max: 23456
""")

BASE = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1", "fs.file-max": "9999"}


def sysctl_for(node: str, text: str = SEED_EXAMPLE, **labels: str) -> dict[str, Any]:
    config = resolve(validate(load_text(text)), node, labels)
    sysctl: dict[str, Any] = config.dump().get("sysctl", {})
    return sysctl


def test_a_node_without_overrides_gets_the_base_conf() -> None:
    assert sysctl_for("plainnode") == BASE


@pytest.mark.parametrize("value", ["dpdk", "sriov"])
def test_label_override_applies_for_any_listed_value(value: str) -> None:
    assert sysctl_for("n1", compute_type=value) == {**BASE, "net.ipv4.ip_forward": "0"}


def test_label_with_an_unlisted_value_does_not_apply() -> None:
    assert sysctl_for("n1", compute_type="general") == BASE


def test_host_override_merges_over_the_base() -> None:
    assert sysctl_for("superhost") == {**BASE, "net.ipv4.ip_forward": "0", "fs.file-max": "12345"}


def test_caveat_1_host_override_wins_and_label_overrides_are_not_used() -> None:
    # superhost2 also matches the dpdk label; only its host override applies, so
    # ip_forward keeps the base value 1 rather than the label's 0.
    assert sysctl_for("superhost2", compute_type="dpdk") == {**BASE, "fs.file-max": "23456"}


def test_caveat_2_last_matching_label_override_wins_alone() -> None:
    # Both labels match: only the last one (another_label) applies; the dpdk override's
    # ip_forward=0 is not merged in as well.
    result = sysctl_for("n1", compute_type="dpdk", another_label="another_value")
    assert result == {**BASE, "net.ipv6.conf.all.forwarding": "0"}


def test_resolution_records_which_override_applied() -> None:
    config = resolve(validate(load_text(SEED_EXAMPLE)), "n1", {"compute_type": "sriov"})
    assert config.overrides["sysctl"].description == "label override compute_type=sriov (labels[0])"


def test_override_of_one_module_never_changes_another() -> None:
    text = dedent("""\
        conf:
          sysctl: {net.ipv4.ip_forward: 1}
          limits:
            nofile: {domain: root, type: soft, item: nofile, value: 100}
          overrides:
            divingbell_limits:
              hosts:
                - name: n1
                  conf:
                    limits:
                      nofile: {value: 200}
            divingbell_sysctl:
              labels:
                - label: {key: role, values: [edge]}
                  conf:
                    sysctl: {net.ipv4.ip_forward: 0}
    """)
    config = resolve(validate(load_text(text)), "n1", {"role": "edge"}).dump()
    assert config["sysctl"] == {"net.ipv4.ip_forward": "0"}
    assert config["limits"]["nofile"]["value"] == "200"
    assert config["limits"]["nofile"]["domain"] == "root"
    other = resolve(validate(load_text(text)), "n2", {}).dump()
    assert other["limits"]["nofile"]["value"] == "100"
    assert other["sysctl"] == {"net.ipv4.ip_forward": "1"}


def test_lists_in_overrides_replace_the_base_list_whole() -> None:
    text = dedent("""\
        conf:
          perm:
            paths:
              - {path: /a, owner: root, group: root, permissions: '0600'}
              - {path: /b, owner: root, group: root, permissions: '0600'}
          overrides:
            divingbell_perm:
              hosts:
                - name: n1
                  conf:
                    perm:
                      paths:
                        - {path: /c, owner: root, group: root, permissions: '0644'}
    """)
    config = resolve(validate(load_text(text)), "n1", {}).dump()
    assert [entry["path"] for entry in config["perm"]["paths"]] == ["/c"]


def test_override_may_add_a_module_the_base_lacks() -> None:
    text = dedent("""\
        conf:
          overrides:
            divingbell_sysctl:
              hosts:
                - {name: n1, conf: {sysctl: {vm.swappiness: 10}}}
    """)
    assert sysctl_for("n1", text) == {"vm.swappiness": "10"}
    assert sysctl_for("n2", text) == {}


def test_slash_and_dot_spellings_of_a_key_merge_as_one() -> None:
    text = dedent("""\
        conf:
          sysctl: {net/ipv4/ip_forward: 1}
          overrides:
            divingbell_sysctl:
              hosts:
                - {name: n1, conf: {sysctl: {net.ipv4.ip_forward: 0}}}
    """)
    assert sysctl_for("n1", text) == {"net.ipv4.ip_forward": "0"}


def test_label_values_written_as_yaml_booleans_match_label_text() -> None:
    text = dedent("""\
        conf:
          sysctl: {vm.swappiness: 60}
          overrides:
            divingbell_sysctl:
              labels:
                - label: {key: ssd, values: [true]}
                  conf: {sysctl: {vm.swappiness: 1}}
    """)
    assert sysctl_for("n1", text, ssd="true") == {"vm.swappiness": "1"}
