"""The stage/job contract shared by the trainer, the operator's CRD and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from coda_trainer import curriculum
from coda_trainer.config import (
    PAPER_TABLE_3,
    MaskingConfig,
    MaskingProbs,
    MeshConfig,
    ModelSpec,
    StageConfig,
    TrainJobConfig,
    load_job_config,
)
from pydantic import ValidationError

STAGE = {
    "name": "pretrain",
    "kind": "pretrain",
    "steps": 100,
    "batch": {"sequences": 8, "seqLen": 256},
    "data": [{"uri": "gs://acme-data/dclm/*.parquet", "weight": 60.17}],
}


def test_camel_and_snake_case_read_the_same_model():
    snake = {**STAGE, "batch": {"sequences": 8, "seq_len": 256}}
    assert StageConfig.model_validate(STAGE) == StageConfig.model_validate(snake)
    dumped = StageConfig.model_validate(STAGE).model_dump(by_alias=True)
    assert dumped["batch"]["seqLen"] == 256 and "seq_len" not in dumped["batch"]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"steps": -5}, "steps"),
        ({"surprise": 1}, "surprise"),
        ({"name": "Pre_Train"}, "DNS label"),
        ({"kind": "finetune"}, "kind"),
        ({"data": []}, "data"),
        ({"data": [{"uri": "s3://bucket/x"}]}, "unsupported URI scheme"),
        ({"data": [{"uri": "gs://A_B/x"}]}, "bucket"),
        ({"batch": {"sequences": 6, "seqLen": 16, "gradAccum": 4}}, "divisible"),
        ({"sft": {"overLength": "drop"}}, "only valid for kind=sft"),
        ({"masking": {"curriculum": "linear"}}, "ramp_to"),
        ({"optimizer": {"warmupSteps": 10, "warmupRatio": 0.1}}, "not both"),
    ],
)
def test_bad_stage_fields_are_rejected_with_the_field_named(patch, needle):
    with pytest.raises(ValidationError) as err:
        StageConfig.model_validate({**STAGE, **patch})
    assert needle in str(err.value)


def test_paper_table_3_curriculum_by_epoch():
    masking = MaskingConfig(curriculum="paper-table-3")
    total = 500
    for epoch, expected in enumerate(PAPER_TABLE_3):
        for step in (epoch * 100, epoch * 100 + 99):
            assert curriculum.probs_at(masking, step, total) == expected
    assert curriculum.probs_at(masking, total + 10, total) == PAPER_TABLE_3[-1]
    assert PAPER_TABLE_3[0] == MaskingProbs(prefix_prob=0.01, truncate_prob=0.01, block_prob=0.05)
    assert PAPER_TABLE_3[-1] == MaskingProbs(prefix_prob=0.20, truncate_prob=0.20, block_prob=0.25)


def test_linear_curriculum_interpolates_between_endpoints():
    masking = MaskingConfig(
        curriculum="linear", block_prob=0.0, ramp_to=MaskingProbs(block_prob=0.5, prefix_prob=0.1)
    )
    assert curriculum.probs_at(masking, 0, 11).block_prob == 0.0
    assert curriculum.probs_at(masking, 5, 11).block_prob == pytest.approx(0.25)
    assert curriculum.probs_at(masking, 10, 11).prefix_prob == pytest.approx(0.1)


def test_mesh_resolution():
    assert MeshConfig(fsdp=-1, tensor=2).resolve(8) == (1, 4, 2)
    assert MeshConfig(data=2, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        MeshConfig(tensor=3).resolve(8)
    with pytest.raises(ValidationError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)


def test_job_config_rejects_sequences_longer_than_the_model(tmp_path):
    job = {
        "tokenizer": "project",
        "model": {"preset": "test-micro"},
        "stage": {**STAGE, "batch": {"sequences": 2, "seqLen": 4096}},
    }
    path = tmp_path / "job.yaml"
    import yaml

    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_job_config(path)
    job["stage"]["batch"]["seqLen"] = 128
    path.write_text(yaml.safe_dump(job))
    cfg = load_job_config(path)
    assert cfg.final_dir == "./checkpoints/pretrain/final"


def test_unknown_preset_is_named():
    with pytest.raises(ValidationError, match="unknown model preset 'gpt-5'"):
        ModelSpec(preset="gpt-5")
    assert (
        TrainJobConfig.model_validate(
            {"tokenizer": "project", "model": {"preset": "coda-tiny"}, "stage": STAGE}
        )
        .model.resolve()
        .vocab_size
        == 4096
    )


def test_config_module_imports_without_jax():
    """The operator image has pydantic but no JAX: config must stay import-light."""
    code = textwrap.dedent(
        """
        import sys
        import coda_trainer.config
        heavy = [m for m in ("jax", "flax", "numpy", "torch") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": "trainer"})
