"""Host modules, one file each, all with the interface in `base`. The registry is explicit and
ordered: modules are planned and applied in `MODULE_NAMES` order."""

from __future__ import annotations

from typing import Any

from divingbell.document.schema import MODULE_NAMES
from divingbell.modules.apparmor import AppArmor
from divingbell.modules.apt import Apt
from divingbell.modules.base import HostModule
from divingbell.modules.ethtool import Ethtool
from divingbell.modules.exec import Exec
from divingbell.modules.limits import Limits
from divingbell.modules.mounts import Mounts
from divingbell.modules.perm import Perm
from divingbell.modules.sysctl import Sysctl
from divingbell.modules.uamlite import Uamlite

IMPLEMENTED: dict[str, HostModule[Any, Any]] = {
    module.name: module for module in (
        Sysctl(), Limits(), Mounts(), Ethtool(), Apt(), Uamlite(), Perm(), AppArmor(), Exec())
}


def get(name: str) -> HostModule[Any, Any]:
    return IMPLEMENTED[name]


__all__ = ["IMPLEMENTED", "MODULE_NAMES", "HostModule", "get"]
