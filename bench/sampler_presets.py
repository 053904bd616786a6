"""Sampler presets (`quality`, `balanced`, `fast`) on one checkpoint: tokens/s and HumanEval pass@1.

Each preset (`coda_trainer.config.SAMPLER_PRESETS`) decodes the same HumanEval prompts with the
same checkpoint through the evaluation harness (`coda_trainer.evaluate.runner`: CoDA's instruct
prompt, code extraction, the sandbox); the ratios are against `quality` in the same run.

tokens/s = rows × max_new_tokens / generation seconds of a second pass over the prompts (the first
pass compiles every prompt shape, so compile time is not counted); the sampler decodes a fixed
canvas and runs with stop_at_eos off here, so every row costs the full canvas (the text is cut at
the first eos as the harness does, so pass@1 is what the harness would score).

CPU (default: a freshly initialised `coda-tiny`, random weights, saved and loaded as a checkpoint):
    python bench/sampler_presets.py --limit 4 --max-new-tokens 64   # README: 6 min on 2 busy cores
GPU (a trained checkpoint, CoDA-1.7B's shape, the release's evaluation length):
    python bench/sampler_presets.py --checkpoint /path/to/sft/final --dtype bfloat16 \\
        --max-new-tokens 512 --limit 164 --batch-size 16

A model with random weights scores 0 pass@1 under every preset: on CPU the point is the harness
and the speed ratios, not the scores. Random weights are also rarely 90% sure of a token, so the
0.9 confidence threshold seldom fires there: `balanced` runs (nearly) its whole step budget, and
`fast`'s gain is its dual cache. Prints a table, then one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import jax
from coda_trainer import hf
from coda_trainer.config import (
    PRESETS,
    SAMPLER_PRESETS,
    ModelConfig,
    SamplerSettings,
    resolve_sampler_settings,
)
from coda_trainer.evaluate.runner import InProcessSource, load_benchmark, run_eval
from coda_trainer.model import Transformer, resolve_attention_impl
from coda_trainer.sampling import SamplingConfig
from coda_trainer.serve.__main__ import resolve_tokenizer_path
from coda_trainer.tokenizer import load_tokenizer
from flax import nnx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="HF folder (default: a fresh random model)")
    p.add_argument("--model-preset", default="coda-tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--benchmark", default="humaneval")
    p.add_argument("--limit", type=int, default=8, help="first N problems")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--presets", nargs="+", default=list(SAMPLER_PRESETS), choices=SAMPLER_PRESETS)
    p.add_argument("--out", default=None, help="also write the JSON document here")
    return p.parse_args(argv)


def load_model(args: argparse.Namespace, tmp: str) -> tuple[Any, str]:
    """The checkpoint every preset runs on: `--checkpoint`, else a random `--model-preset` model
    saved to `tmp` and loaded back (the path the server and the harness take)."""
    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    overrides = {"dtype": dtype, "attention": resolve_attention_impl("auto", backend)}
    path = args.checkpoint
    if path is None:
        path = str(Path(tmp) / "final")
        config = ModelConfig.preset(args.model_preset, **overrides)
        hf.save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), path)
    return hf.load_pretrained(path, config_overrides=overrides)[1], path


def preset_config(name: str, max_new_tokens: int) -> tuple[SamplingConfig, dict[str, Any]]:
    """The SamplingConfig a server (or the harness) runs for `preset: name`, all else default."""
    s = resolve_sampler_settings(
        SamplerSettings(max_new_tokens=max_new_tokens), SamplerSettings(preset=name)
    )
    block = min(s.block_length or max_new_tokens, max_new_tokens)
    knobs = {
        "steps": s.steps or max_new_tokens, "alg": s.alg, "temperature": s.temperature,
        "block_length": block if block < max_new_tokens else None, "threshold": s.threshold,
        "cache": s.cache,
    }  # fmt: skip
    return SamplingConfig(max_new_tokens=max_new_tokens, stop_at_eos=False, **knobs), knobs


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model, path = load_model(args, tmp)
        tokenizer = load_tokenizer(resolve_tokenizer_path(path, None))
        problems = load_benchmark(args.benchmark, limit=args.limit)
        rows = []
        for name in args.presets:
            config, knobs = preset_config(name, args.max_new_tokens)
            source = InProcessSource(
                model, tokenizer, config, batch_size=args.batch_size, seed=0, name=name
            )
            t0 = time.perf_counter()
            source.complete(problems, 1)  # compiles every prompt shape
            first = time.perf_counter() - t0
            report = run_eval(args.benchmark, source, limit=args.limit, keep_text=False)
            tokens = report.n_problems * report.n_samples * args.max_new_tokens
            rows.append({
                "preset": name, "settings": knobs, "first_pass_s": round(first, 2),
                "generation_s": round(report.generation_s, 3),
                "tokens_per_s": round(tokens / report.generation_s, 2),
                "pass_at_1": report.pass_at_k.get("pass@1", 0.0),
                "samples": report.n_samples, "statuses": dict(report.status_counts),
            })  # fmt: skip
            print(f"{name}: {rows[-1]['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["preset"] == "quality"), rows[0])
    for r in rows:
        r["speed_vs_quality"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        r["pass_at_1_minus_quality"] = round(r["pass_at_1"] - base["pass_at_1"], 4)
    return {
        "checkpoint": args.checkpoint or f"random {args.model_preset}",
        "benchmark": args.benchmark,
        "problems": len(problems),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "rows": rows,
    }


def format_table(doc: dict[str, Any]) -> str:
    head = "| preset | steps | block | threshold | cache | tok/s | × quality | pass@1 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        s = r["settings"]
        lines.append(
            f"| {r['preset']} | {s['steps']} | {s['block_length'] or 'whole'} | "
            f"{s['threshold'] or '–'} | {s['cache']} | {r['tokens_per_s']} | "
            f"{r['speed_vs_quality']} | {r['pass_at_1']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    print(format_table(doc))
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
