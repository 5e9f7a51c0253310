"""The validated-document cache: a node's resolved configuration, keyed on the exact bytes of
the document files (plus node, labels and this divingbell's code), so an unchanged document
skips YAML parsing, pydantic and override resolution on the next run.

One entry, in `/var/lib/divingbell/document-cache.json` under the host root: 0600 in a
directory only its owner can write. It is only ever read back if it is a regular file owned by
this user, not writable by anyone else, and names the same key; its content is JSON decoded
into plain read-only objects (`document.frozen`), so a tampered file cannot run code. Any doubt
is a miss: the document is then validated in full, with every error as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divingbell import __version__
from divingbell.core.document.nodeconfig import Applied, NodeConfig

CACHE_FILE = "/var/lib/divingbell/document-cache.json"
FORMAT = 1


@dataclass(frozen=True)
class Resolved:
    """What apply and plan need from the document for one node."""

    config: NodeConfig
    revision: str
    notes: list[str] = field(default_factory=list)


def cache_key(contents: Sequence[tuple[str, bytes]], node: str,
              labels: Mapping[str, str], allow_empty: bool = False) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT, __version__, _code_fingerprint(), node,
                              sorted(labels.items()), allow_empty]).encode())
    for name, data in contents:
        digest.update(f"\0{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _code_fingerprint() -> list[tuple[str, int, int]]:
    """The validation code's files (size, mtime): an edited checkout never reuses entries."""
    package = Path(__file__).resolve().parent
    out = []
    for entry in sorted(os.scandir(package), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            info = entry.stat()
            out.append((entry.name, info.st_size, info.st_mtime_ns))
    return out


def load(cache_path: Path, key: str) -> Resolved | None:
    """The cached entry for `key`, or None (absent, another key, unsafe, or unreadable)."""
    try:
        fd = os.open(cache_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        parent = os.stat(cache_path.parent)
        if not _private(info) or not _private(parent, directory=True):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            entry = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        return _decode_entry(entry)
    except (KeyError, TypeError, ValueError):
        return None


def _private(info: os.stat_result, *, directory: bool = False) -> bool:
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    return kind_ok and info.st_uid == os.geteuid() and not info.st_mode & 0o022 and (
        directory or not info.st_mode & 0o077)


def _decode_entry(entry: dict[str, Any]) -> Resolved:
    from divingbell.core.document.frozen import decode

    overrides = {
        str(name): Applied(str(kind), tuple(path), str(description))
        for name, (kind, path, description) in dict(entry["overrides"]).items()
    }
    config = NodeConfig(str(entry["node"]), dict(entry["labels"]),
                        {str(name): decode(data) for name, data in dict(entry["modules"]).items()},
                        overrides)
    return Resolved(config, str(entry["revision"]), [str(note) for note in entry["notes"]])


def store(cache_path: Path, key: str, resolved: Resolved) -> None:
    """Write the entry (best effort: a run that cannot write its cache is not a failure)."""
    from divingbell.core.document.frozen import encode

    config = resolved.config
    entry = {
        "key": key,
        "node": config.node,
        "labels": dict(config.labels),
        "revision": resolved.revision,
        "notes": resolved.notes,
        "modules": {name: encode(model) for name, model in config.modules.items()},
        "overrides": {name: [a.kind, list(a.path), a.description]
                      for name, a in config.overrides.items()},
    }
    data = json.dumps(entry, separators=(",", ":")).encode()
    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
    try:
        cache_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            rest = memoryview(data)
            while rest:  # a short write (a nearly full disk) must not cut the entry short
                rest = rest[os.write(fd, rest):]
        finally:
            os.close(fd)
        os.replace(tmp, cache_path)
    except OSError:
        # A full or read-only state filesystem: no cache this time, and no temp file left.
        with contextlib.suppress(OSError):
            tmp.unlink()
