"""exec with real processes, chrooted into an overlay of this machine's root: order, args and
env, each rerun policy across applies on an injected clock, a timeout that kills a whole process
tree, failures, storage modes, and forgetting a script that left the document."""

from __future__ import annotations

import json
import stat
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from divingbell.commands.output import plan_text
from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node, plan_node
from divingbell.core.host import Host, interrupt
from divingbell.core.modules import IMPLEMENTED
from divingbell.core.modules.exec import STORE, Exec, decide, script_hash
from divingbell.core.modules.exec_schema import Script

pytestmark = pytest.mark.kernel


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setitem(IMPLEMENTED, "exec", Exec(clock=fake, grace=0.5))
    return fake


@pytest.fixture
def host(overlay_root: Path) -> Iterator[Host]:
    yield Host(root=overlay_root)


def doc(scripts: Mapping[str, Mapping[str, object]]) -> str:
    return "conf:\n  exec:\n" + textwrap.indent(json.dumps(scripts), "    ") + "\n"


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r")


def apply_interrupted(host: Host, text: str, started: Path) -> ApplyReport:
    """Apply, and set the event SIGTERM/SIGINT set once the script has created `started`."""

    def interrupt_once_started() -> None:
        while not started.exists():
            time.sleep(0.02)
        interrupt.set()

    signaller = threading.Thread(target=interrupt_once_started, daemon=True)
    signaller.start()
    try:
        return apply(host, text)
    finally:
        signaller.join()
        interrupt.clear()


def ran(report: ApplyReport) -> list[str]:
    return [c.target.removeprefix("script ") for c in report.applied if c.action == "set"]


LOG = "/tmp/exec-log"


def logger(tag: str, **extra: object) -> dict[str, object]:
    return {"data": f'#!/bin/sh\necho "{tag} $* $GREETING" >> {LOG}\necho out-{tag}\n',
            **extra}


def test_scripts_run_in_name_order_with_args_env_and_output(host: Host, clock: Clock) -> None:
    report = apply(host, doc({
        "020-second": logger("b"),
        "010-first": logger("a", args=["x", "y"], env={"GREETING": "hello"}),
    }))
    assert report.ok, report.as_dict()
    assert host.read_text(LOG) == "a x y hello\nb  \n"
    notes = "\n".join(n for r in report.results for n in r.notes)
    assert "script 010-first: exit 0" in notes and "stdout: out-a" in notes
    store = host.path(STORE)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE((store / "010-first").stat().st_mode) == 0o700
    env_file = store / "010-first.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.read_text() == "GREETING=hello\n"


def test_a_script_sees_its_absolute_stored_path_as_0(host: Host, clock: Clock) -> None:
    """Divingbell ran `./NNN-name`; divingbell runs the stored copy by its absolute path, so
    `$0` and `BASH_SOURCE` are `/var/lib/divingbell/exec/NNN-name` (documented), and the working
    directory is the store, so `./` paths still work. Both with and without a `#!` line."""
    report = apply(host, doc({
        "010-bash": {"data": '#!/bin/bash\necho "$0|${BASH_SOURCE[0]}|$PWD" >> /tmp/zero\n'},
        "020-plain": {"data": 'echo "$0||$PWD" >> /tmp/zero\n'},
    }))
    assert report.ok, report.as_dict()
    assert (host.read_text("/tmp/zero") or "").splitlines() == [
        f"{STORE}/010-bash|{STORE}/010-bash|{STORE}",
        f"{STORE}/020-plain||{STORE}",
    ]


def test_rerun_policies_across_applies(host: Host, clock: Clock) -> None:
    fail_once = ('#!/bin/sh\nif [ -e /tmp/ok ]; then exit 0; fi\ntouch /tmp/ok\n'
                 'echo not yet >&2\nexit 3\n')
    scripts = {
        "a-never": logger("never", rerun_policy="never"),
        "b-once": {"data": fail_once, "rerun_policy": "once_successfully",
                   "retry_interval": 600},
        "c-always": logger("always"),
        "d-hourly": logger("hourly", rerun_interval=3600),
        "e-infinite": logger("infinite", rerun_interval="infinite"),
    }
    first = apply(host, doc(scripts))
    assert ran(first) == ["a-never", "b-once", "c-always", "d-hourly", "e-infinite"]
    assert not first.ok and "script b-once: exit 3" in " ".join(first.errors)
    assert "stderr: not yet" in " ".join(first.errors)

    clock.now += 60
    assert ran(apply(host, doc(scripts))) == ["c-always"]  # b-once waits for retry_interval

    clock.now += 600
    second = apply(host, doc(scripts))
    assert ran(second) == ["b-once", "c-always"] and second.ok

    clock.now += 3600 * 24 * 365
    plan = plan_node(host, resolve(validate(load_text(doc(scripts))), "n1", {}))
    assert [c.target for c in plan.changes if c.changes_host] == [
        "script c-always", "script d-hourly"]
    reasons = {c.target: c.reason for c in plan.changes}
    assert "never again" in reasons["script e-infinite"]
    assert "succeeded at" in reasons["script b-once"]
    assert "ran once at" in reasons["script a-never"]
    shown = plan_text(plan)
    assert "script c-always" in shown and "script a-never" not in shown
    assert "never again" in plan_text(plan, verbose=True), "-v says why the rest wait"

    changed = dict(scripts, **{"a-never": logger("never", rerun_policy="never", args=["v2"])})
    assert "a-never" in ran(apply(host, doc(changed))), "a changed script is a new script"


NOW = 1_800_000_000.0
SCRIPT_DATA = "#!/bin/sh\ntrue\n"


def last_run(ended: str, ago: float) -> dict[str, object]:
    """A journal record of the last run of SCRIPT_DATA, as Exec writes it, `ago` seconds ago."""
    digest = script_hash(Script(data=SCRIPT_DATA))
    base: dict[str, object] = {"hash": digest, "ran_at": NOW - ago, "timed_out": False}
    records: dict[str, dict[str, object]] = {
        "exit 0": {"exit": 0, "seconds": 1.0},
        "exit 3": {"exit": 3, "seconds": 1.0},
        "timed out": {"exit": -15, "timed_out": True, "seconds": 5.0},
        # SIGTERM/SIGINT to divingbell: it killed the script's group and recorded the end.
        "interrupted": {"exit": -15, "interrupted": True, "seconds": 1.0},
        # Written before the script starts; divingbell was killed before the end was recorded.
        "no recorded end": {"exit": None},
        # The same, as journals written before interrupted runs were told apart.
        "no recorded end (older journal)": {"exit": None, "interrupted": True},
    }
    return {**base, **records[ended]}


@pytest.mark.parametrize(("policy", "ended", "runs", "why"), [
    ({"rerun_policy": "never"}, "exit 0", False, "ran once at"),
    ({"rerun_policy": "never"}, "exit 3", False, "(exit 3)"),
    ({"rerun_policy": "never"}, "timed out", False, "(timed out)"),
    ({"rerun_policy": "never"}, "interrupted", True, "an interrupted run does not count"),
    ({"rerun_policy": "never"}, "no recorded end", False, "it may have finished"),
    ({"rerun_policy": "never"}, "no recorded end (older journal)", False,
     "it may have finished"),
    ({"rerun_policy": "once_successfully", "retry_interval": 3600}, "exit 3", False,
     "next retry in"),
    ({"rerun_policy": "once_successfully", "retry_interval": 3600}, "interrupted", True,
     "an interrupted run does not count"),
    ({"rerun_policy": "once_successfully", "retry_interval": 3600}, "no recorded end", False,
     "last try no recorded end: next retry in"),
    ({"rerun_interval": 3600}, "exit 0", False, "next rerun in"),
    ({"rerun_interval": "infinite"}, "interrupted", True, "an interrupted run does not count"),
    ({"rerun_interval": 3600, "retry_interval": 3600}, "interrupted", True,
     "an interrupted run does not count"),
])
def test_an_interrupted_run_does_not_count(policy: dict[str, object], ended: str, runs: bool,
                                          why: str) -> None:
    """Pure: `decide` on a journal record, one minute after the run it records."""
    script = Script.model_validate({"data": SCRIPT_DATA, **policy})
    run, reason = decide(script, last_run(ended, ago=60), NOW)
    assert (run, why in reason) == (runs, True), reason


def test_an_interrupted_never_script_runs_on_the_next_apply(host: Host, clock: Clock) -> None:
    """A `never` script stopped by SIGTERM/SIGINT (here the event the signal handlers set) is
    planned again and says why; once it has run to its end it is never run again."""
    script = ('#!/bin/sh\nif [ -e /tmp/let-finish ]; then echo finished >> /tmp/exec-log; '
              'exit 0; fi\ntouch /tmp/started\nexec sleep 300\n')
    scripts = {"once": {"data": script, "rerun_policy": "never"}}
    stopped = apply_interrupted(host, doc(scripts), host.path("/tmp/started"))
    assert stopped.interrupted and ran(stopped) == ["once"]
    assert "script once: interrupted (SIGTERM/SIGINT)" in " ".join(stopped.errors)

    plan = plan_node(host, resolve(validate(load_text(doc(scripts))), "n1", {}))
    [change] = [c for c in plan.changes if c.target == "script once"]
    assert change.changes_host and change.before == "interrupted", change
    assert "script once: interrupted -> run" in plan_text(plan)
    assert "an interrupted run does not count, so it runs again" in change.reason

    host.path("/tmp/let-finish").touch()
    finished = apply(host, doc(scripts))
    assert ran(finished) == ["once"] and finished.ok, finished.as_dict()
    assert host.read_text(LOG) == "finished\n"
    plan = plan_node(host, resolve(validate(load_text(doc(scripts))), "n1", {}))
    assert not [c for c in plan.changes if c.changes_host], "run to its end, `never` holds"
    assert "rerun_policy never: ran once at" in plan_text(plan, verbose=True)


def test_a_script_that_ends_with_exit_0_despite_the_signal_has_run(
        host: Host, clock: Clock) -> None:
    """SIGTERM/SIGINT came while a `never` script ran, and the script handled TERM by
    finishing its work and exiting 0: that run counts, so it is not run a second time."""
    script = (f"#!/bin/sh\ntrap 'echo finished >> {LOG}; exit 0' TERM\ntouch /tmp/started\n"
              "while :; do sleep 0.05; done\n")
    scripts = {"once": {"data": script, "rerun_policy": "never"}}
    report = apply_interrupted(host, doc(scripts), host.path("/tmp/started"))
    assert ran(report) == ["once"] and host.read_text(LOG) == "finished\n"
    assert "script once: exit 0" in " ".join(
        note for result in report.results for note in result.notes), report.as_dict()
    plan = plan_node(host, resolve(validate(load_text(doc(scripts))), "n1", {}))
    assert not [c for c in plan.changes if c.changes_host], plan_text(plan, verbose=True)
    assert "rerun_policy never: ran once at" in plan_text(plan, verbose=True)


def test_timeout_kills_the_whole_process_group(host: Host, clock: Clock) -> None:
    marker = "divingbell-exec-timeout-test"
    script = (f"#!/bin/bash\ntrap '' TERM\n(exec -a {marker} sleep 300) &\n"
              f"exec -a {marker} sleep 300\n")
    report = apply(host, doc({"slow": {"data": script, "timeout": 1}}))
    assert not report.ok
    assert "timed out after 1s (process group killed)" in " ".join(report.errors)
    left = subprocess.run(["pgrep", "-f", marker], check=False, capture_output=True, text=True)
    assert left.stdout == "", f"left running: {left.stdout}"
    state = json.loads(host.read_text("/var/lib/divingbell/journal.json") or "{}")
    assert state["modules"]["exec"]["state"]["scripts"]["slow"]["timed_out"] is True


def test_halt_on_failure_skips_later_scripts(host: Host, clock: Clock) -> None:
    halting: dict[str, object] = {"data": "#!/bin/sh\nexit 1\n",
                                  "blocking_policy": "foreground_halt_pod_on_failure"}
    report = apply(host, doc({"1-fails": halting, "2-later": logger("later")}))
    assert not report.ok and ran(report) == ["1-fails"]
    assert host.read_text(LOG) is None
    going_on = dict(halting, blocking_policy="foreground")
    report = apply(host, doc({"1-fails": going_on, "2-later": logger("later")}))
    assert not report.ok and ran(report) == ["1-fails", "2-later"]


def test_removed_script_is_forgotten_not_reverted(host: Host, clock: Clock) -> None:
    assert apply(host, doc({"fix": logger("fix", rerun_interval="infinite")})).ok
    plan = plan_node(host, resolve(validate(load_text("conf: {}\n")), "n1", {}))
    (change,) = plan.changes
    assert "not reverted" in change.reason
    assert apply(host, "conf: {}\n").ok
    assert not host.path(f"{STORE}/fix").exists()
    assert host.read_text(LOG) == "fix  \n", "what it did stays"
    again = apply(host, doc({"fix": logger("fix", rerun_interval="infinite")}))
    assert ran(again) == ["fix"], "forgotten: it is a new script again"


def test_bad_input(host: Host) -> None:
    from divingbell.core.errors import DocumentError

    for bad, message in ((
        {"a.sh": {"data": "x", "rerun_policy": "sometimes"}}, "rerun_policy"),
        ({"a.sh": {"data": "x", "rerun_interval": 5}}, "at least 60"),
        ({"../a": {"data": "x"}}, "cannot name a file"),
    ):
        with pytest.raises(DocumentError) as err:
            validate(load_text(doc(bad)))
        assert message in str(err.value)
