"""Label selectors mean what they mean to `kubectl get -l` and to a PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

import pytest

from divingbell.core.document.selectors import from_label_selector, matches, parse_selector

LABELS = {"app": "web", "tier": "front", "canary": ""}


@pytest.mark.parametrize(("selector", "result"), [
    ("", True), ("app=web", True), ("app==web", True), ("app!=web", False),
    ("app!=db", True), ("missing!=x", True), ("tier in (front, back)", True),
    ("tier notin (front)", False), ("missing notin (x)", True), ("canary", True),
    ("!canary", False), ("!missing", True), ("app=web,tier in (back)", False),
    ("app=web, tier in (front,back), !missing", True),
])
def test_matching(selector: str, result: bool) -> None:
    assert matches(selector, LABELS) is result


@pytest.mark.parametrize(("selector", "problem"), [
    ("a b=c", "'a b' is not a label key"), ("x in ()", "`in` needs at least one value"),
    ("app=we b", "'we b' is not a label value"), ("tier in (a", "unbalanced parentheses"),
    ("=x", "'' is not a label key"),
])
def test_bad_selectors_name_the_requirement(selector: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_selector(selector)


@pytest.mark.parametrize(("selector", "result"), [
    ({"matchLabels": {"app": "web"}}, True),
    ({"matchLabels": {"app": "db"}}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}, False),
    ({"matchExpressions": [{"key": "canary", "operator": "Exists"}]}, True),
    ({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}, False),
    ({}, True),     # policy/v1: an empty selector selects every pod in the namespace
    (None, False),  # and a null one none
])
def test_budget_selectors(selector: dict[str, Any] | None, result: bool) -> None:
    assert from_label_selector(selector).matches(LABELS) is result
