"""Rollout decisions as tables: who is in which wave, who starts now, when the rollout halts."""

from __future__ import annotations

import pytest

from divingbell.fleet.rollout import (
    Decision,
    Member,
    Policy,
    Progress,
    Rollout,
    RolloutError,
    Status,
    act,
    plan_waves,
    record_report,
    served_revision,
    start,
    step,
    wave_size,
)


def fleet(*specs: str) -> dict[str, Member]:
    """'cp1', 'w3@r2' (rack r2), 'w4!' (unavailable): compact member specs."""
    members = {}
    for raw in specs:
        available = not raw.endswith("!")
        name, _, rack = raw.rstrip("!").partition("@")
        members[name] = Member(id=name, name=name, control_plane=name.startswith("cp"),
                               rack=rack or None, available=available)
    return members


@pytest.mark.parametrize(("value", "workers", "size"), [
    (1, 10, 1), (3, 10, 3), ("2", 10, 2), ("25%", 10, 2), ("25%", 3, 1), ("50%", 5, 2),
    ("100%", 7, 7), ("10%", 1, 1),
])
def test_wave_size_rounds_percentages_down_but_always_moves(value, workers, size):
    assert wave_size(value, workers) == size


@pytest.mark.parametrize("bad", [0, -1, "0%", "101%", "abc", "5 %", True, "1.5"])
def test_bad_max_unavailable_is_refused_with_the_field(bad):
    with pytest.raises(RolloutError, match="max_unavailable"):
        Policy(max_unavailable=bad)


@pytest.mark.parametrize(("specs", "policy", "waves"), [
    # control plane one at a time first, then workers by max_unavailable
    (("w1", "cp2", "w2", "cp1", "w3"), Policy(max_unavailable=2),
     [["cp1"], ["cp2"], ["w1", "w2"], ["w3"]]),
    # rack by rack: a wave never spans two racks; unknown racks last
    (("w1@r2", "w2@r1", "w3@r1", "w4", "w5@r2", "w6@r1"), Policy(max_unavailable=2),
     [["w2", "w3"], ["w6"], ["w1", "w5"], ["w4"]]),
    # a percentage of the workers: 4 workers at 50% -> waves of 2
    (("cp1", "w1", "w2", "w3", "w4"), Policy(max_unavailable="50%"),
     [["cp1"], ["w1", "w2"], ["w3", "w4"]]),
])
def test_waves(specs, policy, waves):
    assert plan_waves(fleet(*specs).values(), policy) == waves


def test_waves_are_deterministic_whatever_the_input_order():
    members = list(fleet("w3@a", "w1@b", "cp1", "w2@a").values())
    assert plan_waves(members, Policy()) == plan_waves(reversed(members), Policy())


def run(rollout: Rollout, members: dict[str, Member],
        now: float = 0.0) -> tuple[Rollout, Decision]:
    decision = step(rollout, members, now)
    return decision.rollout, decision


def test_control_plane_goes_one_at_a_time_then_workers_in_waves():
    members = fleet("cp1", "cp2", "w1", "w2", "w3")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_unavailable=2))
    rollout, decision = run(rollout, members)
    assert decision.start == ("cp1",)
    assert served_revision(rollout, "cp1") == 2 and served_revision(rollout, "cp2") == 1
    rollout, decision = run(rollout, members)
    assert decision.start == ()  # cp1 has not reported yet
    rollout = record_report(rollout, "cp1", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert decision.start == ("cp2",)
    rollout = record_report(rollout, "cp2", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert decision.start == ("w1", "w2")
    assert served_revision(rollout, "w3") == 1
    rollout = record_report(rollout, "w1", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert decision.start == ()  # waves do not overlap: w2 is still updating
    rollout = record_report(rollout, "w2", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert decision.start == ("w3",)
    rollout = record_report(rollout, "w3", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert rollout.status is Status.COMPLETED


def test_a_control_plane_machine_waits_while_another_is_unavailable():
    members = fleet("cp1", "cp2!", "w1")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy())
    rollout, decision = run(rollout, members)
    assert decision.start == ()
    assert "cp2" in decision.reason


def test_machines_already_unavailable_count_against_max_unavailable():
    members = fleet("w1", "w2", "w3", "w4!", "w5")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_unavailable=2))
    rollout, decision = run(rollout, members)
    # waves [w1 w2] [w3 w4] [w5]: w4 is down, so only one of the first wave may start (and
    # w4 itself is updated now: it is down anyway)
    assert decision.start == ("w1", "w4")
    assert rollout.progress["w2"] is Progress.PENDING


def test_an_unavailable_machine_in_the_wave_starts_without_using_the_budget():
    members = fleet("w1!", "w2", "w3")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_unavailable=2))
    rollout, decision = run(rollout, members)
    assert decision.start == ("w1", "w2")


def test_the_first_failure_halts_and_names_the_machine_and_its_error():
    members = fleet("w1", "w2", "w3", "w4", "w5", "w6")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_unavailable=2))
    rollout, decision = run(rollout, members)
    assert decision.start == ("w1", "w2")
    rollout = record_report(rollout, "w1", 2, converged=True)
    rollout = record_report(rollout, "w2", 2, converged=False, error="sysctl: kernel said no")
    rollout, decision = run(rollout, members)
    assert rollout.status is Status.HALTED and decision.start == ()
    assert "w2" in decision.reason and "kernel said no" in decision.reason
    for untouched in ("w3", "w4", "w5", "w6"):
        assert served_revision(rollout, untouched) == 1
    # still halted on the next report or timer
    rollout, decision = run(rollout, members, now=100)
    assert decision.start == () and rollout.status is Status.HALTED


def test_max_failures_lets_that_many_failures_through():
    members = fleet("w1", "w2", "w3")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_failures=1))
    rollout, _ = run(rollout, members)
    rollout = record_report(rollout, "w1", 2, converged=False, error="boom")
    rollout, decision = run(rollout, members)
    assert rollout.status is Status.RUNNING and decision.start == ("w2",)
    rollout = record_report(rollout, "w2", 2, converged=False, error="bang")
    rollout, decision = run(rollout, members)
    assert rollout.status is Status.HALTED and "w2" in decision.reason


def test_a_failure_mid_wave_lets_the_rest_of_the_wave_finish_but_starts_nothing_new():
    members = fleet("w1", "w2", "w3", "w4")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_unavailable=2))
    rollout, _ = run(rollout, members)
    rollout = record_report(rollout, "w1", 2, converged=False, error="x")
    rollout, _ = run(rollout, members)
    rollout = record_report(rollout, "w2", 2, converged=True)
    assert rollout.progress["w2"] is Progress.DONE
    rollout, decision = run(rollout, members)
    assert decision.start == () and rollout.status is Status.HALTED


def test_pause_then_resume():
    members = fleet("w1", "w2")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy())
    rollout, _ = run(rollout, members)
    rollout = act(rollout, "pause")
    rollout = record_report(rollout, "w1", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert decision.start == () and rollout.status is Status.PAUSED
    with pytest.raises(RolloutError, match="cannot pause a rollout that is paused"):
        act(rollout, "pause")
    rollout = act(rollout, "resume")
    rollout, decision = run(rollout, members)
    assert decision.start == ("w2",)


def test_resume_after_a_halt_retries_the_failed_machine():
    members = fleet("w1", "w2")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy())
    rollout, _ = run(rollout, members)
    rollout = record_report(rollout, "w1", 2, converged=False, error="x")
    rollout, _ = run(rollout, members)
    rollout = act(rollout, "resume")
    assert rollout.progress["w1"] is Progress.UPDATING and not rollout.failures
    rollout = record_report(rollout, "w1", 2, converged=True)
    rollout, decision = run(rollout, members)
    assert decision.start == ("w2",)


@pytest.mark.parametrize(("rollback", "served_w1", "served_w2"), [(False, 2, 1), (True, 1, 1)])
def test_abort_with_and_without_rollback(rollback, served_w1, served_w2):
    members = fleet("w1", "w2")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy())
    rollout, _ = run(rollout, members)
    rollout = record_report(rollout, "w1", 2, converged=True)
    rollout = act(rollout, "abort", rollback=rollback)
    rollout, decision = run(rollout, members)
    assert decision.start == () and rollout.status is Status.ABORTED
    assert served_revision(rollout, "w1") == served_w1
    assert served_revision(rollout, "w2") == served_w2
    with pytest.raises(RolloutError):
        act(rollout, "resume")


def test_pause_between_waves_waits_for_the_clock():
    members = fleet("w1", "w2")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(pause_seconds=60))
    rollout, decision = run(rollout, members, now=0)
    assert decision.start == ("w1",)
    rollout = record_report(rollout, "w1", 2, converged=True)
    rollout, decision = run(rollout, members, now=10)
    assert decision.start == () and decision.wait_until == 70
    rollout, decision = run(rollout, members, now=69.9)
    assert decision.start == ()
    rollout, decision = run(rollout, members, now=70)
    assert decision.start == ("w2",)


def test_machines_already_on_the_revision_are_done_and_reports_of_other_revisions_are_ignored():
    members = fleet("w1", "w2")
    rollout = start(2, members.values(), {"w1": 2, "w2": 1}, Policy())
    assert rollout.progress["w1"] is Progress.DONE
    rollout, decision = run(rollout, members)
    assert decision.start == ("w2",)
    stale = record_report(rollout, "w2", 1, converged=False, error="old")
    assert stale == rollout


def test_a_degraded_control_plane_machine_may_itself_be_updated():
    members = fleet("cp1!", "w1")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy())
    rollout, decision = run(rollout, members)
    assert decision.start == ("cp1",)


def test_a_degraded_worker_does_not_hold_back_the_control_plane():
    members = fleet("cp1", "w1!", "w2")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy())
    rollout, decision = run(rollout, members)
    assert decision.start == ("cp1",)


def test_a_worker_already_down_in_a_later_wave_is_updated_now_instead_of_blocking():
    members = fleet("w1", "w2", "w3!")
    rollout = start(2, members.values(), dict.fromkeys(members, 1), Policy(max_unavailable=1))
    rollout, decision = run(rollout, members)
    # w3 is down and holds the whole budget of 1: without pulling it forward, nothing could move
    assert decision.start == ("w3",)
