"""Host modules, one file each, all with the interface in `base`. The registry is explicit and
ordered: modules are planned and applied in `MODULE_NAMES` order. Each module is imported the
first time it is used, so a run that touches only sysctls imports only that module.

The package also holds each module's configuration model (`<name>_schema.py`), which the
document's schema imports: importing the package itself stays light (no engine, no host)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from divingbell.core.document.keys import MODULE_NAMES

if TYPE_CHECKING:
    from divingbell.core.modules.base import HostModule

_CLASSES = {
    "sysctl": "divingbell.core.modules.sysctl:Sysctl",
    "limits": "divingbell.core.modules.limits:Limits",
    "mounts": "divingbell.core.modules.mounts:Mounts",
    "ethtool": "divingbell.core.modules.ethtool:Ethtool",
    "apt": "divingbell.core.modules.apt:Apt",
    "uamlite": "divingbell.core.modules.uamlite:Uamlite",
    "perm": "divingbell.core.modules.perm:Perm",
    "apparmor": "divingbell.core.modules.apparmor:AppArmor",
    "kernel": "divingbell.core.modules.kernel:Kernel",
    "exec": "divingbell.core.modules.exec:Exec",
}
assert tuple(_CLASSES) == MODULE_NAMES


class _Registry(dict[str, "HostModule[Any, Any]"]):
    def __missing__(self, name: str) -> HostModule[Any, Any]:
        module_name, _, attr = _CLASSES[name].partition(":")
        module = getattr(importlib.import_module(module_name), attr)()
        self[name] = module
        return module  # type: ignore[no-any-return]


IMPLEMENTED: dict[str, HostModule[Any, Any]] = _Registry()


def get(name: str) -> HostModule[Any, Any]:
    return IMPLEMENTED[name]


__all__ = ["IMPLEMENTED", "MODULE_NAMES", "get"]
