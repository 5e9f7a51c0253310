"""The EFI system partition the default install hook writes: read back as FAT12 by the rules of
the FAT specification (not by the writer's code), its EFI application checked by binutils. The
UEFI VM test in test_network_boot.py boots it under OVMF."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from divingbell.image.efi import ESP_SECTORS, MESSAGE, efi_application, esp_head


def fat12_entry(fat: bytes, cluster: int) -> int:
    """The specification's FAT12 read: 12 bits at byte offset cluster * 1.5."""
    offset = cluster + cluster // 2
    pair = int.from_bytes(fat[offset:offset + 2], "little")
    return pair >> 4 if cluster % 2 else pair & 0xFFF


def read_file(volume: bytes, path: tuple[str, ...]) -> bytes:
    """A file of a FAT12 volume (short names), by its path from the root directory."""
    (sector_size, per_cluster, reserved, fats, root_entries, total16, _media, per_fat) = \
        struct.unpack_from("<HBHBHHBH", volume, 11)
    assert volume[510:512] == b"\x55\xaa"
    root_start = (reserved + fats * per_fat) * sector_size
    data_start = root_start + root_entries * 32
    clusters = (total16 * sector_size - data_start) // (per_cluster * sector_size)
    assert clusters < 4085, "a FAT12 volume by its cluster count"
    fat = volume[reserved * sector_size:(reserved + per_fat) * sector_size]
    assert volume[(reserved + per_fat) * sector_size:][:len(fat)] == fat, "the FATs agree"

    def chain(first: int) -> bytes:
        out = b""
        cluster = first
        while cluster < 0xFF8:
            start = data_start + (cluster - 2) * per_cluster * sector_size
            out += volume[start:start + per_cluster * sector_size]
            cluster = fat12_entry(fat, cluster)
        return out

    directory = volume[root_start:data_start]
    for depth, name in enumerate(path):
        stem, _, extension = name.partition(".")
        wanted = (stem.ljust(8) + extension.ljust(3)).encode()
        entries = [directory[i:i + 32] for i in range(0, len(directory), 32)]
        match = next(entry for entry in entries if entry[:11] == wanted)
        attributes, cluster, size = match[11], *struct.unpack_from("<HI", match, 26)
        is_last = depth == len(path) - 1
        assert bool(attributes & 0x10) == (not is_last), name
        directory = chain(cluster)
        if is_last:
            return directory[:size]
    raise AssertionError("empty path")


def test_the_partition_holds_the_removable_media_boot_path() -> None:
    head = esp_head()
    volume = head.ljust(ESP_SECTORS * 512, b"\0")
    assert struct.unpack_from("<H", volume, 19)[0] == ESP_SECTORS
    assert read_file(volume, ("EFI", "BOOT", "BOOTX64.EFI")) == efi_application()
    # Everything the FAT uses is in the head: the rest of the partition may hold anything.
    assert read_file(head + b"\xff" * (ESP_SECTORS * 512 - len(head)),
                     ("EFI", "BOOT", "BOOTX64.EFI")) == efi_application()
    assert esp_head() == head  # reproducible


def test_the_application_is_an_x86_64_efi_application_that_prints_its_line(
        tmp_path: Path) -> None:
    application = efi_application()
    assert MESSAGE.encode("utf-16-le") in application
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (Debian: binutils)")
    path = tmp_path / "BOOTX64.EFI"
    path.write_bytes(application)
    headers = subprocess.run(["objdump", "-x", str(path)], capture_output=True, text=True,
                             check=True).stdout
    assert "file format pei-x86-64" in headers
    assert "(EFI application)" in headers
    assert "relocs stripped" not in headers  # the firmware may load it anywhere
    code = subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True,
                          check=True).stdout
    # ConOut (SystemTable + 0x40), its OutputString (+8) on the message, then halt.
    for instruction in ("mov    0x40(%rdx),%rcx", "lea    0x19(%rip),%rdx", "call   *0x8(%rcx)",
                        "hlt"):
        assert instruction in code, code
    message_at = code.index("# 0x") + 2
    message_rva = int(code[message_at:message_at + 6], 16)
    assert application[0x200 + message_rva - 0x1000:].startswith(
        (MESSAGE + "\r\n").encode("utf-16-le"))
