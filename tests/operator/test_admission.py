"""Arithmetic admission: the shapes the issue found in the repository's own examples are refused
before any slice is requested, each with the field, the numbers and a fix (no JAX involved)."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
from coda_operator import admission, api
from coda_operator.topology import tpu_slice
from coda_trainer.config import ModelConfig, StageConfig
from operator_testkit import run_spec

CODA_1P7B = ModelConfig.preset("coda-1.7b")


def stage(**over: Any) -> StageConfig:
    raw: dict[str, Any] = {
        "name": "sft",
        "kind": "sft",
        "steps": 10,
        "batch": {"sequences": 176, "seqLen": 1024},
        "data": [{"uri": "gs://acme-data/sft/*.jsonl"}],
    }
    raw.update(over)
    return StageConfig.model_validate(raw)


def problems(s: StageConfig, tpu: str, topology: str, slices: int = 1) -> list[str]:
    devices = admission.tpu_devices(tpu_slice(tpu, topology), slices)
    return admission.stage_problems(s, CODA_1P7B, devices, field="spec.stages[2]")


def test_sft_of_the_v5p_example_names_the_field_numbers_and_fix() -> None:
    # coda-1.7b-v5p.yaml as it was: SFT 176 sequences on v5p 4x4x4 (64 chips) exited 78 on the slice
    assert problems(stage(), "v5p", "4x4x4") == [
        "spec.stages[2].batch.sequences: 176 sequences cannot be split over the 64 data-parallel "
        "devices (mesh data×fsdp = 1×64 on v5p 4x4x4 (64 chips)); use 128 or 192 sequences"
    ]


def test_multislice_midtrain_of_the_v6e_example() -> None:
    # multislice-v6e.yaml as it was: mid-training 256 sequences over 2 × 256 chips
    mid = stage(
        name="midtrain", kind="midtrain", batch={"sequences": 256, "seqLen": 8192}, mesh={"data": 2}
    )
    (line,) = problems(mid, "v6e", "16x16", slices=2)
    assert line.startswith(
        "spec.stages[2].batch.sequences: 256 sequences cannot be split over the 512"
    )
    assert "2 × v6e 16x16 (512 chips)" in line and line.endswith("use 512 sequences")


def test_grad_accum_is_part_of_the_rule_and_of_the_fix() -> None:
    # 256 / 4 = 64 per micro-batch over 128 devices: fix by sequences, or by gradAccum 1 or 2
    s = stage(batch={"sequences": 256, "seqLen": 1024, "gradAccum": 4})
    (line,) = problems(s, "v5p", "4x4x8")
    assert "256 sequences / gradAccum 4 = 64 per micro-batch" in line
    assert line.endswith("use 512 sequences, or gradAccum 1 or 2")
    assert (
        problems(stage(batch={"sequences": 256, "seqLen": 1024, "gradAccum": 2}), "v5p", "4x4x8")
        == []
    )


def test_tensor_parallelism_shrinks_the_data_parallel_count() -> None:
    # 176 = 16 × 11: on 64 chips with tensor 4 only 16 devices split the batch
    assert problems(stage(mesh={"fsdp": -1, "tensor": 4}), "v5p", "4x4x4") == []


def test_hosts_must_share_the_batch_equally() -> None:
    # tensor 8 over 4-chip hosts: 4 data-parallel groups but 8 hosts on a v5p 4x4x2 (32 chips)
    s = stage(batch={"sequences": 4, "seqLen": 1024}, mesh={"fsdp": -1, "tensor": 8})
    (line,) = problems(s, "v5p", "2x4x4")
    assert "cannot be split over the 8 hosts" in line and "use 8 sequences" in line


def test_data_readers_must_split_over_the_hosts() -> None:
    # v5p 2x2x4 = 16 chips on 4 hosts: 2 fixed readers cannot be run by 4 processes
    s = stage(batch={"sequences": 16, "seqLen": 1024, "readers": 2})
    (line,) = problems(s, "v5p", "2x2x4")
    assert line.startswith("spec.stages[2].batch.readers: 2 data readers")
    assert "over the 4 hosts" in line and line.endswith("use a multiple of 4")
    assert (
        problems(stage(batch={"sequences": 16, "seqLen": 1024, "readers": 8}), "v5p", "2x2x4") == []
    )


def test_mesh_must_be_the_slice() -> None:
    (line,) = problems(stage(mesh={"data": 1, "fsdp": 32, "tensor": 1}), "v5p", "4x4x4")
    assert line.startswith(
        "spec.stages[2].mesh: data=1, fsdp=32, tensor=1 does not multiply out to the 64"
    )


def test_multislice_data_axis_spans_the_slices() -> None:
    s = stage(batch={"sequences": 512, "seqLen": 1024})
    (line,) = problems(s, "v6e", "16x16", slices=2)
    assert line.startswith("spec.stages[2].mesh.data: 1 is not a multiple of the 2 slices")
    assert (
        problems(
            stage(batch={"sequences": 512, "seqLen": 1024}, mesh={"data": 2}), "v6e", "16x16", 2
        )
        == []
    )


def test_sequence_length_and_block_sizes() -> None:
    s = stage(kind="pretrain", name="pre", batch={"sequences": 64, "seqLen": 65536},
              masking={"blockSizes": [2, 4]})  # fmt: skip
    assert problems(s, "v5p", "4x4x4") == [
        "spec.stages[2].batch.seqLen: 65536 exceeds the model's maxPositionEmbeddings (40960)"
    ]
    s = stage(kind="pretrain", name="pre", batch={"sequences": 64, "seqLen": 16},
              masking={"blockSizes": [4, 32]})  # fmt: skip
    assert problems(s, "v5p", "4x4x4") == [
        "spec.stages[2].masking.blockSizes: block size 32 exceeds batch.seqLen (16); use sizes ≤ 16"
    ]


def test_gpu_stages_count_gpus_and_nodes() -> None:
    devices = admission.gpu_devices("nvidia-h100-80gb", 8, 4)
    (line,) = admission.stage_problems(stage(), CODA_1P7B, devices, field="spec.stages[0]")
    assert (
        "over the 32 data-parallel devices" in line and "4 × 8 nvidia-h100-80gb (32 GPUs)" in line
    )
    assert line.endswith("use 160 or 192 sequences")


@pytest.mark.parametrize(
    ("tpu", "topology", "instead"), [("v5p", "2x2x1", "2x2x2"), ("v6e", "2x2", "2x4")]
)
def test_multislice_of_single_host_slices_is_refused(tpu: str, topology: str, instead: str) -> None:
    spec = run_spec(accelerator={"tpu": {"type": tpu, "topology": topology, "slices": 2}})
    with pytest.raises(api.InvalidSpec) as exc:
        api.parse_spec(spec)
    (line,) = [e for e in exc.value.errors if "Multislice" in e]
    assert line.startswith("spec.accelerator.tpu: slices: 2 slices of")
    assert f"use one {tpu} {instead} slice (8 chips)" in line


def test_every_problem_of_every_stage_is_reported_at_once() -> None:
    spec = copy.deepcopy(run_spec())
    spec["stages"][0]["batch"]["sequences"] = 12  # 8 chips
    spec["stages"][1]["mesh"] = {"data": 1}  # 2 slices
    spec["stages"][2]["batch"]["sequences"] = 4  # 8 chips
    with pytest.raises(api.InvalidSpec) as exc:
        api.parse_spec(spec)
    assert [e.split(":")[0] for e in exc.value.errors] == [
        "spec.stages[0].batch.sequences",
        "spec.stages[1].mesh.data",
        "spec.stages[2].batch.sequences",
    ]
    parsed = api.parse_spec(spec, admission=False)  # what `coda-ctl plan` reads, stage by stage
    assert [len(parsed.stage_problems(i)) for i in range(3)] == [1, 1, 1]


def test_local_runs_ignore_the_accelerator_arithmetic() -> None:
    spec = run_spec(checkpoints={"uri": "/tmp/ckpt"})
    spec["stages"][0]["batch"]["sequences"] = 3  # the local machine's devices decide, not the slice
    api.parse_spec(spec, cluster=False)


def test_admission_imports_no_jax() -> None:
    code = "import sys, coda_operator.api, coda_operator.admission; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
