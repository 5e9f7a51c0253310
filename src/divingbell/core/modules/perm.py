"""perm: owner, group and mode of paths matched by globs; originals restored on removal.

Owner and group names are resolved against the host's own /etc/passwd and /etc/group (under
--root), never this process's. Symlinks are refused: following one could leave the host root.
Divingbell's rerun_policy/rerun_interval are accepted; divingbell enforces on every apply.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.engine.settings import converge, restore
from divingbell.core.errors import ModuleError
from divingbell.core.host import HARD_LINKED, Host, hard_linked
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.perm_schema import PermConf


@dataclass(frozen=True)
class Ids:
    users: dict[str, int]
    groups: dict[str, int]

    def uid(self, name: str) -> int | None:
        return int(name) if name.isdigit() else self.users.get(name)

    def gid(self, name: str) -> int | None:
        return int(name) if name.isdigit() else self.groups.get(name)

    def user_name(self, uid: int) -> str:
        return next((n for n, i in self.users.items() if i == uid), str(uid))

    def group_name(self, gid: int) -> str:
        return next((n for n, i in self.groups.items() if i == gid), str(gid))


def parse_id_file(text: str | None) -> dict[str, int]:
    """name -> id from /etc/passwd or /etc/group text (first entry of a name wins)."""
    ids: dict[str, int] = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            ids.setdefault(fields[0], int(fields[2]))
    return ids


@dataclass(frozen=True)
class Ownership:
    uid: int
    gid: int
    mode: int

    def show(self, ids: Ids) -> str:
        return f"{self.mode:04o} {ids.user_name(self.uid)}:{ids.group_name(self.gid)}"


def parse_shown(text: str, ids: Ids) -> Ownership | None:
    """Inverse of Ownership.show: '0640 root:shadow'."""
    try:
        mode_text, owner = text.split(" ", 1)
        user, group = owner.split(":", 1)
    except ValueError:
        return None
    uid, gid = ids.uid(user), ids.gid(group)
    if uid is None or gid is None:
        return None
    return Ownership(uid, gid, int(mode_text, 8))


@dataclass(frozen=True)
class PermObserved:
    ids: Ids
    wanted: dict[str, Ownership]           # host path -> desired (last matching entry wins)
    current: dict[str, Ownership | None]   # host path -> what it has now (None: gone)
    unmatched: list[str]                   # patterns that matched nothing (ignore_missing)


class Perm(HostModule["PermConf", PermObserved]):
    name = "perm"

    def observe(self, host: Host, desired: PermConf | None, record: ModuleRecord
                ) -> PermObserved:
        ids = Ids(parse_id_file(host.read_text("/etc/passwd")),
                  parse_id_file(host.read_text("/etc/group")))
        problems: list[str] = []
        wanted: dict[str, Ownership] = {}
        unmatched: list[str] = []
        for index, entry in enumerate(desired.paths if desired else []):
            uid, gid = ids.uid(entry.owner), ids.gid(entry.group)
            if uid is None:
                problems.append(f"paths[{index}]: user {entry.owner!r} does not exist on the host")
            if gid is None:
                problems.append(f"paths[{index}]: group {entry.group!r} does not exist on the host")
            matches = self._glob(host, entry.path)
            if not matches:
                if desired is not None and desired.ignore_missing:
                    unmatched.append(entry.path)
                else:
                    problems.append(f"{entry.path}: no such file (set perm.ignore_missing to "
                                    "skip paths that may be absent)")
            for path in matches:
                try:
                    info = host.lstat(path, root_links_only=True)
                except OSError as exc:
                    problems.append(str(exc))
                    continue
                if info is not None and stat.S_ISLNK(info.st_mode):
                    problems.append(f"{path}: is a symlink; name the file it points to")
                elif info is not None and hard_linked(info):
                    problems.append(f"{path}: {HARD_LINKED}")
                elif uid is not None and gid is not None:
                    wanted[path] = Ownership(uid, gid, int(entry.permissions, 8))
        if problems:
            raise ModuleError(self.name, problems)
        current: dict[str, Ownership | None] = {}
        for path in sorted(set(wanted) | {p for p in record.originals}):
            info = host.lstat(path)
            current[path] = (None if info is None else
                             Ownership(info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)))
        return PermObserved(ids, wanted, current, unmatched)

    def plan(self, desired: PermConf | None, observed: PermObserved, record: ModuleRecord
             ) -> list[Change]:
        ids = observed.ids
        changes = [
            Change(self.name, pattern, Action.NOOP, None, None,
                   f"{pattern} matches nothing; ignore_missing is set")
            for pattern in observed.unmatched
        ]
        for path, want in sorted(observed.wanted.items()):
            have = observed.current[path]
            assert have is not None
            changes.append(converge(self.name, path, have.show(ids), want.show(ids), record,
                                    payload=(have, want)))
        for path in sorted(p for p in record.originals if p not in observed.wanted):
            have = observed.current.get(path)
            original_text = record.originals[path]
            original = parse_shown(original_text, ids) if original_text else None
            changes.append(restore(
                self.name, path, have.show(ids) if have else None,
                original.show(ids) if original else None, payload=(have, original)))
        return changes

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> None:
        _, want = change.payload
        host.set_owner_mode(change.target, want.uid, want.gid, want.mode)

    def undo_setting(self, host: Host, change: Change) -> None:
        have, _ = change.payload
        host.set_owner_mode(change.target, have.uid, have.gid, have.mode)

    @staticmethod
    def _glob(host: Host, pattern: str) -> list[str]:
        return host.glob(pattern)
