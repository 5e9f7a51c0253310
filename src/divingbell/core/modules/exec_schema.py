"""The exec module's configuration: scripts by name, with their rerun policy and disruption."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Field,
    RootModel,
    model_validator,
)

from divingbell.core.document.fields import (
    Interval,
    RerunPolicy,
    StrictModel,
    Text,
    check_name_keys,
    check_policy,
)
from divingbell.core.document.types import MAX_SECONDS, EnvName, whole_seconds

_UNIT = r"[A-Za-z0-9:_.@\\-]+"  # systemd unit names, \x2d escapes included
_DISRUPTION = re.compile(rf"none|reboot|(restart|reload):{_UNIT}(,{_UNIT})*")


def _check_disruption(value: str) -> str:
    if not _DISRUPTION.fullmatch(value):
        raise ValueError("must be none, reboot, restart:<unit>[,<unit>...] or "
                         "reload:<unit>[,<unit>...]")
    return value


class Script(StrictModel):
    data: str
    args: list[Text] = []
    env: dict[EnvName, Text] = {}
    rerun_policy: RerunPolicy = "always"
    # always: None reruns on every apply; N at most every N seconds; infinite: never again.
    rerun_interval: Interval | None = None
    # After a failure (once_successfully, always): None retries on every apply; N at most
    # every N seconds.
    retry_interval: Interval | None = None
    timeout: Annotated[
        int, BeforeValidator(whole_seconds),
        Field(ge=1, le=MAX_SECONDS, validation_alias=AliasChoices("timeout", "script_timeout"))
    ] = 1800
    blocking_policy: Literal["foreground", "foreground_halt_pod_on_failure"] = "foreground"
    # What running the script costs the node's workloads: divingbell cannot see what a script
    # does, so the document says it (an extension; Divingbell had no such key).
    disruption: Annotated[str, AfterValidator(_check_disruption)] = "none"

    @model_validator(mode="after")
    def _consistent_policy(self) -> Script:
        check_policy(self.rerun_policy, self.rerun_interval, self.retry_interval)
        return self


class ExecConf(RootModel[Annotated[dict[str, Script], BeforeValidator(check_name_keys)]]):
    pass


