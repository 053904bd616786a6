"""How well does the embedded default learn? Losses, wall times and samples (a benchmark, not a test).

    .venv/bin/python bench/default_quality.py --workdir /tmp/q/run          # train, then sample
    .venv/bin/python bench/default_quality.py --workdir /tmp/q/run --no-train  # sample its finals
    .venv/bin/python bench/default_quality.py --final path/to/sft/final      # sample one checkpoint

Training runs the embedded default's stages (a causal base, then the three diffusion stages) exactly as `coda-ctl local run` does (one
`python -m coda_trainer.train` subprocess per stage, same job dicts from
`coda_trainer.presets.embedded_default_spec`), timing each. Then, for every stage final found, the
report gives the first/last logged train loss and masked CE, the eval metrics, and (for the SFT
final, or `--final`) greedy samples for a fixed set of docstring prompts asked as the local runner
asks after SFT (the SFT question format, its sampling settings `coda_ctl.localrun.sample_settings`),
plus the fraction of answers that `ast.parse` accepts (`--raw`: raw `def` prompts continued). Output: a readable report on stdout and the
same as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for part in ("trainer", "cli"):
    sys.path.insert(0, str(REPO / part))

# Five fixed (signature, docstring) prompts; the first is the local runner's own sample.
PROMPTS = (
    ("def fibonacci(n)", "Return the n-th Fibonacci number."),
    ("def is_palindrome(s)", "Return True if the string s reads the same backwards."),
    ("def count_words(text)", "Return a dict mapping each word in text to its count."),
    ("def read_lines(path)", "Read the file at path and return its lines without newlines."),
    ("def clamp(value, low, high)", "Return value limited to the range [low, high]."),
)


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def stage_metrics(stage_dir: Path) -> dict[str, Any]:
    """First/last train record and the last eval record of a stage's metrics.jsonl."""
    path = stage_dir / "metrics" / "metrics.jsonl"
    if not path.exists():
        return {}
    train, evals = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        event = rec.get("event")
        if event == "train":
            train.append(rec)
        elif event == "eval":
            evals.append(rec)
    keys = ("step", "loss", "masked_ce", "masked_accuracy", "step_seconds")

    def pick(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if rec is None else {k: rec[k] for k in keys if k in rec}

    return {
        "first": pick(train[0] if train else None),
        "last": pick(train[-1] if train else None),
        # The mean of the last quarter of the log: one logged window is noisy (σ is random).
        "tail_masked_ce": (
            sum(r["masked_ce"] for r in train[-max(1, len(train) // 4) :])
            / max(1, len(train[-max(1, len(train) // 4) :]))
            if train
            else None
        ),
        "eval": pick(evals[-1] if evals else None),
    }


def train_all(workdir: Path, scale: float) -> dict[str, float]:
    """Run the embedded default's stages as subprocesses; returns wall seconds per stage."""
    import yaml
    from coda_trainer.presets import embedded_default_spec

    jobs = embedded_default_spec(workdir, scale=scale)
    times: dict[str, float] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("trainer", "cli"))}
    for job in jobs:
        name = job["stage"]["name"]
        cfg = workdir / "jobs" / f"{name}.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(job, sort_keys=False))
        log = workdir / "jobs" / f"{name}.log"
        t0 = time.monotonic()
        with log.open("w") as f:
            code = subprocess.call(
                [sys.executable, "-m", "coda_trainer.train", "--config", str(cfg)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
            )
        times[name] = time.monotonic() - t0
        print(f"[{name}] exit {code} in {times[name]:.0f}s (log {log})", flush=True)
        if code != 0:
            raise SystemExit(f"stage {name} failed; see {log}")
    return times


def sample(
    final: Path,
    prompts: tuple[tuple[str, str], ...] = PROMPTS,
    overrides: dict[str, Any] | None = None,
    *,
    chat: bool = True,
) -> list[dict[str, Any]]:
    """Greedy samples with the local runner's settings, decoded and cut as the server does.

    chat=True (what the local runner does after SFT) asks in the SFT data's question format (the
    chat template around `corpus.sft_instruction`) and scores the answer alone; chat=False
    continues the raw `def ...:` + docstring prompt and scores prompt + completion.
    """
    from coda_ctl.localrun import raw_prompt, sample_settings
    from coda_trainer import hf
    from coda_trainer.corpus import sft_instruction
    from coda_trainer.sampling import SamplingConfig, generate
    from coda_trainer.tokenizer import load_tokenizer

    model_config, model = hf.load_pretrained(str(final))
    tokenizer = load_tokenizer(str(final))
    settings = {**sample_settings(), **(overrides or {})}
    config = SamplingConfig(
        steps=settings.get("steps") or settings["max_tokens"],
        max_new_tokens=settings["max_tokens"],
        temperature=settings.get("temperature", 0.0),
        alg=settings.get("alg", "entropy"),
        block_length=settings.get("block_length"),
        stop_at_eos=True,
    )
    stops = [tokenizer.eos_id, tokenizer.pad_id, tokenizer.im_end_id]
    out = []
    for signature, docstring in prompts:
        if chat:
            prompt = sft_instruction(signature, docstring)
            messages = [{"role": "user", "content": prompt}]
            prompt_ids = tokenizer.chat_ids(messages, add_generation_prompt=True)
        else:
            prompt = raw_prompt(signature, docstring)
            prompt_ids = tokenizer.encode(prompt)
        result = generate(model, [prompt_ids], config, rng=0, model_config=model_config)
        ids = result.completions(stop_ids=stops)[0]
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        text = completion if chat else prompt + completion
        body = [line for line in completion.splitlines() if line.strip()]
        out.append({
            "prompt": prompt, "completion": completion, "parses": parses(text),
            # Python-looking beyond a lone name: parses and has at least two non-empty body lines.
            "multiline_parses": parses(text) and len(body) >= 2,
        })  # fmt: skip
    return out


def report(
    workdir: Path | None,
    final: Path | None,
    times: dict[str, float],
    overrides: dict[str, Any] | None = None,
    *,
    chat: bool = True,
) -> dict[str, Any]:
    result: dict[str, Any] = {"stages": {}, "times_s": times, "loadavg": os.getloadavg()}
    if workdir is not None:
        ckpts = workdir / "checkpoints"
        for stage_dir in sorted(ckpts.iterdir(), key=lambda d: d.stat().st_mtime):
            if (stage_dir / "metrics").is_dir():  # in the order the stages ran
                result["stages"][stage_dir.name] = stage_metrics(stage_dir)
        final = final or ckpts / "sft" / "final"
    if final is not None and (final / "config.json").exists():
        t0 = time.monotonic()
        samples = sample(final, overrides=overrides, chat=chat)
        result["sample_seconds"] = time.monotonic() - t0
        result["samples"] = samples
        result["parse_fraction"] = sum(s["parses"] for s in samples) / len(samples)
        result["multiline_parse_fraction"] = sum(s["multiline_parses"] for s in samples) / len(
            samples
        )
    return result


def show(result: dict[str, Any]) -> None:
    for name, m in result["stages"].items():
        if not m:
            continue
        f, last, ev = m.get("first") or {}, m.get("last") or {}, m.get("eval") or {}
        t = result["times_s"].get(name)
        print(
            f"{name:9s} loss {f.get('loss', float('nan')):.3f} → {last.get('loss', float('nan')):.3f}"
            f"  masked CE {f.get('masked_ce', float('nan')):.3f} → {last.get('masked_ce', float('nan')):.3f}"
            f" (last-quarter mean {m.get('tail_masked_ce') or float('nan'):.3f})"
            f"  acc {last.get('masked_accuracy', float('nan')):.3f}"
            f"  eval CE {ev.get('masked_ce', float('nan')):.3f}"
            + (f"  wall {t:.0f}s" if t is not None else "")
        )
    if result["times_s"]:
        print(f"training wall time {sum(result['times_s'].values()):.0f}s")
    print(f"load average {tuple(round(x, 2) for x in result['loadavg'])}")
    for i, s in enumerate(result.get("samples", [])):
        print(f"--- sample {i} ({'parses' if s['parses'] else 'does not parse'})")
        print(s["prompt"] + ("\n>>> " if "Docstring:" in s["prompt"] else "") + s["completion"])
    if "parse_fraction" in result:
        print(
            f"--- ast.parse: {result['parse_fraction']:.0%} of {len(result['samples'])} samples; "
            f"parse with ≥2 body lines: {result['multiline_parse_fraction']:.0%}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, help="where the embedded default runs (or ran)")
    p.add_argument("--final", type=Path, help="sample this HF checkpoint folder instead")
    p.add_argument("--no-train", action="store_true", help="report on existing finals only")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    p.add_argument(
        "--sampling", type=json.loads, default=None,
        help='override sampling fields for exploration, e.g. \'{"block_length": 8}\'',
    )  # fmt: skip
    p.add_argument(
        "--raw", action="store_true",
        help="continue a raw `def f(...):` + docstring prompt instead of asking in the SFT chat format",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.workdir is None and args.final is None:
        p.error("give --workdir or --final")
    times: dict[str, float] = {}
    if args.workdir is not None and not args.no_train:
        args.workdir.mkdir(parents=True, exist_ok=True)
        times = train_all(args.workdir.resolve(), args.steps_scale)
    result = report(args.workdir, args.final, times, args.sampling, chat=not args.raw)
    show(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
