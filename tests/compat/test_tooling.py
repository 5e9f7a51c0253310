"""The developer-facing commands: the test run's skip summary, and the demo's guard rails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_the_test_run_lists_skips_and_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "def test_needs_a_tool():\n"
        "    pytest.skip('needs frobnicate (install with scripts/test-deps)')\n\n"
        "def test_also():\n"
        "    pytest.skip('needs frobnicate (install with scripts/test-deps)')\n\n"
        "def test_runs():\n"
        "    assert True\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.skip_summary", "-p",
         "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 test(s) skipped" in result.stdout
    assert "   2 needs frobnicate (install with scripts/test-deps)" in result.stdout
    assert "To run them: scripts/test-deps" in result.stdout


def test_the_demo_refuses_documents_with_sysctls_outside_the_sandbox(tmp_path: Path) -> None:
    doc = tmp_path / "global.yaml"
    doc.write_text("conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n  overrides:\n"
                   "    divingbell_sysctl:\n      hosts:\n"
                   "        - {name: superhost, conf: {sysctl: {vm.swappiness: 17}}}\n")
    result = subprocess.run([str(REPO / "scripts/demo"), str(doc)], capture_output=True,
                            text=True, check=False,
                            env={**os.environ, "DIVINGBELL_DEMO_VENV": str(REPO / ".venv")})
    assert result.returncode == 1
    assert "vm.swappiness" in result.stderr
    assert "not in the demo's network namespace" in result.stderr
    assert "\033[" not in result.stdout + result.stderr, "no escape codes into a pipe"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_the_fleet_demo_leaves_no_process_namespace_or_file_behind() -> None:
    """The whole demo runs; afterwards none of its processes (the service, the agents), network
    namespaces or its work directory remain."""
    demo = subprocess.Popen([str(REPO / "scripts/demo-fleet")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    output, _ = demo.communicate(timeout=600)
    assert demo.returncode == 0, output[-4000:]
    work = next(word for word in output.split() if word.startswith("/tmp/divingbell-fleet-demo."))
    work = work.removesuffix("/fleet.db)").removesuffix("/fleet.db")
    assert "divingbell serve" in output and "halted" in output, output[-4000:]
    assert _processes_mentioning(work) == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert f"dbdemo-s{demo.pid}" not in namespaces
    assert f"dbdemo-a{demo.pid}-" not in namespaces
    assert not Path(work).exists()


def _locked() -> dict[str, tuple[str, int]]:
    """requirements.lock: name -> (version, number of hashes)."""
    import re

    entries: dict[str, tuple[str, int]] = {}
    text = (REPO / "requirements.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z])", text):
        head = re.match(r"([A-Za-z0-9._-]+)==([^ ;\\]+)", block)
        if head:
            name = re.sub(r"[-_.]+", "-", head.group(1)).lower()
            entries[name] = (head.group(2), block.count("--hash=sha256:"))
    return entries


def test_the_lock_pins_every_declared_dependency_with_hashes() -> None:
    """What pyproject.toml declares (runtime, every extra, the build backend) is in
    requirements.lock at a version that satisfies it, with hashes, and the lock records the
    declarations it was made from (scripts/setup compares that line)."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = [*pyproject["project"]["dependencies"],
                *(r for extra in pyproject["project"]["optional-dependencies"].values()
                  for r in extra),
                *pyproject["build-system"]["requires"]]
    locked = _locked()
    for text in declared:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "divingbell":
            continue  # dev's divingbell[fleet,bootstrap,policy]
        assert name in locked, f"{text} is not in requirements.lock: run scripts/lock"
        version, hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (text, version)
        assert hashes >= 1, name
    digest = subprocess.run([sys.executable, str(REPO / "scripts/lockcheck.py"), "digest"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert f"# {digest}" in (REPO / "requirements.lock").read_text().splitlines()


def test_setup_refuses_a_lock_older_than_the_dependencies(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/setup", "scripts/lockcheck.py", "requirements.lock"):
        shutil.copy2(REPO / name, tmp_path / name)
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        pyproject.replace('"click>=8.1",', '"click>=8.1",\n    "requests>=2",', 1))
    run = subprocess.run([str(tmp_path / "scripts/setup")], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "run scripts/lock" in run.stderr
    assert not (tmp_path / ".venv").exists()
