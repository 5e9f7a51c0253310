"""limits: pam_limits entries, one owned file each under /etc/security/limits.d.

Only divingbell's own files are ever removed (Divingbell emptied the whole directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from divingbell.core.engine.change import Change
from divingbell.core.engine.files import FileSpec, plan_files
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.limits_schema import Limit, LimitsConf

LIMITS_DIR = "/etc/security/limits.d"
HEADER = MANAGED_LINE + "\n"


def limit_file(name: str) -> str:
    return f"{LIMITS_DIR}/60-divingbell-{name}.conf"


def render_limit(limit: Limit) -> str:
    return f"{HEADER}{limit.domain} {limit.type} {limit.item} {limit.value}\n"


def _describe(content: str) -> str:
    lines = [line for line in content.splitlines() if line and not line.startswith("#")]
    return "; ".join(lines) if lines else "empty"


@dataclass(frozen=True)
class LimitsObserved:
    files: dict[str, str | None]


class Limits(HostModule["LimitsConf", LimitsObserved]):
    name = "limits"

    def observe(self, host: Host, desired: LimitsConf | None, record: ModuleRecord
                ) -> LimitsObserved:
        paths = {limit_file(name) for name in (desired.root if desired else {})}
        paths |= set(record.owned_files) | {p for p in record.originals if p.startswith("/")}
        return LimitsObserved({path: host.read_text(path) for path in sorted(paths)})

    def plan(self, desired: LimitsConf | None, observed: LimitsObserved, record: ModuleRecord
             ) -> list[Change]:
        wanted = {
            limit_file(name): FileSpec(render_limit(limit))
            for name, limit in (desired.root if desired else {}).items()
        }
        return plan_files(self.name, wanted, observed.files, record, _describe)
