"""The package's imports go one way: no module reaches back up to one that imports it.

Every `import` in `src/` counts, also those inside functions (a lazy import is still a
dependency, only a later one), and those under `TYPE_CHECKING`. The import graph's strongly
connected components (Tarjan) of more than one module, or of a module importing itself, are
cycles. The cycles that still exist are allowlisted by name below, and the list may only
shrink: an allowlisted cycle that is gone fails too, so its entry is deleted with the fix.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Cycles other work is removing (issue 30); each entry is one strongly connected component.
KNOWN_CYCLES: dict[str, frozenset[str]] = {
    "the agent and its maintenance sequence": frozenset(
        {"divingbell.agent", "divingbell.maintenance.sequence"}),
    "fleet and rollout commands": frozenset(
        {"divingbell.commands.fleet", "divingbell.commands.rollout"}),
    "rollouts and the fleet service": frozenset(
        {"divingbell.fleet.rollouts", "divingbell.fleet.service"}),
}


def module_files(src: Path) -> dict[str, Path]:
    """Every module under `src` by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The modules of `modules` that `name` imports anywhere in its text."""
    known = set(modules)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    return {target for target in targets if target in known}


def import_graph(src: Path) -> dict[str, set[str]]:
    files = module_files(src)
    return {name: imports_of(name, path, files) for name, path in files.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components that are cycles (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(frozenset(component))
    return found


def cycle_problems(src: Path, allowed: Mapping[str, frozenset[str]]) -> list[str]:
    """What is wrong with the imports under `src`: each cycle not allowed, and each allowed
    one that no longer exists (its entry should go)."""
    found = cycles(import_graph(src))
    problems = [f"import cycle: {' <-> '.join(sorted(cycle))}" for cycle in found
                if cycle not in allowed.values()]
    problems += [f"allowlisted cycle {label!r} ({' <-> '.join(sorted(cycle))}) is gone: "
                 "delete its entry" for label, cycle in allowed.items() if cycle not in found]
    return sorted(problems)


def test_src_has_no_import_cycle_but_the_known_ones() -> None:
    assert cycle_problems(SRC, KNOWN_CYCLES) == []


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_cycle_fails(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "import json\n",
        # Through a lazy, relative import, as cli and entry once were.
        "pkg/cli.py": "from pkg import low\n\ndef main():\n    from .entry import main\n",
        "pkg/entry.py": "def main():\n    from pkg.cli import cli\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "from pkg.sub.b import thing\n",
        "pkg/sub/b.py": "from ..sub import c\nthing = 1\n",
        "pkg/sub/c.py": "import pkg.sub.a\n",
    })
    assert cycle_problems(src, {}) == [
        "import cycle: pkg.cli <-> pkg.entry",
        "import cycle: pkg.sub.a <-> pkg.sub.b <-> pkg.sub.c",
    ]
    allowed = {"cli": frozenset({"pkg.cli", "pkg.entry"}),
               "abc": frozenset({"pkg.sub.a", "pkg.sub.b", "pkg.sub.c"})}
    assert cycle_problems(src, allowed) == []


def test_an_allowlisted_cycle_that_is_gone_fails(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n",
                           "pkg/b.py": "x = 1\n"})
    assert cycle_problems(src, {"old": frozenset({"pkg.a", "pkg.b"})}) == [
        "allowlisted cycle 'old' (pkg.a <-> pkg.b) is gone: delete its entry"]
    assert cycles(import_graph(src)) == []


def test_a_module_importing_itself_is_a_cycle(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "def f():\n    import pkg.a\n"})
    assert cycle_problems(src, {}) == ["import cycle: pkg.a"]
