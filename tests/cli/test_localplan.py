"""The pure half of `coda-ctl local run`: run spec → ordered job configs, paths, skip/resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from coda_ctl import localplan
from coda_ctl.localplan import StageState
from coda_trainer.config import load_job_config


def _stage(name: str, kind: str, steps: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "steps": steps,
        "batch": {"sequences": 4, "seqLen": 64},
        "data": [{"uri": "/data/corpus", "format": "python"}],
        **extra,
    }


RUN: dict[str, Any] = {
    "apiVersion": "coda.dev/v1alpha1",
    "kind": "CodaTrainingRun",
    "metadata": {"name": "tiny"},
    "spec": {
        "image": "local",
        "model": {"preset": "test-micro", "initFrom": "/models/base"},
        "tokenizer": "project",
        "checkpoints": {"uri": "gs://somewhere/else", "everySteps": 40, "keep": 2},
        "accelerator": {"tpu": {"type": "v5e", "topology": "1x1"}},
        "stages": [
            _stage("pretrain", "pretrain", 200, optimizer={"warmupSteps": 20}),
            _stage("midtrain", "midtrain", 100, masking={"curriculum": "paper-table-3"}),
            _stage("sft", "sft", 50, sft={"promptRampFraction": 0.05}),
        ],
    },
}


def test_stages_in_order_with_checkpoint_handoff(tmp_path: Path) -> None:
    plan = localplan.plan_local_run(RUN, tmp_path)
    root = (tmp_path / "tiny").resolve()
    assert plan.root == root and [s.name for s in plan.stages] == ["pretrain", "midtrain", "sft"]
    pre, mid, sft = plan.stages
    # Checkpoints live here, whatever the spec's URI says.
    assert {s.job.checkpoints.uri for s in plan.stages} == {str(root)}
    assert pre.stage_dir == root / "pretrain" and pre.final_dir == root / "pretrain" / "final"
    # Stage 1 starts from the run's initFrom; later stages from the previous final, not from it.
    assert pre.job.model.init_from == "/models/base" and pre.job.stage.init_from is None
    assert mid.job.stage.init_from == str(pre.final_dir) and mid.job.model.init_from is None
    assert sft.job.stage.init_from == str(mid.final_dir)
    assert plan.final == sft.final_dir
    assert pre.config_path == root / ".coda" / "pretrain.yaml" and pre.log_path.suffix == ".log"
    assert mid.job.metrics_dir == str(root / "midtrain" / "metrics")


def test_explicit_stage_init_from_wins(tmp_path: Path) -> None:
    run = json.loads(json.dumps(RUN))
    run["spec"]["stages"][2]["initFrom"] = "/models/other"
    plan = localplan.plan_local_run(run, tmp_path)
    assert plan.stages[2].job.stage.init_from == "/models/other"


def test_steps_scale(tmp_path: Path) -> None:
    plan = localplan.plan_local_run(RUN, tmp_path, steps_scale=0.1)
    assert [s.total_steps for s in plan.stages] == [20, 10, 5]
    assert plan.stages[0].job.stage.optimizer.warmup_steps == 2
    assert plan.stages[0].job.checkpoints.every_steps == 4
    tiny = localplan.plan_local_run(RUN, tmp_path, steps_scale=0.001)
    assert [s.total_steps for s in tiny.stages] == [1, 1, 1]  # never zero
    with pytest.raises(ValueError):
        localplan.scale_stage(plan.stages[0].job.stage, 0)


def test_job_yaml_is_what_the_trainer_reads(tmp_path: Path) -> None:
    plan = localplan.plan_local_run(RUN, tmp_path, steps_scale=0.5)
    for stage in plan.stages:
        path = tmp_path / f"{stage.name}.yaml"
        path.write_text(localplan.job_yaml(stage))
        assert load_job_config(path) == stage.job


def test_stage_state_from_disk(tmp_path: Path) -> None:
    plan = localplan.plan_local_run(RUN, tmp_path)
    pre, mid, _ = plan.stages
    assert localplan.stage_state(pre) is StageState.FRESH and localplan.first_pending(plan) == 0
    (pre.stage_dir / "metrics").mkdir(parents=True)
    assert localplan.stage_state(pre) is StageState.FRESH  # logs alone are not a checkpoint
    (pre.stage_dir / "40").mkdir()
    assert localplan.stage_state(pre) is StageState.RESUME
    pre.final_dir.mkdir()
    assert localplan.stage_state(pre) is StageState.DONE
    assert localplan.first_pending(plan) == 1
    for s in plan.stages:
        s.final_dir.mkdir(parents=True, exist_ok=True)
    assert localplan.first_pending(plan) is None
    assert localplan.stage_state(mid) is StageState.DONE


def test_progress_from_status_file(tmp_path: Path) -> None:
    plan = localplan.plan_local_run(RUN, tmp_path)
    pre = plan.stages[0]
    assert localplan.read_progress(pre) == localplan.Progress(total=200)  # no file yet
    pre.stage_dir.mkdir(parents=True)
    localplan.status_path(pre).write_text('{"step": 7')  # torn write: ignored, not an error
    assert localplan.read_progress(pre).step == 0
    localplan.status_path(pre).write_text(
        json.dumps(
            {
                "run": "tiny",
                "stage": "pretrain",
                "state": "running",
                "step": 40,
                "total_steps": 200,
                "loss": 5.25,
                "tokens_per_second": 1234.5,
                "mfu": None,
            }
        )
    )
    assert localplan.read_progress(pre) == localplan.Progress(
        step=40, total=200, loss=5.25, tokens_per_second=1234.5, state="running"
    )


def test_invalid_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        localplan.plan_local_run({"spec": {}}, tmp_path)
    bad = json.loads(json.dumps(RUN))
    bad["spec"]["stages"][1]["name"] = "pretrain"
    with pytest.raises(ValueError, match="duplicate stage name"):
        localplan.plan_local_run(bad, tmp_path)
    local = json.loads(json.dumps(RUN))
    local["spec"]["checkpoints"]["uri"] = "./runs"  # fine locally (a cluster would refuse it)
    assert localplan.plan_local_run(local, tmp_path).stages


def test_default_run_is_the_trainer_presets_as_a_resource(tmp_path: Path) -> None:
    from coda_ctl import runspec
    from coda_trainer.config import StageConfig
    from coda_trainer.presets import embedded_default_spec

    run = localplan.default_run()
    assert runspec.validate(run, cluster=False) == []  # a valid CodaTrainingRun (local checkpoints)
    jobs = embedded_default_spec(
        tmp_path, corpus_dirs={n: Path("/c") / n for n in ("pretrain", "midtrain", "sft")}
    )
    plan = localplan.plan_local_run(localplan.expand_corpus(run, Path("/c")), tmp_path)
    for stage, job in zip(plan.stages, jobs, strict=True):
        ours, theirs = stage.job.stage.model_dump(), dict(job["stage"])
        # The handoff is implicit (stage i−1's final under this run's root), all else is identical.
        theirs.pop("init_from")
        expected = StageConfig.model_validate(theirs).model_dump()
        ours.pop("init_from"), expected.pop("init_from")
        assert ours == expected
        assert (
            stage.job.model.preset == job["model"]["preset"]
            and stage.job.tokenizer == job["tokenizer"]
        )
    # Every stage gets at least one checkpoint before its end (what makes kill-and-resume useful).
    assert all(plan.stages[0].job.checkpoints.every_steps < s.total_steps for s in plan.stages)


def test_corpus_placeholder(tmp_path: Path) -> None:
    run = localplan.default_run()
    assert localplan.uses_corpus(run) and not localplan.uses_corpus(RUN)
    expanded = localplan.expand_corpus(run, tmp_path / "corpus")
    assert not localplan.uses_corpus(expanded)
    uris = [d["uri"] for s in expanded["spec"]["stages"] for d in [*s["data"], *s["eval"]["data"]]]
    assert all(u.startswith(str(tmp_path / "corpus") + "/") for u in uris)
    assert run["spec"]["stages"][0]["data"][0]["uri"].startswith(
        "${CODA_CORPUS}/"
    )  # original untouched
