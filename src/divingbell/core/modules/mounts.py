"""mounts: filesystems mounted now and at every boot through owned systemd .mount units.

Never /etc/fstab. Where systemd runs the host, units are started and stopped through it; in a
bare chroot divingbell mounts directly and still writes the unit for the next boot. An option
change remounts in place, so a tmpfs keeps its contents. Removal unmounts, disables and
deletes the unit, and removes the mount point only if divingbell created it.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.files import prune_created_dirs
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.errors import CommandError, ModuleError
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule
from divingbell.core.modules.systemd import (
    escape_path,
    is_enabled,
    plan_unit,
    systemctl,
    unit_file,
)

if TYPE_CHECKING:
    from divingbell.core.modules.mounts_schema import Mount, MountsConf

WANTED_BY = "local-fs.target"
NOT_MOUNTED = "not mounted"
MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class LiveMount:
    source: str
    fstype: str
    options: tuple[str, ...]  # mount options and superblock options, as the kernel lists them

    def show(self) -> str:
        return f"{self.source} {self.fstype} ({','.join(self.options)})"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> dict[str, LiveMount]:
    """Mount point -> the mount on top (the last one listed) from /proc/self/mountinfo."""
    mounts: dict[str, LiveMount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3:
            continue
        options = tuple(dict.fromkeys(fields[5].split(",") + tail[2].split(",")))
        mounts[_unescape(fields[4])] = LiveMount(_unescape(tail[1]), tail[0], options)
    return mounts


_SIZE = re.compile(r"^([0-9]+)([kmgtKMGT]?)$")
_IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "rw", "relatime", "users", "user"}


def normalise_options(fstype: str, options: str | tuple[str, ...] | None) -> set[str]:
    """Options as comparable facts: defaults dropped, tmpfs sizes in kibibytes."""
    items = options.split(",") if isinstance(options, str) else list(options or ())
    result = set()
    for raw in items:
        item = raw.strip()
        if not item or item in _IGNORED or item.startswith(("x-", "comment=")):
            continue
        if fstype == "tmpfs":
            if item == "mode=1777":
                continue
            item = _tmpfs_option(item)
        result.add(item)
    return result


_KIB = {"": 1 / 1024, "k": 1, "m": 1024, "g": 1024**2, "t": 1024**3}
_COUNT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _tmpfs_option(item: str) -> str:
    """size=1024M and size=1048576k are the same size; the kernel shows the latter."""
    key, _, value = item.partition("=")
    match = _SIZE.match(value)
    if not match:
        return item
    number, unit = int(match.group(1)), match.group(2).lower()
    if key == "size":
        return f"size={int(number * _KIB[unit])}k"
    if key == "nr_inodes":
        return f"nr_inodes={number * _COUNT[unit]}"
    return item


def matches(mount: Mount, live: LiveMount | None) -> bool:
    if live is None or live.fstype != mount.type or live.source != mount.device:
        return False
    return normalise_options(mount.type, mount.options) <= normalise_options(
        live.fstype, live.options)


def describe(mount: Mount) -> str:
    return f"{mount.device} {mount.type} ({mount.options or 'defaults'})"


def unit_name(mount: Mount) -> str:
    return f"{escape_path(mount.mnt_tgt)}.mount"


def _unit_text(value: str) -> str:
    """A value in a unit file: `%` starts a systemd specifier (%h is a home), so it is doubled
    to mean itself. Newlines and trailing backslashes never get here (document/types.py)."""
    return value.replace("%", "%%")


def render_unit(name: str, mount: Mount) -> str:
    # Plain attribute reads (no model copy): the mount may be a cached, read-only view.
    text = {field: None if getattr(mount, field) is None else _unit_text(getattr(mount, field))
            for field in ("device", "type", "before", "after", "options")}
    lines = [
        MANAGED_LINE,
        "[Unit]",
        f"Description=divingbell mount {name}: {mount.mnt_tgt}",
        "Conflicts=umount.target",
        f"Before={text['before']}",
        f"After={text['after']}",
        "",
        "[Mount]",
        f"What={text['device']}",
        f"Where={mount.mnt_tgt}",
        f"Type={text['type']}",
    ]
    if text["options"]:
        lines.append(f"Options={text['options']}")
    lines += ["", "[Install]", f"WantedBy={WANTED_BY}", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class MountsObserved:
    live: dict[str, LiveMount | None]   # mount point (host path) -> top mount
    units: dict[str, str | None]        # unit path -> content
    enabled: dict[str, bool]            # unit -> enabled for boot


@dataclass(frozen=True)
class MountStep:
    """Payload of a live mount change."""

    target: str
    unit: str
    want: Mount | None        # None: unmount (or put the original options back)
    had: LiveMount | None     # what was there before this change
    original: str | None = None


class Mounts(HostModule["MountsConf", MountsObserved]):
    name = "mounts"

    def observe(self, host: Host, desired: MountsConf | None, record: ModuleRecord
                ) -> MountsObserved:
        mounts = desired.root if desired else {}
        table = parse_mountinfo(Path(MOUNTINFO).read_text())
        targets = {m.mnt_tgt for m in mounts.values()} | {
            t for t in record.originals if not t.endswith(".mount") and t.startswith("/")
            and not t.startswith("/etc/systemd/")}
        problems = [
            f"{name}: {mount.mnt_tgt} is also the target of {other}"
            for name, mount in mounts.items() for other, o in mounts.items()
            if other < name and o.mnt_tgt == mount.mnt_tgt
        ]
        problems += [
            f"{name}: {mount.mnt_tgt} has a symlink in its path; name the real directory "
            "(a mount over a symlink would land wherever it points)"
            for name, mount in sorted(mounts.items()) if not host.is_symlink_free(mount.mnt_tgt)
        ]
        if problems:
            raise ModuleError(self.name, problems)
        units = {unit_file(unit_name(m)) for m in mounts.values()} | set(record.owned_files)
        return MountsObserved(
            {t: table.get(str(host.path(t)).rstrip("/") or "/") for t in sorted(targets)},
            {path: host.read_text(path) for path in sorted(units)},
            {p.rsplit("/", 1)[-1]: is_enabled(host, p.rsplit("/", 1)[-1], WANTED_BY)
             for p in units},
        )

    def plan(self, desired: MountsConf | None, observed: MountsObserved, record: ModuleRecord
             ) -> list[Change]:
        mounts = desired.root if desired else {}
        changes: list[Change] = []
        wanted_units = set()
        for name, mount in sorted(mounts.items()):
            unit = unit_name(mount)
            wanted_units.add(unit_file(unit))
            changes.extend(plan_unit(self.name, unit, render_unit(name, mount), observed.units,
                                     observed.enabled, WANTED_BY, record))
            live = observed.live.get(mount.mnt_tgt)
            before = live.show() if live else NOT_MOUNTED
            capture = mount.mnt_tgt not in record.originals
            if matches(mount, live):
                changes.append(Change(self.name, mount.mnt_tgt, Action.NOOP, before,
                                      describe(mount), f"{mount.mnt_tgt} is mounted as wanted",
                                      capture_original=capture))
            else:
                how = ("remount in place" if live and live.source == mount.device
                       and live.fstype == mount.type else "mount")
                changes.append(Change(self.name, mount.mnt_tgt, Action.SET, before,
                                      describe(mount), how, capture_original=capture,
                                      payload=MountStep(mount.mnt_tgt, unit, mount, live)))
        wanted_targets = {m.mnt_tgt for m in mounts.values()}
        for target in sorted(t for t in observed.live if t not in wanted_targets):
            live = observed.live[target]
            original = record.originals.get(target)
            unit = f"{escape_path(target)}.mount"
            if live is None or (live.show() == original):
                changes.append(Change(self.name, target, Action.NOOP,
                                      live.show() if live else NOT_MOUNTED, original,
                                      "left the document; already as it was before divingbell",
                                      forget=True, payload=MountStep(target, unit, None, live,
                                                                     original)))
            else:
                changes.append(Change(self.name, target, Action.RESTORE, live.show(),
                                      original or NOT_MOUNTED,
                                      "left the document; unmounting" if original in (
                                          None, NOT_MOUNTED) else
                                      "left the document; putting back the original mount",
                                      forget=True,
                                      payload=MountStep(target, unit, None, live, original)))
        for path in sorted(p for p in observed.units if p not in wanted_units):
            changes.extend(plan_unit(self.name, path.rsplit("/", 1)[-1], None, observed.units,
                                     observed.enabled, WANTED_BY, record))
        return changes

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> None:
        step: MountStep = change.payload
        # Mount points created by earlier versions were noted in the module state.
        for directory in record.state.pop("created_dirs", []):
            record.note_created_dir(directory)
        if step.want is not None:
            missing = host.missing_dirs(step.target)
            if missing:
                # Noted in the journal before they exist: a crash right after mkdir still
                # leaves a journal that removes them with the mount.
                for directory in missing:
                    record.note_created_dir(directory)
                record.save_intent()
                host.makedirs(step.target)
            self._mount(host, step, step.want)
        else:
            self._unmount_or_restore(host, step)
            # The mount point and the parents divingbell made go too, once empty.
            prune_created_dirs(host, step.target + "/.", record)

    def undo_setting(self, host: Host, change: Change) -> None:
        step: MountStep = change.payload
        if step.want is not None:
            if step.had is None:
                self._umount(host, step.target, step.unit)
            elif step.had.source == step.want.device and step.had.fstype == step.want.type:
                host.run(["mount", "-o", "remount," + ",".join(step.had.options), step.target])
            else:
                self._umount(host, step.target, step.unit)

    # -----------------------------------------------------------------------------------------

    def _mount(self, host: Host, step: MountStep, mount: Mount) -> None:
        live = step.had
        if live is not None and live.source == mount.device and live.fstype == mount.type:
            host.run(["mount", "-o", f"remount,{mount.options or 'defaults'}", mount.mnt_tgt])
        elif host.is_systemd_running():
            systemctl(host, "start", step.unit)
        else:
            argv = ["mount", "-t", mount.type]
            if mount.options:
                argv += ["-o", mount.options]
            host.run([*argv, mount.device, mount.mnt_tgt])

    def _unmount_or_restore(self, host: Host, step: MountStep) -> None:
        live, original = step.had, step.original
        if live is None:
            return
        if original and original != NOT_MOUNTED:
            source, fstype, _ = original.split(" ", 2)
            if source == live.source and fstype == live.fstype:
                options = original.split("(", 1)[1].rstrip(")")
                host.run(["mount", "-o", f"remount,{options}", step.target])
                return
        self._umount(host, step.target, step.unit)

    def _umount(self, host: Host, target: str, unit: str) -> None:
        try:
            if host.is_systemd_running() and host.exists(unit_file(unit)):
                systemctl(host, "stop", unit)
            else:
                host.run(["umount", target])
        except CommandError as exc:
            if "busy" in (exc.stderr + exc.stdout).lower():
                holders = busy_holders(host.path(target))
                raise ModuleError(self.name, [
                    f"{target} is busy, held by {holders or 'an unknown process'}; stop it and "
                    "apply again (divingbell still owns the mount)"]) from None
            raise


def busy_holders(mount_point: Path) -> str:
    """'pid 123 (sleep), pid 456 (bash)': processes whose cwd, root or open files are inside."""
    inside = str(mount_point).rstrip("/")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        links = [entry / "cwd", entry / "root"]
        with contextlib.suppress(OSError):
            links += list((entry / "fd").iterdir())
        for link in links:
            try:
                path = os.readlink(link)
            except OSError:
                continue
            if path == inside or path.startswith(inside + "/"):
                try:
                    comm = (entry / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                found.append(f"pid {entry.name} ({comm})")
                break
    return ", ".join(found)
