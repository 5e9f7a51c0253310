"""Load YAML documents strictly: duplicate keys are errors, every value remembers its file:line.

Layered files deep-merge in order (later wins; mappings merge recursively, lists are replaced
whole), like layered values files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from divingbell.core.document.paths import PathKey, format_path
from divingbell.core.errors import DocumentError, Problem

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


# Bounds for hostile input: one bad document reaches every node's agent at once, so it must
# fail fast with a clear error, never hang, exhaust memory or overflow the stack.
MAX_BYTES = 4 * 1024 * 1024      # a ConfigMap holds at most 1 MiB
MAX_DEPTH = 64                   # nesting; real documents need about 10
MAX_NODES = 50_000               # values after alias expansion (billion laughs)
MAX_SCALAR_DIGITS = 40           # an integer longer than this cannot be any host setting
_STANDARD_TAGS = {f"tag:yaml.org,2002:{t}" for t in (
    "str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")}


@contextmanager
def _bounded_loader(text: str, source: str, what: str) -> Iterator[yaml.SafeLoader]:
    """A loader for `text` once it passed the bounds above; inside the block, YAML errors and
    too deep nesting become located problems, and the loader is disposed after it."""
    if len(text) > MAX_BYTES:
        raise DocumentError([Problem("", f"{what} is larger than {MAX_BYTES} bytes", source)])
    _prescan(text, source)
    loader = _Loader(text)
    try:
        yield loader
    except yaml.YAMLError as exc:
        raise DocumentError([_yaml_problem(exc, source)]) from None
    except RecursionError:
        raise DocumentError([Problem("", "nested too deeply", source)]) from None
    finally:
        loader.dispose()


def load_text(text: str, source: str = "<string>") -> Loaded:
    problems: list[Problem] = []
    with _bounded_loader(text, source, "the document") as loader:
        node = loader.get_single_node()
    if node is None:
        return Loaded({}, {(): f"{source}:1"}, [source])
    marks: dict[PathKey, str] = {}
    builder = _Builder(loader, source, marks, problems)
    data = builder.construct(node, ())
    if problems:
        raise DocumentError(problems[:50])
    if not isinstance(data, dict):
        raise DocumentError([Problem("", "the document must be a mapping with a `conf:` key",
                                     f"{source}:{node.start_mark.line + 1}")])
    return Loaded(data, marks, [source])


def _yaml_problem(exc: yaml.YAMLError, source: str) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    reason = getattr(exc, "problem", None) or str(exc)
    return Problem("", f"not valid YAML: {reason}", where)


def _prescan(text: str, source: str) -> None:
    """Walk the event stream (no recursion, no construction) and refuse what would make
    composing or building the document unbounded: deep nesting, recursive aliases."""
    depth = 0
    open_anchors: list[str | None] = []
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                open_anchors.append(event.anchor)
                if depth > MAX_DEPTH:
                    raise DocumentError([Problem(
                        "", f"nested more than {MAX_DEPTH} levels deep",
                        _event_where(event, source))])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                open_anchors.pop()
            elif isinstance(event, yaml.AliasEvent) and event.anchor in open_anchors:
                raise DocumentError([Problem(
                    "", f"recursive alias *{event.anchor}: it refers to a value that "
                    "contains it", _event_where(event, source))])
    except yaml.YAMLError as exc:
        raise DocumentError([_yaml_problem(exc, source)]) from None


class _Builder:
    """Plain dicts and lists from composed nodes, with a budget for alias expansion."""

    def __init__(self, loader: yaml.SafeLoader, source: str, marks: dict[PathKey, str],
                 problems: list[Problem]) -> None:
        self.loader = loader
        self.source = source
        self.marks = marks
        self.problems = problems
        self.budget = MAX_NODES

    def where(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}"

    def construct(self, node: yaml.Node, path: PathKey) -> Any:
        self.budget -= 1
        if self.budget < 0:
            if self.budget == -1:
                self.problems.append(Problem(
                    format_path(path), f"the document expands to more than {MAX_NODES} "
                    "values (aliases of aliases?)", self.where(node)))
            return None
        self.marks.setdefault(path, self.where(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                self.problems.append(Problem(format_path(path), f"unsupported tag {node.tag!r}"
                                             "; only plain YAML lists are accepted",
                                             self.where(node)))
                return []
            return [self.construct(item, (*path, index)) for index, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[str, Any]:
        if node.tag != "tag:yaml.org,2002:map":
            self.problems.append(Problem(format_path(path), f"unsupported tag {node.tag!r}; "
                                         "only plain YAML mappings are accepted",
                                         self.where(node)))
            return {}
        try:
            self.loader.flatten_mapping(node)  # resolves `<<` merge keys
        except yaml.YAMLError as exc:
            self.problems.append(Problem(format_path(path), _reason(exc), self.where(node)))
            return {}
        except RecursionError:
            self.problems.append(Problem(format_path(path), "merge keys nested too deeply",
                                         self.where(node)))
            return {}
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(Problem(format_path(path),
                                             "mapping keys must be plain scalars",
                                             self.where(key_node)))
                continue
            # Keys are the text as written: `on:` is the key "on", not True.
            key = str(key_node.value)
            if key in result:
                self.problems.append(Problem(
                    format_path((*path, key)),
                    f"duplicate key {key!r} (first defined at {self.marks[(*path, key)]})",
                    self.where(key_node),
                ))
                continue
            self.marks[(*path, key)] = self.where(key_node)
            result[key] = self.construct(value_node, (*path, key))
        return result

    def _scalar(self, node: yaml.Node, path: PathKey) -> Any:
        tag = node.tag
        value = str(node.value)
        if tag not in _STANDARD_TAGS:
            self.problems.append(Problem(format_path(path), f"unsupported tag {tag!r}; only "
                                         "plain YAML values are accepted", self.where(node)))
            return None
        if tag == "tag:yaml.org,2002:int":
            if _YAML11_SURPRISE_INT.match(value):
                return value
            if len(value) > MAX_SCALAR_DIGITS:
                self.problems.append(Problem(format_path(path), f"number too long ({len(value)} "
                                             "characters)", self.where(node)))
                return None
        try:
            constructed = self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            self.problems.append(Problem(format_path(path),
                                         f"{value[:40]!r} is not a valid {tag.rsplit(':', 1)[-1]}"
                                         f" ({_reason(exc)})", self.where(node)))
            return None
        if isinstance(constructed, float) and not math.isfinite(constructed):
            self.problems.append(Problem(format_path(path), f"{value!r} is not a finite number",
                                         self.where(node)))
            return None
        return constructed


def _reason(exc: BaseException) -> str:
    problem = getattr(exc, "problem", None)
    return str(problem or exc).splitlines()[0][:200]


def load_all_text(text: str, source: str = "<string>") -> list[Loaded]:
    """Every YAML document in `text` (separated by `---`), each with its own file:line marks,
    under the same bounds as `load_text`. Documents may be any YAML value; callers check the
    shape they expect."""
    problems: list[Problem] = []
    documents: list[Loaded] = []
    with _bounded_loader(text, source, "the file") as loader:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            marks: dict[PathKey, str] = {}
            data = _Builder(loader, source, marks, problems).construct(node, ())
            documents.append(Loaded(data, marks, [source]))
    if problems:
        raise DocumentError(problems[:50])
    return documents


def load_file(path: Path) -> Loaded:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise DocumentError([Problem("", f"cannot read {path}: {exc.strerror}")]) from None
    if len(raw) > MAX_BYTES:
        raise DocumentError([Problem("", f"the document is larger than {MAX_BYTES} bytes",
                                     str(path))])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DocumentError([Problem("", f"not UTF-8: byte 0x{raw[exc.start]:02x} cannot be "
                                     "decoded", f"{path}:{line}")]) from None
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
    return merge_layers(layers)


def merge_layers(layers: Iterable[Loaded]) -> Loaded:
    """Deep-merge in order, later layers winning; each path keeps the file:line of the last
    layer that wrote it."""
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


def _event_where(event: yaml.Event, source: str) -> str:
    mark = event.start_mark
    return f"{source}:{mark.line + 1}" if mark is not None else source
