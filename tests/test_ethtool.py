"""ethtool on real veth pairs inside a network namespace per test; the CLI runs chrooted into an
overlay of this machine's userland, so `ethtool` is the real one and writes stay in the test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from divingbell.core.modules.ethtool import parse_features, parse_settings, render_unit
from tests.conftest import Cli, NetNs, require_root_tools, write

pytestmark = pytest.mark.kernel
DATA = Path(__file__).parent / "data"


@pytest.fixture
def veth(netns: NetNs) -> NetNs:
    require_root_tools("ethtool")
    subprocess.run(["ip", "-n", netns.name, "link", "add", "va", "numtxqueues", "4",
                    "numrxqueues", "4", "type", "veth", "peer", "name", "vb", "numtxqueues", "4",
                    "numrxqueues", "4"], check=True)
    return netns


def features(ns: NetNs, iface: str = "va") -> dict[str, bool]:
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ethtool", "--json", "-k", iface],
                         check=True, capture_output=True, text=True).stdout
    return {name: f.active for name, f in parse_features(out).items()}


def channels(ns: NetNs) -> dict[str, int | None]:
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ethtool", "-l", "va"],
                         check=True, capture_output=True, text=True).stdout
    return parse_settings(out)


DOC = """\
conf:
  ethtool:
    va:
      tx-tcp-segmentation: off
      generic-receive-offload: off
      channels: {rx: 2}
"""


def test_apply_noop_change_revert(veth: NetNs, ns_cli: Cli, overlay_root: Path,
                                  tmp_path: Path) -> None:
    original = features(veth)
    assert original["tx-tcp-segmentation"] and original["generic-receive-offload"] is not None
    doc = write(tmp_path / "doc.yaml", DOC)
    result = ns_cli("apply", doc, "--root", overlay_root)
    assert result.returncode == 0, result.stdout + result.stderr
    now = features(veth)
    assert now["tx-tcp-segmentation"] is False
    assert now["generic-receive-offload"] is False
    assert channels(veth)["rx"] == 2
    unit = overlay_root / "etc/systemd/system/divingbell-ethtool-va.service"
    text = unit.read_text()
    assert "ExecStart=/usr/sbin/ethtool -K va generic-receive-offload off tx-tcp-segmentation off" \
        in text
    assert "ExecStart=/usr/sbin/ethtool -L va rx 2" in text
    assert "Before=network-pre.target" in text
    wants = overlay_root / "etc/systemd/system/multi-user.target.wants/divingbell-ethtool-va.service"
    assert wants.is_symlink()

    noop = ns_cli("apply", doc, "--root", overlay_root)
    assert "No changes" in noop.stdout, noop.stdout

    write(doc, DOC.replace("generic-receive-offload: off", "generic-receive-offload: on"))
    changed = json.loads(ns_cli("apply", doc, "--root", overlay_root, "--format", "json").stdout)
    assert changed["result"] == "ok"
    assert features(veth)["generic-receive-offload"] is True

    write(doc, "conf: {}\n")
    reverted = ns_cli("apply", doc, "--root", overlay_root)
    assert reverted.returncode == 0, reverted.stdout
    assert features(veth) == original
    assert channels(veth)["rx"] == 4
    assert not unit.exists() and not wants.is_symlink()


def test_fixed_unknown_and_missing_are_refused_before_any_change(
    veth: NetNs, ns_cli: Cli, overlay_root: Path, tmp_path: Path
) -> None:
    before = features(veth)
    doc = write(tmp_path / "doc.yaml", """\
conf:
  ethtool:
    va:
      tx-tcp-segmentation: off
      lro: on
      not-a-feature: off
    nosuch0: {tso: off}
""")
    result = ns_cli("apply", doc, "--root", overlay_root)
    assert result.returncode == 1
    assert "va lro: is fixed off by the driver ([fixed])" in result.stdout
    assert "va: no feature named 'not-a-feature'" in result.stdout
    assert "nosuch0: no such network interface on this host" in result.stdout
    assert features(veth) == before


def test_unsupported_ring_sizes_name_the_driver(veth: NetNs, ns_cli: Cli, overlay_root: Path,
                                                tmp_path: Path) -> None:
    doc = write(tmp_path / "doc.yaml", "conf:\n  ethtool:\n    va:\n      ring: {rx: 512}\n"
                "      coalesce: {rx-usecs: 10}\n")
    result = ns_cli("apply", doc, "--root", overlay_root)
    assert result.returncode == 1
    assert "va: ring sizes are not supported by veth" in result.stdout
    assert "va: interrupt coalescing are not supported by veth" in result.stdout


def test_features_the_kernel_forces_are_reported(veth: NetNs, ns_cli: Cli, overlay_root: Path,
                                                 tmp_path: Path) -> None:
    doc = write(tmp_path / "doc.yaml",
                "conf:\n  ethtool:\n    va:\n      tx-checksum-ip-generic: off\n")
    result = ns_cli("apply", doc, "--root", overlay_root)
    assert result.returncode == 0, result.stdout
    assert "ethtool: note: va: setting tx-checksum-ip-generic off also changed" in result.stdout
    assert "tx-tcp-segmentation off" in result.stdout
    assert features(veth)["tx-tcp-segmentation"] is False
    # Turning checksumming back on lets the kernel bring TSO back: the host is as before.
    write(doc, "conf: {}\n")
    assert ns_cli("apply", doc, "--root", overlay_root).returncode == 0
    assert features(veth)["tx-tcp-segmentation"] is True


def test_short_feature_names_work(veth: NetNs, ns_cli: Cli, overlay_root: Path,
                                  tmp_path: Path) -> None:
    doc = write(tmp_path / "doc.yaml", "conf:\n  ethtool:\n    va:\n      gro: off\n")
    assert ns_cli("apply", doc, "--root", overlay_root).returncode == 0
    assert features(veth)["generic-receive-offload"] is False


def test_parsers_on_captured_output() -> None:
    # Captured on this kind of machine: ethtool 6.1, kernel 6.18, veth with 4 queues.
    text = (DATA / "ethtool-k-veth.json").read_text()
    parsed = parse_features(text)
    assert parsed["large-receive-offload"].fixed is True
    assert parsed["tx-checksumming"].fixed is None
    assert parsed["tx-tcp-segmentation"].active is True
    assert parse_settings((DATA / "ethtool-l-veth.txt").read_text()) == {
        "rx": 2, "tx": 4, "other": None, "combined": None}


def test_unit_lists_every_setting_in_order() -> None:
    from divingbell.core.modules.ethtool_schema import EthtoolInterface

    conf = EthtoolInterface.model_validate({"tso": False, "rx": True, "ring": {"tx": 512}})
    unit = render_unit("ens3", conf, "/usr/sbin/ethtool")
    assert "ExecStart=/usr/sbin/ethtool -K ens3 rx-checksumming on tcp-segmentation-offload off" \
        in unit
    assert "ExecStart=/usr/sbin/ethtool -G ens3 tx 512" in unit
