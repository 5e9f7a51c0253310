"""The package's imports go one way: no module reaches back up to one that imports it.

Every `import` in `src/` counts, also those inside functions (a lazy import is still a
dependency, only a later one), and those under `TYPE_CHECKING`. The import graph's strongly
connected components (Tarjan) of more than one module, or of a module importing itself, are
cycles, and there are none: a shared helper moves down to a module both sides can import, a
borrowed private becomes a small public module of its own (issue 30).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


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


def test_src_has_no_import_cycle() -> None:
    assert cycle_problems(SRC, {}) == []


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


# The architecture page draws the tree: one table row per part, its first column the part's
# package (or modules), its text naming every module in it.
PAGE = SRC.parent / "docs" / "architecture.md"
PACKAGE = SRC / "divingbell"


def table_rows(page: str) -> list[tuple[list[str], list[str]]]:
    """The "Where each thing lives" table: per row, the paths of its first column and the
    backticked names in its text."""
    section = page.split("## Where each thing lives", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        where, what = line.strip("|").split("|", 1)
        rows.append((re.findall(r"`([^`]+)`", where), re.findall(r"`([^`]+)`", what)))
    return rows


def page_problems(page: str, package: Path) -> list[str]:
    """Where the page and the tree disagree: a path the page names that does not exist, a part
    of the tree no row covers, a module no row names."""
    problems = []
    covered: set[Path] = set()
    named: set[Path] = set()
    for wheres, names in table_rows(page):
        roots = [package / where for where in wheres]
        for where, root in zip(wheres, roots, strict=True):
            if not root.exists():
                problems.append(f"row {where}: no such path in the tree")
            covered.add(root)
            named.add(root)
        for name in names:
            if not re.fullmatch(r"\w[\w/*.-]*\.py|\w[\w/-]*/", name):
                continue
            bases = [root for root in roots if root.is_dir()] + [package]
            found = [hit for base in bases for hit in base.glob(name.rstrip("/"))]
            if not found:
                problems.append(f"row {wheres[0]}: names {name}, which is not in the tree")
            named.update(found)
    for path in sorted(package.iterdir()):
        if path.name.startswith(("_", ".")) or path.name == "py.typed":
            continue
        if not any(path == root or path in root.parents for root in covered):
            problems.append(f"{path.relative_to(package)}: no row of the page covers it")
    for module in sorted(package.rglob("*.py")):
        if module.name.startswith("_") or "migrations" in module.parts:
            continue
        if not any(module == root or root in module.parents for root in covered):
            continue
        if module not in named and not any(hit in module.parents for hit in named - covered):
            problems.append(f"{module.relative_to(package)}: the page never names it")
    return problems


def test_the_architecture_page_and_the_tree_agree() -> None:
    assert page_problems(PAGE.read_text(), PACKAGE) == []


def test_the_page_check_finds_a_missing_and_an_unnamed_module(tmp_path: Path) -> None:
    package = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/core/__init__.py": "",
                               "pkg/core/a.py": "", "pkg/core/b.py": "", "pkg/tool.py": ""})
    page = ("## Where each thing lives\n\n| where | what |\n| --- | --- |\n"
            "| `core/` | `a.py` and `gone.py` |\n| `cli/` | nothing |\n")
    assert page_problems(page, package / "pkg") == [
        "row core/: names gone.py, which is not in the tree",
        "row cli/: no such path in the tree",
        "tool.py: no row of the page covers it",
        "core/b.py: the page never names it",
    ]


def test_each_modules_configuration_model_lives_beside_it() -> None:
    from divingbell.core.document.keys import MODULE_NAMES
    from divingbell.core.document.schema import MODULE_MODELS

    assert list(MODULE_MODELS) == list(MODULE_NAMES)
    assert {name: model.__module__ for name, model in MODULE_MODELS.items()} == {
        name: f"divingbell.core.modules.{name}_schema" for name in MODULE_NAMES}


def part_graph(graph: Mapping[str, set[str]], depth: int = 2) -> dict[str, set[str]]:
    """The import graph between the parts: each module counted as its top-level package."""
    def part(name: str) -> str:
        return ".".join(name.split(".")[:depth])
    parts: dict[str, set[str]] = {}
    for name, targets in graph.items():
        parts.setdefault(part(name), set()).update(
            part(target) for target in targets if part(target) not in (part(name), "divingbell"))
    return parts


def layer_problems(graph: Mapping[str, set[str]], root: str = "divingbell") -> list[str]:
    """The parts import one way: no cycle between them, the host core imports no other part,
    and only the CLI imports the CLI."""
    parts = part_graph(graph)
    problems = [f"parts import each other: {' <-> '.join(sorted(cycle))}"
                for cycle in cycles(parts)]
    problems += [f"{root}.core imports {target}: the core is the bottom layer"
                 for target in sorted(parts.get(f"{root}.core", set()))]
    problems += [f"{name} imports {root}.commands: only the CLI imports the CLI"
                 for name, targets in sorted(parts.items())
                 if f"{root}.commands" in targets and name != f"{root}.__main__"]
    return problems


def test_the_parts_are_layered() -> None:
    assert layer_problems(import_graph(SRC)) == []


def test_a_part_reaching_up_fails(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "divingbell/__init__.py": "", "divingbell/core/__init__.py": "",
        "divingbell/core/host.py": "def run():\n    from divingbell.fleet import app\n",
        "divingbell/fleet/__init__.py": "", "divingbell/fleet/app.py": "import divingbell.core.host\n",
        "divingbell/kube/__init__.py": "from divingbell.commands import cli\n",
        "divingbell/commands/__init__.py": "", "divingbell/commands/cli.py": "import divingbell.kube\n",
    })
    assert layer_problems(import_graph(src)) == [
        "parts import each other: divingbell.commands <-> divingbell.kube",
        "parts import each other: divingbell.core <-> divingbell.fleet",
        "divingbell.core imports divingbell.fleet: the core is the bottom layer",
        "divingbell.kube imports divingbell.commands: only the CLI imports the CLI",
    ]
