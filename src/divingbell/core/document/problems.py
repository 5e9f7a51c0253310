"""Located problems: how every YAML format in divingbell reports what is wrong with it.

A pydantic `ValidationError` on loaded YAML (the node document, a PKI catalog, a bootstrap
design, the boot profiles, the policy file) and the checks each format makes by hand become
`Problem`s of one shape: the path as a reader would look it up, a message in plain words, and
the file:line it stands at. `path.to.field: message (file:line)`; an unknown key names the
closest valid one.

It sits beside the loader, whose `Loaded` knows where each path stands, and imports nothing
else of divingbell's but `paths` and `errors`, so every format can use it without a cycle.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, RootModel, ValidationError
from pydantic_core import ErrorDetails

from divingbell.core.document.loader import Loaded, load_file
from divingbell.core.document.paths import PathKey, format_path
from divingbell.core.errors import DocumentError, Problem

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
}

# Fields whose values are secrets (the node document's password hashes and debconf answers):
# never echoed back in an error.
SENSITIVE_FIELDS = frozenset({"user_crypt_passwd", "answer"})


def problem_at(loaded: Loaded, path: PathKey, message: str) -> Problem:
    """A problem a format found by hand, at `path` in `loaded`."""
    return Problem(format_path(path), message, loaded.location(path))


def check_model(model: type[M], data: Any, loaded: Loaded, prefix: PathKey = ()
                ) -> tuple[M | None, list[Problem]]:
    """`model` validated from `data` (found at `prefix` in `loaded`), or every problem."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, problems_from(exc.errors(include_url=False), model, loaded, prefix)


def load_model(model: type[M], path: Path) -> M:
    """A YAML file loaded strictly (duplicate keys are errors) and validated as `model`;
    DocumentError names every problem."""
    loaded = load_file(path)
    found, problems = check_model(model, loaded.data, loaded)
    if found is None:
        raise DocumentError(problems)
    return found


def problems_from(errors: Iterable[ErrorDetails], model: type[BaseModel], loaded: Loaded,
                  prefix: PathKey = ()) -> list[Problem]:
    """`errors` of validating `model` with the value at `prefix` in `loaded`, each once."""
    problems: list[Problem] = []
    for error in errors:
        loc = tuple(part for part in error["loc"] if not _is_tag(part))
        problem = problem_at(loaded, (*prefix, *loc), _message(error, model, loc))
        if problem not in problems:
            problems.append(problem)
    return problems


def _message(error: ErrorDetails, model: type[BaseModel], loc: PathKey) -> str:
    sensitive = any(part in SENSITIVE_FIELDS for part in loc)
    if error["type"] == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        suggestion = closest(key, _keys_at(model, loc[:-1]))
        return f"unknown key {key!r}" + (f"; did you mean {suggestion!r}?" if suggestion else "")
    if error["type"] == "literal_error" and not sensitive:
        expected = (error.get("ctx") or {}).get("expected", "one of the documented values")
        return f"{error['input']!r} is not allowed: expected {expected}"
    message = _MESSAGES.get(error["type"]) or _clean(error["msg"])
    value = error.get("input")
    shown = repr(value)
    if (not sensitive and error["type"] != "missing" and isinstance(value, str | int | float | bool)
            and shown not in message):
        message += f" (got {shown})"
    return message


def closest(key: str, allowed: list[str]) -> str | None:
    """The valid name `key` was most likely meant to be, if any is close."""
    matches = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _is_tag(part: Any) -> bool:
    """pydantic's own steps in a location (union members, validators, a mapping's `[key]`):
    not part of the path a reader looks up."""
    return isinstance(part, str) and (
        (part.startswith("<") and part.endswith(">")) or part.startswith("function-")
        or part == "[key]")


def _clean(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message[:1].lower() + message[1:] if message else message


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys valid at `loc` below `model`."""
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    found = _as_model(current)
    if found is None:
        return []
    by_name = found.model_config.get("populate_by_name") or found.model_config.get(
        "validate_by_name")
    keys: list[str] = []
    for name, info in found.model_fields.items():
        aliases = _aliases(info.validation_alias or info.alias)
        keys += [*aliases, name] if by_name or not aliases else aliases
    return keys


def _aliases(alias: Any) -> list[str]:
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return []


def _step(annotation: Any, part: Any) -> Any:
    """The annotation one path element below `annotation`."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    model = _as_model(annotation)
    if model is not None:
        if issubclass(model, RootModel):
            return _step(model.model_fields["root"].annotation, part)
        for name, info in model.model_fields.items():
            if part == name or part in _aliases(info.validation_alias or info.alias):
                return info.annotation
        return None
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        return typing.get_args(annotation)[-1]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                found = _step(arg, part)
                if found is not None:
                    return found
    return None


def _as_model(annotation: Any) -> type[BaseModel] | None:
    """The model behind `X`, `Annotated[X, ...]` or `X | None`; None for other types."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model = _as_model(arg)
            if model is not None:
                return model
    return None
