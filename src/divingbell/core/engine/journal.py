"""The journal: what divingbell owns on a host and each setting's original value.

Originals are captured once, before the first change to a setting, and kept until the setting
leaves the document and is restored. Storage sits behind a two-method protocol so where the
journal lives can change later; today it is a JSON file under <root>/var/lib/divingbell/.
"""

from __future__ import annotations

import contextlib
import copy
import json
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from divingbell.core.errors import DivingbellError
from divingbell.core.host import Host

STATE_DIR = "/var/lib/divingbell"
JOURNAL_FILE = f"{STATE_DIR}/journal.json"
LAST_RUN_FILE = f"{STATE_DIR}/last-run.json"
PREVIOUS_FILE = f"{STATE_DIR}/journal.prev.json"
FORMAT_VERSION = 1
# Modules whose every originals key is a file path (others mix names and "/"-paths).
PATH_KEYED_ORIGINALS = frozenset({"perm"})


@dataclass
class ModuleRecord:
    """What divingbell holds for one module: originals, owned files, state."""

    originals: dict[str, str | None] = field(default_factory=dict)
    owned_files: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    # Directories divingbell made (for an owned file or a mount point): removed once empty.
    created_dirs: list[str] = field(default_factory=list)
    # path -> [mode, uid, gid] of an original file, so it comes back exactly as it was.
    file_modes: dict[str, list[int]] = field(default_factory=dict)
    # Set by the engine while the module applies: saves the journal now. A module calls it
    # after recording an intent (a user about to be created) and before acting on it.
    checkpoint: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def save_intent(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint()

    @property
    def empty(self) -> bool:
        return not (self.originals or self.owned_files or self.state or self.created_dirs)

    def note_created_dir(self, path: str) -> None:
        if path not in self.created_dirs:
            self.created_dirs = sorted([*self.created_dirs, path])

    def owns(self, path: str) -> bool:
        return path in self.owned_files

    def own(self, path: str) -> None:
        if path not in self.owned_files:
            self.owned_files = sorted([*self.owned_files, path])

    def disown(self, path: str) -> None:
        self.owned_files = [p for p in self.owned_files if p != path]

    def copy(self) -> ModuleRecord:
        return copy.deepcopy(self)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"originals": self.originals, "owned_files": self.owned_files,
                               "state": self.state}
        if self.created_dirs:
            out["created_dirs"] = self.created_dirs
        if self.file_modes:
            out["file_modes"] = self.file_modes
        return out


@dataclass
class Journal:
    """Every module's record: what to put back, and what divingbell owns."""

    modules: dict[str, ModuleRecord] = field(default_factory=dict)

    def record(self, module: str) -> ModuleRecord:
        return self.modules.setdefault(module, ModuleRecord())

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "modules": {
                name: record.as_dict()
                for name, record in sorted(self.modules.items())
                if not record.empty
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> Journal:
        """Strictly: anything but the exact shape this version writes is an error, because a
        journal misread is an original lost."""
        if not isinstance(data, dict):
            raise ValueError(f"the top level is {type(data).__name__}, not an object")
        version = data.get("version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"journal format {version!r} is not {FORMAT_VERSION} (written by "
                             "another divingbell version?)")
        modules = data.get("modules", {})
        if not isinstance(modules, dict):
            raise ValueError("`modules` is not an object")
        out: dict[str, ModuleRecord] = {}
        for name, raw in modules.items():
            where = f"modules.{name}"
            if not isinstance(raw, dict):
                raise ValueError(f"{where} is not an object")
            originals = raw.get("originals", {})
            if not isinstance(originals, dict) or not all(
                    isinstance(v, str) or v is None for v in originals.values()):
                raise ValueError(f"{where}.originals is not an object of strings")
            owned = raw.get("owned_files", [])
            if not isinstance(owned, list) or not all(isinstance(p, str) for p in owned):
                raise ValueError(f"{where}.owned_files is not a list of paths")
            state = raw.get("state", {})
            if not isinstance(state, dict):
                raise ValueError(f"{where}.state is not an object")
            dirs = raw.get("created_dirs", [])
            if not isinstance(dirs, list) or not all(isinstance(p, str) for p in dirs):
                raise ValueError(f"{where}.created_dirs is not a list of paths")
            modes = raw.get("file_modes", {})
            if not isinstance(modes, dict) or not all(
                    isinstance(m, list) and len(m) == 3
                    and all(isinstance(i, int) and not isinstance(i, bool) for i in m)
                    for m in modes.values()):
                raise ValueError(f"{where}.file_modes is not an object of [mode, uid, gid]")
            _check_absolute(f"{where}.owned_files", owned)
            _check_absolute(f"{where}.created_dirs", dirs)
            _check_absolute(f"{where}.file_modes", modes)
            if name in PATH_KEYED_ORIGINALS:
                _check_absolute(f"{where}.originals", originals)
            out[str(name)] = ModuleRecord(dict(originals), list(owned), dict(state),
                                          list(dirs), {k: list(v) for k, v in modes.items()})
        return cls(out)


def _check_absolute(where: str, paths: Iterable[str]) -> None:
    """divingbell only ever records host paths as absolute: anything else is damage, refused
    here rather than as a traceback from the first module that touches it."""
    for path in paths:
        if not path.startswith("/"):
            raise ValueError(f"{where} holds {path!r}, which is not an absolute path")


class JournalStore(Protocol):
    def load(self) -> Journal: ...
    def save(self, journal: Journal) -> None: ...


class FileJournalStore:
    """The journal as one JSON file, written atomically, readable by root only (it may hold
    originals of sensitive settings). The journal as it was when the last apply started is
    kept as a previous generation (journal.prev.json) to recover from."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._last_saved: str | None = None
        # The last saved journal in compact JSON (the C encoder): `save` compares it before
        # writing the indented file, which pure-Python serialisation made cost a no-op apply
        # about 10 ms when it was done per setting.
        self._last_compact: str | None = None

    def load(self, *, adopt: bool = False) -> Journal:
        """The journal; a clear JournalError (before anything changes) when it is damaged or
        missing while divingbell's own files are on the host. `adopt`: start a fresh journal
        that owns those files (they are deleted, not restored, when they leave the document)."""
        self._check_state_dir()
        try:
            text = self.host.read_text(JOURNAL_FILE)
        except OSError as exc:
            raise JournalCorrupt(self._damaged(f"cannot be read: {exc.strerror or exc}")
                                 ) from None
        if text is None:
            return self._fresh(adopt)
        self._last_saved = text
        try:
            data = json.loads(text)
            journal = Journal.from_dict(data)
            self._last_compact = _compact(data)
            return journal
        except (ValueError, RecursionError) as exc:
            why = "is empty (truncated?)" if not text.strip() else f"is damaged: {exc}"
            raise JournalCorrupt(self._damaged(why)) from None

    def _check_state_dir(self) -> None:
        info = self.host.lstat(STATE_DIR, follow=True)
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise JournalCorrupt(f"{self.host.path(STATE_DIR)} is not a directory; divingbell "
                                 "keeps its journal there. Move it away and see "
                                 "docs/hardening.md (journal recovery).")
        journal = self.host.lstat(JOURNAL_FILE, follow=True)
        if journal is not None and not stat.S_ISREG(journal.st_mode):
            raise JournalCorrupt(self._damaged("is not a regular file"))

    def _damaged(self, why: str) -> str:
        where = self.host.path(JOURNAL_FILE)
        previous = self.host.lstat(PREVIOUS_FILE, follow=True)
        advice = ("`divingbell recover --root ROOT --previous` puts back the previous generation "
                  f"({self.host.path(PREVIOUS_FILE)}, from the start of the last apply) and then "
                  "plans as usual" if previous is not None else
                  "no previous generation exists; `divingbell recover --root ROOT --adopt` "
                  "starts a fresh journal that owns divingbell's files found on the host")
        return (f"{where} {why}. Nothing was changed. {advice}; see docs/hardening.md "
                "(journal recovery).")

    def _fresh(self, adopt: bool) -> Journal:
        found = find_owned_files(self.host)
        if not found:
            return Journal()
        if not adopt:
            shown = ", ".join(path for _, path in found[:5]) + (
                f" (+{len(found) - 5} more)" if len(found) > 5 else "")
            previous = self.host.lstat(PREVIOUS_FILE, follow=True) is not None
            raise JournalMissing(
                f"{self.host.path(JOURNAL_FILE)} is missing, but files divingbell wrote are on "
                f"this host: {shown}. Without the journal, the originals they replaced are "
                "unknown, and applying now would take divingbell's own files for originals. "
                "Nothing was changed. "
                + ("Run `divingbell recover --root ROOT --previous` to put back the previous "
                   "journal generation, or " if previous else "Run ")
                + "`divingbell apply --adopt ...` (or `divingbell recover --root ROOT --adopt`) "
                "to start a fresh journal that owns these files; see docs/hardening.md.")
        journal = Journal()
        for module, path in found:
            journal.record(module).own(path)
        return journal

    def keep_previous(self) -> None:
        """Keep the journal as it is now as the previous generation (start of an apply)."""
        if self._last_saved is None:
            return
        # A run after a run that changed nothing finds the same generation there already:
        # reading it back is cheaper than a durable rewrite on every no-op apply.
        with contextlib.suppress(OSError):
            info = self.host.lstat(PREVIOUS_FILE)
            if (info is not None and stat.S_ISREG(info.st_mode) and info.st_mode & 0o777 == 0o600
                    and self.host.read_text(PREVIOUS_FILE) == self._last_saved):
                return
        self._ensure_state_dir()
        self.host.write_atomic(PREVIOUS_FILE, self._last_saved, mode=0o600)

    def save(self, journal: Journal) -> None:
        data = journal.as_dict()
        compact = _compact(data)
        if compact == self._last_compact:
            return
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        if text == self._last_saved:
            self._last_compact = compact
            return
        try:
            self._ensure_state_dir()
            self.host.write_atomic(JOURNAL_FILE, text, mode=0o600)
        except OSError as exc:
            raise JournalWriteError(
                f"cannot write {self.host.path(JOURNAL_FILE)}: {exc.strerror or exc}; the "
                "change it was to record was not made") from None
        self._last_saved = text
        self._last_compact = compact

    def save_last_run(self, report: dict[str, Any]) -> None:
        self._ensure_state_dir()
        # A report, rewritten by every run: atomic, but not worth an fsync on every no-op.
        self.host.write_atomic(LAST_RUN_FILE, json.dumps(report, indent=2) + "\n", mode=0o600,
                               durable=False)

    def load_last_run(self) -> dict[str, Any] | None:
        try:
            text = self.host.read_text(LAST_RUN_FILE)
        except OSError:
            return None
        if text is None:
            return None
        with contextlib.suppress(ValueError, RecursionError):
            loaded = json.loads(text)
            return loaded if isinstance(loaded, dict) else None
        return None

    def _ensure_state_dir(self) -> None:
        ensure_state_dir(self.host)


def _compact(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def ensure_state_dir(host: Host) -> None:
    """divingbell's state directory, readable by root only."""
    try:
        host.makedirs(STATE_DIR, 0o700)
        info = host.lstat(STATE_DIR, follow=True)
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise JournalCorrupt(f"{host.path(STATE_DIR)} is not a directory")
        if info is not None and info.st_mode & 0o777 != 0o700:
            host.chmod_dir(STATE_DIR, 0o700)
    except OSError as exc:
        raise JournalCorrupt(f"{host.path(STATE_DIR)}: {exc.strerror or exc}; divingbell keeps "
                             "its journal there (see docs/hardening.md)") from None


# Where each module's owned files live, and how divingbell names them: with the header every
# owned file starts with, this finds divingbell's files on a host whose journal is gone.
OWNED_PATTERNS: tuple[tuple[str, str], ...] = (
    ("sysctl", "/etc/sysctl.d/60-divingbell.conf"),
    ("limits", "/etc/security/limits.d/60-divingbell-*.conf"),
    ("mounts", "/etc/systemd/system/*.mount"),
    ("ethtool", "/etc/systemd/system/divingbell-ethtool-*.service"),
    ("apt", "/etc/apt/sources.list.d/divingbell-*.sources"),
    ("apt", "/etc/apt/keyrings/divingbell-*.asc"),
    ("apt", "/etc/apt/preferences.d/divingbell.pref"),
    ("uamlite", "/etc/sudoers.d/divingbell-*"),
)
OWNED_HEADER = "Managed by divingbell"
# The first line of every file a module writes: how find_owned_files knows its own.
MANAGED_LINE = f"# {OWNED_HEADER}; edits here are overwritten on its next apply."


def find_owned_files(host: Host) -> list[tuple[str, str]]:
    """(module, path) of every file on the host that says divingbell wrote it."""
    found: list[tuple[str, str]] = []
    for module, pattern in OWNED_PATTERNS:
        for path in host.glob(pattern):
            try:
                head = (host.read_text(path) or "")[:4096]
            except OSError:
                continue
            if OWNED_HEADER in head or (module == "apt" and "divingbell-" in path):
                found.append((module, path))
    for home in _homes(host):
        path = f"{home.rstrip('/')}/.ssh/authorized_keys"
        try:
            head = (host.read_text(path) or "")[:4096]
        except OSError:
            continue
        if OWNED_HEADER in head:
            found.append(("uamlite", path))
    return found


def _homes(host: Host) -> list[str]:
    try:
        text = host.read_text("/etc/passwd") or ""
    except OSError:
        return []
    return sorted({f[5] for f in (line.split(":") for line in text.splitlines())
                   if len(f) >= 7 and f[5].startswith("/") and f[5] != "/"})


class JournalError(DivingbellError):
    """The journal cannot be trusted; nothing was changed. The message says how to recover."""


class JournalCorrupt(JournalError):
    pass


class JournalMissing(JournalError):
    pass


class JournalWriteError(JournalError):
    pass
