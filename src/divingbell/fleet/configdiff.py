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

from divingbell.core.document.api import effective_document, node_config
from divingbell.core.document.validate import ValidDocument

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


# What leaves a machine's configuration ---------------------------------------------------------

EFFECTS = {
    "sysctl": "original values restored",
    "limits": "limits files removed",
    "mounts": "unmounted, mount units removed",
    "ethtool": "original NIC settings restored",
    "apt": "packages removed, sources removed",
    "uamlite": "accounts expired (purged with purge_expired_users)",
    "perm": "original owner and mode restored",
    "apparmor": "profiles removed",
    "kernel": "parameters leave the boot line (drop-in removed, update-grub): at the next boot",
    "exec": "scripts forgotten (a script reverts nothing)",
}
"""What the host does with an entry that left the document, module by module."""

UNCOUNTED = frozenset({"exec"})
"""Modules whose removals take nothing back from the host: shown, never counted as removals."""

NAMED: dict[str, list[tuple[str, str | None, str]]] = {
    "apt": [("packages", "name", "package"), ("repositories", None, "repository")],
    "uamlite": [("users", "user_name", "user")],
    "perm": [("paths", "path", "path")],
    "apparmor": [("profiles", None, "profile")],
    "kernel": [("cmdline", None, "parameter"), ("flags", None, "parameter")],
}
"""Modules whose entries are named inside lists or maps: (key, the name's field in each item
or None for a map's keys, the word shown before the name)."""

PURGE = "purge_expired_users (expired accounts and their homes are deleted)"


def entries(module: str, settings: Any) -> set[str]:
    """The things one module's effective settings manage on a machine, by name: what the host
    restores or removes when one of them leaves the document."""
    if not isinstance(settings, dict):
        return set()
    if module in ("sysctl", "limits", "mounts", "exec"):
        return {str(key) for key in settings}
    if module == "ethtool":
        return {f"{nic} {key}" + (f".{sub}" if sub is not None else "")
                for nic, values in settings.items() if isinstance(values, dict)
                for key, value in values.items()
                for sub in (value if isinstance(value, dict) else [None])}
    found = set()
    for key, field_name, word in NAMED.get(module, []):
        items = settings.get(key) or []
        names = (list(items) if field_name is None else
                 [item.get(field_name) for item in items if isinstance(item, dict)])
        found |= {f"{word} {name}" for name in names}
    if module == "uamlite" and settings.get("purge_expired_users"):
        found.add(PURGE)
    return found


@dataclass
class Removals:
    """What a new configuration takes away from one machine, against what it keeps."""

    modules: dict[str, list[str]] = field(default_factory=dict)  # module -> entries leaving
    kept: int = 0

    @property
    def removed(self) -> int:
        return sum(len(names) for module, names in self.modules.items()
                   if module not in UNCOUNTED)

    @property
    def exceeds_kept(self) -> bool:
        """Removes more than it keeps: pushing it to the fleet needs `--allow-removals`."""
        return self.removed > self.kept

    def as_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": self.kept,
                "exceeds_kept": self.exceeds_kept,
                "modules": {module: {"entries": names, "effect": EFFECTS.get(module, "removed")}
                            for module, names in self.modules.items()}}


def removals(old: ValidDocument | None, new: ValidDocument, target: Target) -> Removals:
    """Per module, the entries of `target`'s effective configuration under `old` that `new`
    no longer has (the host restores or removes them), and how many entries `new` keeps.
    Turning `purge_expired_users` on counts as a removal: it deletes accounts."""
    before, after = effective(old, target).shown, effective(new, target).shown
    result = Removals()
    for module in sorted(set(before) | set(after)):
        if module == "maintenance":
            continue  # the agent's own settings: nothing on the host to restore
        kept = entries(module, after.get(module))
        gone = entries(module, before.get(module)) - kept
        if PURGE in kept and PURGE not in entries(module, before.get(module)):
            gone.add(PURGE)
        kept.discard(PURGE)
        result.kept += len(kept)
        if gone:
            result.modules[module] = sorted(gone)
    return result


def override_names(*documents: ValidDocument) -> tuple[set[str], set[tuple[str, str]]]:
    """The host names and the (label key, value) pairs the documents' overrides select on."""
    hosts: set[str] = set()
    labels: set[tuple[str, str]] = set()
    for document in documents:
        for section in (document.raw_conf.get("overrides") or {}).values():
            if not isinstance(section, dict):
                continue
            hosts |= {str(h.get("name")) for h in section.get("hosts") or []
                      if isinstance(h, dict)}
            for entry in section.get("labels") or []:
                label = entry.get("label") if isinstance(entry, dict) else None
                if isinstance(label, dict):
                    labels |= {(str(label.get("key")), str(v)) for v in label.get("values") or []}
    return hosts, labels


def override_targets(*documents: ValidDocument) -> list[Target]:
    """Without a fleet, the kinds of node the documents tell apart: every host override's
    node, one node per label override value, and any other node. What `divingbell manifests
    --previous` compares when it cannot know the cluster's nodes."""
    hosts, labels = override_names(*documents)
    return ([Target(name, name, {}) for name in sorted(hosts)]
            + [Target(f"{k}={v}", f"nodes labelled {k}={v}", {k: v}) for k, v in sorted(labels)]
            + [Target("*", "any other node", {})])


# What a new configuration costs each machine's workloads ------------------------------------

DISRUPTION_KINDS = ("none", "restart", "reboot")
"""Weakest first. The host decides the exact units when it plans (`divingbell plan`); before a
rollout the fleet can tell the kind from the two configurations."""


@dataclass
class MachineDisruption:
    """What applying a new configuration would do to one machine: the strongest kind, and per
    module that disrupts anything, why."""

    kind: str = "none"
    modules: dict[str, str] = field(default_factory=dict)

    def add(self, module: str, kind: str, why: str) -> None:
        self.modules[module] = f"{kind}: {why}"
        if DISRUPTION_KINDS.index(kind) > DISRUPTION_KINDS.index(self.kind):
            self.kind = kind

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "modules": self.modules}


def _packages(settings: Any) -> dict[str, Any]:
    """apt's packages by name -> the whole entry (version pin, debconf answers)."""
    if not isinstance(settings, dict):
        return {}
    packages = settings.get("packages") or []
    if isinstance(packages, dict):  # groups of packages
        packages = [p for group in packages.values() for p in group or []]
    return {str(p.get("name")): p for p in packages if isinstance(p, dict)}


def _apt_disruption(before: Any, after: Any) -> tuple[str, str] | None:
    import re

    from divingbell.core.document.keys import REBOOT_PACKAGES

    old, new = _packages(before), _packages(after)
    touched = sorted(name for name in set(old) | set(new)
                     if name in old and old.get(name) != new.get(name))
    kernels = sorted(name for name in (set(old) ^ set(new)) | set(touched)
                     if re.match(REBOOT_PACKAGES, name))
    if kernels:
        return "reboot", f"kernel or microcode packages change ({', '.join(kernels)})"
    upgrade = isinstance(after, dict) and after.get("upgrade") and not (
        isinstance(before, dict) and before.get("upgrade"))
    if upgrade:
        return "reboot", "upgrade turns on: it may bring a new kernel (the host decides)"
    if touched:
        return "restart", (f"packages change or leave ({', '.join(touched)}): the services "
                           "they ship restart")
    return None


def _exec_disruption(before: Any, after: Any) -> tuple[str, str] | None:
    old = before if isinstance(before, dict) else {}
    new = after if isinstance(after, dict) else {}
    declared = {name: str(script.get("disruption") or "none") for name, script in new.items()
                if isinstance(script, dict) and old.get(name) != script}
    disrupting = {name: d for name, d in declared.items() if d != "none"}
    if not disrupting:
        return None
    kind = "reboot" if "reboot" in disrupting.values() else "restart"
    return kind, "new or changed scripts declare it (" + ", ".join(
        f"{name}: {d}" for name, d in sorted(disrupting.items())) + ")"


def _kernel_disruption(before: Any, after: Any) -> tuple[str, str] | None:
    def line(settings: Any) -> tuple[Any, Any]:
        settings = settings if isinstance(settings, dict) else {}
        return settings.get("cmdline") or {}, sorted(settings.get("flags") or [])

    if line(before) == line(after):
        return None
    return "reboot", "the kernel command line changes: it takes effect at the next boot"


MODULE_DISRUPTION = {"apt": _apt_disruption, "exec": _exec_disruption,
                     "kernel": _kernel_disruption}
"""Modules whose changes can cost more than nothing; every other module's changes are live."""


def disruption(old: ValidDocument | None, new: ValidDocument, target: Target
               ) -> MachineDisruption:
    """What `new` would do to `target` against `old`: none (live changes only), restart
    (services restart) or reboot, with the reason per module. Compared on the real values."""
    before, after = effective(old, target).served, effective(new, target).served
    result = MachineDisruption()
    for module, decide in MODULE_DISRUPTION.items():
        if before.get(module) == after.get(module):
            continue
        found = decide(before.get(module), after.get(module))
        if found is not None:
            result.add(module, *found)
    return result
