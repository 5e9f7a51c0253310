"""Owned files, the same way for every module: plan a write or delete, apply it, undo it.

A file divingbell writes is owned; if something else had a file at that path first, its
content is kept as the original and put back when divingbell lets the file go.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.host import Host, UserDir


@dataclass(frozen=True)
class FileSpec:
    """The content and ownership an owned file must have."""

    content: str
    mode: int = 0o644
    owner: tuple[int, int] | None = None  # uid, gid; None: root
    dir_mode: int | None = None           # for the directory, if it must be created
    owner_user: str | None = None         # owner by name, resolved on the host when written
    # The owner's own directory (their home): from it down nothing is followed and every
    # directory must be the user's or root's (sshd's StrictModes), see Host.write_atomic.
    user_dir: str | None = None


@dataclass(frozen=True)
class FileChange:
    """What apply writes (None: remove the file) and what was there, for undo."""

    write: FileSpec | None
    previous: str | None
    own: bool
    user: tuple[str, str] | None = None  # (user, their directory) when the user controls it
    # (mode, uid, gid) of the previous file, noted by apply so undo puts it back exactly.
    seen: dict[str, tuple[int, int, int] | None] = field(default_factory=dict, compare=False)


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

    user = ((desired.owner_user, desired.user_dir) if desired is not None
            and desired.owner_user and desired.user_dir else None)
    if user is None and restore_as is not None and restore_as.owner_user and restore_as.user_dir:
        user = (restore_as.owner_user, restore_as.user_dir)
    if desired is not None:
        data = FileChange(desired, current, own=True, user=user)
        if current == desired.content:
            if record.owns(path):
                return Change(module, path, Action.NOOP, None, None, f"{path} is up to date")
            return Change(module, path, Action.NOOP, None, None,
                          f"{path} already has the wanted content; divingbell owns it now",
                          capture_original=True,
                          payload=FileChange(None, current, own=True, user=user))
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
                          else FileSpec(original), current, own=False, user=user))
    if current is None:
        return Change(module, path, Action.NOOP, None, None,
                      f"{path} is already gone; forgetting it", forget=True,
                      payload=FileChange(None, None, own=False, user=user))
    return Change(module, path, Action.DELETE, what(current), None, "no longer wanted",
                  forget=True, payload=FileChange(None, current, own=False, user=user))


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


def user_dir_of(host: Host, data: FileChange | None) -> UserDir | None:
    if data is None or data.user is None:
        return None
    try:
        uid, gid = host.user_ids(data.user[0])
    except KeyError:  # the account is gone (purged): only root's directories are trusted
        uid, gid = -1, -1
    return UserDir(data.user[1], uid, gid)


def note_original_meta(host: Host, change: Change, record: ModuleRecord) -> None:
    """Keep the mode and owner of a file divingbell is about to take over, with its content,
    so that putting the original back is exact."""
    data = change.payload
    if not isinstance(data, FileChange) or data.previous is None:
        return
    if change.target in record.file_modes:
        return
    meta = host.file_meta(change.target, user_dir=user_dir_of(host, data))
    if meta is not None:
        record.file_modes[change.target] = list(meta)


def apply_file(host: Host, change: Change, record: ModuleRecord) -> None:
    data: FileChange = change.payload
    user_dir = user_dir_of(host, data)
    if data is not None and change.changes_host:
        data.seen[change.target] = host.file_meta(change.target, user_dir=user_dir)
    if data is not None and data.own:
        # Owned before it is written: a crash in between leaves a journal that knows the file
        # may be divingbell's, and its original (captured before) to put back.
        record.own(change.target)
    if data is not None and data.write is not None and change.changes_host:
        note_dirs_to_create(host, change.target, record)
    created: list[str] = []
    try:
        if change.action is Action.WRITE and data.write is not None:
            _write(host, change.target, data.write, user_dir, created)
        elif change.action is Action.DELETE:
            if data.write is not None:
                spec = data.write
                meta = record.file_modes.get(change.target)
                if meta is not None:
                    spec = replace(spec, mode=meta[0], owner=(meta[1], meta[2]), owner_user=None)
                _write(host, change.target, spec, user_dir, created)
            else:
                host.remove(change.target, user_dir=user_dir)
    finally:
        for directory in created:
            record.note_created_dir(directory)
    if data is not None and not data.own:
        record.disown(change.target)
        record.file_modes.pop(change.target, None)
        prune_created_dirs(host, change.target, record)


def note_dirs_to_create(host: Host, path: str, record: ModuleRecord) -> None:
    """Directories a write of `path` will create, in the journal before they exist: killed
    right after the mkdir, the journal still knows to remove them."""
    missing = host.missing_dirs(path.rstrip("/").rpartition("/")[0] or "/")
    if missing:
        for directory in missing:
            record.note_created_dir(directory)
        record.save_intent()


def prune_created_dirs(host: Host, path: str, record: ModuleRecord) -> None:
    """Remove the directories divingbell created for `path` once they are empty."""
    parent = path.rstrip("/").rpartition("/")[0]
    while parent and parent in record.created_dirs:
        if not host.rmdir_if_empty(parent) and host.exists(parent):
            break
        record.created_dirs = [d for d in record.created_dirs if d != parent]
        parent = parent.rpartition("/")[0]


def _write(host: Host, path: str, spec: FileSpec, user_dir: UserDir | None,
           created: list[str]) -> None:
    owner = spec.owner
    if spec.owner_user is not None:
        owner = host.user_ids(spec.owner_user)
    host.write_atomic(path, spec.content, spec.mode, owner=owner, dir_mode=spec.dir_mode,
                      user_dir=user_dir, created=created)


def undo_file(host: Host, change: Change) -> None:
    data: FileChange | None = change.payload
    if data is None or change.action not in (Action.WRITE, Action.DELETE):
        return
    user_dir = user_dir_of(host, data)
    if data.previous is None:
        host.remove(change.target, user_dir=user_dir)
    else:
        meta = data.seen.get(change.target)
        mode, owner = (meta[0], (meta[1], meta[2])) if meta else (0o644, None)
        host.write_atomic(change.target, data.previous, mode, owner=owner, user_dir=user_dir)


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
