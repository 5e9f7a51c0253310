"""The pure decisions of node maintenance, as tables with the clock at the edges."""

from __future__ import annotations

import datetime as dt

import pytest

from divingbell.core.document.schema import MaintenanceWindow
from divingbell.kube import BudgetView, PodView
from divingbell.maintenance import decide
from divingbell.maintenance.decide import Claim, SlotState

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    """An instant, written in UTC."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


NIGHT = MaintenanceWindow(days=["mon", "tue", "wed", "thu"], start="02:00", end="05:00",
                          timezone="Europe/Paris")
LATE = MaintenanceWindow(days=["fri"], start="22:00", end="04:00", timezone="Europe/Paris")
DST_GAP = MaintenanceWindow(start="02:00", end="03:30", timezone="Europe/Paris")
DST_FOLD = MaintenanceWindow(start="02:00", end="02:30", timezone="Europe/Paris")


@pytest.mark.parametrize(("window", "instant", "open_"), [
    # 2026-11-23 is a Monday; Paris is UTC+1 in winter.
    (NIGHT, "2026-11-23T00:59:59", False),   # 01:59:59 local
    (NIGHT, "2026-11-23T01:00:00", True),    # 02:00 local: opens
    (NIGHT, "2026-11-23T03:59:59", True),    # 04:59:59 local
    (NIGHT, "2026-11-23T04:00:00", False),   # 05:00 local: closed (end is exclusive)
    (NIGHT, "2026-11-27T01:30:00", False),   # Friday 02:30: not a window day
    (NIGHT, "2026-11-22T01:30:00", False),   # Sunday
    (None, "2026-11-22T01:30:00", True),     # no window: any time
    # Crossing midnight: opens Friday 22:00, runs into Saturday until 04:00.
    (LATE, "2026-11-27T20:59:00", False),    # Fri 21:59 local
    (LATE, "2026-11-27T21:00:00", True),     # Fri 22:00 local
    (LATE, "2026-11-27T23:30:00", True),     # Sat 00:30 local: yesterday's window
    (LATE, "2026-11-28T02:59:00", True),     # Sat 03:59 local
    (LATE, "2026-11-28T03:00:00", False),    # Sat 04:00 local
    (LATE, "2026-11-28T21:30:00", False),    # Sat 22:30: Saturday opens no window
    (LATE, "2026-11-26T23:30:00", False),    # Fri 00:30: Thursday opened none
    # Clocks go forward on 2026-03-29 at 02:00 CET -> 03:00 CEST: 02:xx never happens.
    (DST_GAP, "2026-03-29T00:59:00", False),  # 01:59 CET
    (DST_GAP, "2026-03-29T01:00:00", True),   # 03:00 CEST, the first instant after 02:00
    (DST_GAP, "2026-03-29T01:29:00", True),   # 03:29 CEST
    (DST_GAP, "2026-03-29T01:30:00", False),  # 03:30 CEST: closed; the window lasted 30 min
    # Clocks go back on 2026-10-25 at 03:00 CEST -> 02:00 CET: 02:xx happens twice.
    (DST_FOLD, "2026-10-25T00:00:00", True),   # 02:00 CEST, first time
    (DST_FOLD, "2026-10-25T00:30:00", False),  # 02:30 CEST
    (DST_FOLD, "2026-10-25T01:00:00", True),   # 02:00 CET, second time
    (DST_FOLD, "2026-10-25T01:29:59", True),   # 02:29:59 CET
    (DST_FOLD, "2026-10-25T01:30:00", False),  # 02:30 CET
])
def test_window(window: MaintenanceWindow | None, instant: str, open_: bool) -> None:
    assert decide.in_window(window, at(instant)) is open_


def test_describe_window() -> None:
    assert decide.describe_window(NIGHT) == "mon,tue,wed,thu 02:00-05:00 Europe/Paris"
    assert decide.describe_window(DST_GAP) == "every day 02:00-03:30 Europe/Paris"
    assert decide.describe_window(None) == "any time"


@pytest.mark.parametrize(("when", "required", "requested", "expected"), [
    (["reboot-required"], True, None, ["reboot-required"]),
    (["reboot-required"], False, "alice: firmware", []),
    (["requested"], True, "alice: firmware", ["requested (alice: firmware)"]),
    (["reboot-required", "requested"], True, "bob", ["reboot-required", "requested (bob)"]),
    ([], True, "bob", []),
])
def test_triggers(when: list[str], required: bool, requested: str | None,
                  expected: list[str]) -> None:
    assert decide.triggers(when, reboot_required=required, requested=requested) == expected


@pytest.mark.parametrize(("found", "window_open", "blockers", "retry_at", "go", "reason"), [
    ([], True, [], 0, False, "no reboot needed"),
    (["reboot-required"], True, [], 0, True, "reboot-required"),
    (["reboot-required"], False, [], 0, False, "outside the maintenance window (w)"),
    (["reboot-required"], True, ["pod a/b"], 0, False, "blocked by pod a/b"),
    (["reboot-required"], True, [], 130, False, "retrying in 30s after an aborted attempt"),
    # The window is judged before blockers, so no blocker is asked outside it.
    (["reboot-required"], False, ["alert X firing"], 0, False,
     "outside the maintenance window (w)"),
])
def test_gate(found: list[str], window_open: bool, blockers: list[str], retry_at: float,
              go: bool, reason: str) -> None:
    gate = decide.may_start(found, window_open=window_open, window="w", blockers=blockers,
                            retry_at=retry_at, now=100)
    assert (gate.go, gate.reason) == (go, reason)


def pod(name: str, labels: dict[str, str] | None = None, *, owner: str = "ReplicaSet",
        mirror: bool = False, phase: str = "Running", deleting: bool = False,
        namespace: str = "shop") -> PodView:
    return PodView(namespace, name, "n1", labels or {}, (owner,), mirror, phase, deleting)


def test_blocking_pods_and_alerts() -> None:
    pods = [pod("backup-1", {"app": "etcd-backup"}), pod("web", {"app": "web"}),
            pod("backup-old", {"app": "etcd-backup"}, phase="Succeeded"),
            pod("backup-going", {"app": "etcd-backup"}, deleting=True)]
    assert decide.blocking_pods(pods, "app=etcd-backup") == ["shop/backup-1"]
    alerts = [{"labels": {"alertname": "NodeDown"}, "state": "firing"},
              {"labels": {"alertname": "EtcdSlow"}, "state": "pending"},
              {"labels": {"alertname": "Watchdog"}, "state": "firing"},
              {"labels": {"alertname": "NodeDown"}, "state": "firing"}]
    assert decide.firing_alerts(alerts, "^(Node|Etcd).*") == ["NodeDown"]


NOW = 1000.0


@pytest.mark.parametrize(("slots", "expected"), [
    ([SlotState(0, False), SlotState(1, False)], Claim(0, "create")),
    ([SlotState(0, True, "n2", NOW + 10), SlotState(1, False)], Claim(1, "create")),
    ([SlotState(0, True, "n2", NOW + 10), SlotState(1, True, None)], Claim(1, "take")),
    ([SlotState(0, True, "n2", NOW + 10), SlotState(1, True, "n1", NOW + 10)],
     Claim(1, "renew")),
    ([SlotState(0, True, "n2", NOW + 10)], None),
    ([SlotState(0, True, "n2", NOW)], Claim(0, "takeover", "n2")),       # expired at NOW
    ([SlotState(0, True, "n2", NOW + 0.001)], None),                     # not quite
    # Still holding an expired slot nobody took: renew it rather than take another.
    ([SlotState(0, True, "n3", NOW - 1), SlotState(1, True, "n1", NOW - 5)],
     Claim(1, "renew")),
])
def test_plan_claim(slots: list[SlotState], expected: Claim | None) -> None:
    assert decide.plan_claim(slots, "n1", NOW) == expected


@pytest.mark.parametrize(("group_by", "labels", "group"), [
    (None, {"divingbell.io/rack": "r1"}, "default"),
    ("divingbell.io/rack", {"divingbell.io/rack": "r1"}, "r1"),
    ("divingbell.io/rack", {}, "default"),
])
def test_slot_group(group_by: str | None, labels: dict[str, str], group: str) -> None:
    assert decide.slot_group(group_by, labels) == group


def test_lease_names_are_valid_and_distinct() -> None:
    assert decide.lease_name("default", 0) == "divingbell-slot-default-0"
    odd = decide.lease_name("Rack_A/1", 2)
    assert odd.startswith("divingbell-slot-rack-a-1-") and odd.endswith("-2")
    assert decide.lease_name("rack-a-1", 2) != odd


@pytest.mark.parametrize(("unschedulable", "annotations", "who", "force", "go"), [
    (False, {}, "divingbell-agent", False, False),                       # nothing to lift
    (True, {decide.CORDONED_BY: "divingbell-agent"}, "divingbell-agent", False, True),
    (True, {}, "divingbell-agent", False, False),                        # kubectl cordon
    (True, {decide.CORDONED_BY: "alice"}, "divingbell-agent", False, False),
    (True, {decide.CORDONED_BY: "alice"}, "alice", False, True),
    (True, {decide.CORDONED_BY: "divingbell-agent"}, "bob", False, False),
    (True, {decide.CORDONED_BY: "alice"}, "bob", True, True),
    (True, {}, "bob", True, True),
])
def test_cordon_ownership(unschedulable: bool, annotations: dict[str, str], who: str,
                          force: bool, go: bool) -> None:
    assert decide.may_uncordon(unschedulable, annotations, who, force=force).go is go
    assert decide.should_cordon(unschedulable) is not unschedulable


def test_uncordon_refusal_says_who_and_why() -> None:
    gate = decide.may_uncordon(True, {decide.CORDONED_BY: "alice",
                                      decide.CORDON_REASON: "disk swap"}, "divingbell-agent")
    assert gate.reason == "cordoned by alice (reason: disk swap); use --force to lift it"


def test_what_a_drain_evicts() -> None:
    pods = [pod("web-1", {"app": "web"}), pod("web-2", {"app": "web"}, deleting=True),
            pod("proxy", owner="DaemonSet", namespace="kube-system"),
            pod("etcd", owner="Node", mirror=True, namespace="kube-system"),
            pod("job-1", {"app": "job"}, owner="Job", phase="Succeeded"),
            pod("cache", {"app": "cache"})]
    plan = decide.plan_eviction(pods)
    assert [p.ref for p in plan.evict] == ["shop/web-1", "shop/cache"]
    assert [p.ref for p in plan.terminating] == ["shop/web-2"]
    assert plan.skipped == [("kube-system/proxy", "DaemonSet pod"),
                            ("kube-system/etcd", "mirror (static) pod"),
                            ("shop/job-1", "finished (Succeeded)")]
    selected = decide.plan_eviction(pods, "app in (web)")
    assert [p.ref for p in selected.remaining] == ["shop/web-1", "shop/web-2"]
    assert ("shop/cache", "not selected by drain.pod_selector") in selected.skipped


def test_drain_timeout_names_pods_and_budgets() -> None:
    budgets = [BudgetView("shop", "web", {"matchLabels": {"app": "web"}}, 0),
               BudgetView("other", "web", {"matchLabels": {"app": "web"}}, 0),
               BudgetView("shop", "none", None, 0)]
    remaining = [pod("web-1", {"app": "web"}), pod("slow", {"app": "slow"}, deleting=True)]
    decision = decide.on_drain_timeout("abort", remaining, budgets, 900)
    assert decision.action == "abort"
    assert decision.blocking == [("shop/web-1", ["shop/web"]), ("shop/slow", [])]
    assert decision.message == (
        "drain timed out after 900s; blocking: shop/web-1 (PodDisruptionBudget shop/web); "
        "shop/slow (still terminating); aborting: uncordon if divingbell cordoned, release "
        "the slot, retry later")
    assert decide.on_drain_timeout("force", remaining, budgets, 60).message.endswith(
        "forcing: deleting them without the budget")


@pytest.mark.parametrize(("current", "new", "legal"), [
    (decide.IDLE, decide.WAITING, True), (decide.WAITING, decide.CORDONING, True),
    (decide.CORDONING, decide.DRAINING, True), (decide.DRAINING, decide.REBOOTING, True),
    (decide.REBOOTING, decide.VERIFYING, True), (decide.VERIFYING, decide.IDLE, True),
    (decide.VERIFYING, decide.FAILED, True), (decide.FAILED, decide.IDLE, True),
    (decide.IDLE, decide.CORDONING, True), (decide.DRAINING, decide.WAITING, True),
    (decide.REBOOTING, decide.WAITING, True), (decide.REBOOTING, decide.FAILED, False),
    (decide.IDLE, decide.REBOOTING, False), (decide.WAITING, decide.DRAINING, False),
    (decide.REBOOTING, decide.IDLE, False), (decide.FAILED, decide.WAITING, False),
])
def test_transitions(current: str, new: str, legal: bool) -> None:
    if legal:
        decide.check_transition(current, new)
    else:
        with pytest.raises(decide.IllegalTransition):
            decide.check_transition(current, new)


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59.6, "1m00s"), (61, "1m01s"),
                                               (3725, "1h02m")])
def test_durations_read_well(seconds: float, text: str) -> None:
    assert decide.describe_duration(seconds) == text
