"""What a new revision would change on each machine: its effective configuration, old against
new, module by module. Pure: the caller loads both revisions and knows each machine's labels.

Both sides go through the same override code the agent uses (`document.api.node_config`), so the
blast radius shown before a rollout is exactly what the machines will be served.

The diff is of the masked configuration (`NodeConfig.dump`), so no secret can reach a plan; but
equality is decided on the real values, so a revision that only changes a password still
changes the machine. Where a masked value hides a change, the new side's line says so
(`user_crypt_passwd: '********** (sensitive, changed)'`), never what it changed from or to.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from divingbell.document.api import effective_document, node_config
from divingbell.document.validate import ValidDocument

SENSITIVE_CHANGED = " (sensitive, changed)"
"""Appended to a masked value whose secret differs between the two sides."""


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


@dataclass(frozen=True)
class Effective:
    """One machine's effective configuration, module by module: as shown (secrets masked) and
    as served (secrets revealed, for comparing only: never printed or returned)."""

    shown: dict[str, Any]
    served: dict[str, Any]


NOTHING = Effective({}, {})


def effective(document: ValidDocument | None, target: Target) -> Effective:
    if document is None:
        return NOTHING
    config = node_config(document, target.name, target.labels)
    return Effective(config.dump(), effective_document(document, config)["conf"])


def module_diff(module: str, old: Any, new: Any, old_served: Any = None,
                new_served: Any = None) -> list[str]:
    """A unified diff of one module's effective settings (as shown: secrets masked), empty
    when equal. `old_served`/`new_served` are the same settings with secrets revealed, when
    known: a secret that differs there is marked changed on the new side."""
    hidden_change = old_served != new_served
    if old == new and not hidden_change:
        return []
    if hidden_change:
        new = mark_hidden_changes(old, old_served, new, new_served)
    before = _yaml(old).splitlines(keepends=False)
    after = _yaml(new).splitlines(keepends=False)
    lines = list(difflib.unified_diff(before, after, f"{module} (current)", f"{module} (new)",
                                      lineterm="", n=2))
    if not lines:
        # The shapes did not line up for marking (cannot happen with today's masking, which
        # only replaces values); still never report a changed secret as no change.
        lines = [f"{module}:{SENSITIVE_CHANGED}"]
    return lines


def mark_hidden_changes(old_shown: Any, old_served: Any, new_shown: Any, new_served: Any
                        ) -> Any:
    """A copy of `new_shown` where every value that masking made equal to the old side, but
    whose real value differs, carries SENSITIVE_CHANGED. Walks the four in step (masking keeps
    keys and list positions); only masked text from `new_shown` is ever copied out."""
    if isinstance(new_shown, dict):
        if not (isinstance(old_shown, dict) and isinstance(old_served, dict)
                and isinstance(new_served, dict)):
            return new_shown
        return {key: mark_hidden_changes(old_shown[key], old_served.get(key), value,
                                         new_served.get(key))
                if key in old_shown else value
                for key, value in new_shown.items()}
    if isinstance(new_shown, list):
        if not (isinstance(old_shown, list) and isinstance(old_served, list)
                and isinstance(new_served, list)):
            return new_shown
        return [mark_hidden_changes(old_shown[i], _at(old_served, i), value, _at(new_served, i))
                if i < len(old_shown) else value
                for i, value in enumerate(new_shown)]
    if old_shown == new_shown and old_served != new_served:
        return f"{new_shown}{SENSITIVE_CHANGED}"
    return new_shown


def machine_diff(old: ValidDocument | None, new: ValidDocument, target: Target) -> MachineDiff:
    before, after = effective(old, target), effective(new, target)
    result = MachineDiff(target.id, target.name)
    for module in sorted(set(before.shown) | set(after.shown)):
        lines = module_diff(module, before.shown.get(module), after.shown.get(module),
                            before.served.get(module), after.served.get(module))
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


def _at(items: list[Any], index: int) -> Any:
    return items[index] if index < len(items) else None
