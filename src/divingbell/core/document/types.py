"""Constrained value types: each refuses what the file format or syscall the value ends up in
cannot hold, so `validate` and `plan` catch it instead of `apply` tripping over it.

- A value written into a line-oriented file (a systemd unit, authorized_keys, a sysctl.d
  drop-in, a deb822 source, debconf-set-selections, chpasswd's stdin) must be one line: a
  newline would add a line of the attacker's choosing, a trailing backslash continues a unit
  file line into the next.
- NUL cannot pass through argv, environment, paths or files read as C strings (checked for
  every string of the document in `validate`).
- Numbers must fit what the kernel or tool takes: uids and gids below 2**32-1, intervals and
  timeouts a finite number of seconds, ring sizes 32-bit.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

MAX_ID = 4_294_967_294          # (uid_t)-1 means "no change" to chown(2)
MAX_SECONDS = 10 * 365 * 86400  # ten years: longer is "never", which has its own spelling
MAX_U32 = 2**32 - 1


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError("must be a string")


def is_ip_address(text: str) -> bool:
    """An IPv4 or IPv6 address, as `ipaddress` reads one (no prefix length, no port)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def single_line(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    if "\n" in text or "\r" in text:
        raise ValueError("must be a single line (a newline here would add a line to the file "
                         "it is written to)")
    return text


def unit_value(text: str) -> str:
    single_line(text)
    if text.rstrip().endswith("\\"):
        raise ValueError("must not end in a backslash (it would continue the unit file line)")
    return text


def no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    return text


def env_name(text: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", text):
        raise ValueError(f"{text!r} is not an environment variable name (letters, digits and _, "
                         "not starting with a digit; no = or NUL)")
    return text


def id_name(text: str) -> str:
    """A user or group: a name as in /etc/passwd, or a number chown(2) can take."""
    single_line(text)
    if text.isdigit():
        if int(text) > MAX_ID:
            raise ValueError(f"{text} is out of range for a uid/gid (at most {MAX_ID})")
        return str(int(text))
    if not re.match(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*[$]?$", text) or len(text) > 256:
        raise ValueError(f"{text!r} is not a user or group name")
    return text


def crypt_chars(text: str) -> str:
    if not re.match(r"^[A-Za-z0-9./$=,+-]+$", text):
        raise ValueError("must be a crypt(3) hash: letters, digits and . / $ = , + - only")
    return text


def whole_seconds(value: Any) -> Any:
    """Seconds as a whole, finite, bounded number (strings like '3600' are fine)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        if not value.is_integer():
            raise ValueError(f"must be a whole number of seconds, not {value}")
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS} seconds (ten years); use 'infinite' "
                         "for never")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) > 12:
        raise ValueError(f"must be at most {MAX_SECONDS} seconds")
    return value


SingleLine = Annotated[str, BeforeValidator(_text, json_schema_input_type=str | int | float | bool),
                       AfterValidator(single_line)]
UnitValue = Annotated[str, BeforeValidator(_text, json_schema_input_type=str | int | float | bool),
                      AfterValidator(unit_value)]
NoNulText = Annotated[str, AfterValidator(no_nul)]
EnvName = Annotated[str, AfterValidator(env_name)]
IdName = Annotated[str, BeforeValidator(_text, json_schema_input_type=str | int),
                   AfterValidator(id_name)]
Seconds = Annotated[int, BeforeValidator(whole_seconds), Field(ge=1, le=MAX_SECONDS)]


def strings_with_nul(value: Any, path: tuple[str | int, ...] = ()
                     ) -> Iterator[tuple[str | int, ...]]:
    """Paths of every key or string in a loaded document that holds a NUL character."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\0" in item:
                yield where
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\0" in str(key):
                    yield (*where, str(key).replace("\0", "\\0"))
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, index)) for index, child in enumerate(item))
