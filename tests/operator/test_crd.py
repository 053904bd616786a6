"""The generated CRD: in sync with the models, a valid structural CRD, and it rejects bad runs."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml
from coda_operator import api, crd
from coda_trainer import contract
from coda_trainer.config import CheckpointConfig, ModelSpec, StageConfig
from crd_validation import cel_errors, crd_errors
from operator_testkit import ROOT, run_spec

K8S_VERSION = "1.30"


def run_doc(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": name, "namespace": "ml"},
        "spec": spec,
    }


# The paper's shapes as a first-time user would write them (pre- and mid-training at the paper's
# 512 × 8192 and 256 × 8192, SFT at the release's 176 sequences), before any pre-flight advice.
PAPER_SHAPE_SPEC = """
image: us-docker.pkg.dev/acme/coda/trainer:0.1.0
serviceAccountName: coda-trainer
model: {preset: coda-1.7b, initFrom: gs://acme-models/qwen3-1.7b}
tokenizer: gs://acme-models/qwen3-1.7b
checkpoints: {uri: gs://acme-ckpt/coda-1p7b, everySteps: 5000, keep: 3}
accelerator: {tpu: {type: v5p, topology: 8x8x8, slices: 1}, spot: false}
queueName: tpu-team
stages:
  - name: pretrain
    kind: pretrain
    steps: 50000
    batch: {sequences: 512, seqLen: 8192}
    optimizer: {name: adafactor, peakLr: 3.0e-4, schedule: linear, warmupSteps: 2000}
    data:
      - {uri: "gs://acme-data/dclm/*.parquet", weight: 60.17}
      - {uri: "gs://acme-data/stack-v2-python/*.parquet", weight: 50.75}
    masking: {prefixProb: 0.01, truncateProb: 0.01, blockProb: 0.01, blockSizes: [2, 4, 8]}
  - name: midtrain
    kind: midtrain
    accelerator: {tpu: {type: v5p, topology: 4x8x8}}
    steps: 50000
    batch: {sequences: 256, seqLen: 8192}
    optimizer: {name: adafactor, peakLr: 2.0e-4}
    data: [{uri: "gs://acme-data/opencoder-annealing/*.parquet"}]
    masking: {curriculum: paper-table-3}
  - name: sft
    kind: sft
    steps: 20000
    batch: {sequences: 176, seqLen: 1024}
    optimizer: {name: adamw, peakLr: 2.0e-5, schedule: cosine, warmupRatio: 0.1}
    data: [{uri: "gs://acme-data/opc-sft-stage2/*.jsonl", format: chat}]
    sft: {promptRampFraction: 0.05, overLength: drop}
sampler: {enabled: true, replicas: 1, accelerator: {tpu: {type: v6e, topology: 1x1}},
          defaults: {steps: 128, alg: entropy, blockLength: 32, threshold: 0.9}}
failurePolicy: {maxRestarts: 3, stageRetries: 1}
activeDeadlineSeconds: 1209600
ttlSecondsAfterFinished: 604800
"""


def paper_shape_spec() -> dict[str, Any]:
    return yaml.safe_load(PAPER_SHAPE_SPEC)


def test_generated_files_are_in_sync_with_the_models() -> None:
    text = crd.crd_yaml()
    for path in (
        ROOT / "manifests" / "crd" / crd.CRD_FILE_NAME,
        ROOT / "charts" / "coda-operator" / "crds" / crd.CRD_FILE_NAME,
    ):
        assert path.exists(), f"{path} missing: run python scripts/generate_crd.py"
        assert path.read_text() == text, f"{path} is stale: run python scripts/generate_crd.py"
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_crd.py"), "--check"], capture_output=True
    )
    assert check.returncode == 0, check.stderr


def test_crd_is_a_valid_structural_crd() -> None:
    doc = yaml.safe_load(crd.crd_yaml())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["names"]["shortNames"] == ["ctr"] and doc["spec"]["group"] == "coda.dev"
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"][:5]] == [
        "Phase",
        "Stage",
        "Step",
        "Loss",
        "Age",
    ]
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True

    def walk(node: dict[str, Any], path: str) -> None:
        # structural: every node has a type (or preserves unknown fields), no unions, no $refs
        assert not {"anyOf", "oneOf", "allOf", "$ref", "$defs", "title"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, path
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(schema, "")
    spec = schema["properties"]["spec"]["properties"]
    # the stage schema *is* the trainer's StageConfig (plus the accelerator override)
    stage_fields = {f.alias or n for n, f in StageConfig.model_fields.items()}
    assert set(spec["stages"]["items"]["properties"]) == stage_fields | {"accelerator"}
    assert spec["stages"]["items"]["properties"]["masking"]["properties"]["curriculum"]["enum"] == [
        "constant",
        "linear",
        "paper-table-3",
    ]
    assert spec["stages"]["items"]["properties"]["steps"]["minimum"] == 0
    assert spec["stages"]["items"]["properties"]["steps"]["exclusiveMinimum"] is True
    assert spec["model"]["properties"]["overrides"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["stages"]["items"]["properties"]["initFrom"]["nullable"] is True
    assert spec["failurePolicy"]["properties"]["maxRestarts"]["default"] == 3


def test_api_reuses_the_trainer_models() -> None:
    assert issubclass(api.RunStage, StageConfig)
    assert issubclass(api.RunModelSpec, ModelSpec)
    assert api.CodaTrainingRunSpec.model_fields["checkpoints"].annotation is CheckpointConfig
    spec = api.parse_spec(run_spec())
    assert type(spec.stages[1].trainer_stage()) is StageConfig
    assert (
        spec.stage_accelerator(1).tpu.type == "v6e" and spec.stage_accelerator(0).tpu.type == "v5p"
    )


def test_paper_shape_sft_is_refused_before_a_slice_is_requested() -> None:
    """SFT's 176 sequences on the run's 512-chip slice: no step could start."""
    spec = paper_shape_spec()
    errors = crd_errors(run_doc(spec, "coda-1p7b"))
    assert len(errors) == 1 and "batch.sequences" in errors[0], errors
    with pytest.raises(api.InvalidSpec) as exc:
        api.parse_spec(spec)
    assert exc.value.errors == [
        "spec.stages[2].batch.sequences: 176 sequences cannot be split over the 512 data-parallel "
        "devices (mesh data×fsdp = 1×512 on v5p 8x8x8 (512 chips)); use 512 sequences"
    ]
    spec["stages"][2]["accelerator"] = {"tpu": {"type": "v5p", "topology": "2x2x4"}}  # 16 chips
    assert crd_errors(run_doc(spec, "coda-1p7b")) == []
    api.parse_spec(spec)


@pytest.mark.parametrize("spec", [run_spec()], ids=["test-run"])
def test_good_runs_pass_every_layer(spec: dict[str, Any]) -> None:
    assert crd_errors(run_doc(spec, "coda-1p7b")) == []
    api.parse_spec(spec)  # the operator accepts it too
    # camelCase on the wire, both ways
    dumped = api.parse_spec(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert "failurePolicy" in dumped and "seqLen" in dumped["stages"][0]["batch"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        node: Any = spec
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        if value is _DELETE:
            del node[parts[-1]]
        else:
            node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value

    return mutate


_DELETE = object()

# (id, mutation, text the error must contain (names the field), rejected by the CRD itself?)
BAD_SPECS: list[tuple[str, Callable[[dict[str, Any]], None], str, bool]] = [
    ("empty-stages", _set("stages", []), "stages", True),
    ("no-stages", _set("stages", _DELETE), "stages", True),
    ("image-not-a-string", _set("image", 42), "image", True),
    ("unknown-tpu-type", _set("accelerator.tpu.type", "v5"), "accelerator.tpu.type", True),
    ("slice-name-as-type", _set("accelerator.tpu.type", "v5p-8"), "accelerator.tpu.type", True),
    ("2d-topology-for-v5p", _set("accelerator.tpu.topology", "4x4"), "accelerator.tpu", True),
    ("unsorted-v5p-topology", _set("accelerator.tpu.topology", "8x4x4"), "accelerator.tpu", True),
    ("impossible-v6e-topology", _set("accelerator.tpu.topology", "3x3"), "accelerator.tpu", True),
    (
        "v5p-bigger-than-a-pod",
        _set("accelerator.tpu.topology", "16x16x64"),
        "accelerator.tpu",
        True,
    ),
    (
        "malformed-topology",
        _set("accelerator.tpu.topology", "2x2x"),
        "accelerator.tpu.topology",
        True,
    ),
    ("duplicate-stage-names", _set("stages.2.name", "pretrain"), "stages", True),
    ("negative-steps", _set("stages.0.steps", -5), "stages[0].steps", True),
    ("zero-batch", _set("stages.1.batch.sequences", 0), "stages[1].batch.sequences", True),
    ("bad-gs-bucket", _set("checkpoints.uri", "gs://Bad_Bucket/x"), "checkpoints.uri", True),
    ("local-checkpoints-on-cluster", _set("checkpoints.uri", "/tmp/ckpt"), "checkpoints.uri", True),
    ("s3-data-uri", _set("stages.0.data.0.uri", "s3://bucket/data"), "stages[0].data[0].uri", True),
    ("unknown-stage-field", _set("stages.0.learningRate", 0.1), "stages[0]", True),
    ("unknown-stage-kind", _set("stages.0.kind", "finetune"), "stages[0].kind", True),
    ("stage-name-not-dns", _set("stages.0.name", "Pre_Train"), "stages[0].name", True),
    ("sft-block-on-pretrain", _set("stages.0.sft", {"promptRampFraction": 0.1}), "sft", True),
    (
        "tpu-and-gpu",
        _set("accelerator.gpu", {"type": "nvidia-h100-80gb", "gpusPerNode": 8}),
        "accelerator",
        True,
    ),
    ("no-accelerator", _set("accelerator", _DELETE), "accelerator", True),
    ("grad-accum-not-dividing", _set("stages.0.batch.gradAccum", 3), "gradAccum", True),
    (
        "two-warmups",
        _set("stages.2.optimizer", {"warmupSteps": 10, "warmupRatio": 0.1}),
        "warmup",
        True,
    ),
    ("multi-host-sampler", _set("sampler.accelerator.tpu.topology", "4x4"), "sampler", True),
    ("unknown-preset", _set("model.preset", "gpt-5"), "model.preset", True),
    ("zero-deadline", _set("activeDeadlineSeconds", 0), "activeDeadlineSeconds", True),
    (
        "negative-retries",
        _set("failurePolicy.stageRetries", -1),
        "failurePolicy.stageRetries",
        True,
    ),
    (
        "linear-curriculum-without-target",
        _set("stages.1.masking.curriculum", "linear"),
        "rampTo",
        True,
    ),
    ("queue-name-not-dns", _set("queueName", "TPU Team"), "queueName", True),
    # Arithmetic admission: shapes a slice would refuse at step 0 (coda_operator.admission).
    (
        "batch-not-dividing-over-chips",
        _set("stages.2.batch.sequences", 12),
        "stages[2].batch.sequences",
        True,
    ),
    (
        "micro-batch-not-dividing",
        _set("stages.0.batch", {"sequences": 16, "seqLen": 128, "gradAccum": 4}),
        "stages[0].batch.sequences",
        True,
    ),
    (
        "batch-not-dividing-over-stage-slices",
        _set("stages.1.batch.sequences", 16),
        "stages[1].batch.sequences",
        True,
    ),
    (
        "batch-not-dividing-over-gpus",
        _set("accelerator", {"gpu": {"type": "nvidia-h100-80gb", "gpusPerNode": 8, "nodes": 2}}),
        "stages[0].batch.sequences",
        True,
    ),
    (
        "multislice-of-single-hosts",
        _set("accelerator.tpu", {"type": "v5p", "topology": "2x2x1", "slices": 2}),
        "accelerator.tpu",
        True,
    ),
    (
        "stage-multislice-of-single-hosts",
        _set("stages.1.accelerator.tpu", {"type": "v6e", "topology": "2x2", "slices": 2}),
        "stages[1].accelerator.tpu",
        True,
    ),
    # Only the operator can tell: these need the resolved model or the mesh arithmetic.
    ("multislice-data-axis", _set("stages.1.mesh", {"data": 1}), "stages[1].mesh.data", False),
    (
        "block-size-beyond-seq-len",
        _set("stages.0.masking", {"blockSizes": [2, 256]}),
        "stages[0].masking.blockSizes",
        False,
    ),
    (
        "mesh-not-the-slice",
        _set("stages.0.mesh", {"data": 1, "fsdp": 4, "tensor": 1}),
        "stages[0].mesh",
        False,
    ),
    ("seq-len-beyond-model", _set("stages.0.batch.seqLen", 1024), "stages[0].batch.seqLen", False),
    (
        "two-inferred-mesh-axes",
        _set("stages.0.mesh", {"data": -1, "fsdp": -1}),
        "stages[0].mesh",
        False,
    ),
]


def test_there_are_at_least_25_bad_specs() -> None:
    assert len(BAD_SPECS) >= 25


@pytest.mark.parametrize(
    ("mutate", "field", "by_crd"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_spec_is_rejected_naming_the_field(
    mutate: Callable[[dict[str, Any]], None], field: str, by_crd: bool
) -> None:
    spec = copy.deepcopy(run_spec())
    mutate(spec)
    errors = crd_errors(run_doc(spec))
    if by_crd:
        assert errors, "the CRD (schema + CEL) accepted it"
        assert any(field.split("[")[0].split(".")[0] in e for e in errors), errors
    else:
        assert errors == []
    # the operator refuses it too (its Invalid condition carries these lines), naming the field
    with pytest.raises(api.InvalidSpec) as exc:
        api.parse_spec(spec)
    names = (
        field,
        re.sub(r"(?<!^)(?=[A-Z])", "_", field).lower(),
    )  # trainer validators say snake_case
    assert any(n in line for line in exc.value.errors for n in names), exc.value.errors


def test_run_name_plus_stage_name_fits_a_hostname() -> None:
    spec = run_spec()
    spec["stages"][0]["name"] = "p" * 40
    assert crd_errors(run_doc(spec, "r" * 4)) == []
    errors = cel_errors(run_doc(spec, "r" * 5))
    assert errors and "metadata.name" in errors[0]


def test_topology_errors_explain_the_naming_trap() -> None:
    with pytest.raises(api.InvalidSpec) as exc:
        api.parse_spec(run_spec(accelerator={"tpu": {"type": "v5p-8", "topology": "2x2x1"}}))
    assert "accelerator.tpu.type" in exc.value.errors[0]
    spec = run_spec(accelerator={"tpu": {"type": "v5p", "topology": "8x4x4"}})
    with pytest.raises(api.InvalidSpec) as exc:
        api.parse_spec(spec)
    assert "write it as 4x4x8" in exc.value.errors[0]


def test_local_checkpoints_are_fine_for_local_runs() -> None:
    spec = run_spec(checkpoints={"uri": "/tmp/coda-ckpt"})
    api.parse_spec(spec, cluster=False)
    with pytest.raises(api.InvalidSpec):
        api.parse_spec(spec)


def test_every_field_is_documented_for_kubectl_explain() -> None:
    """`kubectl explain codatrainingrun.spec.stages.masking` reads these: none may be empty or
    just repeat the field's name."""
    schema = yaml.safe_load(crd.crd_yaml())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    undocumented, restated = [], []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            text = (sub.get("description") or "").strip()
            if not text:
                undocumented.append(f"{path}.{name}")
            elif len(text.split()) < 2 or text.rstrip(".").lower() == name.lower():
                restated.append(f"{path}.{name}: {text!r}")
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], path + ("[]" if key == "items" else "{}"))

    walk(schema, "")
    assert not undocumented, f"{len(undocumented)} fields without a description: {undocumented}"
    assert not restated, restated
    masking = crd._at(schema["properties"]["spec"], "stages[].masking")["properties"]
    assert "S1" in masking["prefixProb"]["description"]
