"""Fixtures for the network-boot tests: the discovery image (built once per session from the
cached Debian packages) and whether VMs can run here, and how fast."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from divingbell.image.discovery import DiscoveryImage, build_discovery_image
from tests.boot.qemu import kvm_usable, missing_tools

# Shared by every test session on this machine (and kept between them): the downloaded .debs
# and the extracted kernel, so a session builds the image in seconds.
IMAGE_CACHE = Path(os.environ.get("DIVINGBELL_TEST_CACHE", "/var/cache/divingbell-test")) / "image"


def require_image_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb", "depmod") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the discovery image needs {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("building the discovery image needs root (apt-get download into the cache)")


@pytest.fixture(scope="session")
def discovery_image(tmp_path_factory: pytest.TempPathFactory) -> DiscoveryImage:
    require_image_tools()
    return build_discovery_image(tmp_path_factory.mktemp("discovery-image"), cache=IMAGE_CACHE)


@dataclass(frozen=True)
class VmSupport:
    kvm: bool
    why: str


@pytest.fixture(scope="session")
def vm_support(discovery_image: DiscoveryImage,
               tmp_path_factory: pytest.TempPathFactory) -> VmSupport:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    if os.environ.get("DIVINGBELL_TEST_KVM") == "0":
        return VmSupport(False, "DIVINGBELL_TEST_KVM=0")
    kvm, why = kvm_usable(discovery_image.kernel, tmp_path_factory.mktemp("kvm-probe"))
    return VmSupport(kvm, why)
