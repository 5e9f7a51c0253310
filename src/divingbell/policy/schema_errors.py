"""Turn pydantic errors on a loaded YAML file into `Problem`s with path and file:line."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from divingbell.document.loader import Loaded, load_file
from divingbell.document.paths import format_path
from divingbell.document.validate import _as_model, _step  # the document's own model walk
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
        raise DocumentError(problems(exc, loaded, model)) from None


def load_model(model: type[M], path: Path) -> M:
    """Load a YAML file strictly (duplicate keys are errors) and validate it as `model`."""
    return validate_loaded(model, load_file(path))


def problems(exc: ValidationError, loaded: Loaded, model: type[BaseModel] | None = None
             ) -> list[Problem]:
    found = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if not _is_tag(part))
        message = _MESSAGES.get(error["type"]) or _clean(str(error["msg"]))
        if error["type"] == "extra_forbidden" and model is not None and loc:
            suggestion = _closest(str(loc[-1]), _fields_at(model, loc[:-1]))
            if suggestion:
                message += f"; did you mean {suggestion!r}?"
        value = error.get("input")
        if error["type"] not in ("missing", "extra_forbidden") and isinstance(
                value, str | int | float | bool) and repr(value) not in message:
            message += f" (got {value!r})"
        found.append(Problem(format_path(loc), message, loaded.location(loc)))
    return found


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    found = _as_model(current)
    if found is None:
        return []
    return [*found.model_fields, *(f.alias for f in found.model_fields.values() if f.alias)]


def _closest(key: str, allowed: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        (part.startswith("<") and part.endswith(">")) or part.startswith("function-"))


def _clean(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message[:1].lower() + message[1:] if message else message
