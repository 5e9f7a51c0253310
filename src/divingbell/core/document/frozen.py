"""Validated configuration as plain JSON data, and back as light read-only objects.

The validated-document cache (`document.cache`) stores a node's configuration this way, so a
later run with the same document bytes skips YAML, pydantic and the schema altogether. The
light objects have the attributes of the schema's models and the same derived views
(`document.views`), which is all the modules use. Decoding builds only these objects from JSON
data: a tampered cache file can produce wrong data (it is also owner-checked), never code.
"""

from __future__ import annotations

from typing import Any

from divingbell.core.document.views import AptConfViews, EthtoolInterfaceViews, RepositoryViews

MODEL, FIELDS, EXTRA, SECRET, DICT = "$model", "fields", "extra", "$secret", "$dict"
SET = "set"  # the fields the document wrote (pydantic's model_fields_set)
MASK = "**********"

_VIEWS: dict[str, tuple[type, ...]] = {
    "AptConf": (AptConfViews,),
    "Repository": (RepositoryViews,),
    "EthtoolInterface": (EthtoolInterfaceViews,),
}


def encode(value: Any) -> Any:
    """A validated value (models, secrets, containers, scalars) as JSON data."""
    from pydantic import BaseModel, SecretStr

    if isinstance(value, BaseModel | Light):
        fields = {name: encode(getattr(value, name)) for name in _field_names(value)}
        out: dict[str, Any] = {MODEL: type(value).__name__, FIELDS: fields}
        extra = value.__pydantic_extra__
        if extra:
            out[EXTRA] = {key: encode(item) for key, item in extra.items()}
        out[SET] = sorted(value.model_fields_set)
        return out
    if isinstance(value, SecretStr | Secret):
        return {SECRET: value.get_secret_value()}
    if isinstance(value, dict):
        return {DICT: {str(key): encode(item) for key, item in value.items()}}
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(data: Any) -> Any:
    if isinstance(data, list):
        return [decode(item) for item in data]
    if isinstance(data, dict):
        if MODEL in data:
            extra = data.get(EXTRA)
            light = _light_class(str(data[MODEL]))(
                {str(k): decode(v) for k, v in dict(data[FIELDS]).items()},
                {str(k): decode(v) for k, v in dict(extra).items()} if extra else None)
            object.__setattr__(light, "model_fields_set",
                               frozenset(str(name) for name in data.get(SET) or ()))
            return light
        if SECRET in data:
            return Secret(str(data[SECRET]))
        if DICT in data:
            return {str(k): decode(v) for k, v in dict(data[DICT]).items()}
        raise ValueError("not encoded configuration")
    if data is None or isinstance(data, str | int | float | bool):
        return data
    raise ValueError("not encoded configuration")


def _field_names(value: Any) -> list[str]:
    if isinstance(value, Light):
        return list(value._fields)
    return list(type(value).model_fields)


class Secret:
    """A secret string that prints masked, like pydantic's SecretStr."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Light:
    """Read-only attributes of one model: its fields and, for models that allow them, extras."""

    _fields: dict[str, Any]
    __pydantic_extra__: dict[str, Any] | None
    model_fields_set: frozenset[str]

    def __init__(self, fields: dict[str, Any], extra: dict[str, Any] | None) -> None:
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "__pydantic_extra__", extra)
        object.__setattr__(self, "model_fields_set", frozenset(fields))

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        extra = object.__getattribute__(self, "__pydantic_extra__") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Light) and type(other).__name__ == type(self).__name__
                and other._fields == self._fields
                and other.__pydantic_extra__ == self.__pydantic_extra__)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields!r})"

    def model_dump(self, mode: str = "json", exclude_none: bool = False,
                   by_alias: bool = False) -> Any:
        """As pydantic's model_dump(mode="json"): plain data, secrets masked."""
        data = {name: _dump(value, exclude_none) for name, value in self._fields.items()
                if not (exclude_none and value is None)}
        data.update({name: _dump(value, exclude_none)
                     for name, value in (self.__pydantic_extra__ or {}).items()})
        return data.get("root") if list(data) == ["root"] else data


def _dump(value: Any, exclude_none: bool) -> Any:
    if isinstance(value, Light):
        return value.model_dump(exclude_none=exclude_none)
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, dict):
        return {key: _dump(item, exclude_none) for key, item in value.items()}
    if isinstance(value, list):
        return [_dump(item, exclude_none) for item in value]
    return value


_CLASSES: dict[str, type[Light]] = {}


def _light_class(name: str) -> type[Light]:
    if not name.isidentifier():
        raise ValueError(f"not a model name: {name!r}")
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (*_VIEWS.get(name, ()), Light), {})
    return _CLASSES[name]
