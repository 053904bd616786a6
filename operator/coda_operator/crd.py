"""The CodaTrainingRun CustomResourceDefinition, generated from the pydantic models in `api`.

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema. The
conversion inlines `$ref`s, turns `anyOf: [X, null]` into `X` + `nullable`, single-value `const`
into `enum`, numeric `exclusiveMinimum/Maximum` into `minimum` + `exclusiveMinimum: true`, free-form
`dict[str, Any]` into `x-kubernetes-preserve-unknown-fields`, and drops what a structural schema
may not carry (`title`, `additionalProperties: false`, `default: null`). Rules the schema cannot say
(unique stage names, a TPU topology valid for its type, ...) are CEL `x-kubernetes-validations`
listed in `CEL_RULES`; tests evaluate them with cel-python.

`python scripts/generate_crd.py` writes the YAML; a test keeps the files in sync with the models.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from coda_trainer import config as trainer_config
from coda_trainer import contract

from coda_operator import api

__all__ = [
    "CEL_RULES",
    "CRD_FILE_NAME",
    "build_crd",
    "crd",
    "crd_yaml",
    "openapi_schema",
    "spec_schema",
    "status_schema",
]

CRD_FILE_NAME = "codatrainingruns.coda.dev.yaml"

# Where a URI field lives in the spec schema; they get the trainer's own URI regex (local or gs://).
_URI_FIELDS = [
    "model.initFrom",
    "checkpoints.uri",
    "stages[].initFrom",
    "stages[].data[].uri",
    "stages[].eval.data[].uri",
]

_V5E_V6E = "['1x1','2x2','2x4','4x4','4x8','8x8','8x16','16x16']"
_SMALL_3D = "['2x2x1','2x2x2','2x2x4','2x4x4']"
_DIMS = "self.topology.split('x')"

_SINGLE_HOST = "['1x1','2x2','2x4','2x2x1']"


def _devices_cel(acc: str) -> str:
    """CEL: the device count (TPU chips over all slices, or GPUs) of accelerator `acc`."""
    dims = f"{acc}.tpu.topology.split('x')"
    chips = (
        f"int({dims}[0]) * int({dims}[1]) * (size({dims}) == 3 ? int({dims}[2]) : 1)"
        f" * (has({acc}.tpu.slices) ? {acc}.tpu.slices : 1)"
    )
    gpus = f"{acc}.gpu.gpusPerNode * (has({acc}.gpu.nodes) ? {acc}.gpu.nodes : 1)"
    return f"(has({acc}.tpu) ? {chips} : has({acc}.gpu) ? {gpus} : 0)"


def _batch_divides_cel(stage: str, acc: str) -> str:
    """CEL: stage's micro-batch divides over its data-parallel devices (devices / mesh.tensor, or
    data × fsdp when tensor is the inferred axis) — admission.stage_problems' main rule."""

    def axis(name: str, default: int) -> str:
        return f"(has({stage}.mesh) && has({stage}.mesh.{name}) ? {stage}.mesh.{name} : {default})"

    tensor = axis("tensor", 1)
    shards = (
        f"({tensor} == -1 ? {axis('data', 1)} * {axis('fsdp', -1)} : "
        f"({tensor} > 0 ? {_devices_cel(acc)} / {tensor} : 0))"
    )
    micro = (
        f"({stage}.batch.sequences / (has({stage}.batch.gradAccum) ? {stage}.batch.gradAccum : 1))"
    )
    return f"({shards} <= 0 || {micro} % {shards} == 0)"


def _own_accelerator_cel(stage: str) -> str:
    return f"has({stage}.accelerator) && (has({stage}.accelerator.tpu) || has({stage}.accelerator.gpu))"


_BATCH_MESSAGE = (
    "batch.sequences / batch.gradAccum must divide over the stage's data-parallel devices "
    "(chips or GPUs / mesh.tensor); `coda-ctl plan -f RUN.yaml` names sizes that do"
)
_MULTISLICE = {
    "rule": f"!has(self.slices) || self.slices == 1 || !(self.topology in {_SINGLE_HOST})",
    "message": "Multislice (slices > 1) joins multi-host slices only; 1x1, 2x2, 2x4 and 2x2x1 are "
    "single hosts: use one larger slice",
    "fieldPath": ".slices",
}

# path (dotted, [] for list items; "" is the spec root, "/" the object root) → CEL rules.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "/": [
        {
            "rule": f"self.spec.stages.all(s, size(self.metadata.name) + size(s.name) <= {api.MAX_RUN_PLUS_STAGE_NAME})",
            "message": f"metadata.name plus the longest stage name must be at most {api.MAX_RUN_PLUS_STAGE_NAME} "
            "characters (JobSet pod hostnames are DNS labels)",
        },
    ],
    "": [
        {
            "rule": "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
            "message": "stage names must be unique",
            "fieldPath": ".stages",
        },
        {
            "rule": "has(self.accelerator) && (has(self.accelerator.tpu) || has(self.accelerator.gpu)) "
            "|| self.stages.all(s, has(s.accelerator) && (has(s.accelerator.tpu) || has(s.accelerator.gpu)))",
            "message": "every stage needs an accelerator: set spec.accelerator.tpu/gpu or a per-stage override",
            "fieldPath": ".accelerator",
        },
        {
            "rule": "self.checkpoints.uri.startsWith('gs://')",
            "message": "checkpoints.uri must be a gs:// URI on a cluster",
            "fieldPath": ".checkpoints.uri",
        },
        {
            "rule": "self.stages.all(s, !has(s.sft) || s.kind == 'sft')",
            "message": "the sft block is only valid in stages of kind sft",
            "fieldPath": ".stages",
        },
        {  # stages running on spec.accelerator (the others are checked at stages[])
            "rule": f"!has(self.accelerator) || self.stages.all(s, {_own_accelerator_cel('s')} "
            f"|| {_batch_divides_cel('s', 'self.accelerator')})",
            "message": _BATCH_MESSAGE,
            "fieldPath": ".stages",
        },
    ],
    "stages[]": [
        {
            "rule": f"!({_own_accelerator_cel('self')}) "
            f"|| {_batch_divides_cel('self', 'self.accelerator')}",
            "message": _BATCH_MESSAGE,
            "fieldPath": ".batch.sequences",
        },
    ],
    "stages[].accelerator.tpu": [_MULTISLICE],
    "accelerator": [
        {
            "rule": "!(has(self.tpu) && has(self.gpu))",
            "message": "set accelerator.tpu or accelerator.gpu, not both",
        },
    ],
    "accelerator.tpu": [
        {
            "rule": f"self.type in ['v5e','v6e'] ? self.topology in {_V5E_V6E} : "
            f"(self.topology in {_SMALL_3D} || (size({_DIMS}) == 3 && {_DIMS}.all(d, int(d) % 4 == 0) "
            f"&& int({_DIMS}[0]) <= int({_DIMS}[1]) && int({_DIMS}[1]) <= int({_DIMS}[2]) "
            f"&& int({_DIMS}[0]) * int({_DIMS}[1]) * int({_DIMS}[2]) <= (self.type == 'v4' ? 4096 : 8960)))",
            "message": "topology is not valid for this TPU type: v5e/v6e take 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, "
            "16x16; v4/v5p take 2x2x1, 2x2x2, 2x2x4, 2x4x4 or AxBxC (A<=B<=C, multiples of 4)",
            "fieldPath": ".topology",
        },
        _MULTISLICE,
    ],
    "stages[].batch": [
        {
            "rule": "!has(self.gradAccum) || self.sequences % self.gradAccum == 0",
            "message": "batch.sequences must be divisible by batch.gradAccum",
        },
    ],
    "stages[].optimizer": [
        {
            "rule": "!(has(self.warmupSteps) && has(self.warmupRatio))",
            "message": "set optimizer.warmupSteps or optimizer.warmupRatio, not both",
        },
    ],
    "stages[].masking": [
        {
            "rule": "!has(self.curriculum) || self.curriculum != 'linear' || has(self.rampTo)",
            "message": "masking.curriculum=linear needs masking.rampTo",
        },
    ],
    "sampler.accelerator": [
        {
            "rule": "!has(self.tpu) || (self.tpu.topology in ['1x1','2x2','2x4','2x2x1'] "
            "&& (!has(self.tpu.slices) || self.tpu.slices == 1))",
            "message": "the sampler runs on one single-host TPU slice (1x1, 2x2, 2x4 or 2x2x1)",
        },
        {
            "rule": "!has(self.gpu) || !has(self.gpu.nodes) || self.gpu.nodes == 1",
            "message": "sampler.accelerator.gpu.nodes must be 1",
        },
    ],
}


# --------------------------------------------------------------------------------------------------
# JSON Schema → structural OpenAPI v3
# --------------------------------------------------------------------------------------------------


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").split("/")[-1]
        merged = {**copy.deepcopy(defs[ref]), **node}  # sibling keys (description, default) win
        return _convert(merged, defs)
    for key in ("title", "$defs", "examples"):
        node.pop(key, None)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        nullable = len(options) < len(node["anyOf"])
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {options} in a structural schema")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**_convert(options[0], defs), **rest}
        if nullable:
            node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("type") == "object":
        extra = node.pop("additionalProperties", None)
        if "properties" not in node:
            if isinstance(extra, dict):
                node["additionalProperties"] = _convert(extra, defs)
            else:  # dict[str, Any]: keep whatever the user writes
                node["x-kubernetes-preserve-unknown-fields"] = True
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {name: _convert(sub, defs) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = _convert(v, defs)
        elif k == "default":
            out[k] = v
        else:
            out[k] = _convert(v, defs) if isinstance(v, (dict, list)) else v
    return out


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split(".")):
        is_list = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if is_list:
            node = node["items"]
    return node


def _json_schema(model: type[api.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}))


def spec_schema(*, with_cel: bool = True) -> dict[str, Any]:
    """Structural schema of `spec` (CEL rules included unless `with_cel=False`)."""
    schema = _json_schema(api.CodaTrainingRunSpec)
    for path in _URI_FIELDS:
        # the trainer's own regex (its single definition); maxLength bounds the CEL cost estimate
        _at(schema, path).update(pattern=trainer_config.URI_PATTERN.pattern, maxLength=2048)
    if with_cel:
        for path, rules in CEL_RULES.items():
            if path != "/":
                _at(schema, path).setdefault("x-kubernetes-validations", []).extend(
                    copy.deepcopy(rules)
                )
    return schema


def status_schema() -> dict[str, Any]:
    schema = _json_schema(api.CodaTrainingRunStatus)
    schema["description"] = (
        "Observed state, written by the operator (phase, stages, evaluation, sampler, conditions) "
        "and by the trainer (progress)."
    )
    # kopf keeps its handler progress under status.kopf; the trainer may add progress fields.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    schema["properties"]["progress"]["x-kubernetes-preserve-unknown-fields"] = True
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def openapi_schema(*, with_cel: bool = True) -> dict[str, Any]:
    """The whole openAPIV3Schema of the CRD's single version."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": "CodaTrainingRun trains a diffusion coder through its stages on TPU slice JobSets "
        "and serves the result.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this object: coda.dev/v1alpha1.",
            },
            "kind": {"type": "string", "description": "The object's kind: CodaTrainingRun."},
            "metadata": {
                "type": "object",
                "description": "Standard object metadata (name, namespace, labels, annotations).",
            },
            "spec": spec_schema(with_cel=with_cel),
            "status": status_schema(),
        },
    }
    if with_cel:
        schema["x-kubernetes-validations"] = copy.deepcopy(CEL_RULES["/"])
    return schema


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # The newest finished evaluation, e.g. "sft: humaneval 12.2, mbpp 4.0" (pass@1, %).
    {"name": "Pass@1", "type": "string", "jsonPath": ".status.score"},
    {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{contract.PLURAL}.{contract.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "coda-operator",
                "app.kubernetes.io/part-of": "coda",
            },
        },
        "spec": {
            "group": contract.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": contract.KIND,
                "listKind": f"{contract.KIND}List",
                "plural": contract.PLURAL,
                "singular": contract.SINGULAR,
                "shortNames": [contract.SHORT_NAME],
                "categories": ["coda"],
            },
            "versions": [
                {
                    "name": contract.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


build_crd = crd


def crd_yaml() -> str:
    header = (
        "# Generated by scripts/generate_crd.py from coda_operator.api — do not edit by hand.\n"
        "# tests/operator/test_crd.py fails when this file and the models disagree.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)
