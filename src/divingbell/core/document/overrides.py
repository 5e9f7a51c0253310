"""Override resolution, exactly as Divingbell documents it.

For each module independently:
- a host override whose `name` is the node wins over every label override;
- otherwise the *last* label override, in list order, whose key has one of the listed values;
- at most one override applies; it deep-merges over the base conf (mappings merge, lists are
  replaced whole);
- an override for one module never changes another module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from divingbell.core.document.keys import MERGE_KEY_CANONICALIZERS
from divingbell.core.document.loader import deep_merge
from divingbell.core.document.nodeconfig import Applied as Applied  # noqa: PLC0414
from divingbell.core.document.paths import PathKey


def select_override(
    module_overrides: Mapping[str, Any], node: str, labels: Mapping[str, str], module: str
) -> tuple[Applied, Mapping[str, Any]] | None:
    """The one override for `module` on this node, and its conf, or None."""
    base: PathKey = ("conf", "overrides", f"divingbell_{module}")
    for index, host in enumerate(module_overrides.get("hosts") or []):
        if str(host["name"]) == node:
            return (
                Applied("host", (*base, "hosts", index), f"host override {node!r}"),
                host.get("conf") or {},
            )
    chosen = None
    for index, entry in enumerate(module_overrides.get("labels") or []):
        selector = entry["label"]
        key, values = str(selector["key"]), [_label_text(v) for v in selector["values"]]
        if key in labels and labels[key] in values:
            chosen = (
                Applied("label", (*base, "labels", index),
                        f"label override {key}={labels[key]} (labels[{index}])"),
                entry.get("conf") or {},
            )
    return chosen


def merge_module(module: str, base: Any, override: Any) -> Any:
    """Deep-merge one module's override conf over its base conf."""
    canonical = MERGE_KEY_CANONICALIZERS.get(module)
    if canonical is not None:
        base = _canonical_keys(base, canonical)
        override = _canonical_keys(override, canonical)
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        return deep_merge(base, override)
    return override


def _canonical_keys(value: Any, canonical: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    return {canonical(str(key)): item for key, item in value.items()}


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
