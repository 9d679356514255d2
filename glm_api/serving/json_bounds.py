"""JSON Schema rewrites that make constrained JSON able to end and keep to its schema.

A grammar lets through whatever its schema allows, and a weak model takes every opening: a
``number`` runs to ``111222222222223333...`` and an open value (``json_object``, or ``{}`` in a
schema) nests ``{"setup":{"setup":...`` until ``max_tokens``. Both loops are closed here, before
llguidance compiles the schema, by what JSON Schema itself can say (llguidance 1.9 has no option
for either):

- numbers: a bound the schema leaves open becomes ``±1e17`` (17 digits before the point) and a
  ``number`` without ``multipleOf`` gets ``multipleOf: 1e-10`` (at most 10 digits after it, the
  finest step llguidance compiles); no exponent, as llguidance writes bounded numbers. Bounds and
  steps the schema gives are kept; one beyond ``±1e17`` leaves the other side open.
- open values (``{}``, ``true``, an array without ``items``, an object without
  ``additionalProperties`` or with ``true``) become a value of at most ``max_depth`` levels of
  arrays and objects, its numbers bounded as above.

:func:`strict_schema` is OpenAI's strict mode (and xgrammar's): an object schema that does not
say ``additionalProperties`` gets ``false``, so tool arguments carry no invented properties.

Where a schema combines subschemas into one (``allOf``, or ``$ref``/``anyOf``/``oneOf`` beside
other constraining keywords) llguidance intersects them, and an added keyword could change what
they mean together: those subtrees are left as given. Pure functions: no torch, no llguidance.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

#: Nesting levels of arrays and objects in an open value (the whole of a ``json_object`` answer).
DEFAULT_MAX_DEPTH = 16
#: ``|x| <= NUMBER_LIMIT`` where the schema gives no bound: 17 digits, a double's precision.
NUMBER_LIMIT = 10**17
#: The finest ``multipleOf`` llguidance compiles for a ``number`` (1e-11 and below are refused).
NUMBER_STEP = 1e-10

#: Keywords that describe a schema without constraining it.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
    "$schema", "$id", "$defs", "definitions", "x-guidance",
})
_OBJECT_KEYS = ("properties", "patternProperties", "additionalProperties", "required",
                "minProperties", "maxProperties")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems")
_VALUE_PREFIX = "glm_api_json_value_"


def strict_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not say."""
    return _rewrite(copy.deepcopy(schema), _close_object)


def bounded_schema(schema: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``schema`` with its numbers bounded and its open values nested at most ``max_depth`` deep."""
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    used = [False]

    def bound(node: Any) -> Any:
        if node is True or (isinstance(node, dict) and _is_open(node)):
            used[0] = True
            kept = {k: v for k, v in node.items() if k in ("$defs", "definitions", "x-guidance")} if isinstance(node, dict) else {}
            return {**kept, **_value_ref(max_depth)}
        return _bound(node, max_depth, used) if isinstance(node, dict) else node

    root = _rewrite(copy.deepcopy(schema), bound)
    if used[0]:
        root = {**root, "$defs": {**root.get("$defs", {}), **_value_defs(max_depth)}}
    return root


def any_object_schema(max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """``json_object``: any JSON object, nested at most ``max_depth`` levels (itself the first)."""
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    inner = _value_ref(max_depth - 1)
    return {"type": "object", "additionalProperties": inner, "$defs": _value_defs(max_depth - 1)}


def bounded_constraint(constraint: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """A JSON constraint (``glm_api.engines.grammar.Constraint``) with :func:`bounded_schema`
    applied (``json_object``: :func:`any_object_schema` as its spec); any other kind as given."""
    if constraint is None or constraint.kind not in ("json_object", "json_schema"):
        return constraint
    if constraint.kind == "json_object":
        return dataclasses.replace(constraint, spec=json.dumps(any_object_schema(max_depth)))
    return dataclasses.replace(constraint, spec=json.dumps(bounded_schema(json.loads(constraint.spec), max_depth)))


def _value_ref(depth: int) -> dict[str, str]:
    return {"$ref": f"#/$defs/{_VALUE_PREFIX}{depth}"}


def _value_defs(max_depth: int) -> dict[str, Any]:
    """A value of at most ``k`` levels, for k = 0 (a scalar) .. ``max_depth``. The scalars are one
    definition that every level refers to: llguidance compiles it once (inlined at each level, the
    bounded number made each token's mask ~4x dearer at depth 16)."""
    scalar = {"$ref": f"#/$defs/{_VALUE_PREFIX}0"}
    defs: dict[str, Any] = {f"{_VALUE_PREFIX}0": {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "string"},
                                                            _bound_number({"type": "number"})]}}
    for k in range(1, max_depth + 1):
        inner = _value_ref(k - 1)
        defs[f"{_VALUE_PREFIX}{k}"] = {"anyOf": [scalar, {"type": "array", "items": inner},
                                                  {"type": "object", "additionalProperties": inner}]}
    return defs


def _rewrite(schema: Any, fn: Any) -> Any:
    """Apply ``fn`` to every subschema that stands alone (bottom-up), leaving combined ones as given."""
    if isinstance(schema, dict) and _combined(schema):
        return schema
    if not isinstance(schema, dict):
        return fn(schema)
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _rewrite(sub, fn) for name, sub in out[key].items()}
    for key in ("additionalProperties", "items"):
        if isinstance(out.get(key), (dict, bool)):
            out[key] = _rewrite(out[key], fn)
    for key in ("prefixItems", "anyOf", "oneOf"):  # alternatives stand alone (siblings would make them combined)
        if isinstance(out.get(key), list):
            out[key] = [_rewrite(sub, fn) for sub in out[key]]
    return fn(out)


def _combined(schema: dict[str, Any]) -> bool:
    if "allOf" in schema:
        return True
    constraining = set(schema) - _ANNOTATIONS
    return any(key in constraining for key in ("$ref", "anyOf", "oneOf")) and len(constraining) > 1


def _types(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    inferred = set()
    if any(key in schema for key in _OBJECT_KEYS):
        inferred.add("object")
    if any(key in schema for key in _ARRAY_KEYS):
        inferred.add("array")
    return inferred


def _is_open(schema: dict[str, Any]) -> bool:
    """No constraining keyword at all: any JSON value."""
    return not (set(schema) - _ANNOTATIONS)


def _close_object(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    named = set(schema.get("properties") or {})
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    if ("object" in _types(schema) and "additionalProperties" not in schema and "unevaluatedProperties" not in schema
            and set(required) <= named):  # a required name the schema does not describe stays allowed
        return {**schema, "additionalProperties": False}
    return schema


def _bound(schema: dict[str, Any], max_depth: int, used: list[bool]) -> dict[str, Any]:
    types = _types(schema)
    if types & {"number", "integer"}:
        schema = _bound_number(schema)
    for key, kind in (("items", "array"), ("additionalProperties", "object")):
        if kind in types and key not in schema and "unevaluatedProperties" not in schema:
            used[0] = True
            schema = {**schema, key: _value_ref(max_depth)}
    return schema


def _bound_number(schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    low = _given(schema, "minimum", "exclusiveMinimum")
    high = _given(schema, "maximum", "exclusiveMaximum")
    # A schema whose own bound lies beyond the limit asks for big numbers: its other side stays open.
    if low is None and (high is None or high > -NUMBER_LIMIT):
        out["minimum"] = -NUMBER_LIMIT
    if high is None and (low is None or low < NUMBER_LIMIT):
        out["maximum"] = NUMBER_LIMIT
    if "number" in _types(schema) and "multipleOf" not in schema:
        out["multipleOf"] = NUMBER_STEP
    return out


def _given(schema: dict[str, Any], inclusive: str, exclusive: str) -> float | None:
    for key in (inclusive, exclusive):
        value = schema.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None
