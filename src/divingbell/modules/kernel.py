"""kernel: command-line parameters, as divingbell's own GRUB drop-in, then `update-grub`.

The drop-in `/etc/default/grub.d/divingbell.cfg` appends the document's parameters to
GRUB_CMDLINE_LINUX; `update-grub` (chrooted under --root, like every command) writes them into
grub.cfg. Removal deletes the drop-in (or puts back what was there) and runs `update-grub` again.
Nothing takes effect before the next boot: every change here is a `reboot`.

`observe` reads both sides of that: what the running kernel booted with (`/proc/cmdline`, the
parent of --proc-sys) and what GRUB will boot next (the default entry of /boot/grub/grub.cfg).
So the plan shows drift in the boot configuration (grub.cfg regenerated without the drop-in, or
edited) and a reboot still pending (the running kernel lacks the parameters, or still has ones
that left the document).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from divingbell.engine.change import REBOOT, Action, Change
from divingbell.engine.files import FileSpec, is_file_change, plan_file, undo_file
from divingbell.engine.journal import ModuleRecord
from divingbell.errors import CommandError, ModuleError
from divingbell.host import Host
from divingbell.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.document.schema import KernelConf

DROPIN = "/etc/default/grub.d/divingbell.cfg"
GRUB_CFG = "/boot/grub/grub.cfg"
GRUBENV = "/boot/grub/grubenv"
UPDATE_GRUB = "/usr/sbin/update-grub"
REBOOT_REQUIRED = "/run/reboot-required"
BOOT_CONFIG = "boot configuration"
RUNNING = "running kernel"
HEADER = (
    "# Managed by divingbell; edits here are overwritten on its next apply.\n"
    "# Kernel parameters of the divingbell document (conf.kernel); update-grub reads this.\n"
)
UPDATE_GRUB_TIMEOUT = 300


def tokens(conf: KernelConf | None) -> list[str]:
    """The document's parameters as they go on the boot line, in document order."""
    if conf is None:
        return []
    return [f"{name}={value}" for name, value in conf.cmdline.items()] + list(conf.flags)


def render_dropin(params: list[str]) -> str:
    return HEADER + f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {" ".join(params)}"\n'


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


# the module ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelObserved:
    dropin: str | None
    running: list[str] | None   # /proc/cmdline, split (None: unreadable)
    next_boot: BootEntry | None  # GRUB's default entry (None: no grub.cfg, or no entry)
    has_grub: bool


@dataclass(frozen=True)
class UpdateGrub:
    """Payload of the change that regenerates grub.cfg; `names` are the parameters divingbell
    manages from then on (the document's, and the ones still to leave the running kernel)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class ForgetNames:
    """Payload of the last change after removal: the parameters are gone everywhere."""


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
        next_boot = (default_entry(grub_cfg, host.read_text(GRUBENV))
                     if grub_cfg is not None else None)
        return KernelObserved(host.read_text(DROPIN), running, next_boot, has_grub)

    def plan(self, desired: KernelConf | None, observed: KernelObserved, record: ModuleRecord
             ) -> list[Change]:
        wanted = tokens(desired)
        names = {param_name(p) for p in wanted} | set(record.state.get("names", []))
        changes: list[Change] = []
        spec = FileSpec(render_dropin(wanted)) if wanted else None
        file_change = plan_file(self.name, DROPIN, spec, observed.dropin, record,
                                _describe)
        if file_change is not None:
            if file_change.changes_host:
                file_change = _with(file_change, REBOOT)
            changes.append(file_change)
        next_boot = (managed(observed.next_boot.params, names)
                     if observed.next_boot is not None else None)
        after = sorted(wanted)
        still_running = ({param_name(p) for p in observed.running} & names
                         if observed.running is not None else set())
        track = tuple(sorted({param_name(p) for p in wanted} | still_running))
        regenerate = file_change is not None and file_change.changes_host
        if observed.has_grub and (regenerate or next_boot != after):
            why = ("update-grub: the drop-in changed" if regenerate else
                   "update-grub: grub.cfg does not boot the document's parameters "
                   "(regenerated without the drop-in, or edited)")
            changes.append(Change(self.name, BOOT_CONFIG, Action.SET,
                                  _line(next_boot) if next_boot is not None else "no grub.cfg",
                                  _line(after), why, payload=UpdateGrub(track),
                                  disruption=REBOOT))
        if observed.running is not None:
            running = managed(observed.running, names)
            if running == after and desired is None and not changes:
                # Gone from the document, the boot line and the running kernel: nothing left
                # to watch, and the module leaves the journal.
                changes.append(Change(self.name, RUNNING, Action.NOOP, _line(running),
                                      _line(after), "the running kernel no longer has "
                                      "divingbell's parameters; forgetting them",
                                      payload=ForgetNames()))
            elif running == after:
                changes.append(Change(self.name, RUNNING, Action.NOOP, _line(running),
                                      _line(after), "the running kernel booted with the "
                                      "document's parameters"))
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
        payload: UpdateGrub = change.payload
        self._update_grub(host)
        record.state["names"] = list(payload.names)
        # The sentinel the maintenance sequence reboots for (as after a kernel upgrade): slot,
        # window, blockers, drain, reboot, health. /run is empty again after the reboot.
        host.write_atomic(REBOOT_REQUIRED, "*** System restart required ***\n", 0o644)
        return ["the new kernel command line takes effect at the next boot "
                f"({REBOOT_REQUIRED} written: maintenance reboots the node)"]

    def undo(self, host: Host, change: Change) -> None:
        # The drop-in is put back first; grub.cfg is regenerated from it (undoing the
        # update-grub change itself has nothing of its own to put back).
        if is_file_change(change):
            undo_file(host, change)
            if host.exists(UPDATE_GRUB):
                self._update_grub(host)

    def undo_setting(self, host: Host, change: Change) -> None:
        """Nothing: undoing the drop-in regenerates grub.cfg."""

    def _update_grub(self, host: Host) -> None:
        try:
            host.run(["update-grub"], timeout=UPDATE_GRUB_TIMEOUT)
        except CommandError as exc:
            tail = (exc.stderr or exc.stdout).strip().splitlines()[-3:]
            raise ModuleError(self.name, [
                f"update-grub failed (exit {exc.returncode}): {' / '.join(tail) or 'no output'}"
            ]) from None


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


def _describe(content: str) -> str:
    for line in content.splitlines():
        if line.startswith("GRUB_CMDLINE_LINUX="):
            return line.split(" ", 1)[1].rstrip('"') if " " in line else "no parameters"
    return "no parameters"

