"""The sysctl module's configuration: kernel tunables by name, in either spelling."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, RootModel, model_validator

from divingbell.core.document.fields import value_kind
from divingbell.core.document.keys import canonical_sysctl_key, sysctl_components
from divingbell.core.document.types import single_line


def _scalar_text(value: Any) -> str:
    """A YAML scalar as text: bools in the kernel's 1/0, numbers as written."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"must be a number or a string, not {value_kind(value)}")


def _sysctl_key_problem(key: str) -> str | None:
    parts = sysctl_components(key)
    if not key or any(not part for part in parts):
        return f"{key!r} is not a sysctl key (empty component)"
    if any(part in (".", "..") for part in parts) or re.search(r"[\s\0]", key):
        return f"{key!r} is not a sysctl key"
    return None


SysctlValue = Annotated[
    str, BeforeValidator(_scalar_text, json_schema_input_type=int | float | str | bool),
    AfterValidator(single_line),
]


class SysctlConf(RootModel[dict[str, SysctlValue]]):
    """Kernel tunables: `net.ipv4.ip_forward: 1` or `net/ipv4/ip_forward: 1`."""

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        seen: dict[str, str] = {}
        problems = []
        out: dict[str, Any] = {}
        for key, item in value.items():
            problem = _sysctl_key_problem(str(key))
            if problem:
                problems.append(problem)
                continue
            canonical = canonical_sysctl_key(str(key))
            if canonical in seen:
                problems.append(f"{key!r} and {seen[canonical]!r} name the same sysctl")
            seen[canonical] = str(key)
            out[canonical] = item
        if problems:
            raise ValueError("; ".join(problems))
        return out
