"""apparmor: owned profile files under /etc/apparmor.d, loaded with `apparmor_parser -r`.

- Every profile is compiled by `apparmor_parser` without loading before anything changes, so a
  profile the parser rejects fails the plan with the parser's message.
- `complain_mode` is a real boolean (Divingbell took the string "false" as true); changing it
  reloads every profile in the new mode.
- Removal unloads the profile (`apparmor_parser -R`) and deletes its file.
- On a kernel without AppArmor, apply fails before any change: "AppArmor is not enabled on this
  host". `load: false` (an extension) stages checked profile files for a later boot instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.files import FileSpec, plan_file
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.errors import CommandError, ModuleError
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.apparmor_schema import AppArmorConf

PROFILE_DIR = "/etc/apparmor.d"
ENABLED_FLAG = "/sys/module/apparmor/parameters/enabled"
PARSER_NOISE = ("Cache read/write disabled", "Warning: unable to find a suitable fs",
                "Use --subdomainfs")


def profile_file(name: str) -> str:
    return f"{PROFILE_DIR}/{name}"


@dataclass(frozen=True)
class Load:
    path: str
    complain: bool
    unload: bool = False
    fresh: bool = False  # the profile file is new: undo unloads it


@dataclass(frozen=True)
class AppArmorObserved:
    files: dict[str, str | None]
    enabled: bool


def parser_message(exc: CommandError) -> str:
    if exc.returncode == 127:
        return "apparmor_parser not found on the host (install the apparmor package)"
    lines = [line for line in (exc.stderr or exc.stdout).splitlines()
             if line.strip() and not line.startswith(PARSER_NOISE)]
    return "; ".join(lines) or str(exc)


class AppArmor(HostModule["AppArmorConf", AppArmorObserved]):
    name = "apparmor"

    def observe(self, host: Host, desired: AppArmorConf | None, record: ModuleRecord
                ) -> AppArmorObserved:
        profiles = desired.profiles if desired else {}
        paths = {profile_file(n) for n in profiles} | set(record.owned_files)
        files = {path: host.read_text(path) for path in sorted(paths)}
        enabled = (host.read_text(ENABLED_FLAG) or "").strip() == "Y"
        problems = []
        for name, text in sorted(profiles.items()):
            try:
                # Compile only (-Q: no kernel load, -K: no cache), output discarded.
                host.run(["apparmor_parser", "-Q", "-K", "-o", "/dev/null", "-I", PROFILE_DIR],
                         input_text=text)
            except CommandError as exc:
                problems.append(f"profile {name}: apparmor_parser rejects it: "
                                f"{parser_message(exc)}")
        loads = desired is not None and desired.load
        changing = any(files.get(profile_file(n)) != t for n, t in profiles.items()) or (
            set(record.owned_files) - {profile_file(n) for n in profiles}) or (
            desired is not None and record.state.get("complain") != desired.complain_mode)
        if loads and changing and not enabled and (profiles or record.owned_files):
            problems.append("AppArmor is not enabled on this host (kernel without AppArmor, or "
                            f"{ENABLED_FLAG} is not Y); nothing was loaded. Set "
                            "apparmor.load: false to stage the profiles for a later boot")
        if problems:
            raise ModuleError(self.name, problems)
        return AppArmorObserved(files, enabled)

    def plan(self, desired: AppArmorConf | None, observed: AppArmorObserved,
             record: ModuleRecord) -> list[Change]:
        profiles = desired.profiles if desired else {}
        complain = desired.complain_mode if desired else False
        loads = desired.load if desired else observed.enabled
        mode_changed = desired is not None and record.state.get("complain") != complain
        wanted = {profile_file(n): FileSpec(t) for n, t in profiles.items()}
        changes: list[Change] = []
        for path in sorted(set(wanted) | set(observed.files)):
            spec = wanted.get(path)
            if spec is None and loads and record.owns(path) and observed.files.get(path):
                changes.append(Change(self.name, f"unload {path}", Action.DELETE, "loaded",
                                      None, "left the document: unloaded, then deleted",
                                      payload=Load(path, complain, unload=True)))
            change = plan_file(self.name, path, spec, observed.files.get(path), record)
            if change is not None:
                changes.append(change)
            if spec is not None and loads and (change is None or change.changes_host
                                               or mode_changed):
                mode = "complain" if complain else "enforce"
                written = change is not None and change.changes_host
                changes.append(Change(self.name, f"load {path}", Action.SET, None, mode,
                                      "profile written" if written else f"mode is now {mode}",
                                      payload=Load(path, complain,
                                                   fresh=observed.files.get(path) is None)))
        if desired is not None and mode_changed:
            changes.append(Change(self.name, "complain_mode", Action.SET,
                                  str(record.state.get("complain")), str(complain),
                                  "set by the document", payload=complain))
        return changes

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> None:
        if isinstance(change.payload, bool):
            record.state["complain"] = change.payload
            return
        load: Load = change.payload
        if load.unload:
            argv = ["apparmor_parser", "-R", load.path]
        else:
            argv = ["apparmor_parser", "-r", "-W", *(["-C"] if load.complain else []), load.path]
        try:
            host.run(argv)
        except CommandError as exc:
            raise ModuleError(self.name, [f"{' '.join(argv)}: {parser_message(exc)}"]) from None

    def undo_setting(self, host: Host, change: Change) -> None:
        # Runs before the file is put back (undo goes in reverse): a profile this run loaded
        # for the first time is unloaded; a reloaded one keeps its new rules in the kernel
        # until the next successful apply.
        load = change.payload
        if isinstance(load, Load) and load.fresh and not load.unload:
            host.run(["apparmor_parser", "-R", load.path], check=False)
