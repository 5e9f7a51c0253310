"""The kernel module's configuration: boot parameters, written as divingbell's GRUB drop-in."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from divingbell.core.document.fields import StrictModel

KERNEL_PARAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Only characters neither the shell that reads GRUB_CMDLINE_LINUX="..." nor GRUB's own script
# (the `linux` line in grub.cfg) gives a meaning: no whitespace, quotes, $, \\, ;, |, &, <, >,
# #, braces, parentheses or wildcards.
KERNEL_PARAM_VALUE = re.compile(r"[A-Za-z0-9%+,\-./:=@^_~]+")
UNSAFE_KERNEL_PARAMS = ("root", "init", "rdinit", "rootfstype", "rootflags", "nfsroot",
                        "BOOT_IMAGE")
"""Parameters that decide what boots: refused unless named in `allow_unsafe`."""


def _kernel_value(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("is a YAML boolean (on/off/yes/no/true/false unquoted): quote the "
                         "value the kernel should get, such as 'off' or '1'")
    if isinstance(value, int | float):
        return str(value)
    return value


def _check_kernel_value(value: str) -> str:
    if not KERNEL_PARAM_VALUE.fullmatch(value):
        raise ValueError(f"{value!r} cannot go on a boot line: letters, digits and "
                         "% + , - . / : = @ ^ _ ~ only (no whitespace, quotes or shell "
                         "characters; not empty: a parameter without a value goes in flags)")
    return value


def _check_kernel_names(value: Any) -> Any:
    names = value.keys() if isinstance(value, dict) else value if isinstance(value, list) else []
    bad = [str(n) for n in names if not KERNEL_PARAM_NAME.fullmatch(str(n))]
    if bad:
        raise ValueError(f"not kernel parameter names: {', '.join(repr(b) for b in bad)} "
                         "(letters, digits, _ . -; the value goes after the name, not in it)")
    return value


KernelValue = Annotated[str, BeforeValidator(_kernel_value, json_schema_input_type=str | int),
                        AfterValidator(_check_kernel_value)]


class KernelConf(StrictModel):
    """Kernel command-line parameters, written as divingbell's own GRUB drop-in."""

    # name -> value: `hugepages: 1024` boots with hugepages=1024.
    cmdline: Annotated[dict[str, KernelValue], BeforeValidator(_check_kernel_names)] = {}
    # Parameters without a value (`nosmt`, `quiet`).
    flags: Annotated[list[str], BeforeValidator(_check_kernel_names)] = []
    # Names from UNSAFE_KERNEL_PARAMS the document may set all the same.
    allow_unsafe: list[Literal[UNSAFE_KERNEL_PARAMS]] = []  # type: ignore[valid-type]
    # A new line boots once on trial (with panic=trial_panic, 0: none added) and is committed
    # when the node is healthy on it; not healthy within trial_timeout seconds: reverted.
    trial_panic: Annotated[int, Field(ge=0, le=3600)] = 30
    trial_timeout: Annotated[float, Field(ge=30, le=86400)] = 900.0

    @model_validator(mode="after")
    def _check(self) -> KernelConf:
        problems = []
        both = sorted(set(self.cmdline) & set(self.flags))
        if both:
            problems.append(f"set with a value and as a flag at once: {', '.join(both)}")
        twice = sorted({f for f in self.flags if self.flags.count(f) > 1})
        if twice:
            problems.append(f"flags listed twice: {', '.join(twice)}")
        unsafe = sorted(n for n in [*self.cmdline, *self.flags]
                        if n in UNSAFE_KERNEL_PARAMS and n not in self.allow_unsafe)
        if unsafe:
            problems.append(f"{', '.join(unsafe)}: decides what boots; a mistake leaves the node "
                            "unbootable. Name it in kernel.allow_unsafe to set it all the same")
        if problems:
            raise ValueError("; ".join(problems))
        return self


