"""`divingbell node ...` as an operator runs it: the real command and the real lightkube client
against the API server stub (the fake cluster behind kube-apiserver's paths and codes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from divingbell.kube import FakeKube, LeaseView
from divingbell.maintenance import decide

from .conftest import cluster
from .kubestub import MaintenanceApiStub


@pytest.fixture
def live() -> Iterator[MaintenanceApiStub]:
    """The cluster on the real clock, pods stopping in a fraction of a second."""
    stub = MaintenanceApiStub(cluster(time.time, stop=0.2))
    yield stub
    stub.server.shutdown()


@pytest.fixture
def kubeconfig(live: MaintenanceApiStub, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": live.url}}],
        "users": [{"name": "stub", "user": {}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}]}))
    return path


def node_cmd(kubeconfig: Path, *args: str, stdin: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "divingbell", "node", *args,
                           "--kubeconfig", str(kubeconfig)], capture_output=True, text=True,
                          check=False, input=stdin, timeout=120)


def test_cordon_records_who_and_why_and_uncordon_respects_it(
        live: MaintenanceApiStub, kubeconfig: Path) -> None:
    fake = live.backing
    done = node_cmd(kubeconfig, "cordon", "n1", "--reason", "disk swap", "--as", "alice")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "n1 cordoned by alice: disk swap\n"
    state = fake.node_state("n1")
    assert state.unschedulable
    assert state.annotations[decide.CORDONED_BY] == "alice"
    assert state.annotations[decide.CORDON_REASON] == "disk swap"
    again = node_cmd(kubeconfig, "cordon", "n1", "--as", "bob")
    assert again.stdout == "n1 is already cordoned by alice; left as it is\n"
    refused = node_cmd(kubeconfig, "uncordon", "n1", "--as", "bob")
    assert refused.returncode == 1
    assert refused.stderr == ("error: not uncordoning n1: cordoned by alice (reason: disk "
                              "swap); use --force to lift it\n")
    assert fake.node_state("n1").unschedulable
    forced = node_cmd(kubeconfig, "uncordon", "n1", "--as", "bob", "--force")
    assert forced.returncode == 0 and "(--force)" in forced.stdout
    state = fake.node_state("n1")
    assert not state.unschedulable and decide.CORDONED_BY not in state.annotations
    assert [e["reason"] for e in fake.events("n1")] == ["Cordoned", "Uncordoned"]


def test_a_drain_blocked_by_a_budget_names_it_and_exits_1(live: MaintenanceApiStub,
                                                          kubeconfig: Path) -> None:
    run = node_cmd(kubeconfig, "drain", "n1", "--timeout", "2s", "--interval", "1s",
                   "--as", "alice")
    assert run.returncode == 1, run.stderr
    assert "evicted shop/web-1" in run.stdout
    assert "waiting: evicting shop/web-2 would violate its PodDisruptionBudget" in run.stdout
    assert "  shop/web-2: protected by PodDisruptionBudget shop/web" in run.stderr
    assert live.backing.node_state("n1").unschedulable  # stays cordoned
    warning = [e for e in live.backing.events("n1") if e["reason"] == "DrainTimeout"]
    assert warning and warning[0]["type"] == "Warning"
    # What happened, not what the agent's sequence would do: no uncordon, no slot involved.
    message = warning[0]["message"]
    assert "shop/web-2 (PodDisruptionBudget shop/web)" in message
    assert "uncordon if" not in message and "slot" not in message, message
    assert "n1 stays cordoned" in message and "nothing was deleted" in message, message


def test_a_drain_evicts_all_but_daemonset_mirror_and_finished_pods(
        live: MaintenanceApiStub, kubeconfig: Path) -> None:
    live.backing.add_budget("shop", "web", {"matchLabels": {"app": "web"}}, max_unavailable=2)
    run = node_cmd(kubeconfig, "drain", "n1", "--interval", "0.2s", "--format", "json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["drained"] and sorted(report["evicted"]) == ["shop/web-1", "shop/web-2"]
    assert {s["pod"] for s in report["skipped"]} == {
        "kube-system/proxy-n1", "kube-system/etcd-n1", "batch/report-1"}
    assert live.backing.pod_names() == ["batch/report-1", "kube-system/etcd-n1",
                                        "kube-system/proxy-n1", "shop/web-3"]


def test_reboot_asks_the_agent_and_status_shows_nodes_and_slots(
        live: MaintenanceApiStub, kubeconfig: Path) -> None:
    fake: FakeKube = live.backing
    run = node_cmd(kubeconfig, "reboot", "n2", "--reason", "firmware 2.1", "--as", "alice")
    assert run.returncode == 0, run.stderr
    assert fake.node_state("n2").annotations["divingbell.io/reboot-requested"] == (
        "alice: firmware 2.1")
    fake.patch_node("n1", unschedulable=True, annotations={
        "divingbell.io/maintenance": "draining", decide.CORDONED_BY: "divingbell-agent",
        "divingbell.io/maintenance-slot": "default/0",
        "divingbell.io/maintenance-reason": "draining: 2 pod(s) left"})
    fake.create_lease("divingbell", LeaseView(
        "divingbell-slot-default-0", "n1", 1800, 1_800_000_000.0, 1_800_000_060.0,
        labels={"divingbell.io/slot-group": "default", "divingbell.io/slot-index": "0"}))
    table = node_cmd(kubeconfig, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NODE", "MAINTENANCE", "CORDONED", "BY", "SLOT", "REASON"]
    assert lines[1].split()[:4] == ["n1", "draining", "divingbell-agent", "default/0"]
    assert lines[2].split()[:4] == ["n2", "-", "-", "-"]
    assert lines[4].split() == ["SLOT", "HOLDER", "SINCE", "EXPIRES"]
    assert lines[5].split() == ["default/0", "n1", "2027-01-15T08:00:00Z",
                                "2027-01-15T08:31:00Z"]
    data = json.loads(node_cmd(kubeconfig, "status", "--format", "json").stdout)
    assert data["slots"] == [{"slot": "default/0", "holder": "n1",
                              "since": "2027-01-15T08:00:00Z",
                              "expires_at": "2027-01-15T08:31:00Z"}]


def test_release_warns_and_frees_the_slot(live: MaintenanceApiStub, kubeconfig: Path) -> None:
    live.backing.create_lease("divingbell", LeaseView(
        "divingbell-slot-default-0", "n1", 1800, time.time(), time.time(),
        labels={"divingbell.io/slot-group": "default", "divingbell.io/slot-index": "0"}))
    declined = node_cmd(kubeconfig, "release", "default/0", stdin="n\n")
    assert declined.returncode == 1
    assert "WARNING: default/0 is held by n1" in declined.stderr
    assert "two nodes down at once" in declined.stderr
    lease = live.backing.get_lease("divingbell", "divingbell-slot-default-0")
    assert lease is not None and lease.holder == "n1"
    done = node_cmd(kubeconfig, "release", "default/0", "--yes")
    assert done.returncode == 0 and done.stdout == "released default/0 (was held by n1)\n"
    lease = live.backing.get_lease("divingbell", "divingbell-slot-default-0")
    assert lease is not None and lease.holder is None
    missing = node_cmd(kubeconfig, "release", "default/9", "--yes")
    assert missing.returncode == 1 and "no slot 'default/9'" in missing.stderr


def test_decommission_drains_deletes_and_reports(live: MaintenanceApiStub,
                                                 kubeconfig: Path) -> None:
    live.backing.create_lease("divingbell", LeaseView(
        "divingbell-slot-default-0", "n2", 1800, time.time(), time.time(),
        labels={"divingbell.io/slot-group": "default", "divingbell.io/slot-index": "0"}))
    run = node_cmd(kubeconfig, "decommission", "n2", "--yes", "--interval", "0.2s",
                   "--as", "alice", "--reason", "rack retired")
    assert run.returncode == 0, run.stderr
    assert "removed Node n2 (rack retired, by alice)" in run.stdout
    assert "  evicted: shop/web-3" in run.stdout
    assert "  released its slot(s): default/0" in run.stdout
    assert "n2" not in live.backing.node_objects
    blocked = node_cmd(kubeconfig, "decommission", "n1", "--yes", "--timeout", "1s",
                       "--interval", "0.5s")
    assert blocked.returncode == 1 and "not deleting n1" in blocked.stderr
    assert "n1" in live.backing.node_objects
    unknown = node_cmd(kubeconfig, "cordon", "nope")
    assert unknown.returncode == 1 and unknown.stderr == "error: no node 'nope' in this cluster\n"
