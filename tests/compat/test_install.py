"""The documented install path, run as an operator would on a Debian host: deploy/install into
an overlay of this machine's root (chroot; nothing here changes), then the agent's unit is
checked with `systemd-analyze verify` against what the install put there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from divingbell import __version__
from tests.conftest import require_root_tools

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parent.parent.parent


def copy_checkout(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", "build", "dist"))


def test_deploy_install_then_the_unit_verifies(overlay_root: Path) -> None:
    require_root_tools("systemd-analyze", "chroot")
    copy_checkout(overlay_root / "tmp/divingbell-src")
    install = subprocess.run(["chroot", str(overlay_root), "/tmp/divingbell-src/deploy/install"],
                             capture_output=True, text=True, check=False)
    if install.returncode != 0 and ("NewConnectionError" in install.stderr
                                    or "No matching distribution" in install.stderr):
        pytest.skip(f"deploy/install needs PyPI (or a pip cache): {install.stderr[-300:]}")
    assert install.returncode == 0, install.stdout + install.stderr
    assert f"installed: divingbell, version {__version__} in /opt/divingbell" in install.stdout
    site = next((overlay_root / "opt/divingbell/lib").glob("python3*/site-packages"))
    assert not (site / "distutils-precedence.pth").exists(), "no setuptools hook at start-up"
    link = overlay_root / "usr/local/sbin/divingbell"
    assert link.is_symlink() and str(link.readlink()) == "/opt/divingbell/bin/divingbell"
    version = subprocess.run(["chroot", str(overlay_root), "divingbell", "--version"],
                             capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"})
    assert version.stdout.strip() == f"divingbell, version {__version__}"
    unit = "/etc/systemd/system/divingbell-agent.service"
    assert (overlay_root / unit.lstrip("/")).read_text() == (
        REPO / "deploy/divingbell-agent.service").read_text()
    verify = subprocess.run(["chroot", str(overlay_root), "systemd-analyze", "verify", unit],
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr


def test_the_unit_names_the_installed_command() -> None:
    unit = (REPO / "deploy/divingbell-agent.service").read_text()
    assert "ExecStart=/opt/divingbell/bin/divingbell agent " in unit
    assert "deploy/install" in unit


def test_deploy_install_refuses_to_run_unprivileged() -> None:
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "sh", str(REPO / "deploy/install")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "run it as root" in result.stderr
