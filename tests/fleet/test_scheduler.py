"""The roles scheduler (pure) and the machine state machine (data)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from divingbell.fleet import states
from divingbell.fleet.scheduler import Candidate, node_labels, rack_of, schedule

T0 = datetime(2026, 1, 1)


def machine(n: int, *, roles: tuple[str, ...] = (), rack: str | None = None,
            pinned: bool = False, schedulable: bool = True) -> Candidate:
    return Candidate(f"m{n}", f"uuid-{n:03d}", T0 + timedelta(seconds=n), roles, pinned, rack,
                     schedulable)


def test_the_control_plane_is_all_or_nothing() -> None:
    assert schedule([machine(1), machine(2)], 3) == {}  # 2 of 3: nobody, not even workers
    assert schedule([machine(i) for i in range(3)], 3) == {
        "m0": ["control-plane"], "m1": ["control-plane"], "m2": ["control-plane"]}


def test_workers_only_once_the_control_plane_exists() -> None:
    decided = schedule([machine(i) for i in range(5)], 3)
    assert sorted(decided.items()) == [("m0", ["control-plane"]), ("m1", ["control-plane"]),
                                       ("m2", ["control-plane"]), ("m3", ["worker"]),
                                       ("m4", ["worker"])]
    existing = [machine(i, roles=("control-plane",)) for i in range(3)]
    assert schedule([*existing, machine(9)], 3) == {"m9": ["worker"]}


def test_a_missing_member_is_topped_up_alone() -> None:
    members = [machine(0, roles=("control-plane",)), machine(1, roles=("control-plane",)),
               machine(2, roles=("worker",))]
    # One of three is gone: just one more, not a full set again; the worker keeps its role.
    assert schedule([*members, machine(5), machine(6)], 3) == {"m5": ["control-plane"],
                                                               "m6": ["worker"]}
    # Nobody free yet: nothing changes, and no new worker joins a short control plane.
    assert schedule(members, 3) == {}


def test_control_plane_spreads_across_racks_and_is_deterministic() -> None:
    fleet = [machine(0, rack="r1"), machine(1, rack="r1"), machine(2, rack="r1"),
             machine(3, rack="r2"), machine(4, rack="r3"), machine(5, rack="r2")]
    decided = schedule(fleet, 3)
    control = sorted(m for m, roles in decided.items() if roles == ["control-plane"])
    assert control == ["m0", "m3", "m4"]  # one per rack, earliest in each
    assert schedule(list(reversed(fleet)), 3) == decided
    # Topping up prefers a rack without a member.
    members = [machine(0, rack="r1", roles=("control-plane",)),
               machine(3, rack="r2", roles=("control-plane",))]
    assert schedule([*members, machine(7, rack="r1"), machine(8, rack="r3")], 3)["m8"] == [
        "control-plane"]


def test_pinned_and_unschedulable_machines_are_never_picked() -> None:
    fleet = [machine(0, pinned=True, roles=("worker",)), machine(1, schedulable=False),
             machine(2), machine(3), machine(4)]
    decided = schedule(fleet, 3)
    assert "m0" not in decided and "m1" not in decided
    assert schedule([*fleet[:1], machine(2), machine(3)], 3) == {}  # 2 free: not enough
    pinned_control = [machine(0, pinned=True, roles=("control-plane",))]
    assert schedule([*pinned_control, machine(1), machine(2), machine(3)], 3) == {
        "m1": ["control-plane"], "m2": ["control-plane"], "m3": ["worker"]}


def test_roles_become_node_labels() -> None:
    assert node_labels(["worker"], "rack-2") == {"node-role.kubernetes.io/worker": "",
                                                 "divingbell.io/role": "worker",
                                                 "divingbell.io/rack": "rack-2"}
    assert node_labels([], None) == {}
    assert rack_of([{"chassis_id": "00:11:22:33:44:55", "chassis_name": None}]) == (
        "00-11-22-33-44-55")
    assert rack_of([{"chassis_name": "tor 1/a"}]) == "tor-1-a"
    assert rack_of([]) is None


def test_transitions_are_data_and_checked() -> None:
    assert set(states.TRANSITIONS) == set(states.STATES)
    for targets in states.TRANSITIONS.values():
        assert targets <= set(states.STATES)
    states.check_transition("discovered", "scheduled")
    states.check_transition("installing", "failed")
    with pytest.raises(states.TransitionError, match="'installing' cannot become 'ready'"):
        states.check_transition("installing", "ready")
    with pytest.raises(states.TransitionError):
        states.check_transition("decommissioned", "ready")
