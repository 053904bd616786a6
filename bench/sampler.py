"""Sampler throughput and latency: plain vs block+threshold vs block+threshold+prefix cache.

Shapes follow the issue: a 128-token prompt + 256 new tokens, batch 1 and 8, steps 256/64/32,
entropy confidence, temperature 0, random weights.

CPU (default: `coda-tiny`, a short subset):
    python bench/sampler.py
    python bench/sampler.py --batch 1 8 --steps 64 32 --release /tmp/coda-release
GPU (the CoDA-1.7B shape in bf16; the release itself measured 30.5 tok/s at batch 1, 256 steps):
    python bench/sampler.py --preset coda-1.7b --dtype bfloat16 --batch 1 8 --steps 256 64 32 \\
        --release /path/to/CoDA

Modes: (a) `plain` = one full forward per step, no cache (the release's algorithm, compiled);
(b) `block_threshold` = blocks of --block-length with confidence threshold --threshold;
(c) `block_threshold_prefix` = (b) plus the block-wise prefix KV cache (`..._dual` also exists).
With `--release PATH` (a checkout of SalesforceAIResearch/CoDA, never copied here) the release's
own `_sample` loop runs on the same shapes, in the same process, on the same device, and every row
gets its ratio to the release at the same step count. Prints a table, then one JSON document.

Random weights are not a trained model: a 0.9 threshold rarely fires on them, so (b) and (c) run
(nearly) the full step budget and their speed-up comes from the cache. `fwds` in the table shows
how many model calls each row made. Small models use the peaked parity weights by default
(`--weights`), so the plain rows must produce exactly the release's tokens (`same_tokens_as_release`
in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
from coda_trainer import hf
from coda_trainer.config import PRESETS, ModelConfig
from coda_trainer.hf_config import hf_config_from_model
from coda_trainer.model import Transformer, resolve_attention_impl
from coda_trainer.sampling import SamplingConfig, generate
from coda_trainer.sampling.parity import random_hf_weights, write_hf_folder
from flax import nnx

MODES = ("plain", "block_threshold", "block_threshold_prefix", "block_threshold_dual")
# The release on one H200, bf16, entropy, 128 + 256 tokens (DESIGN.md), tokens/s by (batch, steps).
RELEASE_H200 = {
    (1, 256): 30.5,
    (1, 64): 114.0,
    (1, 32): 215.0,
    (8, 256): 177.0,
    (8, 64): 781.0,
    (8, 32): 1445.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="coda-tiny", choices=sorted(PRESETS))
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="default: f32 on CPU, bf16 elsewhere"
    )
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument(
        "--weights",
        choices=["parity", "init"],
        help="parity: coda_trainer.sampling.parity's peaked random weights (default below 300M "
        "parameters: the release then must produce the same tokens); init: the model's own "
        "0.02-scale initialisation (near-uniform logits, so near-ties make tokens differ)",
    )
    p.add_argument("--batch", type=int, nargs="+", help="default: 1 on CPU, 1 8 elsewhere")
    p.add_argument("--steps", type=int, nargs="+", help="default: 32 on CPU, 256 64 32 elsewhere")
    p.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument(
        "--alg", default="entropy", choices=["origin", "maskgit_plus", "topk_margin", "entropy"]
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="timed runs per row (after one compile run)"
    )
    p.add_argument(
        "--release", help="checkout of SalesforceAIResearch/CoDA: also time its _sample loop"
    )
    p.add_argument("--release-repeats", type=int, default=1)
    p.add_argument("--json", help="also write the JSON document to this file")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> Transformer:
    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    overrides: dict[str, Any] = {
        "dtype": dtype,
        "param_dtype": dtype,
        "attention": resolve_attention_impl("auto", backend),
    }
    if args.layers:
        overrides["num_layers"] = args.layers
    config = ModelConfig.preset(args.preset, **overrides)
    weights = args.weights or ("parity" if config.num_params() < 300e6 else "init")
    if weights == "init":
        return Transformer(config, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_folder(tmp, config, random_hf_weights(config, 0))
        keep = {k: getattr(config, k) for k in ("dtype", "param_dtype", "attention")}
        return hf.load_pretrained(tmp, config_overrides=keep)[1]


def sampling_config(mode: str, steps: int, args: argparse.Namespace) -> SamplingConfig:
    extra: dict[str, Any] = {}
    if mode != "plain":
        extra = {"block_length": args.block_length, "threshold": args.threshold}
        extra["cache"] = {"block_threshold": "none", "block_threshold_prefix": "prefix"}.get(
            mode, "dual"
        )
    return SamplingConfig(
        steps=steps, max_new_tokens=args.new_tokens, alg=args.alg, temperature=0.0, **extra
    )


def prompts_for(config: ModelConfig, batch: int, length: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    special = {config.mask_token_id, config.pad_token_id, config.eos_token_id, config.bos_token_id}
    ordinary = np.array([t for t in range(min(config.vocab_size, 50_000)) if t not in special])
    return rng.choice(ordinary, size=(batch, length)).astype(np.int32)


def time_ours(model, prompts: np.ndarray, config: SamplingConfig, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = generate(model, prompts, config, rng=0, pad_to_multiple_of=1)
    compile_and_first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, prompts, config, rng=i + 1, pad_to_multiple_of=1)
        times.append(time.perf_counter() - t0)
    latency = statistics.median(times)
    return {
        "latency_s": latency,
        "tokens_per_s": prompts.shape[0] * config.max_new_tokens / latency,
        "forwards": out.num_steps_used,
        "full_forwards": out.num_full_forwards,
        "ms_per_forward": 1e3 * latency / max(out.num_steps_used, 1),
        "first_call_s": compile_and_first,
        "tokens": out.generated_BxN,
    }


class Release:
    """The release's model and `_sample` loop, on the same device (same weights when small)."""

    def __init__(self, path: str, model: Transformer, dtype: str):
        import reference_release_sampler as ref
        import torch

        self.ref, self.torch = ref, torch
        self.device = (
            "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
        )
        config = model.config
        small = config.num_params() < 300e6
        with tempfile.TemporaryDirectory() as tmp:
            if small:  # identical weights: the plain rows can be compared token for token
                hf.save_pretrained(model, tmp)
                self.model = ref.build_release_model(path, tmp, dtype=dtype).to(self.device)
            else:
                self.model = ref.release_model(
                    path, hf_config_from_model(config), dtype=dtype, device=self.device
                )
        self.same_weights = small

    def time(self, prompts: np.ndarray, steps: int, args: argparse.Namespace) -> dict[str, Any]:
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        settings = {
            "alg": args.alg,
            "steps": steps,
            "max_new_tokens": args.new_tokens,
            "temperature": 0.0,
        }
        times, out = [], None
        for _ in range(args.release_repeats):
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = self.ref.release_sample(self.model, ids, settings)
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        latency = statistics.median(times)
        return {
            "latency_s": latency,
            "tokens_per_s": prompts.shape[0] * args.new_tokens / latency,
            "ms_per_forward": 1e3 * latency / steps,
            "tokens": out[:, prompts.shape[1] :].cpu().numpy(),
        }


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    batches = args.batch or ([1] if on_cpu else [1, 8])
    steps_list = args.steps or ([32] if on_cpu else [256, 64, 32])
    model = build_model(args)
    cfg = model.config
    release = Release(args.release, model, cfg.dtype) if args.release else None
    if release is not None:
        import torch

        torch.set_grad_enabled(False)

    rows = []
    for batch in batches:
        prompts = prompts_for(cfg, batch, args.prompt_len)
        for steps in steps_list:
            ref = release.time(prompts, steps, args) if release else None
            for mode in args.modes:
                ours = time_ours(model, prompts, sampling_config(mode, steps, args), args.repeats)
                row = {"mode": mode, "batch": batch, "steps": steps}
                row |= {k: v for k, v in ours.items() if k != "tokens"}
                if ref is not None:
                    row["release_tokens_per_s"] = ref["tokens_per_s"]
                    row["release_latency_s"] = ref["latency_s"]
                    row["speedup_vs_release"] = row["tokens_per_s"] / ref["tokens_per_s"]
                    if mode == "plain" and release.same_weights:
                        row["same_tokens_as_release"] = bool(
                            np.array_equal(ours["tokens"], ref["tokens"])
                        )
                if not on_cpu and (batch, steps) in RELEASE_H200:
                    row["release_h200_tokens_per_s"] = RELEASE_H200[(batch, steps)]
                rows.append(row)
                print_row(row, first=len(rows) == 1)

    doc = {
        "machine": machine(),
        "model": {
            "preset": args.preset,
            "weights": args.weights or ("parity" if cfg.num_params() < 300e6 else "init"),
            "dtype": cfg.dtype,
            "layers": cfg.num_layers,
            "params": cfg.num_params(),
        },
        "shape": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "alg": args.alg,
            "block_length": args.block_length,
            "threshold": args.threshold,
        },
        "release": args.release,
        "rows": rows,
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def print_row(row: dict[str, Any], *, first: bool) -> None:
    cols = [
        ("mode", "{:<24}", row["mode"]),
        ("batch", "{:>5}", row["batch"]),
        ("steps", "{:>5}", row["steps"]),
        ("fwds", "{:>5}", row["forwards"]),
        ("latency_s", "{:>10.3f}", row["latency_s"]),
        ("tok/s", "{:>9.1f}", row["tokens_per_s"]),
        ("ms/fwd", "{:>8.2f}", row["ms_per_forward"]),
        (
            "release tok/s",
            "{:>13}",
            f"{row['release_tokens_per_s']:.1f}" if "release_tokens_per_s" in row else "-",
        ),
        (
            "x release",
            "{:>9}",
            f"{row['speedup_vs_release']:.2f}" if "speedup_vs_release" in row else "-",
        ),
    ]
    if first:
        print(
            " ".join(
                fmt.replace(".3f", "").replace(".1f", "").replace(".2f", "").format(name)
                for name, fmt, _ in cols
            )
        )
    print(" ".join(fmt.format(value) for _, fmt, value in cols), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
