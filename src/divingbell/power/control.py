"""Power verbs with confirmed outcomes.

A state is *confirmed* when the BMC reports it `confirm_reads` times in a row (so one stale or
lying answer cannot start an action); a change is *confirmed* the same way, read back with
backoff until a deadline. Nothing here ever acts on a state that is not confirmed, never
repeats an action, and never turns a failed read into "off" (MAAS's `--on-if-off` after a
transient error, Launchpad 1730089). Requests to one BMC are spaced by `min_interval`
(IPMI BMCs freeze after a burst). Time and sleep are injected, so the logic is tested without
waiting, and against real emulators with real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from divingbell.power.bmc import BOOT_DEVICES, OFF, ON, Action, Bmc, BmcError

VERBS: Final = ("status", "on", "off", "soft-off", "cycle")


@dataclass(frozen=True)
class Policy:
    min_interval: float = 1.0
    """Seconds between two requests to one BMC."""
    confirm_reads: int = 2
    """Consecutive identical reads that make a state confirmed."""
    max_reads: int = 6
    """Reads spent at most on confirming the state before acting."""
    timeout: float = 120.0
    """Seconds a change may take to be confirmed (soft-off: the OS shutting down)."""
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        if self.min_interval < 0 or self.timeout <= 0 or self.backoff_max <= 0:
            raise ValueError("power policy: intervals and timeout must be positive")
        if not 1 <= self.confirm_reads <= self.max_reads:
            raise ValueError("power policy: 1 <= confirm_reads <= max_reads")


@dataclass
class Outcome:
    verb: str
    ok: bool = False
    state: str | None = None
    """The last confirmed power state (None: never confirmed)."""
    before: str | None = None
    """The state confirmed before any action."""
    actions: list[str] = field(default_factory=list)
    """What was sent to the BMC, in order (`boot-once pxe`, `off`, `on`)."""
    requests: int = 0
    message: str = ""
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"verb": self.verb, "ok": self.ok, "state": self.state or "unknown",
                "before": self.before or "unknown", "actions": list(self.actions),
                "requests": self.requests, "message": self.message,
                "errors": self.errors[-5:]}


class Unconfirmed(Exception):
    pass


class Paced:
    """A BMC whose requests are at least `min_interval` apart (counting a request made before
    this one by another operation: `previous`, from the store's monotonic view)."""

    def __init__(self, bmc: Bmc, outcome: Outcome, min_interval: float,
                 sleep: Callable[[float], None], clock: Callable[[], float],
                 previous: float | None = None) -> None:
        self.bmc, self.outcome, self.min_interval = bmc, outcome, min_interval
        self.sleep, self.clock, self.last = sleep, clock, previous

    def _wait(self) -> None:
        if self.last is not None:
            remaining = self.last + self.min_interval - self.clock()
            if remaining > 0:
                self.sleep(remaining)
        self.last = self.clock()
        self.outcome.requests += 1

    def power_state(self) -> str:
        self._wait()
        return self.bmc.power_state()

    def power(self, action: Action) -> None:
        self._wait()
        self.outcome.actions.append(action)
        self.bmc.power(action)

    def boot_once(self, device: str) -> None:
        self._wait()
        self.outcome.actions.append(f"boot-once {device}")
        self.bmc.boot_once(device)


def confirm_state(bmc: Paced, policy: Policy) -> str:
    """The state the BMC reports `confirm_reads` times in a row within `max_reads` reads;
    Unconfirmed otherwise (errors and transitions break a streak)."""
    streak: tuple[str | None, int] = (None, 0)
    seen: list[str] = []
    for _ in range(policy.max_reads):
        try:
            state = bmc.power_state()
        except BmcError as exc:
            bmc.outcome.errors.append(str(exc))
            seen.append("error")
            streak = (None, 0)
            continue
        seen.append(state)
        streak = (state, streak[1] + 1) if state == streak[0] else (state, 1)
        if state in (ON, OFF) and streak[1] >= policy.confirm_reads:
            return state
    last_error = f"; last error: {bmc.outcome.errors[-1]}" if bmc.outcome.errors else ""
    raise Unconfirmed(f"the power state was not confirmed in {policy.max_reads} reads "
                      f"(read: {', '.join(seen)}{last_error})")


def await_state(bmc: Paced, wanted: str, policy: Policy) -> None:
    """Read back until `wanted` is confirmed, with backoff, until `policy.timeout`."""
    deadline = bmc.clock() + policy.timeout
    delay = max(policy.min_interval, 0.05)
    streak = 0
    last = "nothing"
    while True:
        try:
            state = bmc.power_state()
            last = state
        except BmcError as exc:
            bmc.outcome.errors.append(str(exc))
            state, last = "error", f"error ({exc})"
        streak = streak + 1 if state == wanted else 0
        if streak >= policy.confirm_reads:
            bmc.outcome.state = wanted
            return
        if bmc.clock() + delay > deadline:
            raise Unconfirmed(f"{wanted} not confirmed within {policy.timeout:g}s (last read: "
                              f"{last})")
        bmc.sleep(delay)
        # Backoff while the change has not shown; while it shows, confirm it promptly.
        delay = delay if streak else min(delay * 2, policy.backoff_max)


def run(bmc: Bmc, verb: str, boot_once: str | None = None, policy: Policy | None = None, *,
        previous_request: float | None = None, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Do `verb` (status, on, off, soft-off, cycle) through `bmc`, optionally setting the next
    boot to `boot_once` first. Never raises for the BMC's faults: the Outcome says what was
    confirmed, what was sent and why it stopped."""
    if verb not in VERBS:
        raise ValueError(f"verb: one of {', '.join(VERBS)}")
    if boot_once is not None and boot_once not in BOOT_DEVICES:
        raise ValueError(f"boot_once: one of {', '.join(BOOT_DEVICES)}")
    policy = policy or Policy()
    outcome = Outcome(verb)
    paced = Paced(bmc, outcome, policy.min_interval, sleep, clock, previous_request)
    try:
        before = confirm_state(paced, policy)
    except Unconfirmed as exc:
        outcome.message = f"{exc}: nothing sent to the BMC"
        return outcome
    outcome.before = outcome.state = before
    try:
        outcome.message = _act(paced, verb, before, boot_once, policy)
        outcome.ok = True
    except Unconfirmed as exc:
        sent = ", ".join(outcome.actions) or "nothing"
        outcome.message = f"sent {sent}; {exc}: stopped, nothing more sent"
        if outcome.actions:  # something was sent and not confirmed: the state is not known
            outcome.state = None
    except BmcError as exc:
        outcome.errors.append(str(exc))
        sent = ", ".join(outcome.actions)
        outcome.message = f"the BMC refused or did not answer {sent}: {exc}; nothing more sent"
        outcome.state = None  # after a failed command the state is not known any more
    return outcome


def _act(bmc: Paced, verb: str, before: str, boot_once: str | None, policy: Policy) -> str:
    if boot_once:
        bmc.boot_once(boot_once)
    next_boot = f"; next boot from {boot_once}" if boot_once else ""
    if verb == "status":
        return f"{before} (confirmed){next_boot}"
    if verb == "on":
        if before == ON:
            return f"already on: nothing sent{next_boot}"
        bmc.power("on")
        await_state(bmc, ON, policy)
        return f"off -> on (confirmed){next_boot}"
    if verb in ("off", "soft-off"):
        if before == OFF:
            return "already off: nothing sent"
        bmc.power("off" if verb == "off" else "soft-off")
        await_state(bmc, OFF, policy)
        return "on -> off (confirmed)"
    # cycle: off, confirmed, then on, confirmed; from a confirmed off, only on.
    if before == ON:
        bmc.power("off")
        await_state(bmc, OFF, policy)
    bmc.power("on")
    await_state(bmc, ON, policy)
    return (f"{'on -> off -> on' if before == ON else 'was off: off -> on'} "
            f"(each confirmed){next_boot}")
