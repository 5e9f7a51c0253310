"""systemd units owned by divingbell: names, enablement, and talking to a running systemd.

Unit files themselves are owned files (engine.files). Enabling is a wants/ symlink, created
directly so it works the same on a booted host and in a bare chroot; when systemd runs the
host, it is told (daemon-reload) and units are started and stopped through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.files import (
    FileSpec,
    note_dirs_to_create,
    plan_file,
    prune_created_dirs,
)
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.host import Host

UNIT_DIR = "/etc/systemd/system"
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def escape_path(path: str) -> str:
    """`systemd-escape --path`: /mnt/a-b -> mnt-a\\x2db."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-"
    out = []
    for index, char in enumerate(trimmed):
        if char == "/":
            out.append("-")
        elif char in _SAFE and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def unit_file(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}"


def wants_link(unit: str, wanted_by: str) -> str:
    return f"{UNIT_DIR}/{wanted_by}.wants/{unit}"


def is_enabled(host: Host, unit: str, wanted_by: str) -> bool:
    return host.lstat(wants_link(unit, wanted_by)) is not None


@dataclass(frozen=True)
class Enablement:
    """Payload of a change that enables or disables a unit."""

    unit: str
    wanted_by: str
    start: bool  # also start/stop it now where systemd runs the host


def plan_enablement(
    module: str, unit: str, wanted_by: str, want: bool, enabled: bool, *, start: bool
) -> Change | None:
    if want == enabled:
        return None
    return Change(
        module, unit, Action.SET, "enabled" if enabled else "disabled",
        "enabled" if want else "disabled",
        f"{'enable' if want else 'disable'} for boot (WantedBy={wanted_by})",
        payload=Enablement(unit, wanted_by, start),
    )


def plan_unit(
    module: str,
    unit: str,
    content: str | None,
    observed: Mapping[str, str | None],
    enabled: Mapping[str, bool],
    wanted_by: str,
    record: ModuleRecord,
) -> list[Change]:
    """An owned unit and its enablement: write then enable it, or (content None) disable then
    delete it. `observed` maps unit paths to their current content."""
    path = unit_file(unit)
    spec = FileSpec(content) if content is not None else None
    file_change = plan_file(module, path, spec, observed.get(path), record,
                            lambda _: "unit file")
    toggle = plan_enablement(module, unit, wanted_by, content is not None,
                             enabled.get(unit, False), start=False)
    ordered = [file_change, toggle] if content is not None else [toggle, file_change]
    return [change for change in ordered if change is not None]


def apply_enablement(host: Host, change: Change, *, undo: bool = False,
                     record: ModuleRecord | None = None) -> None:
    target: Enablement = change.payload
    want = (change.before if undo else change.after) == "enabled"
    link = wants_link(target.unit, target.wanted_by)
    if want:
        if record is not None:
            note_dirs_to_create(host, link, record)
        created: list[str] = []
        try:
            host.symlink(f"../{target.unit}", link, created=created)
        finally:
            for directory in created:
                if record is not None:
                    record.note_created_dir(directory)
    else:
        if target.start:
            systemctl(host, "stop", target.unit)
        host.remove(link)
        if record is not None:
            # The .wants/ directory goes too when divingbell made it and it is empty now.
            prune_created_dirs(host, link, record)
    systemctl(host, "daemon-reload")
    if want and target.start:
        systemctl(host, "start", target.unit)


def systemctl(host: Host, *args: str) -> None:
    """Run systemctl when systemd runs the host; a bare chroot has nothing to tell."""
    if host.is_systemd_running():
        host.run(["systemctl", *args])
