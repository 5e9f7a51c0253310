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
from divingbell.manifests import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_prints_the_version_from_one_place(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("divingbell-*.whl")
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
