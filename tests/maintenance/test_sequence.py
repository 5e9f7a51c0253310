"""The maintenance sequence on a node, against the fake cluster: every step, its Events and
annotations, and each failure mode the issue names (budgets that never allow an eviction,
someone else's cordon, a reboot that does not happen, a node that does not come back)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from divingbell.core.document.schema import MaintenanceConf
from divingbell.core.host import Host
from divingbell.kube import FakeKube, FakePod, MaintenanceKube
from divingbell.maintenance import decide
from divingbell.maintenance.alerts import alert_blockers
from divingbell.maintenance.sequence import (
    REQUEST_ANNOTATION,
    MaintenanceMetrics,
    Record,
    Sequence,
)
from divingbell.maintenance.slots import LeaseSlots, SlotBackend

from .conftest import Clock

NS = "divingbell"


class Node:
    """A node's agent over a scratch root. Rebooting is the one thing simulated: the boot id
    changes, /run empties, and a new Sequence (the agent's next process) carries on from the
    record on the host."""

    def __init__(self, name: str, base: Path, kube: MaintenanceKube | None, clock: Clock,
                 slots: SlotBackend, **kwargs: Any) -> None:
        self.name, self.kube, self.clock, self.slots = name, kube, clock, slots
        self.host = Host(root=base / name / "root", proc_sys=base / name / "proc_sys")
        (self.host.proc_sys / "kernel/random").mkdir(parents=True)
        self.host.path("/run").mkdir(parents=True)
        self.registry = CollectorRegistry()
        self.metrics = MaintenanceMetrics(self.registry)
        self.reboots: list[str] = []
        self.kwargs = kwargs
        self.boot()

    def boot(self) -> None:
        (self.host.proc_sys / "kernel/random/boot_id").write_text(f"{uuid.uuid4()}\n")
        for entry in self.host.path("/run").iterdir():
            entry.unlink()
        self.sequence = Sequence(self.name, self.host, self.kube, self.slots,
                                 metrics=self.metrics, clock=self.clock,
                                 reboot=self.reboots.append, **self.kwargs)

    def needs_reboot(self) -> None:
        self.host.path("/run/reboot-required").write_text("*** System restart required ***\n")

    def step(self, conf: MaintenanceConf | None, converged: bool = True) -> Record:
        return self.sequence.step(conf, {}, converged)

    def metric(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)


def conf(**reboot: Any) -> MaintenanceConf:
    return MaintenanceConf.model_validate({"reboot": {"drain": {"timeout": "10m",
                                                                 "grace_period": "30s"},
                                                       **reboot}})


def events(kube: FakeKube, node: str) -> list[str]:
    return [e["reason"] for e in kube.events(node)]


@pytest.fixture
def node(kube: FakeKube, clock: Clock, tmp_path: Path) -> Node:
    return Node("n1", tmp_path, kube, clock, LeaseSlots(kube, NS, clock))


def drain_with_a_replacement(node: Node, kube: FakeKube, clock: Clock,
                             config: MaintenanceConf) -> None:
    """web-1 is evicted; its budget refuses web-2 until the ReplicaSet's replacement (on n2)
    is ready; then web-2 goes too."""
    record = node.step(config)
    assert record.phase == decide.DRAINING
    assert record.reason == ("draining: 2 pod(s) left; eviction refused by a "
                             "PodDisruptionBudget for shop/web-2")
    clock.advance(5)
    kube.add_pod(FakePod("shop", "web-4", "n2", {"app": "web"}))
    assert node.step(config).reason == "draining: 1 pod(s) left"
    clock.advance(5)


def test_a_reboot_from_start_to_finish(node: Node, kube: FakeKube, clock: Clock) -> None:
    config = conf()
    assert node.step(config).phase == decide.IDLE
    assert node.metric("divingbell_reboot_required") == 0
    node.needs_reboot()
    drain_with_a_replacement(node, kube, clock, config)
    state = kube.node_state("n1")
    assert state.unschedulable
    assert state.annotations[decide.CORDONED_BY] == "divingbell-agent"
    old_boot = (node.host.proc_sys / "kernel/random/boot_id").read_text().strip()
    record = node.step(config)
    assert record.phase == decide.REBOOTING and node.reboots == ["reboot"]
    annotations = kube.node_state("n1").annotations
    assert annotations["divingbell.io/maintenance"] == "rebooting"
    assert annotations["divingbell.io/maintenance-boot-id"] == old_boot
    # DaemonSet, mirror and finished pods were never touched.
    assert kube.pod_names() == ["batch/report-1", "kube-system/etcd-n1",
                                "kube-system/proxy-n1", "shop/web-3", "shop/web-4"]
    assert node.metric("divingbell_drain_duration_seconds_sum") == 10

    clock.advance(90)
    node.boot()  # a new agent process after the reboot reads the record on the host
    kube.set_node_ready("n1", False)
    assert node.step(config, converged=False).phase == decide.VERIFYING
    clock.advance(20)
    kube.set_node_ready("n1", True)
    assert node.step(config, converged=False).phase == decide.VERIFYING  # own converge first
    record = node.step(config, converged=True)
    assert record.phase == decide.IDLE
    assert record.outcome.startswith("rebooted (reboot) at ")
    assert record.outcome.endswith("total 2m00s, drain 10s, reboot 1m30s, health 20s")
    state = kube.node_state("n1")
    assert not state.unschedulable and decide.CORDONED_BY not in state.annotations
    assert state.annotations["divingbell.io/maintenance"] == "idle"
    lease = kube.get_lease(NS, "divingbell-slot-default-0")
    assert lease is not None and lease.holder is None
    assert not node.host.path("/run/reboot-required").exists()
    assert events(kube, "n1") == ["SlotClaimed", "Cordoned", "Drained", "Rebooting", "Booted",
                                  "Uncordoned", "SlotReleased", "MaintenanceDone"]
    assert node.metric("divingbell_reboots_total") == 1
    assert node.metric("divingbell_maintenance_slot_held") == 0
    assert node.step(config).phase == decide.IDLE  # and nothing more to do


def test_a_cordon_someone_else_placed_stays(node: Node, kube: FakeKube, clock: Clock) -> None:
    kube.patch_node("n1", unschedulable=True)  # kubectl cordon: no divingbell record
    kube.delete_pod("shop", "web-1", 0)
    kube.delete_pod("shop", "web-2", 0)
    node.needs_reboot()
    config = conf()
    assert node.step(config).phase == decide.REBOOTING
    node.boot()
    assert node.step(config).phase == decide.IDLE
    assert kube.node_state("n1").unschedulable
    assert "Uncordoned" not in events(kube, "n1")
    assert "AlreadyCordoned" in events(kube, "n1")


def test_a_drain_that_times_out_is_aborted_and_says_what_blocks(
        node: Node, kube: FakeKube, clock: Clock) -> None:
    kube.add_budget("shop", "web", {"matchLabels": {"app": "web"}}, min_available=3)
    node.needs_reboot()
    config = conf()
    assert node.step(config).phase == decide.DRAINING
    clock.advance(599)
    assert node.step(config).phase == decide.DRAINING
    clock.advance(1)
    record = node.step(config)
    assert record.phase == decide.WAITING and record.slot is None
    assert record.reason.startswith("aborted, retrying after ")
    warning = next(e for e in kube.events("n1") if e["reason"] == "DrainTimeout")
    assert warning["type"] == "Warning"
    assert ("blocking: shop/web-1 (PodDisruptionBudget shop/web); shop/web-2 "
            "(PodDisruptionBudget shop/web)") in warning["message"]
    state = kube.node_state("n1")
    assert not state.unschedulable  # we cordoned it, so we lift it
    assert "shop/web-1" in state.annotations["divingbell.io/maintenance-outcome"]
    lease = kube.get_lease(NS, "divingbell-slot-default-0")
    assert lease is not None and lease.holder is None
    assert node.reboots == [] and node.metric("divingbell_drains_aborted_total") == 1
    clock.advance(1799)
    assert node.step(config).reason.startswith("retrying in 1s")
    clock.advance(1)
    assert node.step(config).phase == decide.DRAINING  # tries again


def test_a_drain_that_times_out_with_force_deletes_and_reboots(
        node: Node, kube: FakeKube, clock: Clock) -> None:
    kube.add_budget("shop", "web", {"matchLabels": {"app": "web"}}, min_available=3)
    node.needs_reboot()
    config = conf(drain={"timeout": "1m", "grace_period": "3s", "on_timeout": "force"})
    node.step(config)
    clock.advance(60)
    record = node.step(config)
    assert record.phase == decide.DRAINING and "forcing" in record.reason
    clock.advance(3)
    assert node.step(config).phase == decide.REBOOTING
    assert events(kube, "n1").count("DrainTimeout") == 1


def test_blockers_are_checked_before_any_lock(node: Node, kube: FakeKube,
                                              clock: Clock) -> None:
    kube.add_pod(FakePod("ops", "etcd-backup-1", "n1", {"app": "etcd-backup"},
                         owner_kind="Job"))
    node.needs_reboot()
    config = conf(blockers={"pods": {"selector": "app=etcd-backup"}})
    record = node.step(config)
    assert (record.phase, record.reason) == (decide.WAITING,
                                             "blocked by pod ops/etcd-backup-1")
    assert not [r for r in kube.sent if "leases" in r.path]
    kube.delete_pod("ops", "etcd-backup-1", 0)
    kube.sent.clear()
    assert node.step(config).phase == decide.WAITING  # asked a moment ago: not again yet
    assert not [r for r in kube.sent if "pods" in r.path]
    clock.advance(15)
    assert node.step(config).phase == decide.DRAINING


def test_outside_the_window_nothing_is_asked(node: Node, kube: FakeKube,
                                             clock: Clock) -> None:
    # 1_800_000_000 is 2027-01-15T08:00Z, a Friday morning.
    node.needs_reboot()
    config = conf(window={"days": ["sat", "sun"], "start": "01:00", "end": "05:00"},
                  blockers={"pods": {"selector": "app=etcd-backup"}})
    kube.sent.clear()
    record = node.step(config)
    assert record.reason == "outside the maintenance window (sat,sun 01:00-05:00 UTC)"
    assert not [r for r in kube.sent if "pods" in r.path or "leases" in r.path]
    assert node.metric("divingbell_reboot_required") == 1


def test_one_slot_two_nodes_the_second_waits(kube: FakeKube, clock: Clock,
                                             tmp_path: Path) -> None:
    first = Node("n1", tmp_path, kube, clock, LeaseSlots(kube, NS, clock))
    second = Node("n2", tmp_path, kube, clock, LeaseSlots(kube, NS, clock))
    for pod in ("web-1", "web-2", "web-3"):
        kube.delete_pod("shop", pod, 0)
    config = conf()
    first.needs_reboot()
    second.needs_reboot()
    assert first.step(config).phase == decide.REBOOTING
    record = second.step(config)
    assert record.phase == decide.WAITING
    assert record.reason.startswith("waiting for a slot in group 'default' (default/0 by n1 "
                                    "since ")
    first.boot()
    assert first.step(config).phase == decide.IDLE
    clock.advance(15)
    assert second.step(config).phase == decide.REBOOTING
    assert second.reboots == ["reboot"]


def test_a_reboot_that_does_not_happen_is_a_failure(node: Node, kube: FakeKube,
                                                    clock: Clock) -> None:
    kube.delete_pod("shop", "web-1", 0)
    kube.delete_pod("shop", "web-2", 0)
    node.needs_reboot()
    config = conf(health={"timeout": "5m"})
    assert node.step(config).phase == decide.REBOOTING
    clock.advance(299)
    assert node.step(config).phase == decide.REBOOTING
    clock.advance(1)
    record = node.step(config)
    assert record.phase == decide.WAITING
    assert record.outcome == "aborted: the host did not reboot within 5m00s (same boot id)"
    assert node.metric("divingbell_reboots_failed_total") == 1
    assert not kube.node_state("n1").unschedulable


def test_a_node_that_does_not_come_back_healthy_keeps_its_slot(
        node: Node, kube: FakeKube, clock: Clock) -> None:
    kube.delete_pod("shop", "web-1", 0)
    kube.delete_pod("shop", "web-2", 0)
    node.needs_reboot()
    config = conf(health={"timeout": "5m"}, slot_ttl="2m")
    node.step(config)
    node.boot()
    assert node.step(config, converged=False).phase == decide.VERIFYING
    for _ in range(10):  # five minutes of agent ticks, renewing the slot
        clock.advance(30)
        record = node.step(config, converged=False)
    assert record.phase == decide.FAILED
    assert "keeping the node cordoned and the slot default/0 held" in record.reason
    assert kube.node_state("n1").unschedulable
    other = LeaseSlots(kube, NS, clock).claim("default", "n2", 1, 120)
    assert other.slot is None  # the rollout stops here
    assert node.metric("divingbell_reboots_failed_total") == 1
    clock.advance(30)
    assert node.step(config, converged=True).phase == decide.IDLE  # recovered: finishes
    assert not kube.node_state("n1").unschedulable


def test_an_operator_request_triggers_and_is_cleared(node: Node, kube: FakeKube,
                                                    clock: Clock) -> None:
    for pod in ("web-1", "web-2"):
        kube.delete_pod("shop", pod, 0)
    config = conf()
    assert node.step(config).phase == decide.IDLE
    kube.patch_node("n1", annotations={REQUEST_ANNOTATION: "alice: firmware"})
    kube.sent.clear()
    assert node.step(config).phase == decide.IDLE  # the Node is read at most every 15s
    assert kube.sent == []
    clock.advance(15)
    record = node.step(config)
    assert record.trigger == "requested (alice: firmware)"
    node.boot()
    node.step(config)
    assert REQUEST_ANNOTATION not in kube.node_state("n1").annotations


def test_strategy_none_and_no_section_do_nothing(node: Node, kube: FakeKube) -> None:
    node.needs_reboot()
    kube.sent.clear()
    assert node.step(None).phase == decide.IDLE
    assert kube.sent == []  # no document section: not even an annotation
    assert node.step(conf(strategy="none")).phase == decide.IDLE


def test_firing_alerts_block_before_any_lock(node: Node, kube: FakeKube, clock: Clock,
                                             prometheus: str) -> None:
    assert alert_blockers(prometheus, "^Node") == ["alert NodeAlwaysFiring firing"]
    assert alert_blockers(prometheus, "NeverFiring") == []
    node.needs_reboot()
    blocked = conf(blockers={"alerts": {"prometheus": prometheus, "match": "^(Node|Etcd).*"}})
    record = node.step(blocked)
    assert record.reason == "blocked by alert NodeAlwaysFiring firing"
    assert not [r for r in kube.sent if "leases" in r.path]
    quiet = conf(blockers={"alerts": {"prometheus": prometheus, "match": "^Etcd"}})
    clock.advance(15)
    assert node.step(quiet).phase == decide.DRAINING


def test_an_unreachable_prometheus_blocks(node: Node) -> None:
    node.needs_reboot()
    record = node.step(conf(blockers={"alerts": {"prometheus": "http://127.0.0.1:9",
                                                 "timeout": "2s"}}))
    assert record.phase == decide.WAITING
    assert record.reason.startswith("blocked by unknown alerts (cannot read alerts from "
                                    "http://127.0.0.1:9/api/v1/alerts")


def test_maintenance_turned_off_mid_drain_undoes_the_cordon(node: Node, kube: FakeKube,
                                                            clock: Clock) -> None:
    kube.add_budget("shop", "web", {"matchLabels": {"app": "web"}}, min_available=3)
    node.needs_reboot()
    assert node.step(conf()).phase == decide.DRAINING
    record = node.step(conf(strategy="none"))
    assert record.phase == decide.WAITING
    assert record.outcome == ("aborted: maintenance is no longer enabled for this node in "
                              "the document")
    assert not kube.node_state("n1").unschedulable and node.reboots == []
    assert node.step(conf(strategy="none")).phase == decide.IDLE


def test_an_unreadable_record_starts_from_idle(node: Node) -> None:
    node.host.write_atomic("/var/lib/divingbell/maintenance.json", '{"phase": "exploding"}')
    assert node.sequence.load() == Record()
    node.host.write_atomic("/var/lib/divingbell/maintenance.json", "{not json")
    assert node.sequence.load() == Record()
    node.host.remove("/var/lib/divingbell/maintenance.json")
    node.needs_reboot()
    node.step(conf())
    saved = node.host.path("/var/lib/divingbell/maintenance.json")
    assert saved.stat().st_mode & 0o777 == 0o600  # the record is the node's own business


@pytest.mark.parametrize(("returncode", "phase"), [(-15, decide.REBOOTING),
                                                   (1, decide.WAITING), (127, decide.WAITING)])
def test_a_reboot_command_killed_by_its_own_shutdown_is_not_a_failure(
        kube: FakeKube, clock: Clock, tmp_path: Path, returncode: int, phase: str) -> None:
    from divingbell.core.errors import CommandError

    def reboot(strategy: str) -> None:
        raise CommandError(["systemctl", strategy, "--no-block"], returncode, "",
                           "Failed to connect to bus" if returncode == 1 else "")

    for pod in ("web-1", "web-2"):
        kube.delete_pod("shop", pod, 0)
    node = Node("n1", tmp_path, kube, clock, LeaseSlots(kube, NS, clock))
    node.sequence._reboot = reboot
    node.needs_reboot()
    record = node.step(conf())
    assert record.phase == phase
    if phase == decide.WAITING:
        assert record.outcome.startswith("aborted: the reboot command failed: ")
        assert "systemctl" in record.outcome
        assert not kube.node_state("n1").unschedulable
