"""The discovery image: built from Debian packages, complete, reproducible, and its scripts sound."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from divingbell.image.cpio import Entry, gzip_bytes, newc_archive
from divingbell.image.discovery import (
    DiscoveryImage,
    ImageError,
    build_discovery_image,
    module_closure,
    parse_modules_dep,
)
from tests.boot.conftest import IMAGE_CACHE, require_image_tools

INITRAMFS = Path(__file__).resolve().parents[2] / "src/divingbell/image/initramfs"


def cpio_list(initrd: Path) -> list[str]:
    """The member list as GNU cpio (not our writer) reads it."""
    if shutil.which("cpio") is None:
        pytest.skip("needs cpio (Debian: cpio)")
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=gzip.decompress(initrd.read_bytes()),
                             capture_output=True, check=True)
    return listing.stdout.decode().split()


def test_cpio_archive_is_read_back_by_gnu_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("needs cpio (Debian: cpio)")
    archive = newc_archive([
        Entry.directory("etc"), Entry.file("etc/a b", b"hello\n", 0o600),
        Entry.symlink("link", "etc/a b"), Entry.file("odd", b"123")
    ])
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=tmp_path, check=True)
    assert (tmp_path / "etc/a b").read_bytes() == b"hello\n"
    assert (tmp_path / "etc/a b").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "link").readlink() == Path("etc/a b")
    assert (tmp_path / "odd").read_bytes() == b"123"
    assert gzip_bytes(archive) == gzip_bytes(archive)
    with pytest.raises(ValueError, match="duplicate"):
        newc_archive([Entry.file("x", b""), Entry.file("x", b"")])


def test_module_closure_follows_dependencies_and_names_what_is_missing() -> None:
    deps = parse_modules_dep(
        "kernel/drivers/ata/ata_piix.ko: kernel/drivers/ata/libata.ko kernel/drivers/scsi/scsi_mod.ko\n"
        "kernel/drivers/ata/libata.ko: kernel/drivers/scsi/scsi_mod.ko\n"
        "kernel/drivers/scsi/scsi_mod.ko:\n"
        "kernel/drivers/net/e1000.ko:\n"
    )
    needed, built_in = module_closure(["ata-piix", "unix"], deps, {"unix"})
    assert needed == ["kernel/drivers/ata/ata_piix.ko", "kernel/drivers/ata/libata.ko",
                      "kernel/drivers/scsi/scsi_mod.ko"]
    assert built_in == ["unix"]
    with pytest.raises(ImageError, match="no module named nosuch, other"):
        module_closure(["e1000", "nosuch", "other"], deps, set())


def test_the_image_holds_kernel_busybox_drivers_and_the_client(
        discovery_image: DiscoveryImage) -> None:
    members = set(cpio_list(discovery_image.initrd))
    version = discovery_image.kernel_version
    modules = f"lib/modules/{version}"
    for path in ("init", "bin/busybox", "bin/sh", "dev/console", "usr/bin/divingbell-discovery",
                 "usr/lib/divingbell/install-hook", "usr/lib/divingbell/esp-head.img",
                 "usr/share/udhcpc/default.script",
                 "usr/share/divingbell/udhcpc.script", "etc/divingbell/modules",
                 f"{modules}/modules.dep",
                 f"{modules}/kernel/drivers/net/ethernet/intel/e1000/e1000.ko",
                 f"{modules}/kernel/drivers/block/virtio_blk.ko",
                 f"{modules}/kernel/drivers/ata/ata_piix.ko",
                 f"{modules}/kernel/drivers/ata/libata.ko",
                 f"{modules}/kernel/drivers/scsi/sd_mod.ko"):
        assert path in members, path
    # bzImage magic: the kernel is Debian's, as shipped.
    assert discovery_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    manifest = json.loads(discovery_image.manifest.read_text())
    assert [p["name"] for p in manifest["packages"]] == [
        "linux-image-amd64", f"linux-image-{version}", "busybox-static"]
    assert manifest["files"]["initrd.img"]["bytes"] == discovery_image.initrd.stat().st_size


def test_the_cli_rebuilds_the_same_bytes_from_the_cache(discovery_image: DiscoveryImage,
                                                         tmp_path: Path) -> None:
    from tests.conftest import REPO

    out = subprocess.run(
        [str(REPO / ".venv/bin/divingbell"), "image", "discovery", "-o", str(tmp_path / "again"),
         "--cache", str(IMAGE_CACHE), "--format", "json"],
        capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["reused_kernel_bundle"] is True
    assert summary["kernel_version"] == discovery_image.kernel_version
    for name in ("vmlinuz", "initrd.img", "image.json"):
        assert (tmp_path / "again" / name).read_bytes() == \
            (discovery_image.directory / name).read_bytes(), name


def test_a_replacement_hook_and_module_list_go_in(tmp_path: Path) -> None:
    require_image_tools()
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\necho my installer\n")
    built = build_discovery_image(tmp_path / "custom", cache=IMAGE_CACHE, hook=hook,
                                  modules=["e1000"])
    assert built.modules == ("kernel/drivers/net/ethernet/intel/e1000/e1000.ko",)
    data = gzip.decompress(built.initrd.read_bytes())
    assert b"#!/bin/sh\necho my installer\n" in data
    assert b"writes an MBR" not in data  # the built-in hook is gone


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    from tests.conftest import REPO

    not_a_script = tmp_path / "hook.bin"
    not_a_script.write_bytes(b"\x7fELF")
    with pytest.raises(ImageError, match="must start with #!"):
        build_discovery_image(tmp_path / "x", cache=IMAGE_CACHE, hook=not_a_script)
    with pytest.raises(ImageError, match="not a Debian package name"):
        build_discovery_image(tmp_path / "x", cache=IMAGE_CACHE, kernel_package="../x")
    require_image_tools()
    failed = subprocess.run(
        [str(REPO / ".venv/bin/divingbell"), "image", "discovery", "-o", str(tmp_path / "x"),
         "--cache", str(IMAGE_CACHE), "--module", "e1000", "--module", "nosuchdriver"],
        capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip() == "error: the kernel has no module named nosuchdriver"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", ["init", "discovery", "udhcpc.script", "install-hook"])
def test_shell_scripts_pass_shellcheck_as_posix_sh(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("needs shellcheck (Debian: shellcheck)")
    result = subprocess.run(["shellcheck", "-s", "sh", str(INITRAMFS / script)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
