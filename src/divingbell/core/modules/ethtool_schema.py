"""The ethtool module's configuration: NIC features, ring sizes, channels and coalescing."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel

from divingbell.core.document.fields import SWITCH_WORDS, Switch
from divingbell.core.document.views import EthtoolInterfaceViews


def _ethtool_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a whole number, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number, not {value!r}") from None
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def _coalesce_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in SWITCH_WORDS:
        return "on" if SWITCH_WORDS[value.lower()] else "off"
    return str(_ethtool_number(value))


EthtoolNumber = Annotated[int, BeforeValidator(_ethtool_number, json_schema_input_type=int)]
CoalesceValue = Annotated[
    str, BeforeValidator(_coalesce_value, json_schema_input_type=int | bool | str)
]


class EthtoolInterface(EthtoolInterfaceViews, BaseModel):
    """Offload features by ethtool name (`tx-tcp-segmentation: off`), plus divingbell's ring
    sizes, channels and interrupt coalescing (`ring: {rx: 4096}`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Switch] = Field(init=False)

    ring: dict[str, EthtoolNumber] | None = None
    channels: dict[str, EthtoolNumber] | None = None
    coalesce: dict[str, CoalesceValue] | None = None


def _interface_name(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            if not re.match(r"^[A-Za-z0-9_.@+-]{1,15}$", str(key)) or str(key) in (".", ".."):
                raise ValueError(f"{key!r} is not a network interface name")
            settings = value[key]
            groups = [settings] + [settings.get(g) for g in ("ring", "channels", "coalesce")
                                   if isinstance(settings, dict)]
            for group in groups:
                for name in group if isinstance(group, dict) else ():
                    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", str(name)):
                        # These names land in a unit's ExecStart= line.
                        raise ValueError(f"{key}: {name!r} is not an ethtool setting name")
    return value


class EthtoolConf(
    RootModel[Annotated[dict[str, EthtoolInterface], BeforeValidator(_interface_name)]]
):
    pass
