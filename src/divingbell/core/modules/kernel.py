"""kernel: command-line parameters, booted once on trial, then committed (last-known-good).

GRUB reads the parameters from its environment block at every boot, so a new command line can
be tried for one boot while the default stays the last one known to work:

- divingbell's drop-in `/etc/default/grub.d/divingbell.cfg` appends `${divingbell_cmdline}` to
  GRUB_CMDLINE_LINUX, and its script `/etc/grub.d/01_divingbell` (run after Debian's
  00_header, which loads /boot/grub/grubenv) sets that variable when GRUB starts: to
  `divingbell_try` once (cleared with `save_env` before it boots, as `grub-reboot`'s
  `next_entry` is), otherwise to `divingbell_good`. `update-grub` (chrooted under --root)
  writes both into grub.cfg; after that only the environment block changes (`grub-editenv`).
- Applying new parameters sets `divingbell_try` (with `panic=N`, so a panic reboots by itself)
  and records the trial in `/var/lib/divingbell/kernel-trial.json`; the default stays.
- After the reboot the agent (`settle_trial`) commits the tried line as `divingbell_good` once
  the node is healthy, or reverts: the machine came back on the good line (the try did not
  boot), or was not healthy within the trial's timeout (it then reboots onto the good line).
  A reverted line is held: while the document asks for the same parameters the plan keeps the
  good line and says so (`reverted`); other parameters are tried afresh.

Removal deletes the drop-in and the script, runs `update-grub` and clears divingbell's
variables: the distribution's own line is the known-good one. Nothing takes effect before the
next boot: every change of the boot line is a `reboot`.

`observe` reads both sides: what the running kernel booted with (`/proc/cmdline`, the parent of
--proc-sys) and what GRUB boots next (grub.cfg's default entry with the environment block's
line). So the plan shows drift in the boot configuration and a reboot still pending.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from divingbell.core.engine.change import NONE, REBOOT, Action, Change
from divingbell.core.engine.files import FileSpec, is_file_change, plan_file, undo_file
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.errors import CommandError, ModuleError
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.kernel_schema import KernelConf

DROPIN = "/etc/default/grub.d/divingbell.cfg"
SCRIPT = "/etc/grub.d/01_divingbell"
GRUB_CFG = "/boot/grub/grub.cfg"
GRUBENV = "/boot/grub/grubenv"
UPDATE_GRUB = "/usr/sbin/update-grub"
REBOOT_REQUIRED = "/run/reboot-required"
TRIAL_FILE = "/var/lib/divingbell/kernel-trial.json"
BOOT_CONFIG = "boot configuration"
RUNNING = "running kernel"
VARIABLE = "${divingbell_cmdline}"
GOOD, TRY = "divingbell_good", "divingbell_try"
DROPIN_TEXT = (
    MANAGED_LINE + "\n"
    "# The kernel parameters of the divingbell document (conf.kernel) come from GRUB's\n"
    "# environment block at boot (see /etc/grub.d/01_divingbell); update-grub reads this.\n"
    'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX \\${divingbell_cmdline}"\n'
)
SCRIPT_TEXT = (
    "#!/bin/sh\n"
    + MANAGED_LINE + "\n"
    "# After 00_header's load_env: a line on trial boots once (cleared before it boots, as\n"
    "# grub-reboot's next_entry is), otherwise the last-known-good line.\n"
    "cat <<'EOF'\n"
    'if [ "${divingbell_try}" ] ; then\n'
    '  set divingbell_cmdline="${divingbell_try}"\n'
    "  set divingbell_try=\n"
    "  save_env divingbell_try\n"
    "else\n"
    '  set divingbell_cmdline="${divingbell_good}"\n'
    "fi\n"
    "EOF\n"
)
UPDATE_GRUB_TIMEOUT = 300


def tokens(conf: KernelConf | None) -> list[str]:
    """The document's parameters as they go on the boot line, in document order."""
    if conf is None:
        return []
    return [f"{name}={value}" for name, value in conf.cmdline.items()] + list(conf.flags)


def try_line(params: list[str], panic: int) -> list[str]:
    """The line booted on trial: with `panic=N` (unless the document sets one), so a kernel
    panic reboots by itself, onto the last-known-good line."""
    if panic <= 0 or any(param_name(p) == "panic" for p in params):
        return list(params)
    return [*params, f"panic={panic}"]


def param_name(token: str) -> str:
    return token.partition("=")[0]


def managed(params: list[str], names: set[str]) -> list[str]:
    """The parameters of a boot line that divingbell manages, sorted."""
    return sorted(p for p in params if param_name(p) in names)


# grub.cfg --------------------------------------------------------------------------------------

_MENUENTRY = re.compile(r"""^\s*(menuentry|submenu)\s+(?:'([^']*)'|"([^"]*)"|(\S+))(.*)$""")
_ENTRY_ID = re.compile(r"""\$menuentry_id_option\s+'([^']*)'|--id\s+'?([^'\s]+)'?""")
_SET_DEFAULT = re.compile(r"""^\s*set\s+default=["']?([^"'\s]*)["']?\s*$""")


@dataclass(frozen=True)
class BootEntry:
    title: str
    params: list[str]  # the `linux` line after the kernel image


@dataclass
class _Entry:
    title: str
    entry_id: str
    params: list[str] | None
    children: list[_Entry]


def _parse_entries(text: str) -> list[_Entry]:
    top: list[_Entry] = []
    stack: list[_Entry] = []
    depth_of: list[int] = []
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        match = _MENUENTRY.match(line)
        if match:
            title = match[2] if match[2] is not None else match[3] or match[4] or ""
            found = _ENTRY_ID.search(match[5])
            entry = _Entry(title, (found[1] or found[2]) if found else "",
                           None if match[1] == "submenu" else [], [])
            (stack[-1].children if stack else top).append(entry)
            stack.append(entry)
            depth_of.append(depth)
        elif stack and stack[-1].params is not None and re.match(r"^(linux|linuxefi)\s", stripped):
            stack[-1].params = stripped.split()[2:]
        depth += line.count("{") - line.count("}")
        while stack and depth <= depth_of[-1]:
            stack.pop()
            depth_of.pop()
    return top


def _default_name(text: str, grubenv: str | None) -> str:
    """The `set default=` GRUB ends up with when no one-time entry is set (grub-reboot)."""
    chosen = "0"
    for line in text.splitlines():
        match = _SET_DEFAULT.match(line)
        if match and match[1] != "${next_entry}":
            chosen = match[1]
    if chosen == "${saved_entry}":
        saved = re.search(r"^saved_entry=(.*)$", grubenv or "", re.MULTILINE)
        chosen = saved[1] if saved and saved[1] else "0"
    return chosen


def default_entry(text: str, grubenv: str | None = None) -> BootEntry | None:
    """The entry GRUB boots by default: `set default` as a number, `N>M` into a submenu, or an
    entry's id or title; the first entry when nothing matches."""
    entries = _parse_entries(text)
    name = _default_name(text, grubenv)
    level = entries
    found: _Entry | None = None
    for part in name.split(">"):
        found = None
        if part.isdigit():
            found = level[int(part)] if int(part) < len(level) else None
        else:
            found = next((e for e in level if part in (e.entry_id, e.title)), None)
        if found is None:
            break
        level = found.children
    while found is not None and found.params is None and found.children:
        found = found.children[0]
    if found is None or found.params is None:
        found = next((e for e in _flatten(entries) if e.params is not None), None)
    return None if found is None or found.params is None else BootEntry(found.title,
                                                                        found.params)


def _flatten(entries: list[_Entry]) -> list[_Entry]:
    return [x for e in entries for x in (e, *_flatten(e.children))]


# the environment block and the trial record ----------------------------------------------------

def parse_grubenv(text: str | None) -> dict[str, str]:
    """grub-editenv's block: `name=value` lines after the header, `#` padding to 1024 bytes."""
    values: dict[str, str] = {}
    for line in (text or "").splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        values[name] = value
    return values


@dataclass
class Trial:
    """A line booted once on trial, not yet committed or reverted."""

    params: list[str]
    boot_id: str  # the boot it was set from: another boot id means the machine has rebooted
    at: float
    timeout: float  # how long the tried boot has to become healthy
    booted_seen_at: float | None = None  # when the agent first ran on the tried line


@dataclass
class Reverted:
    params: list[str]
    reason: str
    at: float


@dataclass
class TrialState:
    """`/var/lib/divingbell/kernel-trial.json`: written atomically before GRUB is told to try,
    so a crash at any point leaves a record the agent can act on after the next boot."""

    trying: Trial | None = None
    reverted: Reverted | None = None
    committed: list[str] | None = None
    committed_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def load_trial(host: Host) -> TrialState:
    text = host.read_text(TRIAL_FILE)
    if not text:
        return TrialState()
    try:
        data = json.loads(text)
        trying = data.get("trying")
        reverted = data.get("reverted")
        return TrialState(Trial(**trying) if trying else None,
                          Reverted(**reverted) if reverted else None,
                          data.get("committed"), data.get("committed_at"),
                          list(data.get("history", []))[-20:])
    except (ValueError, TypeError) as exc:
        raise ModuleError("kernel", [f"{TRIAL_FILE} is unreadable ({exc}): it records a "
                                     "kernel command line on trial; remove it to start over"]
                          ) from None


def save_trial(host: Host, state: TrialState) -> None:
    from dataclasses import asdict

    host.write_atomic(TRIAL_FILE, json.dumps(asdict(state), indent=1), mode=0o600,
                      dir_mode=0o700)


def boot_id(host: Host) -> str:
    try:
        return (host.proc_sys / "kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def grub_editenv(host: Host, *args: str) -> None:
    try:
        host.run(["grub-editenv", GRUBENV, *args], timeout=60)
    except CommandError as exc:
        raise ModuleError("kernel", [
            f"grub-editenv {' '.join(args)} failed (exit {exc.returncode}): "
            f"{(exc.stderr or exc.stdout).strip()[-300:] or 'no output'}"]) from None


# the module ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelObserved:
    dropin: str | None
    running: list[str] | None   # /proc/cmdline, split (None: unreadable)
    next_boot: BootEntry | None  # GRUB's default entry (None: no grub.cfg, or no entry)
    has_grub: bool
    script: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # divingbell's grubenv variables
    trial: TrialState = field(default_factory=TrialState)
    boot_id: str = ""

    @property
    def wired(self) -> bool:
        """grub.cfg's default entry takes its parameters from the environment block."""
        return self.next_boot is not None and VARIABLE in self.next_boot.params

    def line(self, name: str) -> list[str]:
        return self.env.get(name, "").split()

    def next_params(self) -> list[str] | None:
        """What GRUB boots next: the default entry, with the environment block's line."""
        if self.next_boot is None:
            return None
        value = self.line(TRY) or self.line(GOOD)
        return [x for p in self.next_boot.params for x in (value if p == VARIABLE else [p])]

    def on_trial(self) -> bool:
        """Rebooted onto the line on trial, not yet committed."""
        trying = self.trial.trying
        return (trying is not None and self.running is not None and trying.boot_id != self.boot_id
                and managed(self.running, {param_name(p) for p in trying.params})
                == sorted(trying.params))


@dataclass(frozen=True)
class UpdateGrub:
    """Payload of the change that regenerates grub.cfg; `names` are the parameters divingbell
    manages from then on (the document's, and the ones still to leave the running kernel)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class TryOnce:
    """Set the line GRUB boots once, and record the trial."""

    params: tuple[str, ...]
    panic: int
    timeout: float


@dataclass(frozen=True)
class ClearTry:
    """The document asks for the committed line again: nothing to try."""


@dataclass(frozen=True)
class ClearAll:
    """Removal: divingbell's variables and trial record go."""


@dataclass(frozen=True)
class ForgetNames:
    """Payload of the last change after removal: the parameters are gone everywhere."""


@dataclass(frozen=True)
class Held:
    """The document's line was tried and reverted: the last-known-good line stays."""

    reason: str


class Kernel(HostModule["KernelConf", KernelObserved]):
    name = "kernel"

    def observe(self, host: Host, desired: KernelConf | None, record: ModuleRecord
                ) -> KernelObserved:
        has_grub = host.exists(UPDATE_GRUB)
        if desired is not None and not has_grub:
            raise ModuleError(self.name, [
                f"no GRUB on this host ({UPDATE_GRUB} not found under the root): the kernel "
                "module writes GRUB's configuration; install grub2-common (with the host's "
                "GRUB) or leave conf.kernel out"])
        try:
            running: list[str] | None = (host.proc_sys.parent / "cmdline").read_text().split()
        except OSError:
            running = None
        grub_cfg = host.read_text(GRUB_CFG)
        grubenv = host.read_text(GRUBENV)
        next_boot = default_entry(grub_cfg, grubenv) if grub_cfg is not None else None
        env = {k: v for k, v in parse_grubenv(grubenv).items() if k in (GOOD, TRY)}
        return KernelObserved(host.read_text(DROPIN), running, next_boot, has_grub,
                              host.read_text(SCRIPT), env, load_trial(host), boot_id(host))

    def plan(self, desired: KernelConf | None, observed: KernelObserved, record: ModuleRecord
             ) -> list[Change]:
        wanted = tokens(desired)
        names = {param_name(p) for p in wanted} | set(record.state.get("names", []))
        changes: list[Change] = []
        # Wiring: constant files; only removal changes the boot line through them.
        regenerate = False
        for path, spec in ((DROPIN, FileSpec(DROPIN_TEXT)), (SCRIPT, FileSpec(SCRIPT_TEXT, 0o755))):
            current = observed.dropin if path == DROPIN else observed.script
            file_change = plan_file(self.name, path, spec if desired is not None else None,
                                    current, record)
            if file_change is not None:
                if file_change.changes_host:
                    regenerate = True
                    if desired is None:
                        file_change = _with(file_change, REBOOT)
                changes.append(file_change)
        still_running = ({param_name(p) for p in observed.running} & names
                         if observed.running is not None else set())
        track = tuple(sorted({param_name(p) for p in wanted} | still_running))
        drifted = observed.has_grub and observed.wired != (desired is not None)
        if observed.has_grub and (regenerate or drifted):
            why = ("update-grub: divingbell's GRUB configuration changed" if regenerate else
                   "update-grub: grub.cfg does not take the parameters from divingbell's "
                   "variables (regenerated without the drop-in, or edited)")
            changes.append(Change(self.name, "grub.cfg", Action.SET,
                                  "wired" if observed.wired else "not wired",
                                  "wired" if desired is not None else "not wired", why,
                                  payload=UpdateGrub(track),
                                  disruption=REBOOT if desired is None else NONE))
        good, trying = observed.line(GOOD), observed.line(TRY)
        held = (observed.trial.reverted
                if desired is not None and observed.trial.reverted is not None
                and sorted(observed.trial.reverted.params) == sorted(wanted) else None)
        on_trial = (desired is not None and observed.on_trial()
                    and observed.trial.trying is not None
                    and sorted(observed.trial.trying.params) == sorted(wanted))
        target = good if held is not None else wanted
        if desired is None:
            if good or trying or observed.trial.trying or observed.trial.reverted:
                changes.append(Change(self.name, BOOT_CONFIG, Action.SET, _line(trying or good),
                                      _line([]), "the document no longer sets kernel "
                                      "parameters: clearing divingbell's boot variables",
                                      payload=ClearAll(), disruption=REBOOT))
        elif on_trial:
            pass  # booted on trial: the agent commits it once healthy (settle_trial)
        elif sorted(target) == sorted(good):
            if trying:
                changes.append(Change(self.name, BOOT_CONFIG, Action.SET,
                                      f"{_line(trying)} once", _line(good),
                                      "the last-known-good line is the one wanted: nothing "
                                      "to try", payload=ClearTry()))
        elif sorted(trying) != sorted(try_line(wanted, desired.trial_panic)):
            changes.append(Change(self.name, BOOT_CONFIG, Action.SET,
                                  _line(trying or good), f"{_line(wanted)} once, on trial",
                                  "the new line boots once; it becomes the default when the "
                                  f"node comes back healthy (last-known-good: {_line(good)})",
                                  payload=TryOnce(tuple(wanted), desired.trial_panic,
                                                  desired.trial_timeout),
                                  disruption=REBOOT))
        after = sorted(target)
        if observed.running is not None:
            running = managed(observed.running, names)
            if held is not None:
                changes.append(Change(self.name, RUNNING, Action.NOOP, _line(running),
                                      _line(wanted), f"reverted to the last-known-good line "
                                      f"{_line(good)}: {held.reason}", payload=Held(held.reason),
                                      notice=True))
            elif running == after and desired is None and not changes:
                # Gone from the document, the boot line and the running kernel: nothing left
                # to watch, and the module leaves the journal.
                changes.append(Change(self.name, RUNNING, Action.NOOP, _line(running),
                                      _line(after), "the running kernel no longer has "
                                      "divingbell's parameters; forgetting them",
                                      payload=ForgetNames()))
            elif running == after:
                changes.append(Change(self.name, RUNNING, Action.NOOP, _line(running),
                                      _line(after), "the running kernel booted with the "
                                      "document's parameters" + (
                                          " (on trial: committed once the node is healthy)"
                                          if on_trial else "")))
            else:
                changes.append(Change(self.name, RUNNING, Action.NOOP, _line(running),
                                      _line(after), "pending reboot: "
                                      + _pending(running, after), disruption=REBOOT))
        return changes

    def apply(self, host: Host, change: Change, record: ModuleRecord) -> list[str]:
        if isinstance(change.payload, ForgetNames):
            record.state.pop("names", None)
            return []
        return super().apply(host, change, record)

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> list[str]:
        payload = change.payload
        if isinstance(payload, UpdateGrub):
            self._update_grub(host)
            record.state["names"] = list(payload.names)
            return []
        if isinstance(payload, ClearTry):
            grub_editenv(host, "unset", TRY)
            state = load_trial(host)
            state.trying = None
            save_trial(host, state)
            return []
        if isinstance(payload, ClearAll):
            if host.exists(GRUBENV):
                grub_editenv(host, "unset", TRY, GOOD)
            host.remove(TRIAL_FILE)
            host.write_atomic(REBOOT_REQUIRED, "*** System restart required ***\n", 0o644)
            return ["the distribution's command line takes effect at the next boot"]
        assert isinstance(payload, TryOnce)
        state = load_trial(host)
        # The record first: a crash after it, before GRUB is told, is a trial that did not
        # boot (reverted, with the reason), never a tried line nobody is watching.
        state.trying = Trial(list(payload.params), boot_id(host), time.time(), payload.timeout)
        state.reverted = None
        save_trial(host, state)
        names = set(record.state.get("names", [])) | {param_name(p) for p in payload.params}
        record.state["names"] = sorted(names)
        line = try_line(list(payload.params), payload.panic)
        grub_editenv(host, "set", f"{TRY}={' '.join(line)}")
        # The sentinel the maintenance sequence reboots for (as after a kernel upgrade): slot,
        # window, blockers, drain, reboot, health. /run is empty again after the reboot.
        host.write_atomic(REBOOT_REQUIRED, "*** System restart required ***\n", 0o644)
        return ["the new kernel command line boots once at the next boot, on trial "
                f"({REBOOT_REQUIRED} written: maintenance reboots the node); it becomes the "
                "default once the node is healthy on it"]

    def undo(self, host: Host, change: Change) -> None:
        # The wiring is put back first; grub.cfg is regenerated from it (undoing the
        # update-grub change itself has nothing of its own to put back).
        if is_file_change(change):
            undo_file(host, change)
            if host.exists(UPDATE_GRUB):
                self._update_grub(host)
        else:
            self.undo_setting(host, change)

    def undo_setting(self, host: Host, change: Change) -> None:
        if isinstance(change.payload, TryOnce):
            grub_editenv(host, "unset", TRY)
            state = load_trial(host)
            state.trying = None
            save_trial(host, state)

    def _update_grub(self, host: Host) -> None:
        try:
            host.run(["update-grub"], timeout=UPDATE_GRUB_TIMEOUT)
        except CommandError as exc:
            tail = (exc.stderr or exc.stdout).strip().splitlines()[-3:]
            raise ModuleError(self.name, [
                f"update-grub failed (exit {exc.returncode}): {' / '.join(tail) or 'no output'}"
            ]) from None


# commit or revert, after the reboot ------------------------------------------------------------

@dataclass(frozen=True)
class Settled:
    """What `settle_trial` did: committed, or reverted (and whether the node must reboot to
    get back onto the last-known-good line)."""

    outcome: str  # "committed" or "reverted"
    params: list[str]
    reason: str
    reboot: bool = False


def settle_trial(host: Host, unhealthy: Callable[[], str | None], now: float
                 ) -> Settled | None:
    """Called by the agent every pass, before it converges. `unhealthy` says why the node is
    not healthy yet (None: healthy: agent converged, its fleet or API server reachable, the
    Kubernetes node Ready); asked only while a line is on trial. Returns what it decided, or
    None while there is nothing to do."""
    state = load_trial(host)
    trying = state.trying
    if trying is None or trying.boot_id == boot_id(host):
        return None  # nothing on trial, or not rebooted yet
    try:
        running = (host.proc_sys.parent / "cmdline").read_text().split()
    except OSError:
        return None
    names = {param_name(p) for p in trying.params}
    if managed(running, names) != sorted(trying.params):
        reason = (f"the machine came back on the last-known-good command line, not the tried "
                  f"one ({_line(trying.params)}): the try did not boot (a panic, or a hang "
                  "ended by a watchdog or a power cycle)")
        return _revert(host, state, trying, reason, now, reboot=False)
    if trying.booted_seen_at is None:
        trying.booted_seen_at = now
        save_trial(host, state)
    problem = unhealthy()
    if problem is None:
        grub_editenv(host, "set", f"{GOOD}={' '.join(trying.params)}")
        state.trying, state.reverted = None, None
        state.committed, state.committed_at = trying.params, now
        state.history = [*state.history, {"committed": trying.params, "at": now}][-20:]
        save_trial(host, state)
        return Settled("committed", trying.params, "healthy on the tried line")
    waited = now - trying.booted_seen_at
    if waited < trying.timeout:
        return None
    reason = f"not healthy {waited:.0f}s after booting the tried line: {problem}"
    # GRUB cleared the try when it booted it: the next boot is the last-known-good line.
    grub_editenv(host, "unset", TRY)
    return _revert(host, state, trying, reason, now, reboot=True)


def _revert(host: Host, state: TrialState, trying: Trial, reason: str, now: float, *,
            reboot: bool) -> Settled:
    state.trying = None
    state.reverted = Reverted(trying.params, reason, now)
    state.history = [*state.history, {"reverted": trying.params, "reason": reason,
                                      "at": now}][-20:]
    save_trial(host, state)
    return Settled("reverted", trying.params, reason, reboot)


def _with(change: Change, disruption: str) -> Change:
    from dataclasses import replace

    return replace(change, disruption=disruption)


def _line(params: list[str]) -> str:
    return " ".join(params) if params else "(none of divingbell's)"


def _pending(running: list[str], after: list[str]) -> str:
    parts = []
    missing = [p for p in after if p not in running]
    leaving = [p for p in running if p not in after]
    if missing:
        parts.append(f"the running kernel booted without {' '.join(missing)}")
    if leaving:
        parts.append(f"it still has {' '.join(leaving)}")
    return "; ".join(parts)
