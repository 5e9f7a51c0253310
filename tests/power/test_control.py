"""The decisions of `power/control.py` as a table: what the BMC answers, read by read, and
what may be sent. A scripted BMC and a fake clock (the logic is pure; the emulator tests in
test_power_fleet.py run the same code against real protocols and real time)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from divingbell.power.bmc import Action, BmcError, split_host_port
from divingbell.power.control import Policy, run

ERROR = "error"


@dataclass
class ScriptedBmc:
    """Answers power reads from `reads` (then repeats the last); records what it was sent."""

    reads: list[str]
    sent: list[str] = field(default_factory=list)
    fail_commands: bool = False
    _answers: Iterator[str] | None = None
    last: str = ""

    def power_state(self) -> str:
        if self._answers is None:
            self._answers = iter(self.reads)
        self.last = next(self._answers, self.last or self.reads[-1])
        if self.last == ERROR:
            raise BmcError("bmc: reading the power state: 503 busy")
        return self.last

    def power(self, action: Action) -> None:
        if self.fail_commands:
            raise BmcError("bmc: power: 500")
        self.sent.append(action)

    def boot_once(self, device: str) -> None:
        self.sent.append(f"boot-once {device}")

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


POLICY = Policy(min_interval=1.0, confirm_reads=2, max_reads=6, timeout=30.0, backoff_max=8.0)

CASES = {
    # name: (reads, verb, boot_once, ok, sent, final state)
    "status off": (["off", "off"], "status", None, True, [], "off"),
    "on from a confirmed off": (["off", "off", "off", "on", "on"], "on", None, True, ["on"],
                                "on"),
    "on when on sends nothing": (["on", "on"], "on", None, True, [], "on"),
    "a lie at the first read is outvoted": (["off", "on", "on"], "on", None, True, [], "on"),
    "errors only: nothing sent": ([ERROR], "cycle", None, False, [], None),
    "a transient 503 then agreement": ([ERROR, "on", "on", "off", "off"], "off", None, True,
                                       ["off"], "off"),
    "flapping never confirms: nothing sent": (["on", "off"] * 5, "off", None, False, [],
                                              None),
    "transitioning is not a state to act on": (["transitioning"], "on", None, False, [],
                                               None),
    "cycle from on: off confirmed, then on": (["on", "on", "off", "off", "on", "on"], "cycle",
                                              "pxe", True, ["boot-once pxe", "off", "on"],
                                              "on"),
    "cycle from off: only on": (["off", "off", "on", "on"], "cycle", None, True, ["on"], "on"),
    "cycle stops when off is never confirmed": (["on", "on", "on"], "cycle", None, False,
                                                ["off"], None),
    "a change that shows once then reverts is not confirmed": (
        ["on", "on", "off", "on"], "off", None, False, ["off"], None),
    "the read-back fails throughout: stop, no retry": (["on", "on", ERROR], "off", None, False,
                                                       ["off"], None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_power_decisions(name: str) -> None:
    reads, verb, boot_once, ok, sent, state = CASES[name]
    bmc = ScriptedBmc(list(reads))
    clock = Clock()
    outcome = run(bmc, verb, boot_once, POLICY, sleep=clock.sleep, clock=clock)
    assert (outcome.ok, bmc.sent, outcome.state) == (ok, sent, state), outcome.message
    assert outcome.requests <= POLICY.max_reads + 2 * (30 / 1 + 2) + len(sent)
    if not ok:
        assert outcome.message


def test_a_refused_command_leaves_the_state_unknown_and_sends_nothing_more() -> None:
    bmc = ScriptedBmc(["on", "on"], fail_commands=True)
    clock = Clock()
    outcome = run(bmc, "cycle", None, POLICY, sleep=clock.sleep, clock=clock)
    assert not outcome.ok and outcome.state is None and bmc.sent == []
    assert outcome.actions == ["off"] and "refused or did not answer" in outcome.message


def test_requests_are_paced_and_the_read_back_backs_off_within_the_deadline() -> None:
    bmc = ScriptedBmc(["on", "on"] + ["on"] * 100)  # off never shows
    clock = Clock()
    outcome = run(bmc, "off", None, POLICY, sleep=clock.sleep, clock=clock,
                  previous_request=-0.25)  # another command spoke to this BMC 0.25 s ago
    assert clock.sleeps[0] == pytest.approx(0.75)  # the first read waits out the interval
    assert not outcome.ok and "not confirmed within 30s" in outcome.message
    backoff = clock.sleeps[3:]
    assert backoff == sorted(backoff) and max(backoff) == POLICY.backoff_max
    assert clock.now <= 30 + POLICY.backoff_max + 2
    assert bmc.sent == ["off"]


def test_bad_verbs_and_devices_are_refused_before_the_bmc_is_asked() -> None:
    bmc = ScriptedBmc(["on"])
    with pytest.raises(ValueError, match="verb"):
        run(bmc, "reboot", None, POLICY)
    with pytest.raises(ValueError, match="boot_once"):
        run(bmc, "on", "usb", POLICY)
    assert bmc.last == ""


@pytest.mark.parametrize(("address", "expected"), [
    ("192.0.2.9", ("192.0.2.9", 623)),
    ("bmc-7.example:6230", ("bmc-7.example", 6230)),
    ("fd00::9", ("fd00::9", 623)),
    ("[fd00::9]:6230", ("fd00::9", 6230)),
])
def test_an_ipmi_address_is_a_host_and_a_port(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["bmc:x:623", "[bmc:x]:623", "[fd00::9]623", "a b:623"])
def test_a_colon_outside_an_ipv6_address_is_not_host_port(address: str) -> None:
    with pytest.raises(ValueError, match=r"is not HOST\[:PORT\]"):
        split_host_port(address)
