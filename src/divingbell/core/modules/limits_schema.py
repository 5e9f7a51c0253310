"""The limits module's configuration: pam_limits lines by name."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, RootModel, model_validator

from divingbell.core.document.fields import StrictModel, check_name_keys, plain_text

LIMIT_ITEMS = (
    "core", "data", "fsize", "memlock", "nofile", "rss", "stack", "cpu", "nproc", "as",
    "maxlogins", "maxsyslogins", "nonewprivs", "priority", "locks", "sigpending", "msgqueue",
    "nice", "rtprio", "chroot",
)


def _limit_value(value: Any) -> str:
    text = plain_text(value).strip()
    if text in ("unlimited", "infinity", "-1") or re.match(r"^-?[0-9]{1,19}$", text):
        return text
    raise ValueError(f"{text!r} is not a limit: use a whole number, unlimited or infinity")


def _limit_domain(value: Any) -> str:
    text = plain_text(value).strip()
    if not text or re.search(r"\s", text):
        raise ValueError(f"{text!r} is not a pam_limits domain (user, @group, uid:uid, *)")
    return text


class Limit(StrictModel):
    """One pam_limits line, written to /etc/security/limits.d/60-divingbell-<name>.conf."""

    domain: Annotated[str, BeforeValidator(_limit_domain, json_schema_input_type=str | int)]
    type: Literal["soft", "hard", "-"]
    item: Literal[LIMIT_ITEMS]  # type: ignore[valid-type]  # noqa: RUF100
    value: Annotated[str, BeforeValidator(_limit_value, json_schema_input_type=str | int)]

    @model_validator(mode="after")
    def _value_fits_item(self) -> Limit:
        if self.item in ("nice", "priority"):
            return self
        if self.value.startswith("-") and self.value != "-1":
            raise ValueError(f"{self.item} cannot be negative (got {self.value})")
        return self


class LimitsConf(RootModel[Annotated[dict[str, Limit], BeforeValidator(check_name_keys)]]):
    pass
