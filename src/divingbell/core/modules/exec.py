"""exec: operators' one-off host fixes, run in name order with a memory of what ran.

- Each script is stored under /var/lib/divingbell/exec (directory 0700, script 0700, env 0600)
  and run from there, chrooted into the host root, with its args and env; stdout and stderr go
  into the run's report.
- The journal keeps, per script, its content hash, last exit and last run time. A changed script
  (data, args or env) is a new script. `never` runs once ever; `once_successfully` retries
  (every `retry_interval`, or every apply) until it exits 0; `always` reruns on every apply, or
  every `rerun_interval` seconds, and `rerun_interval: infinite` means never again; after a
  failure, `retry_interval` (if given) paces its reruns instead. Settings that contradict the
  policy are refused when the document is validated.
- An interrupted run does not count as a run, whatever the policy: divingbell got SIGTERM or
  SIGINT while the script ran and killed its process group, so it never finished, and the next
  apply runs it again at once (as Divingbell, which recorded an exit only when a script ended).
  A run whose end was never recorded (divingbell itself was killed) is different: it may have
  finished, or still be running, so it counts as a run that did not succeed.
- Scripts run with their stored directory as the working directory (`./helper` works), by
  their absolute stored path: `$0` is `/var/lib/divingbell/exec/NNN-name` (Divingbell's was
  `./NNN-name`).
- A timeout kills the script's whole process group: TERM, then KILL after a grace period.
- A failing script fails the run; the run is not rolled back (a script's effects are its own).
  `foreground_halt_pod_on_failure` also skips the scripts after it.
- A script that leaves the document is forgotten and its stored copy deleted; nothing it did is
  reverted.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from divingbell.core.engine.change import NONE, Action, Change
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.errors import OutcomeFailed
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.exec_schema import ExecConf, Script

STORE = "/var/lib/divingbell/exec"
OUTPUT_TAIL = 2000  # characters of each stream kept in the report


def script_hash(script: Script) -> str:
    material = json.dumps({"data": script.data, "args": script.args, "env": script.env},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


INTERRUPTED = "interrupted"
NO_RECORDED_END = "no recorded end"


def ending(last: dict[str, Any]) -> str:
    """How the recorded run ended, in the words plan shows."""
    if last.get("exit") is None:
        # Only the record written before the script starts lacks an exit: divingbell died
        # (SIGKILL, power) before the run's end reached the journal.
        return NO_RECORDED_END
    if last.get("interrupted"):
        return INTERRUPTED
    if last.get("timed_out"):
        return "timed out"
    return f"exit {last['exit']}"


def decide(script: Script, last: dict[str, Any] | None, now: float) -> tuple[bool, str]:
    """Whether `script` runs now, and why (or why not). Pure: the clock comes in as `now`."""
    digest = script_hash(script)
    if last is None:
        return True, "new script"
    if last.get("hash") != digest:
        return True, "the script changed (data, args or env): a new script"
    ran = float(last.get("ran_at", 0))
    ended = ending(last)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ran))
    if ended == INTERRUPTED:
        return True, (f"the run started at {when} was interrupted (SIGTERM/SIGINT killed its "
                      "process group before it ended): an interrupted run does not count, so "
                      "it runs again")
    if script.rerun_policy == "never":
        if ended == NO_RECORDED_END:
            return False, (f"rerun_policy never: started at {when}, and divingbell was killed "
                           "before recording how it ended (it may have finished), so it is not "
                           "run again")
        return False, f"rerun_policy never: ran once at {when} ({ended})"
    if script.rerun_policy == "once_successfully":
        if last.get("exit") == 0 and not last.get("timed_out"):
            return False, f"once_successfully: succeeded at {when}"
        return _due(script.retry_interval, ran, now, f"once_successfully: last try {ended}",
                    "retry")
    if script.retry_interval is not None and (last.get("exit") != 0 or last.get("timed_out")):
        # `always` with a failed last run: retry_interval paces the retries.
        return _due(script.retry_interval, ran, now, f"always: last run {ended}", "retry")
    return _due(script.rerun_interval, ran, now, "always", "rerun")


def _due(interval: int | str | None, ran: float, now: float, what: str, verb: str
         ) -> tuple[bool, str]:
    if interval is None:
        return True, f"{what}: {verb} on every apply"
    if interval == "infinite":
        return False, f"{what}: {verb}_interval is infinite, so never again"
    assert isinstance(interval, int)
    if now - ran >= interval:
        return True, f"{what}: {interval}s since the last run have passed"
    return False, f"{what}: next {verb} in {int(interval - (now - ran))}s"


@dataclass(frozen=True)
class RunScript:
    name: str
    script: Script
    digest: str


@dataclass(frozen=True)
class ForgetScript:
    name: str


@dataclass(frozen=True)
class ExecObserved:
    now: float


class Exec(HostModule["ExecConf", ExecObserved]):
    name = "exec"

    def __init__(self, clock: Callable[[], float] = time.time, grace: float = 10.0) -> None:
        self._clock = clock
        self._grace = grace

    def observe(self, host: Host, desired: ExecConf | None, record: ModuleRecord
                ) -> ExecObserved:
        return ExecObserved(self._clock())

    def plan(self, desired: ExecConf | None, observed: ExecObserved, record: ModuleRecord
             ) -> list[Change]:
        scripts = desired.root if desired else {}
        state: dict[str, Any] = record.state.get("scripts", {})
        changes = []
        for name in sorted(scripts):
            script = scripts[name]
            last = state.get(name)
            run, why = decide(script, last, observed.now)
            before = None if last is None else ending(last)
            changes.append(Change(self.name, f"script {name}", Action.SET if run else Action.NOOP,
                                  before, "run" if run else None, why,
                                  payload=RunScript(name, script, script_hash(script)),
                                  disruption=script.disruption if run else NONE))
        for name in sorted(set(state) - set(scripts)):
            changes.append(Change(
                self.name, f"script {name}", Action.DELETE, "stored", None,
                "left the document: forgotten and its stored copy deleted; what it did on "
                "the host stays (scripts are not reverted)", payload=ForgetScript(name)))
        return changes

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> list[str]:
        if isinstance(change.payload, ForgetScript):
            name = change.payload.name
            host.remove(f"{STORE}/{name}")
            host.remove(f"{STORE}/{name}.env")
            record.state["scripts"] = {k: v for k, v in record.state.get("scripts", {}).items()
                                       if k != name}
            return []
        step: RunScript = change.payload
        return self._run(host, step, record)

    def _run(self, host: Host, step: RunScript, record: ModuleRecord) -> list[str]:
        script = step.script
        path = f"{STORE}/{step.name}"
        host.write_atomic(path, script.data, 0o700, dir_mode=0o700)
        host.write_atomic(f"{path}.env", "".join(f"{k}={shlex.quote(v)}\n"
                                                 for k, v in script.env.items()),
                          0o600, dir_mode=0o700)
        argv = [path, *script.args] if script.data.startswith("#!") else ["/bin/sh", path,
                                                                           *script.args]
        started = self._clock()
        # Recorded as started before it starts: if divingbell is killed mid-script, the journal
        # still says it ran (with no exit), so `never` does not run twice a script that may have
        # finished or may still be running (and once_successfully retries it).
        scripts = dict(record.state.get("scripts", {}))
        scripts[step.name] = {"hash": step.digest, "exit": None, "ran_at": started,
                              "timed_out": False}
        record.state["scripts"] = scripts
        record.save_intent()
        # From its own stored directory: Divingbell's scripts use ./ relative paths.
        done = host.run_script(argv, env=script.env, timeout=script.timeout, grace=self._grace,
                               cwd=STORE)
        scripts = dict(record.state.get("scripts", {}))
        scripts[step.name] = {"hash": step.digest, "exit": done.returncode, "ran_at": started,
                              "timed_out": done.timed_out, "seconds": round(done.seconds, 3)}
        # A script that still ended with exit 0 (it ignored TERM, or ended as the signal came)
        # ran to its end: that is a run, or a one-shot script would run twice.
        cut_short = done.interrupted and done.returncode != 0
        if cut_short:
            scripts[step.name]["interrupted"] = True
        record.state["scripts"] = scripts
        outcome = ("interrupted (SIGTERM/SIGINT): its process group was killed"
                   if cut_short else
                   f"timed out after {script.timeout}s (process group killed)" if done.timed_out
                   else f"exit {done.returncode}")
        note = f"script {step.name}: {outcome} in {done.seconds:.2f}s"
        for label, text in (("stdout", done.stdout), ("stderr", done.stderr)):
            if text.strip():
                note += f"\n  {label}: {_tail(text)}"
        if done.timed_out or cut_short or done.returncode != 0:
            raise OutcomeFailed(self.name, [note], halt=(
                script.blocking_policy == "foreground_halt_pod_on_failure"))
        return [note]

    def undo_setting(self, host: Host, change: Change) -> None:
        """A script's effects are its own: nothing to undo."""


def _tail(text: str) -> str:
    text = text.rstrip("\n")
    if len(text) > OUTPUT_TAIL:
        text = "…" + text[-OUTPUT_TAIL:]
    return text.replace("\n", "\n    ")
