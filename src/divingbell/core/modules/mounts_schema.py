"""The mounts module's configuration: mounts persisted as systemd .mount units."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, RootModel

from divingbell.core.document.fields import AbsPath, StrictModel, check_name_keys
from divingbell.core.document.types import UnitValue


class Mount(StrictModel):
    """A mount persisted as a systemd .mount unit (never /etc/fstab)."""

    mnt_tgt: AbsPath
    device: UnitValue
    type: UnitValue
    options: UnitValue | None = None  # as Divingbell: no Options= line unless given
    before: UnitValue = "docker.service"
    after: UnitValue = "network-online.target"


class MountsConf(RootModel[Annotated[dict[str, Mount], BeforeValidator(check_name_keys)]]):
    pass
