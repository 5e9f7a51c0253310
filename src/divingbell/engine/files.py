"""Owned files, the same way for every module: plan a write or delete, apply it, undo it.

A file divingbell writes is owned; if something else had a file at that path first, its
content is kept as the original and put back when divingbell lets the file go.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from divingbell.engine.change import Action, Change
from divingbell.engine.journal import ModuleRecord
from divingbell.host import Host


@dataclass(frozen=True)
class FileSpec:
    content: str
    mode: int = 0o644
    owner: tuple[int, int] | None = None  # uid, gid; None: root
    dir_mode: int | None = None           # for the directory, if it must be created
    owner_user: str | None = None         # owner by name, resolved on the host when written


@dataclass(frozen=True)
class FileChange:
    """What apply writes (None: remove the file) and what was there, for undo."""

    write: FileSpec | None
    previous: str | None
    own: bool


def plan_file(
    module: str,
    path: str,
    desired: FileSpec | None,
    current: str | None,
    record: ModuleRecord,
    describe: Callable[[str], str] | None = None,
    restore_as: FileSpec | None = None,
) -> Change | None:
    """The change that makes `path` hold `desired` (None: divingbell no longer wants it).

    `describe` summarises a content for the plan ("3 settings"); by default, its line count.
    `restore_as` gives the mode and owner an original content is put back with.
    """
    summary = describe or _line_count

    def what(content: str | None) -> str | None:
        return None if content is None else summary(content)

    if desired is not None:
        data = FileChange(desired, current, own=True)
        if current == desired.content:
            if record.owns(path):
                return Change(module, path, Action.NOOP, None, None, f"{path} is up to date")
            return Change(module, path, Action.NOOP, None, None,
                          f"{path} already has the wanted content; divingbell owns it now",
                          capture_original=True, payload=FileChange(None, current, own=True))
        return Change(
            module, path, Action.WRITE, what(current), what(desired.content),
            "create" if current is None else "content differs",
            capture_original=not record.owns(path), payload=data,
        )
    if not record.owns(path):
        if path in record.originals:
            # Captured before a write that never happened (a crash or a rollback in between).
            return Change(module, path, Action.NOOP, None, None,
                          f"{path} was never written; forgetting it", forget=True)
        return None
    original = record.originals.get(path)
    if original is not None:
        return Change(module, path, Action.DELETE, what(current), "original content",
                      "no longer wanted; putting back what was there before divingbell",
                      forget=True, payload=FileChange(
                          replace(restore_as, content=original) if restore_as
                          else FileSpec(original), current, own=False))
    if current is None:
        return Change(module, path, Action.NOOP, None, None,
                      f"{path} is already gone; forgetting it", forget=True,
                      payload=FileChange(None, None, own=False))
    return Change(module, path, Action.DELETE, what(current), None, "no longer wanted",
                  forget=True, payload=FileChange(None, current, own=False))


def plan_files(
    module: str,
    wanted: Mapping[str, FileSpec],
    current: Mapping[str, str | None],
    record: ModuleRecord,
    describe: Callable[[str], str] | None = None,
) -> list[Change]:
    """`plan_file` for every path wanted now or seen (owned) before, in path order."""
    changes = []
    for path in sorted(set(wanted) | set(current)):
        change = plan_file(module, path, wanted.get(path), current.get(path), record, describe)
        if change is not None:
            changes.append(change)
    return changes


def apply_file(host: Host, change: Change, record: ModuleRecord) -> None:
    data: FileChange = change.payload
    if change.action is Action.WRITE and data.write is not None:
        _write(host, change.target, data.write)
    elif change.action is Action.DELETE:
        if data.write is not None:
            _write(host, change.target, data.write)
        else:
            host.remove(change.target)
    if data is not None and data.own:
        record.own(change.target)
    elif data is not None:
        record.disown(change.target)


def _write(host: Host, path: str, spec: FileSpec) -> None:
    owner = spec.owner
    if spec.owner_user is not None:
        owner = host.user_ids(spec.owner_user)
    host.write_atomic(path, spec.content, spec.mode, owner=owner, dir_mode=spec.dir_mode)


def undo_file(host: Host, change: Change) -> None:
    data: FileChange | None = change.payload
    if data is None or change.action not in (Action.WRITE, Action.DELETE):
        return
    if data.previous is None:
        host.remove(change.target)
    else:
        host.write_atomic(change.target, data.previous)


def is_file_change(change: Change) -> bool:
    return isinstance(change.payload, FileChange)


def _line_count(content: str) -> str:
    lines = content.count("\n") + (0 if content.endswith("\n") or not content else 1)
    return f"{lines} line{'s' if lines != 1 else ''}"


def original_of(change: Change) -> str | None:
    """The value to keep as the target's original: a file's previous content, else `before`."""
    if isinstance(change.payload, FileChange):
        return change.payload.previous
    return change.before
