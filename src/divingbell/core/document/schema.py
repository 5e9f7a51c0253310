"""The document schema: Divingbell's documented YAML, unchanged, plus divingbell's extensions.

The document itself is modelled here: `conf:` with one section per module, the agent's
maintenance section and the overrides. Each module's own section is modelled beside the module
(`core/modules/<name>_schema.py`); what sections share is in `fields.py` and `types.py`. A
document is validated whole before anything touches a host. Unions are avoided (or tagged
`<...>`, stripped from error paths) so each problem is reported once, at its own path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from divingbell.core.document.fields import StrictModel, Text, plain_text
from divingbell.core.document.selectors import parse_selector
from divingbell.core.modules.apparmor_schema import AppArmorConf
from divingbell.core.modules.apt_schema import AptConf
from divingbell.core.modules.ethtool_schema import EthtoolConf
from divingbell.core.modules.exec_schema import ExecConf
from divingbell.core.modules.kernel_schema import KernelConf
from divingbell.core.modules.limits_schema import LimitsConf
from divingbell.core.modules.mounts_schema import MountsConf
from divingbell.core.modules.perm_schema import PermConf
from divingbell.core.modules.sysctl_schema import SysctlConf
from divingbell.core.modules.uamlite_schema import UamliteConf

# maintenance (issue 15: reboots and drains, a few nodes at a time) ---------------------------
# Not a host module: the agent's maintenance sequence reads it (divingbell.maintenance), with
# the same override rules as the modules (conf.overrides.divingbell_maintenance).

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(value: Any) -> float:
    """`15m`, `1h30m`, `90s`, or a plain number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 90s, 15m or 1h30m, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = plain_text(value).strip()
        match = _DURATION.match(text)
        if text.isdigit():
            seconds = float(text)
        elif not text or match is None:
            raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 15m or 1h30m")
        else:
            hours, minutes, secs = (float(g or 0) for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ValueError(f"must be longer than zero (got {value!r})")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=str | int)]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _clock_time(value: Any) -> str:
    text = plain_text(value).strip()
    match = re.match(r"^([01]?\d|2[0-3]):([0-5]\d)$", text)
    if match is None:
        raise ValueError(f"{text!r} is not a time of day: use HH:MM (24-hour), like \"02:00\"")
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def _time_zone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = plain_text(value).strip()
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{text!r} is not a time zone known to this host's tzdata "
                         "(use an IANA name like Europe/Paris or UTC)") from None
    return text


def _weekday(value: Any) -> str:
    text = plain_text(value).strip().lower()[:3]
    if text not in WEEKDAYS:
        raise ValueError(f"{value!r} is not a day: use {', '.join(WEEKDAYS)}")
    return text


def _label_selector(value: Any) -> str:
    text = plain_text(value).strip()
    parse_selector(text)  # raises ValueError naming the bad requirement
    return text


def _regex(value: Any) -> str:
    text = plain_text(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a regular expression: {exc}") from None
    return text


ClockTime = Annotated[str, BeforeValidator(_clock_time, json_schema_input_type=str)]
TimeZone = Annotated[str, BeforeValidator(_time_zone, json_schema_input_type=str)]
Weekday = Annotated[str, BeforeValidator(_weekday, json_schema_input_type=str)]
Selector = Annotated[str, BeforeValidator(_label_selector, json_schema_input_type=str)]
Regex = Annotated[str, BeforeValidator(_regex, json_schema_input_type=str)]


class MaintenanceWindow(StrictModel):
    """When maintenance may *start*, in local time; `days` are the days a window opens (a
    window from 22:00 to 04:00 opened on a Friday ends on Saturday morning)."""

    days: list[Weekday] = list(WEEKDAYS)
    start: ClockTime
    end: ClockTime
    timezone: TimeZone = "UTC"

    @model_validator(mode="after")
    def _check(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: a window needs a length (leave "
                             "`window` out to allow maintenance at any time)")
        if not self.days:
            raise ValueError("days is empty: the window would never open")
        return self


class PodBlocker(StrictModel):
    selector: Selector


class AlertBlocker(StrictModel):
    prometheus: Text
    match: Regex = ".*"
    timeout: Duration = 10.0

    @field_validator("prometheus")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL of a Prometheus server")
        return value.rstrip("/")


class Blockers(StrictModel):
    pods: PodBlocker | None = None
    alerts: AlertBlocker | None = None


class Drain(StrictModel):
    timeout: Duration = 900.0
    grace_period: Duration = 60.0
    on_timeout: Literal["abort", "force"] = "abort"
    pod_selector: Selector = ""


class Health(StrictModel):
    timeout: Duration = 1200.0


REBOOT_TRIGGERS = ("reboot-required", "requested")


class Reboot(StrictModel):
    strategy: Literal["reboot", "kexec", "poweroff", "none"] = "reboot"
    when: list[Literal[REBOOT_TRIGGERS]] = list(REBOOT_TRIGGERS)  # type: ignore[valid-type]  # noqa: RUF100
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 1
    group_by: Text | None = None
    window: MaintenanceWindow | None = None
    blockers: Blockers = Blockers()
    drain: Drain = Drain()
    health: Health = Health()
    # Extensions: how long a slot outlives its holder's last renewal (longer than a reboot
    # takes), and how long to wait after an aborted attempt.
    slot_ttl: Duration = 1800.0
    retry_after: Duration = 1800.0


class MaintenanceConf(StrictModel):
    reboot: Reboot = Reboot()


# overrides ------------------------------------------------------------------------------------

class LabelSelector(StrictModel):
    key: Text
    values: list[Text]


class LabelOverride(StrictModel):
    label: LabelSelector
    conf: dict[str, Any]


class HostOverride(StrictModel):
    name: Text
    conf: dict[str, Any]


class ModuleOverrides(StrictModel):
    labels: list[LabelOverride] = []
    hosts: list[HostOverride] = []


class Overrides(StrictModel):
    divingbell_sysctl: ModuleOverrides | None = None
    divingbell_limits: ModuleOverrides | None = None
    divingbell_mounts: ModuleOverrides | None = None
    divingbell_ethtool: ModuleOverrides | None = None
    divingbell_apt: ModuleOverrides | None = None
    divingbell_uamlite: ModuleOverrides | None = None
    divingbell_perm: ModuleOverrides | None = None
    divingbell_apparmor: ModuleOverrides | None = None
    divingbell_kernel: ModuleOverrides | None = None
    divingbell_exec: ModuleOverrides | None = None
    divingbell_maintenance: ModuleOverrides | None = None


# the document ---------------------------------------------------------------------------------

class Conf(StrictModel):
    sysctl: SysctlConf | None = None
    limits: LimitsConf | None = None
    mounts: MountsConf | None = None
    ethtool: EthtoolConf | None = None
    apt: AptConf | None = None
    uamlite: UamliteConf | None = None
    perm: PermConf | None = None
    apparmor: AppArmorConf | None = None
    kernel: KernelConf | None = None
    exec: ExecConf | None = None
    maintenance: MaintenanceConf | None = None
    overrides: Overrides | None = None
    # Divingbell chart settings, accepted so its values files load unchanged; they have no
    # meaning for an agent on the node and `validate` says so.
    chroot_mnt_path: str | None = None
    log_colors: bool | None = None
    extra_verbose: bool | None = None


class Document(StrictModel):
    """A divingbell document: everything under `conf:`, for every node."""

    conf: Conf = Conf()
    # What the agent does when the host drifts from the document between applies: put it
    # back (correct) or only report it (report: metrics, a node event, the status annotation).
    drift: Literal["correct", "report"] = "correct"
    # Retired: it switched off a guard that refused plans removing more than they keep.
    # Documents that say it still validate (with a note); it changes nothing.
    allow_mass_removal: bool = False


MODULE_MODELS: dict[str, type[BaseModel]] = {
    "sysctl": SysctlConf,
    "limits": LimitsConf,
    "mounts": MountsConf,
    "ethtool": EthtoolConf,
    "apt": AptConf,
    "uamlite": UamliteConf,
    "perm": PermConf,
    "apparmor": AppArmorConf,
    "kernel": KernelConf,
    "exec": ExecConf,
}

SECTION_MODELS: dict[str, type[BaseModel]] = {**MODULE_MODELS, "maintenance": MaintenanceConf}
"""Every section with overrides: the host modules, then the agent's maintenance section."""
