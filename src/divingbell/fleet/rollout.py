"""Rollouts, decided by pure functions: who goes in which wave, who starts now, when to halt.

The service stores a rollout and each member's progress in its database and calls `step` whenever
something changed (a report arrived, an operator pressed a button, a timer fired). Nothing here
reads a clock, a database or the network: the caller passes `now` and the machines as they are.

Order, safest first: control-plane machines one at a time (and never while another control-plane
machine is unavailable: quorum first), then workers in waves of `max_unavailable`, rack by rack
when racks are known (a wave never spans two racks). Machines already unavailable for any reason
count against `max_unavailable`. The first failure beyond `max_failures` halts the rollout: no new
machine starts until an operator resumes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

_PERCENT = re.compile(r"^(\d{1,3})%$")


class Progress(StrEnum):
    """Where one machine is in a rollout."""

    PENDING = "pending"  # not reached yet: still served the previous revision
    UPDATING = "updating"  # served the new revision, not yet reported it converged
    DONE = "done"  # reported the new revision converged
    FAILED = "failed"  # reported the new revision failed


class Status(StrEnum):
    """A rollout's own state. Stable states change only on request."""

    RUNNING = "running"
    PAUSED = "paused"  # by an operator: nothing new starts
    HALTED = "halted"  # by a failure: nothing new starts until resumed
    COMPLETED = "completed"
    ABORTED = "aborted"


# Operator verbs and the states they are allowed from (anything else is a 409 for the API).
TRANSITIONS: Mapping[str, tuple[frozenset[Status], Status]] = {
    "pause": (frozenset({Status.RUNNING}), Status.PAUSED),
    "resume": (frozenset({Status.PAUSED, Status.HALTED}), Status.RUNNING),
    "abort": (frozenset({Status.RUNNING, Status.PAUSED, Status.HALTED}), Status.ABORTED),
}


class RolloutError(ValueError):
    """A request that does not fit the rollout's state or a policy value that is wrong."""


@dataclass(frozen=True)
class Member:
    """A machine as the rollout sees it."""

    id: str
    name: str
    control_plane: bool = False
    rack: str | None = None
    available: bool = True  # ready and reporting; degraded or silent machines are not


@dataclass(frozen=True)
class Policy:
    max_unavailable: int | str = 1  # a count, or a percentage of the workers such as "25%"
    max_failures: int = 0
    pause_seconds: float = 0.0  # wait between waves

    def __post_init__(self) -> None:
        parse_max_unavailable(self.max_unavailable)
        if self.max_failures < 0:
            raise RolloutError("max_failures: must be 0 or more")
        if not math.isfinite(self.pause_seconds) or self.pause_seconds < 0:
            raise RolloutError("pause_seconds: must be a finite number of seconds, 0 or more")


def parse_max_unavailable(value: int | str) -> tuple[int, bool]:
    """(number, is_percentage). Raises RolloutError naming the field."""
    if isinstance(value, bool):
        raise RolloutError("max_unavailable: must be a number or a percentage such as '25%'")
    if isinstance(value, int):
        if value < 1:
            raise RolloutError("max_unavailable: must be at least 1")
        return value, False
    text = str(value).strip()
    if text.isdigit():
        return parse_max_unavailable(int(text))
    match = _PERCENT.match(text)
    if not match or not 1 <= int(match.group(1)) <= 100:
        raise RolloutError(
            f"max_unavailable: {value!r} is not a number or a percentage from 1% to 100%")
    return int(match.group(1)), True


def wave_size(max_unavailable: int | str, workers: int) -> int:
    """How many workers may be unavailable at once. A percentage rounds down, but a rollout
    always moves: never less than one."""
    number, percentage = parse_max_unavailable(max_unavailable)
    if percentage:
        number = math.floor(workers * number / 100)
    return max(1, number)


def plan_waves(members: Iterable[Member], policy: Policy) -> list[list[str]]:
    """Member ids in waves. Deterministic: the same machines give the same waves."""
    members = list(members)
    control = sorted((m for m in members if m.control_plane), key=_order)
    workers = sorted((m for m in members if not m.control_plane), key=_order)
    waves: list[list[str]] = [[m.id] for m in control]
    size = wave_size(policy.max_unavailable, len(workers))
    racks: dict[str, list[Member]] = {}
    for member in workers:
        racks.setdefault(member.rack or "", []).append(member)
    for rack in sorted(racks, key=lambda name: (name == "", name)):
        in_rack = racks[rack]
        waves.extend([m.id for m in in_rack[i:i + size]] for i in range(0, len(in_rack), size))
    return waves


def _order(member: Member) -> tuple[str, str, str]:
    return (member.rack or "\uffff", member.name, member.id)


@dataclass(frozen=True)
class Failure:
    machine: str
    error: str


@dataclass(frozen=True)
class Rollout:
    """A rollout's decisive state, as the service stores it."""

    revision: int
    previous: Mapping[str, int | None]  # member id -> revision it was served before
    waves: Sequence[Sequence[str]]
    progress: Mapping[str, Progress]
    policy: Policy = field(default_factory=Policy)
    status: Status = Status.RUNNING
    gate: tuple[int, float] | None = None  # (wave index, not before): the pause between waves
    failures: Sequence[Failure] = ()
    rollback: bool = False

    @property
    def halt_reason(self) -> str | None:
        return self.describe_halt({})

    def describe_halt(self, names: Mapping[str, str]) -> str | None:
        """Why the rollout halted, naming the machine (by name, when known) and its error."""
        if self.status is not Status.HALTED or not self.failures:
            return None
        first = self.failures[min(self.policy.max_failures, len(self.failures) - 1)]
        who = f"{names[first.machine]} ({first.machine})" if first.machine in names else \
            first.machine
        return f"halted: {who} failed to converge revision {self.revision}: {first.error}"


@dataclass(frozen=True)
class Decision:
    """What the service must do now."""

    rollout: Rollout
    start: tuple[str, ...] = ()  # serve the new revision to these now
    wait_until: float | None = None  # nothing to start before this time (pause between waves)
    reason: str = ""


def start(revision: int, members: Iterable[Member], served: Mapping[str, int | None],
          policy: Policy) -> Rollout:
    """A new rollout of `revision` over `members`; `served` is what each is served now."""
    members = list(members)
    waves = plan_waves(members, policy)
    progress = {m.id: Progress.DONE if served.get(m.id) == revision else Progress.PENDING
                for m in members}
    return Rollout(revision=revision, previous={m.id: served.get(m.id) for m in members},
                   waves=waves, progress=progress, policy=policy)


def served_revision(rollout: Rollout, member: str) -> int | None:
    """The revision the service serves `member` under this rollout."""
    if member not in rollout.progress:
        return rollout.revision if rollout.status is not Status.ABORTED else None
    if rollout.status is Status.ABORTED and rollout.rollback:
        return rollout.previous.get(member)
    if rollout.progress[member] is Progress.PENDING:
        return rollout.previous.get(member)
    return rollout.revision


def record_report(rollout: Rollout, member: str, revision: int | None, converged: bool,
                  error: str = "") -> Rollout:
    """A member reported: the new revision converged (done) or failed. Reports of another
    revision (an old agent still settling) change nothing."""
    if rollout.progress.get(member) is not Progress.UPDATING or revision != rollout.revision:
        return rollout
    progress = dict(rollout.progress)
    if converged:
        progress[member] = Progress.DONE
        return replace(rollout, progress=progress)
    progress[member] = Progress.FAILED
    failures = (*rollout.failures, Failure(member, error or "converge failed"))
    return replace(rollout, progress=progress, failures=failures)


def act(rollout: Rollout, verb: str, *, rollback: bool = False) -> Rollout:
    """An operator's verb: pause, resume or abort. Resuming retries the failed machines."""
    if verb not in TRANSITIONS:
        raise RolloutError(f"unknown action {verb!r}; use pause, resume or abort")
    allowed, target = TRANSITIONS[verb]
    if rollout.status not in allowed:
        raise RolloutError(f"cannot {verb} a rollout that is {rollout.status.value}")
    if verb == "resume":
        progress = {member: Progress.UPDATING if state is Progress.FAILED else state
                    for member, state in rollout.progress.items()}
        return replace(rollout, status=target, progress=progress, failures=())
    return replace(rollout, status=target, rollback=rollback if verb == "abort" else False)


def step(rollout: Rollout, members: Mapping[str, Member], now: float) -> Decision:
    """Decide what happens next. Call after every report, verb or timer."""
    if rollout.status in (Status.PAUSED, Status.ABORTED, Status.COMPLETED):
        return Decision(rollout, reason=rollout.status.value)
    failed = [m for m, p in rollout.progress.items() if p is Progress.FAILED]
    if len(failed) > rollout.policy.max_failures:
        halted = replace(rollout, status=Status.HALTED)
        return Decision(halted, reason=halted.halt_reason or "halted")
    if rollout.status is Status.HALTED:
        return Decision(rollout, reason=rollout.halt_reason or "halted")

    wave_index = _current_wave(rollout)
    if wave_index is None:
        return Decision(replace(rollout, status=Status.COMPLETED), reason="completed")
    wave = rollout.waves[wave_index]
    in_flight = [m for m in wave if rollout.progress[m] is Progress.UPDATING]
    pending = [m for m in wave if rollout.progress[m] is Progress.PENDING]
    if not pending:
        return Decision(rollout, reason=f"wave {wave_index + 1}: waiting for {len(in_flight)} "
                        "machine(s) to report")

    started_in_wave = any(rollout.progress[m] is not Progress.PENDING for m in wave)
    if wave_index > 0 and not started_in_wave and rollout.policy.pause_seconds > 0:
        if rollout.gate is None or rollout.gate[0] != wave_index:
            rollout = replace(rollout, gate=(wave_index, now + rollout.policy.pause_seconds))
        assert rollout.gate is not None
        if now < rollout.gate[1]:
            return Decision(rollout, wait_until=rollout.gate[1],
                            reason=f"pause before wave {wave_index + 1}")

    control = all(members[m].control_plane for m in wave if m in members)
    unavailable = {m for m, member in members.items() if not member.available}
    unavailable |= {m for m, p in rollout.progress.items() if p is Progress.UPDATING}
    if control:
        others_down = [m for m in unavailable if m in members and members[m].control_plane
                       and m not in wave]
        if others_down:
            return Decision(rollout, reason="control plane: waiting until "
                            f"{', '.join(sorted(members[m].name for m in others_down))} "
                            "is available again")
        limit = 1
        unavailable = {m for m in unavailable if m in members and members[m].control_plane}
    else:
        workers = sum(1 for member in members.values() if not member.control_plane)
        limit = wave_size(rollout.policy.max_unavailable, workers)
        unavailable = {m for m in unavailable if m in members and not members[m].control_plane}

    if not control:
        # Workers already down that wait in a later wave go now: updating them costs nothing
        # (they count against the budget either way) and may repair them; otherwise one broken
        # machine would hold the budget and block the rollout that could fix it.
        later = [m for w in rollout.waves[wave_index + 1:] for m in w
                 if rollout.progress[m] is Progress.PENDING and m in unavailable]
        pending = pending + later
    to_start: list[str] = []
    for member in pending:
        if member in unavailable:  # already down: updating it costs nothing more
            to_start.append(member)
        elif len(unavailable) < limit:
            unavailable.add(member)
            to_start.append(member)
    if not to_start:
        return Decision(rollout, reason=f"wave {wave_index + 1}: {len(unavailable)} machine(s) "
                        f"unavailable, limit {limit}")
    progress = dict(rollout.progress)
    progress.update({m: Progress.UPDATING for m in to_start})
    return Decision(replace(rollout, progress=progress), start=tuple(to_start),
                    reason=f"wave {wave_index + 1}: starting {len(to_start)}")


def _current_wave(rollout: Rollout) -> int | None:
    for index, wave in enumerate(rollout.waves):
        if any(rollout.progress[m] in (Progress.PENDING, Progress.UPDATING) for m in wave):
            return index
    return None


def summary(rollout: Rollout) -> dict[str, int]:
    counts = {p.value: 0 for p in Progress}
    for state in rollout.progress.values():
        counts[state.value] += 1
    return counts
