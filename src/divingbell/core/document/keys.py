"""Names and key spellings every part needs, without the schema's validation machinery (so the
engine and the modules import fast)."""

from __future__ import annotations

from collections.abc import Callable

MODULE_NAMES: tuple[str, ...] = (
    "sysctl", "limits", "mounts", "ethtool", "apt", "uamlite", "perm", "apparmor", "kernel",
    "exec",
)
"""Every host module, in the order divingbell applies them (packages before users that need
them, mounts before permissions on what they mount, the kernel command line after the packages
that bring GRUB, one-off scripts last)."""


def sysctl_components(key: str) -> list[str]:
    """The /proc/sys path components of a key in dot or slash form.

    As in sysctl.d(5): if the first separator is a slash, slashes separate and dots are literal
    (`net/ipv4/conf/eth0.100/forwarding`); otherwise dots separate and a slash stands for a
    literal dot (`net.ipv4.conf.eth0/100.forwarding`).
    """
    first_dot, first_slash = key.find("."), key.find("/")
    if first_slash != -1 and (first_dot == -1 or first_slash < first_dot):
        return key.split("/")
    return [part.replace("/", ".") for part in key.split(".")]


def canonical_sysctl_key(key: str) -> str:
    """Dot form, as sysctl(8) prints it: `net.ipv4.conf.eth0/100.forwarding`."""
    return ".".join(part.replace(".", "/") for part in sysctl_components(key))


MERGE_KEY_CANONICALIZERS: dict[str, Callable[[str], str]] = {"sysctl": canonical_sysctl_key}
"""Modules whose mapping keys have several spellings: overrides merge by the canonical one."""


REBOOT_PACKAGES = r"^linux-(image|modules)-|^(intel|amd64)-microcode$"
"""Packages whose new version only takes effect after a reboot (a pattern on the name)."""


CRYPT_PREFIXES = ("$1$", "$5$", "$6$", "$y$", "$2b$")
"""crypt(3) hash prefixes divingbell accepts (md5, sha256, sha512, yescrypt, bcrypt)."""
