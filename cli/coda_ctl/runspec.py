"""Read CodaTrainingRun files and say precisely why one is rejected, before any cluster sees it.

Two checks, in order: the generated CRD's openAPIV3Schema (jsonschema, with unknown fields
rejected as the API server's strict field validation does), then the operator's pydantic model
(which also carries the rules the schema expresses as CEL). Both come from `coda_operator`, so the
CLI never keeps a copy of the API.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from coda_trainer.contract import API_VERSION, KIND, VERSION

from coda_ctl.errors import CtlError, Exit


def crd() -> dict[str, Any]:
    """The CodaTrainingRun CustomResourceDefinition, generated from the operator's API models."""
    from coda_operator import crd as crd_mod

    return crd_mod.build_crd()


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Structural schema → jsonschema that rejects unknown fields (the API server would prune them)."""
    schema = dict(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    for key in ("properties",):
        if key in schema:
            schema[key] = {k: _strict(v) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    # OpenAPI 3.0 writes exclusive bounds as booleans next to minimum/maximum; jsonschema (draft 6+)
    # wants the bound itself.
    for bound, excl in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if schema.get(excl) is True and bound in schema:
            schema[excl] = schema.pop(bound)
        elif schema.get(excl) is False:
            schema.pop(excl)
    if schema.pop("nullable", False):
        # OpenAPI's nullable has no jsonschema keyword: allow null explicitly (keeps errors precise).
        if isinstance(schema.get("type"), str):
            schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    return schema


@functools.cache
def _validator() -> Any:
    import jsonschema

    doc = crd()
    version = next(v for v in doc["spec"]["versions"] if v["name"] == VERSION)
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is validated by the API server's ObjectMeta, not the CRD schema: check the basics here.
    schema.setdefault("properties", {})["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {
                "type": "string",
                "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                "maxLength": 40,
            },
            "namespace": {"type": "string"},
        },
    }
    schema.setdefault("required", [])
    for key in ("apiVersion", "kind", "metadata", "spec"):
        if key not in schema["required"]:
            schema["required"].append(key)
    schema["properties"]["apiVersion"] = {"const": API_VERSION}
    schema["properties"]["kind"] = {"const": KIND}
    return jsonschema.Draft7Validator(schema)


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every CRD-schema violation as `field.path: reason`, sorted by path."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


def model_errors(doc: dict[str, Any], *, cluster: bool = True) -> list[str]:
    """Violations of the operator's pydantic model (cross-field rules included)."""
    from coda_operator import api

    try:
        api.parse_spec(doc.get("spec"), cluster=cluster)
    except api.InvalidSpec as e:
        return list(e.errors)
    return []


def validate(doc: dict[str, Any], *, cluster: bool = True) -> list[str]:
    """All reasons `doc` would be rejected; empty when it is a valid CodaTrainingRun."""
    if not isinstance(doc, dict):
        return [f"<root>: expected a mapping, got {type(doc).__name__}"]
    errors = schema_errors(doc)
    # Model checks repeat the schema's on malformed input; run them only on schema-valid specs.
    return errors or model_errors(doc, cluster=cluster)


def _written(doc: Any, path: str) -> bool:
    """Whether the dotted field path (`spec.checkpoints.uri`) is present in the document."""
    node = doc
    for part in path.split("."):
        if part.endswith("]") and "[" in part:  # stages[2]
            key, index = part[:-1].split("[", 1)
            node = node.get(key) if isinstance(node, dict) else None
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return False
    return True


def explain_default(doc: Any, error: str, *, local_ok: bool = False) -> str:
    """Say so when an error is about a field the user never wrote (its default applies), and when
    the whole file is fine for `coda-ctl local run`, so nobody hunts for a value not in the file."""
    path, sep, reason = error.partition(": ")
    if not sep or not path.startswith("spec.") or " " in path or _written(doc, path):
        return error
    hint = "; this file runs as is with `coda-ctl local run`" if local_ok else ""
    return f"{path} (not set in the file, so its default applies): {reason}{hint}"


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """YAML documents of a file ('-' is stdin), empty documents dropped."""
    import sys

    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    except FileNotFoundError:
        raise CtlError(f"{path}: no such file", Exit.NOT_FOUND) from None
    except OSError as e:
        raise CtlError(f"{path}: cannot read: {e}", Exit.ERROR) from e
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise CtlError(f"{path}: not valid YAML: {e}", Exit.INVALID) from e
    if not docs:
        raise CtlError(f"{path}: no documents", Exit.INVALID)
    return docs


def load_runs(path: str | Path, *, cluster: bool = True) -> list[dict[str, Any]]:
    """Every CodaTrainingRun in a file, validated; raises CtlError(INVALID) listing all problems.

    `cluster=False` (local runs) accepts local checkpoint paths, which a cluster cannot share.
    """
    docs = load_documents(path)
    problems: list[str] = []
    for i, doc in enumerate(docs):
        name = (
            doc.get("metadata", {}).get("name", f"document {i + 1}")
            if isinstance(doc, dict)
            else f"document {i + 1}"
        )
        errors = validate(doc, cluster=cluster)
        local_ok = (
            cluster and bool(errors) and isinstance(doc, dict) and not validate(doc, cluster=False)
        )
        for err in errors:
            problems.append(f"  {name}: {explain_default(doc, err, local_ok=local_ok)}")
    if problems:
        raise CtlError(f"{path}: invalid CodaTrainingRun:\n" + "\n".join(problems), Exit.INVALID)
    return docs
