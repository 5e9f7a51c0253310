"""What the document's models share: the strict base model, and the scalar fields and checks
that more than one section uses (each module's own are in `core/modules/<name>_schema.py`).

Values keep YAML 1.1 meanings where the seeds rely on them: an unquoted `on` is already a bool
when it gets here, and a text field given one reads it back as "true"/"false".
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

from divingbell.core.document.types import whole_seconds


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# Scalars --------------------------------------------------------------------------------------

def value_kind(value: Any) -> str:
    """What a value that should have been a scalar is, as an error message names it."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "empty"
    return type(value).__name__


def plain_text(value: Any) -> str:
    """Text fields that YAML may have typed: `values: [true]` is the label value "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"must be a string, not {value_kind(value)}")


def matching_text(value: Any, pattern: re.Pattern[str], problem: str) -> str:
    """A text field that must match `pattern`; else `problem`, with the text's repr in its {}."""
    text = plain_text(value)
    if not pattern.match(text):
        raise ValueError(problem.format(repr(text)))
    return text


SWITCH_WORDS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def switch(value: Any) -> bool:
    """on/off, true/false, yes/no; YAML 1.1 already turned unquoted ones into bools."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in SWITCH_WORDS:
        return SWITCH_WORDS[value.strip().lower()]
    raise ValueError(f"must be on or off (true/false), not {value!r}")


Text = Annotated[str, BeforeValidator(plain_text, json_schema_input_type=str | int | float | bool)]
Switch = Annotated[bool, BeforeValidator(switch, json_schema_input_type=bool | str)]


# Paths and names ------------------------------------------------------------------------------

def absolute_path(value: Any) -> str:
    text = plain_text(value)
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, not {text!r}")
    if "\0" in text or "\n" in text:
        raise ValueError("must not contain NUL or newline characters")
    if ".." in text.split("/"):
        raise ValueError(f"{text!r} must not contain `..` (every path stays inside the host "
                         "root)")
    return text


AbsPath = Annotated[str, BeforeValidator(absolute_path, json_schema_input_type=str)]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")


def file_name(value: Any) -> str:
    text = plain_text(value)
    if not _NAME.match(text) or ".." in text:
        raise ValueError(
            f"{text!r} cannot name a file: use letters, digits and . _ - @ + (not starting "
            "with . and without ..)"
        )
    return text


FileName = Annotated[str, BeforeValidator(file_name, json_schema_input_type=str)]


def check_name_keys(value: Any) -> Any:
    """The keys of a mapping whose entries become files (mounts, limits, profiles, scripts)."""
    if isinstance(value, dict):
        for key in value:
            file_name(key)
    return value


# Rerun policies (perm, exec) ------------------------------------------------------------------

def interval_seconds(value: Any) -> int | Literal["infinite"]:
    if value == "infinite":
        return "infinite"
    value = whole_seconds(value)
    if isinstance(value, bool):
        raise ValueError(f"must be a number of seconds or 'infinite', not {value!r}")
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds or 'infinite', not {value!r}") from None
    if seconds < 60:
        raise ValueError(f"must be at least 60 seconds (got {seconds})")
    return seconds


Interval = Annotated[
    int | Literal["infinite"], BeforeValidator(interval_seconds, json_schema_input_type=int | str)
]
RerunPolicy = Literal["always", "never", "once_successfully"]


def check_policy(policy: str | None, rerun: Any, retry: Any) -> None:
    """Refuse interval settings the rerun policy would silently ignore."""
    problems = []
    if rerun is not None and policy == "once_successfully":
        problems.append("rerun_interval does nothing with rerun_policy once_successfully (after "
                        "a success it never runs again): remove it, or use retry_interval to "
                        "pace retries after failures")
    if rerun is not None and policy == "never":
        problems.append("rerun_interval does nothing with rerun_policy never (it runs once): "
                        "remove it, or use rerun_policy always")
    if retry is not None and policy == "never":
        problems.append("retry_interval does nothing with rerun_policy never (it runs once, "
                        "failed or not): remove it, or use rerun_policy once_successfully")
    if problems:
        raise ValueError("; ".join(problems))
