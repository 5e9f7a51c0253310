"""What the default install step writes so that a UEFI machine can boot its disk: a tiny EFI
application that prints one line and halts (the UEFI twin of the MBR boot code in the hook), in
a FAT12 EFI system partition at \\EFI\\BOOT\\BOOTX64.EFI, the path firmware boots from a disk
that has no boot entry of its own.

Pure and reproducible (fixed dates, no timestamps): the same message gives the same bytes. The
hook writes `esp_head()` at the start of the partition; the rest of the partition is free space
by the FAT, so whatever the disk held there before does not matter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512
ESP_SECTORS = 2048  # 1 MiB: FAT12 (fewer than 4085 clusters of one sector)
BOOT_PATH = ("EFI", "BOOT", "BOOTX64.EFI")
MESSAGE = "divingbell: booted from the installed disk (UEFI)"

_RESERVED_SECTORS = 1
_FAT_COUNT = 2
_ROOT_ENTRIES = 16  # one sector
_MEDIA = 0xF8
_ATTR_DIRECTORY = 0x10
_ATTR_ARCHIVE = 0x20
_FAT12_END = 0xFFF
_DOS_DATE = (1 << 5) | 1  # 1980-01-01: fixed, so the partition is reproducible

_SECTION_RVA = 0x1000
_FILE_ALIGNMENT = 0x200
_SECTION_ALIGNMENT = 0x1000


def efi_application(message: str = MESSAGE) -> bytes:
    """A PE32+ EFI application (x86-64) that writes `message` to the firmware's console
    (ConOut, which OVMF and most servers mirror on the serial port) and halts."""
    # Entry: rcx = ImageHandle, rdx = SystemTable (Microsoft x64 calling convention).
    code = bytes.fromhex(
        "4883ec28"        # sub rsp, 0x28          shadow space, 16-byte aligned call
        "488b4a40"        # mov rcx, [rdx+0x40]    SystemTable->ConOut
        "488d1519000000"  # lea rdx, [rip+0x19]    the message (at 0x28 in the section)
        "ff5108"          # call [rcx+8]           ConOut->OutputString(ConOut, message)
        "fa"              # cli
        "f4"              # hlt
        "ebfd"            # jmp hlt
    )
    # One base-relocation block with a single padding entry: nothing to relocate, but the
    # directory is present, so the loader may place the image anywhere.
    relocations = struct.pack("<IIHH", _SECTION_RVA, 12, 0, 0)
    relocations_offset = 0x18
    message_offset = 0x28
    text = bytearray(code.ljust(relocations_offset, b"\x90"))
    text += relocations
    text = text.ljust(message_offset, b"\0")
    text += (message + "\r\n").encode("utf-16-le") + b"\0\0"
    raw_size = -(-len(text) // _FILE_ALIGNMENT) * _FILE_ALIGNMENT
    image_size = _SECTION_RVA + -(-len(text) // _SECTION_ALIGNMENT) * _SECTION_ALIGNMENT

    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 0xF0,
                       0x0022)  # executable image, large-address aware; relocatable
    directories = [(0, 0)] * 16
    directories[5] = (_SECTION_RVA + relocations_offset, len(relocations))  # base relocations
    optional = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        0x20B, 0, 0, raw_size, 0, 0, _SECTION_RVA, _SECTION_RVA,  # PE32+, entry, code base
        0, _SECTION_ALIGNMENT, _FILE_ALIGNMENT,  # image base 0: the loader relocates
        0, 0, 0, 0, 0, 0, 0,
        image_size, _FILE_ALIGNMENT, 0,
        10, 0,  # subsystem: EFI application
        0x10000, 0x10000, 0, 0, 0, 16,
    ) + b"".join(struct.pack("<II", rva, size) for rva, size in directories)
    section = struct.pack("<8sIIIIIIHHI", b".text", len(text), _SECTION_RVA, raw_size,
                          _FILE_ALIGNMENT, 0, 0, 0, 0,
                          0x60000020)  # code, executable, readable
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    return headers.ljust(_FILE_ALIGNMENT, b"\0") + bytes(text).ljust(raw_size, b"\0")


@dataclass(frozen=True)
class _Layout:
    sectors_per_fat: int
    root_sector: int
    first_data_sector: int
    clusters: int


def _layout(total_sectors: int) -> _Layout:
    sectors_per_fat = 1
    while True:
        first_data = _RESERVED_SECTORS + _FAT_COUNT * sectors_per_fat \
            + _ROOT_ENTRIES * 32 // SECTOR
        clusters = total_sectors - first_data
        if (clusters + 2) * 3 // 2 + 1 <= sectors_per_fat * SECTOR:
            return _Layout(sectors_per_fat, _RESERVED_SECTORS + _FAT_COUNT * sectors_per_fat,
                           first_data, clusters)
        sectors_per_fat += 1


def _dir_entry(name: str, attributes: int, cluster: int, size: int = 0) -> bytes:
    if name in (".", ".."):
        short = name.ljust(11).encode("ascii")
    else:
        stem, _, extension = name.partition(".")
        short = (stem.ljust(8) + extension.ljust(3)).encode("ascii")
    return struct.pack("<11sBBBHHHHHHHI", short, attributes, 0, 0, 0, _DOS_DATE, _DOS_DATE,
                       0, 0, _DOS_DATE, cluster, size)


def _fat12(entries: list[int]) -> bytes:
    packed = bytearray()
    padded = entries + [0] * (len(entries) % 2)
    for low, high in zip(padded[::2], padded[1::2], strict=True):
        packed += (low | (high << 12)).to_bytes(3, "little")
    return bytes(packed)


def esp_head(message: str = MESSAGE, total_sectors: int = ESP_SECTORS) -> bytes:
    """The first sectors of a FAT12 EFI system partition of `total_sectors` sectors holding
    \\EFI\\BOOT\\BOOTX64.EFI (boot sector, both FATs, root directory, used clusters)."""
    layout = _layout(total_sectors)
    if layout.clusters >= 4085:
        raise ValueError(f"{total_sectors} sectors is too large for FAT12")
    application = efi_application(message)
    file_clusters = -(-len(application) // SECTOR)
    efi_dir, boot_dir, first_file = 2, 3, 4
    if first_file + file_clusters > layout.clusters + 2:
        raise ValueError(f"{total_sectors} sectors is too small for the EFI application")

    boot = bytearray(SECTOR)
    boot[0:3] = b"\xeb\x3c\x90"
    boot[3:11] = b"DIVINGBL"
    struct.pack_into("<HBHBHHBHHHII", boot, 11, SECTOR, 1, _RESERVED_SECTORS, _FAT_COUNT,
                     _ROOT_ENTRIES, total_sectors if total_sectors < 0x10000 else 0, _MEDIA,
                     layout.sectors_per_fat, 63, 255, 0,
                     total_sectors if total_sectors >= 0x10000 else 0)
    struct.pack_into("<BBBI11s8s", boot, 36, 0x80, 0, 0x29, 0x44420001, b"DIVINGBELL ",
                     b"FAT12   ")
    boot[510:512] = b"\x55\xaa"

    fat = [0xF00 | _MEDIA, _FAT12_END, _FAT12_END, _FAT12_END]
    fat += [cluster + 1 for cluster in range(first_file, first_file + file_clusters - 1)]
    fat.append(_FAT12_END)
    fat_bytes = _fat12(fat).ljust(layout.sectors_per_fat * SECTOR, b"\0")

    root = _dir_entry(BOOT_PATH[0], _ATTR_DIRECTORY, efi_dir).ljust(SECTOR, b"\0")
    efi = (_dir_entry(".", _ATTR_DIRECTORY, efi_dir) + _dir_entry("..", _ATTR_DIRECTORY, 0)
           + _dir_entry(BOOT_PATH[1], _ATTR_DIRECTORY, boot_dir)).ljust(SECTOR, b"\0")
    boot_entries = (_dir_entry(".", _ATTR_DIRECTORY, boot_dir)
                    + _dir_entry("..", _ATTR_DIRECTORY, efi_dir)
                    + _dir_entry(BOOT_PATH[2], _ATTR_ARCHIVE, first_file, len(application)))
    return (bytes(boot) + fat_bytes * _FAT_COUNT + root + efi
            + boot_entries.ljust(SECTOR, b"\0")
            + application.ljust(file_clusters * SECTOR, b"\0"))
