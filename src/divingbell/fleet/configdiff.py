"""What a new revision would change on each machine: its effective configuration, old against
new, module by module. Pure: the caller loads both revisions and knows each machine's labels.

Both sides go through the same override code the agent uses (`document.api.node_config`), so the
blast radius shown before a rollout is exactly what the machines will be served.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from divingbell.document.api import node_config
from divingbell.document.validate import ValidDocument


@dataclass(frozen=True)
class Target:
    id: str
    name: str
    labels: Mapping[str, str]


@dataclass
class MachineDiff:
    id: str
    name: str
    modules: dict[str, list[str]] = field(default_factory=dict)  # module -> unified diff lines

    @property
    def changed(self) -> bool:
        return bool(self.modules)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "changed": self.changed,
                "modules": self.modules}


def effective(document: ValidDocument | None, target: Target) -> dict[str, Any]:
    if document is None:
        return {}
    return node_config(document, target.name, target.labels).dump()


def module_diff(module: str, old: Any, new: Any) -> list[str]:
    """A unified diff of one module's effective settings, empty when equal."""
    if old == new:
        return []
    before = _yaml(old).splitlines(keepends=False)
    after = _yaml(new).splitlines(keepends=False)
    return list(difflib.unified_diff(before, after, f"{module} (current)", f"{module} (new)",
                                     lineterm="", n=2))


def machine_diff(old: ValidDocument | None, new: ValidDocument, target: Target) -> MachineDiff:
    before, after = effective(old, target), effective(new, target)
    result = MachineDiff(target.id, target.name)
    for module in sorted(set(before) | set(after)):
        lines = module_diff(module, before.get(module), after.get(module))
        if lines:
            result.modules[module] = lines
    return result


def fleet_diff(old: ValidDocument | None, new: ValidDocument,
               targets: Iterable[Target]) -> list[MachineDiff]:
    return [machine_diff(old, new, target) for target in sorted(targets, key=lambda t: t.name)]


def _yaml(value: Any) -> str:
    if value is None:
        return ""
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False, width=1000)
