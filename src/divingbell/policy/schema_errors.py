"""Turn pydantic errors on a loaded YAML file into `Problem`s with path and file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from divingbell.document.loader import Loaded, load_file
from divingbell.document.paths import format_path
from divingbell.errors import DocumentError, Problem

M = TypeVar("M", bound=BaseModel)

_MESSAGES = {
    "missing": "field required",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "extra_forbidden": "unknown key",
}


def validate_loaded(model: type[M], loaded: Loaded) -> M:
    try:
        return model.model_validate(loaded.data)
    except ValidationError as exc:
        raise DocumentError(problems(exc, loaded)) from None


def load_model(model: type[M], path: Path) -> M:
    """Load a YAML file strictly (duplicate keys are errors) and validate it as `model`."""
    return validate_loaded(model, load_file(path))


def problems(exc: ValidationError, loaded: Loaded) -> list[Problem]:
    found = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if not _is_tag(part))
        message = _MESSAGES.get(error["type"]) or _clean(str(error["msg"]))
        value = error.get("input")
        if error["type"] not in ("missing", "extra_forbidden") and isinstance(
                value, str | int | float | bool) and repr(value) not in message:
            message += f" (got {value!r})"
        found.append(Problem(format_path(loc), message, loaded.location(loc)))
    return found


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        (part.startswith("<") and part.endswith(">")) or part.startswith("function-"))


def _clean(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message[:1].lower() + message[1:] if message else message
