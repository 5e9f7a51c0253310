"""Evaluating a ValidatingAdmissionPolicy the way kube-apiserver does, with cel-python: the
match conditions first (all true, or the policy does not apply), then the variables in order
(each may use the ones before), then every validation (false = denied with its message).

There is no API server here; this runs the policy's own CEL text on admission requests shaped
as the API server builds them (`request.userInfo.extra` holds lists of strings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError


def _evaluate(expression: str, activation: Mapping[str, Any]) -> Any:
    environment = celpy.Environment()
    program = environment.program(environment.compile(expression))
    result = program.evaluate(dict(activation))
    if isinstance(result, CELEvalError):
        raise AssertionError(f"CEL error in {expression!r}: {result}")
    return result


def admit(policy: Mapping[str, Any], request: Mapping[str, Any],
          new: Mapping[str, Any] | None, old: Mapping[str, Any] | None) -> list[str]:
    """The messages of the validations that deny this request; empty when admitted (or when
    the policy does not match it)."""
    spec = policy["spec"]
    activation: dict[str, Any] = {
        "request": json_to_cel(dict(request)),
        # On DELETE the API server sends no object, only oldObject.
        "object": json_to_cel(dict(new)) if new is not None else None,
        "oldObject": json_to_cel(dict(old)) if old is not None else None,
    }
    for condition in spec.get("matchConditions") or []:
        if not bool(_evaluate(condition["expression"], activation)):
            return []
    variables = celtypes.MapType({})
    for variable in spec.get("variables") or []:
        value = _evaluate(variable["expression"], {**activation, "variables": variables})
        variables = celtypes.MapType({**variables, celtypes.StringType(variable["name"]): value})
    activation["variables"] = variables
    return [validation["message"] for validation in spec["validations"]
            if not bool(_evaluate(validation["expression"], activation))]
