"""coda_trainer.preflight's pure parts: reading the TPU compiler's out-of-HBM message, the hosts of
a slice, and the recompute a remat policy costs. (The compile itself: tests/cli/test_plan.py.)"""

from __future__ import annotations

import pytest
from coda_trainer.config import PRESETS
from coda_trainer.preflight import TpuTarget, parse_oom, recompute_flops_per_token

GIB = 1 << 30


def test_parse_oom_reads_both_forms_of_the_compiler_message() -> None:
    temporaries = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (4.58T) exceeds available HBM (95.74G)."
    )
    required, hbm = parse_oom(temporaries)
    assert required == int(4.58 * (1 << 40)) and hbm == int(95.74 * GIB)
    used = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 41.97G of 31.25G hbm. Exceeded hbm capacity by 10.72G."
    assert parse_oom(used) == (int(41.97 * GIB), int(31.25 * GIB))
    assert parse_oom("INTERNAL: something else") == (None, None)


@pytest.mark.parametrize(
    ("tpu", "topology", "slices", "chips", "per_host"),
    [("v5p", "2x2x1", 1, 4, 4), ("v5p", "2x2x2", 2, 16, 4), ("v6e", "1x1", 1, 1, 1),
     ("v6e", "2x4", 1, 8, 8), ("v6e", "16x16", 2, 512, 4), ("v5e", "2x2", 1, 4, 4)],
)  # fmt: skip
def test_tpu_target_hosts(tpu: str, topology: str, slices: int, chips: int, per_host: int) -> None:
    target = TpuTarget(tpu, topology, slices)
    assert (target.chips, target.host_chips()) == (chips, per_host)


def test_recompute_grows_with_the_remat_policy() -> None:
    base = PRESETS["coda-1.7b"]
    cost = {
        policy: recompute_flops_per_token(base.model_copy(update={"remat": policy}), 8192)
        for policy in ("none", "dots", "dots_no_batch", "minimal", "full")
    }
    assert cost["none"] == cost["dots"] == 0
    assert 0 < cost["dots_no_batch"] < cost["full"] and 0 < cost["minimal"] < cost["full"]
    # full remat = one more forward pass: a third of forward + backward
    assert cost["full"] == pytest.approx(base.train_flops_per_token(8192) / 3)


def test_a_stage_remat_overrides_the_model_remat() -> None:
    from coda_trainer.config import TrainJobConfig
    from coda_trainer.step import stage_model_config

    def job(**stage: object) -> TrainJobConfig:
        return TrainJobConfig.model_validate({
            "run": "r", "model": {"preset": "test-micro", "overrides": {"remat": "dots"}},
            "tokenizer": "project", "checkpoints": {"uri": "/tmp/unused"},
            "stage": {"name": "s", "kind": "pretrain", "steps": 1, "batch": {"sequences": 2, "seqLen": 16},
                      "data": [{"uri": "/tmp/unused.jsonl"}], **stage},
        })  # fmt: skip

    assert stage_model_config(job()).remat == "dots"
    assert stage_model_config(job(remat="full")).remat == "full"
