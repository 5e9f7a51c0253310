"""`divingbell apply` without click: the fast path must parse exactly as click would, fall back
to click for anything else, and leave click, pydantic and inspect's imports out of a no-op."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from divingbell.commands.apply import ApplyOptions, parse_fast
from divingbell.commands.host import apply as apply_command
from tests.conftest import Cli


def click_parse(argv: list[str]) -> ApplyOptions | None:
    """What click makes of `divingbell apply ARGV`, or None if it refuses it."""
    try:
        with apply_command.make_context("apply", list(argv)) as ctx:
            return ApplyOptions(**ctx.params)
    except (click.ClickException, click.exceptions.Exit):
        return None


@pytest.fixture
def place(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "a.yaml").write_text("conf: {}\n")
    (tmp_path / "b.yaml").write_text("conf: {}\n")
    (tmp_path / "root").mkdir()
    return {"doc": str(tmp_path / "a.yaml"), "doc2": str(tmp_path / "b.yaml"),
            "root": str(tmp_path / "root"), "dir": str(tmp_path), "missing": str(
                tmp_path / "nope.yaml"), "procsys": str(tmp_path / "ps")}


@pytest.mark.parametrize("argv", [
    ["{doc}"],
    ["{doc}", "--root", "{root}"],
    ["--root={root}", "{doc}", "{doc2}"],
    ["{doc}", "--node", "n1", "--label", "a=b", "--label=example.com/c=", "--format", "json",
     "--lock-timeout", "2.5", "--allow-empty", "--adopt", "--proc-sys", "{procsys}"],
    ["--format=text", "{doc}", "--lock-timeout=0"],
])
def test_what_the_fast_path_accepts_click_parses_the_same(
        place: dict[str, str], argv: list[str]) -> None:
    args = [a.format(**place) for a in argv]
    fast = parse_fast(args, {})
    assert fast is not None
    assert fast == click_parse(args)


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-h"], ["{doc}", "-v"], ["{doc}", "--"], ["-", "{doc}"],
    ["{dir}"], ["{missing}"], ["{doc}", "--root", "{missing}"], ["{doc}", "--root", "{doc}"],
    ["{doc}", "--root", "{root}", "--root", "{root}"], ["{doc}", "--root"],
    ["{doc}", "--root", ""], ["{doc}", "--format", "yaml"], ["{doc}", "--lock-timeout", "x"],
    ["{doc}", "--node", "a b"], ["{doc}", "--node", ""], ["{doc}", "--label", "novalue"],
    ["{doc}", "--label", "a b=c"], ["{doc}", "--adopt=yes"], ["{doc}", "--adopt", "--adopt"],
    ["{doc}", "--proc-sys", "{doc}"], ["{doc}", "--roo", "{root}"],
])
def test_anything_else_is_left_to_click(place: dict[str, str], argv: list[str]) -> None:
    assert parse_fast([a.format(**place) for a in argv], {}) is None


def test_environment_defaults_are_clicks(place: dict[str, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"DIVINGBELL_ROOT": place["root"], "DIVINGBELL_PROC_SYS": place["procsys"]}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    fast = parse_fast([place["doc"]], environ)
    assert fast is not None and fast.root == Path(place["root"])
    assert fast == click_parse([place["doc"]])
    environ["DIVINGBELL_ROOT"] = place["missing"]
    assert parse_fast([place["doc"]], environ) is None


TOKENS = ["{doc}", "{doc2}", "{dir}", "{missing}", "{root}", "{procsys}", "--root", "--proc-sys",
          "--node", "--label", "--format", "--lock-timeout", "--allow-empty", "--adopt",
          "--help", "--", "-", "text", "json", "yaml", "n1", "a=b", "x", "1.5", "", " ",
          "--root={root}", "--label=a=b", "--format=json", "--node=", "--verbose"]


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TOKENS), max_size=8))
def test_fuzz_the_fast_path_never_disagrees_with_click(
        place: dict[str, str], tokens: list[str]) -> None:
    args = [t.format(**place) for t in tokens]
    fast = parse_fast(args, {})
    if fast is not None:
        assert fast == click_parse(args), args


def imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime`'s report."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_no_op_apply_imports_neither_click_nor_pydantic_nor_inspect(
        ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = tmp_path / "d.yaml"
    doc.write_text("conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n")
    first = ns_cli("apply", doc, "--root", root, "--node", "n1")
    assert first.returncode == 0, first.stderr
    assert "net.ipv4.ip_forward: 0 -> 1" in first.stdout
    again = ns_cli("apply", doc, "--root", root, "--node", "n1",
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert again.returncode == 0, again.stderr
    imported = imported_modules(again.stderr)
    assert "divingbell.core.engine.runner" in imported, "proof the report lists the imports"
    assert not imported & {"click", "pydantic", "yaml", "ast", "dis"}, sorted(imported)
    # The same command through click prints the same thing.
    through_click = subprocess.run(
        ["ip", "netns", "exec", ns_cli.netns.name,  # type: ignore[union-attr]
         sys.executable, "-c", "from divingbell.commands.cli import cli; cli(prog_name='divingbell')",
         "apply", str(doc), "--root", str(root), "--node", "n1"],
        check=False, capture_output=True, text=True)
    assert (through_click.returncode, through_click.stdout) == (0, again.stdout)
    assert "No changes: the host already matches the document." in again.stdout


def test_no_host_module_imports_pydantic_or_its_schema() -> None:
    """A no-op apply runs the modules on the cached document's light objects: each module
    names its pydantic model (beside it, `<name>_schema.py`) only for type checking."""
    from divingbell.core.document.keys import MODULE_NAMES

    imports = "; ".join(f"import divingbell.core.modules.{name}" for name in MODULE_NAMES)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", imports],
                          check=True, capture_output=True, text=True)
    imported = imported_modules(done.stderr)
    assert "divingbell.core.modules.exec" in imported, "proof the report lists the imports"
    assert "pydantic" not in imported
    assert sorted(name for name in imported if name.endswith(("_schema", ".schema"))) == []


def test_usage_errors_on_the_fast_paths_command_are_clicks(cli: Cli, tmp_path: Path) -> None:
    doc = tmp_path / "d.yaml"
    doc.write_text("conf: {}\n")
    result = cli("apply", doc, "--root", tmp_path / "nope")
    assert result.returncode == 2
    assert "Invalid value for '--root'" in result.stderr
    result = cli("apply", doc, "--root", tmp_path, "--label", "a b=c")
    assert result.returncode == 2 and "'a b' is not a Kubernetes label key" in result.stderr


def test_inspect_stand_in_loads_the_real_module_when_used() -> None:
    probe = (
        "import sys\n"
        "from divingbell.commands.entry import _ImportedOnFirstUse\n"
        "sys.modules['inspect'] = _ImportedOnFirstUse('inspect')\n"
        "import dataclasses\n"
        "assert 'ast' not in sys.modules\n"
        "@dataclasses.dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "print(Point.__doc__)\n"
        "import inspect\n"
        "print(inspect.signature(lambda a, b=1: 0), 'ast' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == ["Point(x: int)", "(a, b=1) True"]
