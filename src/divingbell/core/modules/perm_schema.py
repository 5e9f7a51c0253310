"""The perm module's configuration: owner, group and mode for paths matching globs."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from divingbell.core.document.fields import (
    AbsPath,
    Interval,
    RerunPolicy,
    StrictModel,
    check_policy,
    plain_text,
)
from divingbell.core.document.types import IdName


def _mode(value: Any) -> str:
    text = plain_text(value).strip()
    if not re.match(r"^0?[0-7]{3,4}$", text):
        raise ValueError(f"{text!r} is not an octal mode (like '0644')")
    return f"{int(text, 8):04o}"


FileMode = Annotated[str, BeforeValidator(_mode, json_schema_input_type=str | int)]


class PermPath(StrictModel):
    """Owner, group and mode for every path matching a glob."""

    path: AbsPath
    owner: IdName
    group: IdName
    permissions: FileMode


class PermConf(StrictModel):
    paths: list[PermPath] = []
    ignore_missing: bool = False
    rerun_policy: RerunPolicy | None = None
    rerun_interval: Interval | None = None

    @model_validator(mode="after")
    def _consistent_policy(self) -> PermConf:
        check_policy(self.rerun_policy, self.rerun_interval, None)
        return self

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, value: Any) -> Any:
        # Early Divingbell took the list of paths directly under `perm:`.
        return {"paths": value} if isinstance(value, list) else value
