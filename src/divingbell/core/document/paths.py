"""Paths into a document, written the way a reader would look them up."""

from __future__ import annotations

import re

PathKey = tuple[str | int, ...]

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def format_path(path: PathKey) -> str:
    """("conf", "sysctl", "net.ipv4.ip_forward") -> 'conf.sysctl["net.ipv4.ip_forward"]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN.match(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out
