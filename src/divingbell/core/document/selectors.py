"""Kubernetes label selectors (`app=etcd,tier in (a,b),!canary`), parsed and matched as the
API server does, so a selector in the document means what `kubectl get -l` means."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SET = re.compile(r"^\s*(\S+)\s+(in|notin)\s*\(([^)]*)\)\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # "!=", "notin"


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """All requirements hold; the empty selector matches everything."""
        return all(r.matches(labels) for r in self.requirements)


def parse_selector(text: str) -> Selector:
    """Parse a selector; ValueError names the requirement that is wrong."""
    return Selector(tuple(_requirement(part) for part in _split(text.strip()) if part.strip()))


def matches(selector: str, labels: Mapping[str, str]) -> bool:
    return parse_selector(selector).matches(labels)


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in label selector {text!r}")
    return parts


def _requirement(part: str) -> Requirement:
    text = part.strip()
    set_match = _SET.match(text)
    if set_match:
        key, op, raw = set_match.groups()
        values = tuple(v.strip() for v in raw.split(",") if v.strip())
        if not values:
            raise ValueError(f"{text!r}: `{op}` needs at least one value")
        return _checked(Requirement(key, op, values), text)
    for op in ("!=", "==", "="):
        if op in text:
            key, _, value = text.partition(op)
            return _checked(Requirement(key.strip(), "!=" if op == "!=" else "=",
                                        (value.strip(),)), text)
    if text.startswith("!"):
        return _checked(Requirement(text[1:].strip(), "!"), text)
    return _checked(Requirement(text, "exists"), text)


def _checked(requirement: Requirement, text: str) -> Requirement:
    if not _KEY.match(requirement.key) or len(requirement.key.rpartition("/")[2]) > 63:
        raise ValueError(f"{text!r}: {requirement.key!r} is not a label key")
    for value in requirement.values:
        if not _VALUE.match(value) or len(value) > 63:
            raise ValueError(f"{text!r}: {value!r} is not a label value")
    return requirement


def from_label_selector(selector: Mapping[str, object] | None) -> Selector:
    """A Kubernetes LabelSelector object (a PodDisruptionBudget's `spec.selector`). As policy/v1:
    an empty selector selects every pod; a null one selects none."""
    if selector is None:
        return Selector((Requirement("", "in", ()),))  # matches nothing
    requirements: list[Requirement] = []
    match_labels = selector.get("matchLabels") or {}
    assert isinstance(match_labels, Mapping)
    for key, value in sorted(match_labels.items()):
        requirements.append(Requirement(str(key), "=", (str(value),)))
    expressions = selector.get("matchExpressions") or []
    assert isinstance(expressions, list)
    operators = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expression in expressions:
        op = operators.get(str(expression.get("operator")))
        if op is None:
            raise ValueError(f"unknown selector operator {expression.get('operator')!r}")
        requirements.append(Requirement(str(expression.get("key")), op,
                                        tuple(str(v) for v in expression.get("values") or [])))
    return Selector(tuple(requirements))
