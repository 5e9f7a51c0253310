"""sysctl against the real kernel: `divingbell` runs inside a network namespace made for each
test, where net.* tunables are the namespace's own. The machine's own values are never touched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from divingbell.core.modules.sysctl import DROPIN
from tests.conftest import Cli, NetNs, write

pytestmark = pytest.mark.kernel

DOC = """\
conf:
  sysctl:
    net.ipv4.ip_forward: 1
    net/ipv4/tcp_rmem: "4096  87380 6291456"
    net.core.somaxconn: 1000
"""


def test_apply_noop_change_revert(netns: NetNs, ns_cli: Cli, root: Path, tmp_path: Path) -> None:
    originals = {key: netns.sysctl(key) for key in
                 ("net.ipv4.ip_forward", "net.ipv4.tcp_rmem", "net.core.somaxconn")}
    doc = write(tmp_path / "doc.yaml", DOC)

    first = ns_cli("apply", doc, "--root", root, "--node", "n1")
    assert first.returncode == 0, first.stderr
    assert netns.sysctl("net.ipv4.ip_forward") == "1"
    assert netns.sysctl("net.ipv4.tcp_rmem") == "4096 87380 6291456"
    assert netns.sysctl("net.core.somaxconn") == "1000"
    dropin = (root / DROPIN.lstrip("/")).read_text()
    assert "net.ipv4.tcp_rmem = 4096 87380 6291456\n" in dropin

    noop = ns_cli("apply", doc, "--root", root, "--node", "n1")
    assert noop.returncode == 0
    assert "No changes: the host already matches the document." in noop.stdout

    write(doc, DOC.replace("1000", "2000"))
    change = ns_cli("apply", doc, "--root", root, "--node", "n1", "--format", "json")
    report = json.loads(change.stdout)
    assert report["summary"]["change"] == 2  # the value and the drop-in
    assert netns.sysctl("net.core.somaxconn") == "2000"

    write(doc, "conf: {}\n")
    revert = ns_cli("apply", doc, "--root", root, "--node", "n1")
    assert revert.returncode == 0, revert.stderr
    for key, value in originals.items():
        assert netns.sysctl(key) == value, f"{key} restored"
    assert not (root / DROPIN.lstrip("/")).exists()
    status = json.loads(ns_cli("status", "--root", root, "--format", "json").stdout)
    assert status["journal"]["modules"] == {}
    assert status["last_run"]["result"] == "ok"


def test_drift_is_corrected_on_the_next_apply(netns: NetNs, ns_cli: Cli, root: Path,
                                              tmp_path: Path) -> None:
    doc = write(tmp_path / "doc.yaml", DOC)
    assert ns_cli("apply", doc, "--root", root).returncode == 0
    netns.set_sysctl("net.core.somaxconn", "77")
    plan = ns_cli("plan", doc, "--root", root)
    assert "~ net.core.somaxconn: 77 -> 1000" in plan.stdout
    assert ns_cli("apply", doc, "--root", root).returncode == 0
    assert netns.sysctl("net.core.somaxconn") == "1000"


def test_a_value_the_kernel_rejects_rolls_back_the_whole_run(
    netns: NetNs, ns_cli: Cli, root: Path, tmp_path: Path
) -> None:
    before = netns.sysctl("net.core.somaxconn")
    # Applied in key order: somaxconn is written first, then the kernel rejects the second.
    doc = write(tmp_path / "doc.yaml",
                "conf:\n  sysctl:\n    net.core.somaxconn: 1234\n"
                "    net.ipv4.tcp_syncookies: banana\n")
    result = ns_cli("apply", doc, "--root", root)
    assert result.returncode == 1
    assert "net.ipv4.tcp_syncookies: cannot set 'banana': the kernel rejected the value" \
        in result.stdout
    assert "[rolled back]" in result.stdout
    assert netns.sysctl("net.core.somaxconn") == before
    assert not (root / DROPIN.lstrip("/")).exists()
    status = json.loads(ns_cli("status", "--root", root, "--format", "json").stdout)
    assert status["journal"]["modules"] == {}, "journal back to before the run"
    assert status["last_run"]["result"] == "failed"


def test_unknown_and_read_only_keys_are_refused_before_any_change(
    netns: NetNs, ns_cli: Cli, root: Path, tmp_path: Path
) -> None:
    before = netns.sysctl("net.ipv4.ip_forward")
    doc = write(tmp_path / "doc.yaml",
                "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n    net.ipv4.not_a_key: 1\n"
                "    net.ipv4.tcp_available_congestion_control: reno\n")
    result = ns_cli("apply", doc, "--root", root)
    assert result.returncode == 1
    assert "net.ipv4.not_a_key: no such sysctl on this kernel" in result.stdout
    assert "net.ipv4.tcp_available_congestion_control: is read-only" in result.stdout
    assert netns.sysctl("net.ipv4.ip_forward") == before


def test_host_and_label_overrides_resolve_on_the_node(
    netns: NetNs, ns_cli: Cli, root: Path, tmp_path: Path
) -> None:
    doc = write(tmp_path / "doc.yaml", """\
conf:
  sysctl: {net.core.somaxconn: 1000}
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: role, values: [edge]}
          conf: {sysctl: {net.core.somaxconn: 2000}}
      hosts:
        - name: special
          conf: {sysctl: {net.core.somaxconn: 3000}}
""")
    assert ns_cli("apply", doc, "--root", root, "--node", "n1", "--label", "role=edge"
                  ).returncode == 0
    assert netns.sysctl("net.core.somaxconn") == "2000"
    assert ns_cli("apply", doc, "--root", root, "--label", "role=edge",
                  env={"NODE_NAME": "special"}).returncode == 0
    assert netns.sysctl("net.core.somaxconn") == "3000"


def test_slash_form_with_a_literal_dot_reaches_the_right_file(
    netns: NetNs, ns_cli: Cli, root: Path, tmp_path: Path
) -> None:
    subprocess.run(["ip", "-n", netns.name, "link", "add", "v.100", "type", "veth",
                    "peer", "name", "vpeer"], check=True)
    doc = write(tmp_path / "doc.yaml",
                "conf:\n  sysctl:\n    net/ipv4/conf/v.100/forwarding: 1\n")
    result = ns_cli("apply", doc, "--root", root)
    assert result.returncode == 0, result.stdout + result.stderr
    out = subprocess.run(["ip", "netns", "exec", netns.name, "cat",
                          "/proc/sys/net/ipv4/conf/v.100/forwarding"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert "net.ipv4.conf.v/100.forwarding = 1" in (root / DROPIN.lstrip("/")).read_text()


def test_sysctls_that_constrain_each_other_apply_and_restore_in_any_order(
    netns: NetNs, ns_cli: Cli, root: Path, tmp_path: Path
) -> None:
    # ipfrag_low_thresh must stay below ipfrag_high_thresh. Raising both above the current high
    # needs high first; restoring needs low first. Key order gives the wrong one for restore.
    low, high = netns.sysctl("net.ipv4.ipfrag_low_thresh"), netns.sysctl("net.ipv4.ipfrag_high_thresh")
    big_low, big_high = int(high) + 1_000_000, int(high) + 2_000_000
    doc = write(tmp_path / "doc.yaml",
                f"conf:\n  sysctl:\n    net.ipv4.ipfrag_high_thresh: {big_high}\n"
                f"    net.ipv4.ipfrag_low_thresh: {big_low}\n")
    applied = ns_cli("apply", doc, "--root", root)
    assert applied.returncode == 0, applied.stdout
    assert netns.sysctl("net.ipv4.ipfrag_low_thresh") == str(big_low)
    write(doc, "conf: {}\n")
    restored = ns_cli("apply", doc, "--root", root)
    assert restored.returncode == 0, restored.stdout
    assert netns.sysctl("net.ipv4.ipfrag_low_thresh") == low
    assert netns.sysctl("net.ipv4.ipfrag_high_thresh") == high
