"""Load YAML documents strictly: duplicate keys are errors, every value remembers its file:line.

Layered files deep-merge in order (later wins; mappings merge recursively, lists are replaced
whole), like layered values files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from divingbell.document.paths import PathKey, format_path
from divingbell.errors import DocumentError, Problem

try:  # libyaml's parser is several times faster; the constructor stays ours either way
    _Loader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader

# YAML 1.1 reads 0640 as octal 416 and 1:20 as sexagesimal 80. Nobody writing host config means
# either: file modes and sysctl values are kept exactly as written (the kernel parses "0640"
# itself), so these plain scalars stay strings.
_YAML11_SURPRISE_INT = re.compile(r"^[-+]?(0[0-7_]+|[1-9][0-9_]*(:[0-5]?[0-9])+)$")


@dataclass
class Loaded:
    """A merged document with the file:line of every path it contains."""

    data: dict[str, Any]
    marks: dict[PathKey, str] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def location(self, path: PathKey) -> str | None:
        """file:line of `path`, or of its nearest ancestor that has one."""
        for cut in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:cut]))
            if mark:
                return mark
        return None


def load_text(text: str, source: str = "<string>") -> Loaded:
    problems: list[Problem] = []
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        reason = getattr(exc, "problem", None) or str(exc)
        raise DocumentError([Problem("", f"not valid YAML: {reason}", where)]) from None
    finally:
        loader.dispose()
    if node is None:
        return Loaded({}, {(): f"{source}:1"}, [source])
    marks: dict[PathKey, str] = {}
    data = _construct(loader, node, (), source, marks, problems)
    if problems:
        raise DocumentError(problems)
    if not isinstance(data, dict):
        raise DocumentError([Problem("", "the document must be a mapping with a `conf:` key",
                                     f"{source}:{node.start_mark.line + 1}")])
    return Loaded(data, marks, [source])


def load_all_text(text: str, source: str = "<string>") -> list[Loaded]:
    """Every YAML document in `text` (separated by `---`), each with its own file:line marks.
    Documents may be any YAML value; callers check the shape they expect."""
    problems: list[Problem] = []
    loader = _Loader(text)
    documents: list[Loaded] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            marks: dict[PathKey, str] = {}
            data = _construct(loader, node, (), source, marks, problems)
            documents.append(Loaded(data, marks, [source]))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        reason = getattr(exc, "problem", None) or str(exc)
        raise DocumentError([Problem("", f"not valid YAML: {reason}", where)]) from None
    finally:
        loader.dispose()
    if problems:
        raise DocumentError(problems)
    return documents


def load_file(path: Path) -> Loaded:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DocumentError([Problem("", f"cannot read {path}: {exc.strerror}")]) from None
    return load_text(text, str(path))


def load_files(paths: Iterable[Path]) -> Loaded:
    """Load every file (reporting problems in all of them), then merge in order."""
    problems: list[Problem] = []
    layers: list[Loaded] = []
    for path in paths:
        try:
            layers.append(load_file(path))
        except DocumentError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DocumentError(problems)
    merged = Loaded({})
    for layer in layers:
        merged.data = deep_merge(merged.data, layer.data)
        merged.marks.update(layer.marks)
        merged.sources.extend(layer.sources)
    return merged


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge recursively and `over` wins; anything else (lists too) is replaced whole."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _construct(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: PathKey,
    source: str,
    marks: dict[PathKey, str],
    problems: list[Problem],
) -> Any:
    marks.setdefault(path, f"{source}:{node.start_mark.line + 1}")
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<` merge keys
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(format_path(path), "mapping keys must be plain scalars",
                                        f"{source}:{key_node.start_mark.line + 1}"))
                continue
            # Keys are the text as written: `on:` is the key "on", not True.
            key = str(key_node.value)
            if key in result:
                problems.append(Problem(
                    format_path((*path, key)),
                    f"duplicate key {key!r} (first defined at {marks[(*path, key)]})",
                    f"{source}:{key_node.start_mark.line + 1}",
                ))
                continue
            marks[(*path, key)] = f"{source}:{key_node.start_mark.line + 1}"
            result[key] = _construct(loader, value_node, (*path, key), source, marks, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(loader, item, (*path, index), source, marks, problems)
            for index, item in enumerate(node.value)
        ]
    if node.tag == "tag:yaml.org,2002:int" and _YAML11_SURPRISE_INT.match(node.value):
        return str(node.value)
    return loader.construct_object(node, deep=True)
