"""A node's desired labels, applied through the Kubernetes adapter.

The desired map is the whole set of the node's labels outside Kubernetes' own domains: labels
it does not name are removed, except those under kubernetes.io/ and k8s.io/ (topology, roles,
the kubelet's own), which are never removed. The keys divingbell set are kept in the
`divingbell.io/bootstrap-labels` annotation so teardown removes exactly those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from divingbell.bootstrap.design import is_protected, label_problem
from divingbell.bootstrap.paths import OWNED_ANNOTATION
from divingbell.kube import NodeLabelApi, NodeView


@dataclass(frozen=True)
class LabelChange:
    node: str
    set: dict[str, str]
    removed: list[str]
    kept_protected: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.set or self.removed)

    def as_dict(self) -> dict[str, object]:
        return {"node": self.node, "set": self.set, "removed": self.removed,
                "kept_protected": self.kept_protected, "changed": self.changed}


def parse_labels(pairs: list[str] | tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """KEY=VALUE arguments -> (labels, problems)."""
    labels: dict[str, str] = {}
    problems = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            problems.append(f"{pair!r}: expected KEY=VALUE")
            continue
        problem = label_problem(key, value)
        if problem:
            problems.append(problem)
        labels[key] = value
    return labels, problems


def plan_labels(view: NodeView, desired: Mapping[str, str]) -> LabelChange:
    to_set = {k: v for k, v in sorted(desired.items()) if view.labels.get(k) != v}
    removed = sorted(k for k in view.labels if k not in desired and not is_protected(k))
    kept = sorted(k for k in view.labels if k not in desired and is_protected(k))
    return LabelChange(view.name, to_set, removed, kept)


def set_labels(api: NodeLabelApi, node: str, desired: Mapping[str, str]) -> LabelChange:
    view = _view(api, node)
    change = plan_labels(view, desired)
    if change.changed or view.annotations.get(OWNED_ANNOTATION) != _owned(desired):
        api.patch_node(node, labels={**change.set, **dict.fromkeys(change.removed)},
                       annotations={OWNED_ANNOTATION: _owned(desired)})
    return change


def remove_owned_labels(api: NodeLabelApi, node: str) -> LabelChange:
    """Teardown: remove the labels divingbell set (never a protected one)."""
    view = _view(api, node)
    owned = [k for k in (view.annotations.get(OWNED_ANNOTATION) or "").split(",") if k]
    removed = sorted(k for k in owned if k in view.labels and not is_protected(k))
    kept = sorted(k for k in owned if k in view.labels and is_protected(k))
    if removed or owned:
        api.patch_node(node, labels=dict.fromkeys(removed),
                       annotations={OWNED_ANNOTATION: None})
    return LabelChange(node, {}, removed, kept)


def _view(api: NodeLabelApi, node: str) -> NodeView:
    return api.node(node)


def _owned(desired: Mapping[str, str]) -> str:
    return ",".join(sorted(desired))
