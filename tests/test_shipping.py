"""Shipping: the wheel carries the one version, and the OCI image built from this checkout runs
`divingbell --version` (unpacked with umoci, entered with chroot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from divingbell import __version__
from divingbell.agent.manifests import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parent.parent


def build_wheel(directory: Path) -> Path:
    """The wheel of this checkout, built from a copy of it: builds in the checkout itself
    share its build/ and *.egg-info, and two test workers building at once break each other."""
    source = directory / "source"
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(directory), str(source)],
                   check=True, capture_output=True)
    (wheel,) = directory.glob("divingbell-*.whl")
    return wheel


def test_the_wheel_prints_the_version_from_one_place(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"divingbell-{__version__}-")
    # Pure Python: the wheel is importable as it is, so this runs the packaged code.
    run = subprocess.run([sys.executable, "-m", "divingbell", "--version"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(wheel)}, capture_output=True,
                         text=True, check=True)
    assert run.stdout.strip() == f"divingbell, version {__version__}"
    assert f"divingbell:{__version__}" == DEFAULT_IMAGE


@pytest.mark.kernel
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("umoci", "debootstrap")),
                    reason="needs umoci and debootstrap (.ci/run installs them)")
def test_the_image_builds_and_runs_divingbell(tmp_path: Path) -> None:
    build = subprocess.run([str(REPO / "deploy/build-image"), str(tmp_path / "out")],
                           env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                           text=True, check=False)
    if build.returncode != 0 and "debootstrap" in build.stderr and "Failed" in build.stderr:
        pytest.skip(f"no Debian mirror: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stdout + build.stderr
    archive = tmp_path / "out" / f"divingbell-{__version__}.oci.tar"
    layout = tmp_path / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="tar")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{__version__}", str(bundle)],
                   check=True, capture_output=True)
    rootfs = bundle / "rootfs"
    run = subprocess.run(["chroot", str(rootfs), "/opt/divingbell/bin/divingbell", "--version"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == f"divingbell, version {__version__}"
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["/opt/divingbell/bin/divingbell", "agent"]
    labels = config["annotations"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert "org.opencontainers.image.source" in labels
    assert not (rootfs / "usr/sbin/ethtool").exists(), "host tools come from the host"


def _base_closure() -> list[str]:
    """The distributions a plain `pip install divingbell` brings: its requirements without
    extras, and theirs, as this (locked) environment has them."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted, seen = ["divingbell"], set[str]()
    while wanted:
        name = wanted.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
    return sorted(seen - {"divingbell"})


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel of this checkout and only its base dependencies,
    copied from the locked .venv (no index, no network): a plain `pip install divingbell`."""
    from importlib import metadata

    work = tmp_path_factory.mktemp("base-install")
    wheel = build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin/python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True,
                               check=True).stdout.strip())
    for name in _base_closure():
        dist = metadata.distribution(name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if file.parts[0] == ".." or not source.is_file():
                continue  # scripts in bin/: not needed to import
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return venv


@pytest.mark.parametrize(("argv", "extra"), [
    (["policy", "manifests", "--config", "policy.yaml", "--ca-bundle", "ca.crt"], "policy"),
    (["tenants", "sync", "--source", "tenants.yaml", "--once"], "policy"),
    (["pki", "check", "."], "bootstrap"),
    (["pki", "generate", "--help"], None),
])
def test_a_command_needing_an_extra_names_it_without_a_traceback(
        base_install: Path, tmp_path: Path, argv: list[str], extra: str | None) -> None:
    from tests.policy.pki import ScratchCa
    from tests.policy.test_config import EXAMPLE

    (tmp_path / "policy.yaml").write_text(EXAMPLE)
    (tmp_path / "ca.crt").write_bytes(ScratchCa.create().pem)
    (tmp_path / "tenants.yaml").write_text("tenants: []\n")
    python = base_install / "bin/python"
    absent = subprocess.run([python, "-c", "import cryptography"], capture_output=True,
                            check=False)
    assert absent.returncode == 1, "the base install must not have cryptography"
    run = subprocess.run([base_install / "bin/divingbell", *argv], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert "Traceback" not in run.stderr, run.stderr
    if extra is None:  # help needs nothing extra
        assert run.returncode == 0, run.stderr
        return
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "cryptography" in lines[0] and f"pip install 'divingbell[{extra}]'" in lines[0]
