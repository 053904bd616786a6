"""Validate a CodaTrainingRun the way the API server would, offline.

1. defaulting from the schema (the API server defaults before it validates),
2. the structural openAPIV3Schema with jsonschema, unknown fields rejected (kubectl's strict field
   validation; the API server would otherwise prune them),
3. the CEL `x-kubernetes-validations`, evaluated with cel-python. Kubernetes' CEL has the `strings`
   extension library; the rules use its `split`, registered here with the same semantics.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import celpy
import jsonschema
from celpy import celtypes
from coda_operator import crd


def _split(s: Any, sep: Any) -> celtypes.ListType:
    return celtypes.ListType([celtypes.StringType(x) for x in str(s).split(str(sep))])


_ENV = celpy.Environment()


@functools.cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule), functions={"split": _split})


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    if out.get("exclusiveMinimum") is True:  # OpenAPI 3.0 boolean form → draft-7 numeric form
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _schema() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    schema = _strict(copy.deepcopy(_schema()))
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out.lstrip(".") or "<root>"


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


def _cel(schema: dict[str, Any], value: Any, path: str, out: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            ok = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # a CEL runtime error is a validation failure in Kubernetes too
            ok = e
        if ok is not True and not (isinstance(ok, celtypes.BoolType) and bool(ok)):
            out.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value and value[name] is not None:
                _cel(sub, value[name], f"{path}.{name}" if path else name, out)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            _cel(schema["items"], v, f"{path}[{i}]", out)


def cel_errors(doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    _cel(_schema(), doc, "", out)
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Everything the API server would reject `doc` for (schema first, CEL on schema-valid input)."""
    doc = apply_defaults(_schema(), copy.deepcopy(doc))
    return schema_errors(doc) or cel_errors(doc)
