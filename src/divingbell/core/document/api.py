"""The document entry points the CLI and the agent share.

Imports of YAML, pydantic and the schema happen inside the functions that need them: a run
whose document is in the validated-document cache never loads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from divingbell.core.errors import DocumentError, Problem

if TYPE_CHECKING:
    from divingbell.core.document.cache import Resolved
    from divingbell.core.document.nodeconfig import NodeConfig
    from divingbell.core.document.validate import ValidDocument


def read_documents(files: Iterable[Path]) -> list[tuple[str, bytes]]:
    """Each file's name and bytes; every unreadable file is reported."""
    contents, problems = [], []
    for path in files:
        try:
            contents.append((str(path), path.read_bytes()))
        except OSError as exc:
            problems.append(Problem("", f"cannot read {path}: {exc.strerror}"))
    if problems:
        raise DocumentError(problems)
    return contents


def load_contents(contents: Sequence[tuple[str, bytes]], *,
                  allow_empty: bool = False) -> ValidDocument:
    """Parse, merge in order and validate; raises DocumentError listing every problem."""
    from divingbell.core.document.loader import load_text, merge_layers
    from divingbell.core.document.validate import validate

    problems: list[Problem] = []
    layers = []
    for name, data in contents:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            problems.append(Problem("", f"not UTF-8 text (byte {data[exc.start]:#04x}): save "
                                    "the file as UTF-8", f"{name}:{line}"))
            continue
        try:
            layers.append(load_text(text, name))
        except DocumentError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DocumentError(problems)
    return validate(merge_layers(layers), allow_empty=allow_empty)


def load_document(files: Iterable[Path], *, allow_empty: bool = False) -> ValidDocument:
    """Load, merge and validate; raises DocumentError listing every problem."""
    return load_contents(read_documents(files), allow_empty=allow_empty)


def load_document_text(data: bytes | str, name: str) -> ValidDocument:
    """Like load_document, for a document received as bytes (the fleet service's PUT): the
    same loader and validation, problems located as `name:line`."""
    return load_contents([(name, data.encode() if isinstance(data, str) else data)])


def revision(document: ValidDocument) -> str:
    """A short, stable digest of the merged document: the revision a node converged to."""
    return revision_of(document.loaded.data)


def revision_of(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def node_config(document: ValidDocument, node: str, labels: Mapping[str, str]) -> NodeConfig:
    from divingbell.core.document.validate import resolve

    return resolve(document, node, labels)


def effective_document(document: ValidDocument, config: NodeConfig) -> dict[str, Any]:
    """A node's effective configuration as a complete document with no overrides (what
    `render` shows, plus `drift`): loading it gives that node the same configuration.
    Unlike `NodeConfig.dump`, secret fields (crypt hashes) keep their value, since the node
    needs them to converge."""
    from pydantic import SecretStr, TypeAdapter

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [reveal(v) for v in value]
        return value

    conf = {name: reveal(model.model_dump(mode="python", exclude_none=True, by_alias=False))
            for name, model in config.modules.items()}
    dumped: dict[str, Any] = TypeAdapter(dict[str, Any]).dump_python(
        {"drift": document.model.drift, "conf": conf}, mode="json")
    return dumped


def resolve_files(files: Sequence[Path], node: str, labels: Mapping[str, str],
                  cache_file: Path | None = None, *, allow_empty: bool = False) -> Resolved:
    """The node's configuration from document files, through the validated-document cache
    when `cache_file` is given (see `document.cache`)."""
    from divingbell.core.document import cache

    contents = read_documents(files)
    key = cache.cache_key(contents, node, labels, allow_empty) if cache_file is not None else ""
    if cache_file is not None:
        hit = cache.load(cache_file, key)
        if hit is not None:
            return hit
    document = load_contents(contents, allow_empty=allow_empty)
    resolved = cache.Resolved(node_config(document, node, labels), revision(document),
                              list(document.notes))
    if cache_file is not None:
        cache.store(cache_file, key, resolved)
    return resolved
