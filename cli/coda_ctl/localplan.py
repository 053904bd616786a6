"""The pure half of `coda-ctl local run`: a CodaTrainingRun → the ordered per-stage job configs,
the paths they use on this machine, and what a (re)run must do with each stage.

Nothing here starts a process or touches the network; `localrun` does that with what this returns.
"""

from __future__ import annotations

import copy
import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coda_trainer import contract
from coda_trainer.config import StageConfig, TrainJobConfig

# Bookkeeping next to the checkpoints; stage names are DNS labels, so a dot-name never collides.
META_DIR = ".coda"


class StageState(enum.Enum):
    DONE = "done"  # <stage>/final exists: skip
    RESUME = "resume"  # step checkpoints exist: the trainer resumes from the newest complete one
    FRESH = "fresh"  # nothing yet


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    job: TrainJobConfig
    config_path: Path  # the job YAML handed to the trainer
    log_path: Path  # the trainer's stdout/stderr
    stage_dir: Path  # <root>/<stage>: step checkpoints, final, status.json, metrics
    final_dir: Path

    @property
    def total_steps(self) -> int:
        return self.job.stage.steps


@dataclass(frozen=True)
class LocalPlan:
    run: str
    root: Path  # <workdir>/<run>
    stages: tuple[StagePlan, ...]
    # spec.evaluation: (stage, the evaluation Job's command with this machine's paths) in stage
    # order, and the gate; empty without `evaluation`.
    evaluations: tuple[tuple[str, tuple[str, ...]], ...] = ()
    min_pass_at1: tuple[tuple[str, float], ...] = ()

    @property
    def final(self) -> Path:
        """The checkpoint the sampler serves: the last stage's final."""
        return self.stages[-1].final_dir


def _scaled(n: int, scale: float) -> int:
    return max(1, math.ceil(n * scale))


def scale_stage(stage: StageConfig, scale: float) -> StageConfig:
    """Shrink (or grow) a stage's step counts and everything measured in steps, keeping ratios."""
    if scale == 1.0:
        return stage
    if scale <= 0:
        raise ValueError(f"steps scale must be positive, got {scale}")
    upd: dict[str, Any] = {
        "steps": _scaled(stage.steps, scale),
        "log_every": _scaled(stage.log_every, scale),
    }
    if stage.optimizer.warmup_steps is not None:
        upd["optimizer"] = stage.optimizer.model_copy(
            update={"warmup_steps": min(_scaled(stage.optimizer.warmup_steps, scale), upd["steps"])}
        )
    if stage.eval is not None:
        upd["eval"] = stage.eval.model_copy(
            update={"every_steps": _scaled(stage.eval.every_steps, scale)}
        )
    return stage.model_copy(update=upd)


def _run_parts(run: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    try:
        return run["metadata"]["name"], run["spec"]
    except (KeyError, TypeError):
        raise ValueError("a CodaTrainingRun needs metadata.name and spec") from None


def plan_local_run(run: dict[str, Any], workdir: Path, *, steps_scale: float = 1.0) -> LocalPlan:
    """Per stage, the TrainJobConfig the trainer gets on this machine, in order.

    Checkpoints go to `<workdir>/<run>/` whatever the spec's (gs://) URI says; stage i > 0 starts from
    stage i−1's `final` unless it names its own `initFrom` (the same handoff the operator makes).
    """
    from coda_operator.api import parse_spec
    from coda_operator.render import eval_command, stage_job_config

    name, raw_spec = _run_parts(run)
    spec = parse_spec(raw_spec, cluster=False)  # InvalidSpec (a ValueError) names the field
    root = (workdir / name).resolve()
    # Same job configs as the operator renders (init_from handoff included), with checkpoints here.
    ckpt = spec.checkpoints.model_copy(
        update={"uri": str(root), "every_steps": _scaled(spec.checkpoints.every_steps, steps_scale)}
    )
    spec = spec.model_copy(update={"checkpoints": ckpt})
    plans: list[StagePlan] = []
    for i in range(len(spec.stages)):
        cluster_job = stage_job_config(name, spec, i)
        stage = scale_stage(cluster_job.stage, steps_scale)
        stage_dir = root / stage.name
        job = cluster_job.model_copy(
            update={"stage": stage, "metrics_dir": str(stage_dir / contract.METRICS_DIR)}
        )
        plans.append(
            StagePlan(
                index=i,
                name=stage.name,
                job=job,
                config_path=root / META_DIR / f"{stage.name}.yaml",
                log_path=root / META_DIR / f"{stage.name}.log",
                stage_dir=stage_dir,
                final_dir=stage_dir / contract.FINAL_DIR,
            )
        )
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"run {name!r} has duplicate stage names: {names}")
    evaluations = tuple((s, tuple(eval_command(spec, s))) for s in spec.evaluated_stages())
    gate = tuple(spec.evaluation.min_pass_at1.items()) if spec.evaluation else ()
    return LocalPlan(
        run=name, root=root, stages=tuple(plans), evaluations=evaluations, min_pass_at1=gate
    )


def job_yaml(plan: StagePlan) -> str:
    import yaml

    return yaml.safe_dump(plan.job.to_yaml_dict(), sort_keys=False)


def stage_state(plan: StagePlan) -> StageState:
    """What a rerun does with this stage, from what is on disk."""
    if plan.final_dir.is_dir():
        return StageState.DONE
    if plan.stage_dir.is_dir() and any(
        p.name.isdigit() for p in plan.stage_dir.iterdir() if p.is_dir()
    ):
        return StageState.RESUME
    return StageState.FRESH


def first_pending(plan: LocalPlan) -> int | None:
    """Index of the first stage that is not done (stages run strictly in order), None if all are."""
    for p in plan.stages:
        if stage_state(p) is not StageState.DONE:
            return p.index
    return None


# ----------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_second: float | None = None
    state: str | None = None
    compiling: bool = False  # the trainer is compiling (running) its first train step
    compile_seconds: float | None = None  # how long that took, once it is done


def status_path(plan: StagePlan) -> Path:
    return plan.stage_dir / contract.STATUS_FILE


def read_progress(plan: StagePlan) -> Progress:
    """The trainer's own status.json, tolerant of a file being rewritten while read."""
    try:
        data = json.loads(status_path(plan).read_text())
    except (OSError, ValueError):
        return Progress(total=plan.total_steps)
    return parse_status(data, plan.total_steps)


def parse_status(data: dict[str, Any], total_steps: int) -> Progress:
    def num(*keys: str) -> float | None:
        for k in keys:
            v = data.get(k)
            if isinstance(v, int | float):
                return float(v)
        return None

    step = num("step")
    total = num("total_steps", "totalSteps")
    return Progress(
        step=int(step or 0),
        total=int(total or total_steps),
        loss=num("loss"),
        tokens_per_second=num("tokens_per_second", "tokensPerSecond"),
        state=data.get("state") or data.get("phase"),
        compiling=data.get("compiling") is True,
        compile_seconds=num("compile_seconds"),
    )


# ----------------------------------------------------------------------------- the default corpus

# Data URIs may start with this placeholder: `local run` writes the embedded default corpora
# (Python's standard library; coda_trainer.corpus) under `<workdir>/corpus` and substitutes it.
CORPUS_PLACEHOLDER = "${CODA_CORPUS}"


def _data_sources(run: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for stage in (run.get("spec") or {}).get("stages") or []:
        out += stage.get("data") or []
        out += (stage.get("eval") or {}).get("data") or []
    return out


def uses_corpus(run: dict[str, Any]) -> bool:
    return any(str(d.get("uri", "")).startswith(CORPUS_PLACEHOLDER) for d in _data_sources(run))


def expand_corpus(run: dict[str, Any], corpus_root: Path) -> dict[str, Any]:
    """A copy of `run` with the corpus placeholder replaced by `corpus_root`."""
    out = copy.deepcopy(run)
    for d in _data_sources(out):
        uri = str(d.get("uri", ""))
        if uri.startswith(CORPUS_PLACEHOLDER):
            d["uri"] = str(corpus_root) + uri[len(CORPUS_PLACEHOLDER) :]
    return out


def default_run() -> dict[str, Any]:
    """The embedded default (coda_trainer.presets) as a CodaTrainingRun for this machine.

    The presets give one job per stage (and a small evaluation of the last); as a resource they share one model, tokenizer and checkpoint
    policy, and the init_from chain is the implicit stage handoff. Data URIs use the corpus
    placeholder, so `manifests/examples/local-tiny.yaml` can be this very object.
    """
    from coda_trainer.api import (
        EMBEDDED_DEFAULT_EVALUATION,
        PRESET_NAMES,
        embedded_default_spec,
    )
    from coda_trainer.config import CheckpointConfig

    corpus = {name: Path(CORPUS_PLACEHOLDER) / name for name in PRESET_NAMES}
    jobs = embedded_default_spec(".", corpus_dirs=corpus)
    every = min(
        max(j["stage"]["steps"] // 2, 1) for j in jobs
    )  # a mid-stage checkpoint in each stage
    stages = []
    for i, job in enumerate(jobs):
        raw = {**job["stage"], "init_from": None} if i else job["stage"]
        stage = StageConfig.model_validate(raw)
        dumped = stage.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
        stages.append(dumped)
    ckpt = CheckpointConfig(every_steps=every, keep=jobs[0]["checkpoints"].get("keep", 2))
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": jobs[0]["run"]},
        "spec": {
            # Only `coda-ctl local run` uses this resource; image and accelerator satisfy the API.
            "image": "coda-trainer:local",
            "model": dict(jobs[0]["model"]),
            "tokenizer": jobs[0]["tokenizer"],
            "checkpoints": {"everySteps": ckpt.every_steps, "keep": ckpt.keep},
            "accelerator": {"tpu": {"type": "v6e", "topology": "1x1"}},
            "stages": stages,
            # The run ends with a measured pass@1 (no gate: a 5M model scores ≈0 by design).
            "evaluation": copy.deepcopy(EMBEDDED_DEFAULT_EVALUATION),
        },
    }


# ----------------------------------------------------------------------------- inputs, up front


def input_problems(plan: LocalPlan) -> list[str]:
    """Every local data source and init_from of the stages still to train that is not there.

    Checked for all stages before the first one trains, so a typo in stage 4 costs seconds, not
    stages 1–3. An init_from that an earlier stage of this plan produces (its final, or its stage
    directory) is fine though it does not exist yet; gs:// URIs are left to the trainer (its own
    pre-flight lists them with the credentials it runs with). One line per problem, naming the stage
    and the spec field.
    """
    from coda_trainer.api import data_source_problem

    produced: set[str] = set()
    problems: list[str] = []
    count = len(plan.stages)
    for stage in plan.stages:
        where = f"stage {stage.name} ({stage.index + 1}/{count})"
        if stage_state(stage) is not StageState.DONE:
            job = stage.job
            sources = [(f"data[{j}]", s) for j, s in enumerate(job.stage.data)]
            if job.stage.eval is not None:
                sources += [(f"eval.data[{j}]", s) for j, s in enumerate(job.stage.eval.data)]
            for field, source in sources:
                if source.uri.startswith("gs://"):
                    continue
                problem = data_source_problem(source, sft=job.stage.kind == "sft")
                if problem is not None:
                    problems.append(
                        f"{where}: spec.stages[{stage.index}].{field}.uri {source.uri!r}: "
                        f"{problem.removeprefix(f'data source {source.uri!r} ')}"
                    )
            init, field = job.stage.init_from, f"spec.stages[{stage.index}].initFrom"
            if init is None:
                init, field = job.model.init_from, "spec.model.initFrom"
            if (
                init is not None
                and not init.startswith("gs://")
                and init.rstrip("/") not in produced
                and not Path(init).exists()
            ):
                problems.append(f"{where}: {field} {init!r} does not exist")
        produced |= {str(stage.final_dir), str(stage.stage_dir)}
    return problems
