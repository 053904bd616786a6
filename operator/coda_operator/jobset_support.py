"""Does the cluster's JobSet understand the JobSets coda renders? Checked once, at operator start.

An API server prunes the fields a CRD's schema does not know, silently. With a JobSet from before
v0.10 that would drop `failurePolicy.rules[].onJobFailureMessagePatterns`, and the remaining rule
(`onJobFailureReasons: [PodFailurePolicy]`) would then match every pod failure: one preempted host
would fail the whole stage permanently. So the operator renders a representative stage, walks it
against the installed CRD's schema, and refuses to start while anything it relies on is missing.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from coda_operator.api import CodaTrainingRunSpec
from coda_operator.render import render_stage

__all__ = [
    "JOBSET_API_VERSION",
    "JOBSET_CRD",
    "MIN_JOBSET_VERSION",
    "jobset_crd_problem",
    "representative_jobset",
    "unsupported_fields",
]

JOBSET_CRD = "jobsets.jobset.x-k8s.io"
JOBSET_API_VERSION = "v1alpha2"
# onJobFailureMessagePatterns came with kubernetes-sigs/jobset PR #1033 (merged 2025-09-18); v0.10.1
# (images 2025-09-29) is the first release certain to carry it. The check itself reads the installed
# schema, not a version number: any JobSet whose CRD has the fields passes.
MIN_JOBSET_VERSION = "v0.10.1"
_INSTALL = (
    f"install JobSet ≥ {MIN_JOBSET_VERSION}: kubectl apply --server-side -f "
    f"https://github.com/kubernetes-sigs/jobset/releases/download/{MIN_JOBSET_VERSION}/manifests.yaml"
)


@cache
def representative_jobset() -> dict[str, Any]:
    """A stage JobSet using every feature render may emit: multi-host TPU slices (several
    replicated jobs), a Kueue queue (suspend), the failure policies, a ServiceAccount."""
    spec = CodaTrainingRunSpec.model_validate(
        {
            "image": "coda-trainer:probe",
            "serviceAccountName": "coda-trainer",
            "queueName": "probe",
            "model": {"preset": "test-micro"},
            "tokenizer": "project",
            "checkpoints": {"uri": "gs://probe/run"},
            "accelerator": {"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}},
            "stages": [
                {
                    "name": "pretrain",
                    "kind": "pretrain",
                    "steps": 1,
                    "batch": {"sequences": 32, "seqLen": 128},
                    "mesh": {"data": 2, "fsdp": -1},
                    "data": [{"uri": "gs://probe/data/*.jsonl"}],
                }
            ],
        }
    )
    return render_stage("probe", "default", spec, 0).jobset


def _is_open(schema: dict[str, Any]) -> bool:
    """An object schema that accepts any field (metadata, preserve-unknown-fields, maps)."""
    return (
        bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        or "additionalProperties" in schema
        or (schema.get("type") == "object" and "properties" not in schema)
    )


def unsupported_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Paths of `value` the structural `schema` would prune or reject (unknown fields, values
    outside an enum). Pure: the CRD's openAPIV3Schema in, a list of `spec.a.b[0].c` paths out."""
    problems: list[str] = []
    if isinstance(value, dict):
        if _is_open(schema):
            return problems
        properties = schema.get("properties", {})
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key not in properties:
                problems.append(where)
            else:
                problems.extend(unsupported_fields(properties[key], item, where))
    elif isinstance(value, list):
        items = schema.get("items", {})
        for i, item in enumerate(value):
            problems.extend(unsupported_fields(items, item, f"{path}[{i}]"))
    elif "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}={value}")
    return problems


def jobset_crd_problem(crd: dict[str, Any] | None) -> str | None:
    """Why this cluster's JobSet CRD cannot run coda's JobSets, or None when it can."""
    if crd is None:
        return f"the JobSet CRD ({JOBSET_CRD}) is not installed; {_INSTALL}"
    versions = {v.get("name"): v for v in crd.get("spec", {}).get("versions", [])}
    served = versions.get(JOBSET_API_VERSION)
    if served is None or not served.get("served", False):
        have = ", ".join(sorted(n for n, v in versions.items() if v.get("served"))) or "none"
        return f"the JobSet CRD does not serve {JOBSET_API_VERSION} (serves: {have}); {_INSTALL}"
    schema = (served.get("schema") or {}).get("openAPIV3Schema")
    if not schema:
        return None  # not structural: nothing is pruned
    missing = unsupported_fields(schema, representative_jobset())
    if missing:
        return (
            f"the installed JobSet CRD would drop or reject fields coda relies on "
            f"({', '.join(missing)}); {_INSTALL}"
        )
    return None
