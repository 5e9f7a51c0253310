"""Hostile YAML ends in a clear, located error within bounded time and memory (issue 11,
section 3): named cases, then a hypothesis fuzz run under kernel resource limits."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from divingbell.core.document.loader import MAX_NODES, load_file, load_text
from divingbell.core.document.validate import validate
from divingbell.core.errors import DocumentError

LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n"
    for i in range(8))

# Each case: the text, and what divingbell's message says, or None where the wording is not
# divingbell's own: how deep nesting is refused depends on the PyYAML/libyaml build (libyaml may
# stop at its own depth limit before divingbell's check). Either way it must be a located error.
HOSTILE: dict[str, tuple[str, str | None]] = {
    "billion laughs": (LAUGHS, f"more than {MAX_NODES} values"),
    "recursive alias": ("a: &a [*a]\n", "recursive alias *a"),
    "recursive merge": ("a: &a {<<: *a}\n", "recursive alias *a"),
    "5000-deep lists": ("conf: " + "[" * 5000 + "]" * 5000 + "\n", None),
    "5000-deep mappings": ("conf: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", None),
    "5000-digit integer": ("conf:\n  sysctl:\n    vm.x: " + "9" * 5000 + "\n", "too long"),
    "bad timestamp": ("conf: !!timestamp 2001-13-45\n", "not a valid timestamp"),
    "unknown tag": ("conf: !!foo 1\n", "unsupported tag"),
    "python tag": ("conf: !!python/object/apply:os.system [id]\n", "unsupported tag"),
    "float abc": ("conf: !!float abc\n", "not a valid float"),
    "merge of a scalar": ("conf: {<<: 5}\n", "for merging"),
    "infinity": ("conf:\n  exec:\n    s: {data: x, rerun_interval: .inf}\n", "finite"),
    "two documents": ("conf: {}\n---\nconf: {}\n", "not valid YAML"),
    "tab indentation": ("conf:\n\tsysctl: {}\n", "not valid YAML"),
    "set tag": ("conf: !!set {a, b}\n", "unsupported tag"),
    "control character": ("conf: \x07\n", "not valid YAML"),
    "empty file": ("", "no `conf:`"),
    "truncated": ("conf:\n  sysctl:\n    vm.swap", "must be a mapping"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_is_a_located_error(name: str) -> None:
    text, expected = HOSTILE[name]
    with pytest.raises(DocumentError) as caught:
        validate(load_text(text, "doc.yaml"))
    shown = "\n".join(str(p) for p in caught.value.problems)
    if expected is None:
        assert re.search(r"\(doc\.yaml:1(:\d+)?\)", shown), shown
    else:
        assert expected in shown
    assert "doc.yaml" in shown


@pytest.mark.parametrize("name", ["5000-deep lists", "5000-deep mappings"])
def test_deep_nesting_through_apply_is_located_and_changes_nothing(
        cli: object, root: Path, tmp_path: Path, name: str) -> None:
    """Whichever layer refuses the depth, `apply` ends with the usage exit code and one line
    naming the file and line, and the host root is left as it was."""
    from tests.conftest import Cli

    assert isinstance(cli, Cli)
    path = tmp_path / "deep.yaml"
    path.write_text(HOSTILE[name][0])
    result = cli("apply", path, "--root", root)
    assert result.returncode == 2, result.stderr
    assert re.search(rf"{re.escape(str(path))}:1\b", result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert list(root.iterdir()) == []


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_bytes(b"conf:\n  sysctl:\n    vm.x: \xff\n")
    with pytest.raises(DocumentError, match=r"not UTF-8: byte 0xff.*doc.yaml:3"):
        load_file(path)


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_bytes(b"conf: {}\n" + b"#" * (5 * 1024 * 1024))
    with pytest.raises(DocumentError, match="larger than"):
        load_file(path)


def test_hostile_documents_through_the_cli(cli: object, tmp_path: Path) -> None:
    from tests.conftest import Cli

    assert isinstance(cli, Cli)
    for name, (text, _) in HOSTILE.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(text)
        result = cli("validate", path)
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))   # 2 GiB of address space
    resource.setrlimit(resource.RLIMIT_CPU, (600, 600))          # 10 minutes of CPU


def test_fuzz_loader_and_validator_within_kernel_limits() -> None:
    """Hypothesis-generated documents (valid-ish trees, random bytes, truncations, alias bombs
    of every size, deep nesting). A hang or a memory blow-up is killed by the kernel and fails
    the test; every input must end in a document or a DocumentError with messages."""
    examples = 600
    script = Path(__file__).with_name("fuzz_loader.py")
    done = subprocess.run([sys.executable, str(script), str(examples)], capture_output=True,
                          text=True, preexec_fn=_limits, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    count = int(done.stdout.rsplit("fuzz inputs:", 1)[1])
    print(f"\nfuzz inputs: {count}")  # shown with `pytest -s`
    assert count >= examples
