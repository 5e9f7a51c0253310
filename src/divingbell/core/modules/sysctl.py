"""sysctl: kernel tunables, live under /proc/sys and persisted in one owned sysctl.d drop-in."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from divingbell.core.document.keys import sysctl_components
from divingbell.core.engine.change import Change
from divingbell.core.engine.files import FileSpec, plan_file
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.engine.settings import converge, left_the_document, restore
from divingbell.core.errors import ModuleError
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.sysctl_schema import SysctlConf

DROPIN = "/etc/sysctl.d/60-divingbell.conf"
HEADER = (
    MANAGED_LINE + "\n"
    "# Change the divingbell document instead. Loaded at boot by systemd-sysctl.\n"
)


@dataclass(frozen=True)
class SysctlObserved:
    """The live values of the document's sysctls, and divingbell's drop-in."""

    live: dict[str, str | None]  # canonical key -> whitespace-normalised value (None: absent)
    dropin: str | None


def normalise(value: str) -> str:
    """'4096\t87380   6291456\n' and '4096 87380 6291456' are the same setting."""
    return " ".join(value.split())


def _describe(content: str) -> str:
    count = sum(1 for line in content.splitlines() if line.strip() and not line.startswith("#"))
    return f"{count} setting{'s' if count != 1 else ''}"


def suggest_key(proc_sys: Path, key: str) -> str | None:
    """The existing sysctl closest to a key that does not exist (a typo in one component)."""
    import difflib

    parts = sysctl_components(key)
    found: list[str] = []
    directory = proc_sys
    for index, part in enumerate(parts):
        if (directory / part).exists():
            found.append(part)
            directory = directory / part
            continue
        try:
            names = [entry.name for entry in os.scandir(directory)]
        except OSError:
            return None
        for candidate in difflib.get_close_matches(part, names, n=3, cutoff=0.6):
            rest = parts[index + 1:]
            if (directory / candidate).joinpath(*rest).exists():
                return ".".join(p.replace(".", "/") for p in [*found, candidate, *rest])
        return None
    return None


def render_dropin(settings: dict[str, str]) -> str:
    return HEADER + "".join(f"{key} = {settings[key]}\n" for key in sorted(settings))


class Sysctl(HostModule["SysctlConf", SysctlObserved]):
    name = "sysctl"

    def observe(
        self, host: Host, desired: SysctlConf | None, record: ModuleRecord
    ) -> SysctlObserved:
        wanted = desired.root if desired is not None else {}
        keys = sorted(set(wanted) | {key for key in record.originals if not key.startswith("/")})
        live: dict[str, str | None] = {}
        problems = []
        for key in keys:
            path = self._path(host, key)
            try:
                live[key] = normalise(path.read_text())
            except FileNotFoundError:
                live[key] = None
                if key in wanted:
                    hint = suggest_key(host.proc_sys, key)
                    problems.append(f"{key}: no such sysctl on this kernel ({path} does not exist)"
                                    + (f"; did you mean {hint}?" if hint else ""))
                continue
            except OSError as exc:
                problems.append(f"{key}: cannot read {path}: {exc.strerror}")
                continue
            if key in wanted and not path.stat().st_mode & 0o222:
                problems.append(f"{key}: is read-only on this kernel")
        if problems:
            raise ModuleError(self.name, problems)
        return SysctlObserved(live, host.read_text(DROPIN))

    def plan(
        self, desired: SysctlConf | None, observed: SysctlObserved, record: ModuleRecord
    ) -> list[Change]:
        wanted = {key: normalise(value) for key, value in (desired.root if desired else {}).items()}
        changes = []
        for key in sorted(wanted):
            changes.append(converge(self.name, key, observed.live[key], wanted[key], record))
        for key in left_the_document(record, wanted):
            changes.append(restore(self.name, key, observed.live.get(key),
                                   record.originals[key]))
        dropin = FileSpec(render_dropin(wanted)) if wanted else None
        file_change = plan_file(self.name, DROPIN, dropin, observed.dropin, record, _describe)
        if file_change is not None:
            changes.append(file_change)
        return changes

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> None:
        assert change.after is not None
        self._write(host, change.target, change.after)

    def undo_setting(self, host: Host, change: Change) -> None:
        if change.before is not None:
            self._write(host, change.target, change.before)

    def _write(self, host: Host, key: str, value: str) -> None:
        path = self._path(host, key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            rejected = exc.errno == errno.EINVAL
            why = "the kernel rejected the value" if rejected else exc.strerror
            raise ModuleError(self.name, [f"{key}: cannot set {value!r}: {why}"],
                              retryable=rejected) from None
        reported = normalise(path.read_text())
        if reported != value:
            raise ModuleError(self.name, [
                f"{key}: wrote {value!r} but the kernel reports {reported!r}"
            ])

    @staticmethod
    def _path(host: Host, key: str) -> Path:
        return host.proc_sys.joinpath(*sysctl_components(key))
