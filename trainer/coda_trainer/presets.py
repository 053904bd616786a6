"""Stage presets (the paper's three stages) and the embedded default run.

- `stage_preset(name, **overrides)`: `presets/<name>.yaml` (pretrain, midtrain, sft: the paper's
  hyperparameters) deep-merged with overrides (at least `data`) into a validated `StageConfig`.
- `embedded_default(workdir)`: the whole recipe at laptop scale — `coda-tiny` (≈5M parameters,
  the project tokenizer) trained on Python's standard library: a causal `base` (the autoregressive
  model the recipe adapts), diffusion pre-training on modules, a code-only mid-training mix with
  the Table 3 curriculum, then (docstring → function) SFT; each stage starts from the previous
  stage's `final`. Sized to finish in a few minutes on 2 CPU cores. A pure
  function of `workdir` apart from writing the corpora (cached) under it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from coda_trainer.config import StageConfig, TrainJobConfig

__all__ = [
    "EMBEDDED_DEFAULT_EVALUATION",
    "PRESET_NAMES",
    "embedded_default",
    "embedded_default_spec",
    "stage_preset",
    "stage_preset_dict",
]

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_NAMES = ("pretrain", "midtrain", "sft")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown stage preset {name!r}; known: {list(PRESET_NAMES)}")
    return yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())


def stage_preset(name: str, **overrides: Any) -> StageConfig:
    """The paper's stage `name` with `overrides` merged in (nested dicts merge, lists replace)."""
    return StageConfig.model_validate(_deep_merge(stage_preset_dict(name), overrides))


# --------------------------------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------------------------------

# The recipe adapts an autoregressive model (CoDA-1.7B starts from Qwen3-1.7B); the embedded default
# has no such base to download, so it first trains one: `base`, a causal stage on the pre-training
# corpus, whose final the diffusion stages adapt. bench/causal_base.py (real trainer, same corpora,
# model and step count, this 2-core machine): 500 causal + 300 diffusion steps reach a lower masked
# CE on held-out code than 800 diffusion steps from scratch (σ = 0.15: 5.58 vs 5.99; σ = 0.5: 6.05
# vs 6.36): next-token training learns a tiny model's first facts about code faster than
# denoising does, which is the paper's premise.
# Sized for 2 CPU cores: a 1024-token step of coda-tiny takes ≈0.2 s on an idle machine (≈0.3 s at
# load ≈2); each stage adds ≈10 s of start-up and compilation. bench/default_quality.py, this
# machine, load ≈1.7: 295 s of training (base 132 s, pretrain 24 s, midtrain 24 s, SFT 115 s).
# Most compute goes to the base and to SFT, whose short (docstring → function) rows are what the
# printed sample asks for. AdamW at 3e-3 everywhere (tiny model, short stages); σ ≥ 0.1
# (sampling_eps) bounds the 1/σ loss weight at 10, which keeps the small-batch gradient from being
# dominated by a few nearly-unmasked rows.
_OPT = {"name": "adamw", "peak_lr": 3e-3, "schedule": "cosine", "end_lr_ratio": 0.1, "b2": 0.99}
_MASK = {"block_sizes": [2, 4, 8], "sampling_eps": 0.1}
_BATCH = {"sequences": 8, "seq_len": 128}
# Stage name → (paper preset it starts from or None, corpus, overrides), in run order.
_DEFAULT_STAGES: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "base": (None, "pretrain", {
        "kind": "causal",
        "steps": 600,
        "batch": _BATCH,
        "optimizer": {**_OPT, "warmup_steps": 20, "weight_decay": 0.01},
        "log_every": 25,
    }),
    "pretrain": ("pretrain", "pretrain", {
        "steps": 60,
        "batch": _BATCH,
        "optimizer": {**_OPT, "warmup_steps": 10, "weight_decay": 0.01},
        "masking": _MASK,
        "log_every": 10,
    }),
    "midtrain": ("midtrain", "midtrain", {
        "steps": 60,
        "batch": _BATCH,
        "optimizer": {**_OPT, "warmup_steps": 5, "weight_decay": 0.01},
        "masking": _MASK,
        "log_every": 10,
    }),
    "sft": ("sft", "sft", {
        "steps": 700,
        # The (short) pairs fit in 96 tokens: prompt, answer, room for the pads that end it.
        "batch": {"sequences": 8, "seq_len": 96},
        "optimizer": {**_OPT, "warmup_ratio": 0.05},
        "masking": {"sampling_eps": 0.1},
        "sft": {"prompt_ramp_fraction": 0.05, "over_length": "drop"},
        "log_every": 25,
    }),
}  # fmt: skip


# The embedded default's `spec.evaluation` (the CodaTrainingRun's camelCase): the run ends by
# measuring pass@1 on a handful of problems, which for a ≈5M-parameter model trained for minutes is
# honestly ≈0 — the point is the machinery (the evaluation Job's very command) and the table beside
# the paper's numbers. Sized for 2 CPU cores: HumanEval+ is scored from HumanEval's generations
# (the harness generates once for both), 64 new tokens in 16 steps over two 32-token blocks (the
# model's answers are short anyway). This machine, `python -m coda_trainer.evaluate` on the default's
# SFT final, load ≈4: 48 s wall for 4 problems each (HE gen 16 s, HE+ 0 s, MBPP 23 s, ≈8 s of start
# and load); 8 problems each took 141 s at load ≈9.5, hence 5 (one batch of each benchmark).
EMBEDDED_DEFAULT_EVALUATION: dict[str, Any] = {
    "benchmarks": ["humaneval", "humaneval-plus", "mbpp"],
    "limit": 5,
    "sampler": {"maxNewTokens": 64, "steps": 16, "blockLength": 32},
}


def embedded_default_spec(
    workdir: str | Path, *, corpus_dirs: dict[str, Path] | None = None, scale: float = 1.0
) -> list[dict[str, Any]]:
    """The embedded default as plain job dicts (the CLI can show or edit them), one per stage.

    `scale` multiplies every stage's step count (tests use a small fraction).
    """
    workdir = Path(workdir).resolve()
    if corpus_dirs is None:
        from coda_trainer.corpus import build_default_corpora

        corpus_dirs = build_default_corpora(workdir)
    checkpoints = str(workdir / "checkpoints")
    jobs, previous = [], None
    for name, (preset, corpus_name, overrides) in _DEFAULT_STAGES.items():
        over = copy.deepcopy(overrides)
        over["steps"] = max(2, round(over["steps"] * scale))
        corpus = corpus_dirs[corpus_name]
        stage = _deep_merge(stage_preset_dict(preset), over) if preset else over
        fmt = "chat" if stage["kind"] == "sft" else "jsonl"
        stage.update(
            name=name,
            data=[{"uri": str(Path(corpus) / "train-*.jsonl"), "format": fmt}],
            mesh={"data": 1, "fsdp": -1, "tensor": 1},
            init_from=previous,
        )
        held_out = Path(corpus) / "eval.jsonl"
        # A corpus built with a small `limit` may hold nothing out; a placeholder path (the CLI
        # renders the spec before the corpus exists) keeps its eval.
        if not (held_out.exists() and held_out.stat().st_size == 0):
            stage["eval"] = {
                "data": [{"uri": str(held_out), "format": fmt}],
                "every_steps": over["steps"],
                "batches": 2,
            }
        jobs.append({
            "run": "embedded-default",
            "model": {"preset": "coda-tiny"},
            "tokenizer": "project",
            "checkpoints": {"uri": checkpoints, "every_steps": max(over["steps"] // 2, 1), "keep": 2},
            "stage": stage,
        })  # fmt: skip
        previous = f"{checkpoints}/{name}/final"
    return jobs


def embedded_default(workdir: str | Path, **kwargs: Any) -> list[TrainJobConfig]:
    """The three validated stage jobs of the embedded default, in order."""
    return [TrainJobConfig.model_validate(job) for job in embedded_default_spec(workdir, **kwargs)]
