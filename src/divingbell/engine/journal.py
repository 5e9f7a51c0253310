"""The journal: what divingbell owns on a host and each setting's original value.

Originals are captured once, before the first change to a setting, and kept until the setting
leaves the document and is restored. Storage sits behind a two-method protocol so where the
journal lives can change later; today it is a JSON file under <root>/var/lib/divingbell/.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from divingbell.host import Host

STATE_DIR = "/var/lib/divingbell"
JOURNAL_FILE = f"{STATE_DIR}/journal.json"
LAST_RUN_FILE = f"{STATE_DIR}/last-run.json"
FORMAT_VERSION = 1


@dataclass
class ModuleRecord:
    originals: dict[str, str | None] = field(default_factory=dict)
    owned_files: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.originals or self.owned_files or self.state)

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
        return {"originals": self.originals, "owned_files": self.owned_files, "state": self.state}


@dataclass
class Journal:
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
    def from_dict(cls, data: dict[str, Any]) -> Journal:
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"journal format {version!r} is not {FORMAT_VERSION}")
        return cls({
            name: ModuleRecord(
                originals=dict(raw.get("originals", {})),
                owned_files=list(raw.get("owned_files", [])),
                state=dict(raw.get("state", {})),
            )
            for name, raw in data.get("modules", {}).items()
        })


class JournalStore(Protocol):
    def load(self) -> Journal: ...
    def save(self, journal: Journal) -> None: ...


class FileJournalStore:
    """The journal as one JSON file, written atomically, readable by root only (it may hold
    originals of sensitive settings)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._last_saved: str | None = None

    def load(self) -> Journal:
        text = self.host.read_text(JOURNAL_FILE)
        if text is None:
            return Journal()
        self._last_saved = text
        try:
            return Journal.from_dict(json.loads(text))
        except (ValueError, AttributeError, TypeError) as exc:
            raise JournalCorrupt(f"{self.host.path(JOURNAL_FILE)} is unreadable: {exc}") from None

    def save(self, journal: Journal) -> None:
        text = json.dumps(journal.as_dict(), indent=2, sort_keys=True) + "\n"
        if text == self._last_saved:
            return
        self._ensure_state_dir()
        self.host.write_atomic(JOURNAL_FILE, text, mode=0o600)
        self._last_saved = text

    def save_last_run(self, report: dict[str, Any]) -> None:
        self._ensure_state_dir()
        # A report, rewritten by every run: atomic, but not worth an fsync on every no-op.
        self.host.write_atomic(LAST_RUN_FILE, json.dumps(report, indent=2) + "\n", mode=0o600,
                               durable=False)

    def load_last_run(self) -> dict[str, Any] | None:
        text = self.host.read_text(LAST_RUN_FILE)
        if text is None:
            return None
        with contextlib.suppress(ValueError):
            loaded = json.loads(text)
            return loaded if isinstance(loaded, dict) else None
        return None

    def _ensure_state_dir(self) -> None:
        ensure_state_dir(self.host)


def ensure_state_dir(host: Host) -> None:
    """divingbell's state directory, readable by root only."""
    directory = host.path(STATE_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o777 != 0o700:
        directory.chmod(0o700)


class JournalCorrupt(Exception):
    pass
