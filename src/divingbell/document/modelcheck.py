"""Validate any loaded YAML against a pydantic model, with the node document's kind of errors:
each problem named by its path in the file and its file:line, unknown keys with the closest
valid name. Used by the parts that have their own YAML formats (PKI catalogs, bootstrap
designs) so that every format in divingbell reports problems the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from divingbell.document.loader import Loaded
from divingbell.document.paths import PathKey, format_path
from divingbell.document.validate import _MESSAGES, _as_model, _clean, _closest, _step
from divingbell.errors import Problem

M = TypeVar("M", bound=BaseModel)


def check_model(model: type[M], data: Any, loaded: Loaded, prefix: PathKey = ()
                ) -> tuple[M | None, list[Problem]]:
    """`model` validated from `data` (found at `prefix` in `loaded`), or every problem."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, problems_from(exc.errors(include_url=False), model, loaded, prefix)


def problems_from(errors: Sequence[Any], model: type[BaseModel], loaded: Loaded,
                  prefix: PathKey) -> list[Problem]:
    problems: list[Problem] = []
    for error in errors:
        loc = tuple(part for part in error["loc"] if not _is_tag(part))
        path = (*prefix, *loc)
        if error["type"] == "extra_forbidden":
            key = str(loc[-1]) if loc else ""
            message = f"unknown key {key!r}"
            suggestion = _closest(key, _fields_at(model, loc[:-1]))
            if suggestion:
                message += f"; did you mean {suggestion!r}?"
        elif error["type"] == "literal_error":
            expected = (error.get("ctx") or {}).get("expected", "one of the documented values")
            message = f"{error['input']!r} is not allowed: expected {expected}"
        else:
            message = _MESSAGES.get(error["type"]) or _clean(error["msg"])
            value = error.get("input")
            shown = repr(value)
            if (error["type"] != "missing" and isinstance(value, str | int | float | bool)
                    and shown not in message):
                message += f" (got {shown})"
        problem = Problem(format_path(path), message, loaded.location(path))
        if problem not in problems:
            problems.append(problem)
    return problems


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        (part.startswith("<") and part.endswith(">")) or part.startswith("function-"))


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    found = _as_model(current)
    return list(found.model_fields) if found is not None else []
