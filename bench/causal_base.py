"""Does a causal base help the diffusion stages? Same budget, with and without (a benchmark).

    .venv/bin/python bench/causal_base.py --workdir /tmp/cb [--causal-steps 500 --diffusion-steps 300]

Two runs of the real trainer (`python -m coda_trainer.train`, one subprocess per stage) on the
embedded default's corpora, model (`coda-tiny`) and optimiser settings:

* adapted: a `causal` stage of `--causal-steps`, then a `pretrain` stage of `--diffusion-steps`
  started from its final (what the embedded default does);
* scratch: one `pretrain` stage of `--causal-steps + --diffusion-steps` from a fresh init.

Both finals are then scored on one fixed batch of held-out mid-training documents (32 rows of 128
tokens), masked at fixed rates σ with one fixed draw: the mean cross-entropy of the masked tokens
(logit shift as in training). Lower is better; same number of steps and tokens on both sides.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

SIGMAS = (0.15, 0.5)


def _run_stage(job: dict[str, Any], workdir: Path) -> float:
    import yaml

    name = f"{job['run']}-{job['stage']['name']}"
    cfg = workdir / "jobs" / f"{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    t0 = time.monotonic()
    with (workdir / "jobs" / f"{name}.log").open("w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "coda_trainer.train", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {cfg.with_suffix('.log')}")
    return time.monotonic() - t0


def _stage(template: dict[str, Any], name: str, kind: str, steps: int, init: str | None) -> dict:
    stage = copy.deepcopy(template)
    stage.update(name=name, kind=kind, steps=steps, init_from=init, log_every=max(steps // 10, 1))
    stage.pop("eval", None)
    if kind == "causal":
        stage.pop("masking", None)
    return stage


def train_both(workdir: Path, causal_steps: int, diffusion_steps: int) -> dict[str, Path]:
    from coda_trainer.presets import embedded_default_spec

    jobs = {j["stage"]["name"]: j for j in embedded_default_spec(workdir)}
    template = jobs["pretrain"]["stage"]
    finals = {}
    for run, stages in {
        "adapted": [("base", "causal", causal_steps), ("pretrain", "pretrain", diffusion_steps)],
        "scratch": [("pretrain", "pretrain", causal_steps + diffusion_steps)],
    }.items():
        root, previous = workdir / run, None
        for name, kind, steps in stages:
            job = copy.deepcopy(jobs["pretrain"])
            job.update(run=run, checkpoints={"uri": str(root), "every_steps": steps, "keep": 1})
            job["stage"] = _stage(template, name, kind, steps, previous)
            seconds = _run_stage(job, workdir)
            print(f"[{run}/{name}] {kind} {steps} steps in {seconds:.0f}s", flush=True)
            previous = str(root / name / "final")
        finals[run] = Path(previous)
    return finals


def held_out_batch(workdir: Path, rows: int = 32, seq_len: int = 128):
    import numpy as np
    from coda_trainer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("project")
    ids: list[int] = []
    for line in (workdir / "corpus" / "midtrain" / "eval.jsonl").read_text().splitlines():
        ids += [*tokenizer.encode(json.loads(line)["text"]), tokenizer.eos_id]
        if len(ids) >= rows * seq_len:
            break
    if len(ids) < rows * seq_len:
        raise SystemExit("the held-out corpus is too small for the scoring batch")
    return np.asarray(ids[: rows * seq_len], np.int32).reshape(rows, seq_len)


def masked_ce(final: Path, tokens, sigmas=SIGMAS) -> dict[float, float]:
    """Mean CE of the masked tokens at each σ (one fixed mask draw per σ, logit shift)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from coda_trainer import hf

    config, model = hf.load_pretrained(str(final), config_overrides={"dtype": "float32"})
    forward = jax.jit(lambda t: model(t))
    rng = np.random.default_rng(0)
    out = {}
    for sigma in sigmas:
        masked = rng.random(tokens.shape) < sigma
        logits = forward(jnp.asarray(np.where(masked, config.mask_token_id, tokens)))
        logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)  # position i predicts i+1
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
        out[sigma] = float(ce[masked].mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--causal-steps", type=int, default=500)
    p.add_argument("--diffusion-steps", type=int, default=300)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()
    finals = train_both(workdir, args.causal_steps, args.diffusion_steps)
    tokens = held_out_batch(workdir)
    result = {run: masked_ce(final, tokens) for run, final in finals.items()}
    for run, ce in result.items():
        print(f"{run:8s} " + "  ".join(f"masked CE at σ={s}: {v:.3f}" for s, v in ce.items()))
    (workdir / "causal_base.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
