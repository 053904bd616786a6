"""Throughput of the CoDA transformer: a jitted forward, or forward+backward with MFU.

CPU (default, small):   python bench/forward.py --preset coda-100m --batch 2 --seq 256
GPU anchor (one H100/H200; DESIGN.md: 47.9% MFU on an H200):
                        python bench/forward.py --preset coda-1.7b --batch 8 --seq 2048 --train

MFU = ModelConfig.train_flops_per_token(seq) · tokens / (step time · peak), counting full
(bidirectional) attention FLOPs; a forward-only step counts one third of that. The loss is the mean
of the logits: it exercises the whole model and its backward without a data pipeline. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import jax
import jax.numpy as jnp
from coda_trainer.config import PRESETS, MeshConfig, ModelConfig
from coda_trainer.model import create_sharded_model, resolve_attention_impl
from coda_trainer.sharding import batch_sharding, make_mesh
from flax import nnx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="coda-100m", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--train", action="store_true", help="time forward+backward instead of forward")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype (default: bf16 on accelerators, f32 on CPU)",
    )
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"])
    p.add_argument(
        "--remat",
        choices=["none", "full", "dots", "dots_no_batch", "minimal"],
        help="default: dots_no_batch with --train, none otherwise",
    )
    p.add_argument(
        "--no-scan", action="store_true", help="unroll the layers instead of scanning them"
    )
    p.add_argument(
        "--layers", type=int, help="override the preset's layer count (smaller CPU runs)"
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--peak-flops",
        type=float,
        default=989e12,
        help="peak FLOP/s of one device (H100/H200 bf16 dense: 989e12)",
    )
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> ModelConfig:
    backend = jax.default_backend()
    overrides = {
        "dtype": args.dtype or ("float32" if backend == "cpu" else "bfloat16"),
        "attention": resolve_attention_impl(args.attention, backend),
        "remat": args.remat or ("dots_no_batch" if args.train else "none"),
        "scan_layers": not args.no_scan,
    }
    if args.layers:
        overrides["num_layers"] = args.layers
    return ModelConfig.preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = build_config(args)
    mesh = make_mesh(MeshConfig(fsdp=-1))
    t0 = time.perf_counter()
    model = create_sharded_model(config, mesh, seed=0)
    init_s = time.perf_counter() - t0
    graphdef, params = nnx.split(model)
    tokens = jax.device_put(
        jax.random.randint(
            jax.random.key(0), (args.batch, args.seq), 0, config.vocab_size, jnp.int32
        ),
        batch_sharding(mesh),
    )

    def loss_fn(params, tokens_BxL):
        return jnp.mean(nnx.merge(graphdef, params)(tokens_BxL))

    step = jax.jit(jax.value_and_grad(loss_fn) if args.train else loss_fn)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step.lower(params, tokens).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            jax.block_until_ready(compiled(params, tokens))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = compiled(params, tokens)
        jax.block_until_ready(out)
        step_s = (time.perf_counter() - t0) / args.steps

    tokens_per_step = args.batch * args.seq
    flops_per_token = config.train_flops_per_token(args.seq) / (1 if args.train else 3)
    n_dev = mesh.size
    result = {
        "bench": "forward+backward" if args.train else "forward",
        "preset": args.preset,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "devices": n_dev,
        "batch": args.batch,
        "seq": args.seq,
        "layers": config.num_layers,
        "params": config.num_params(),
        "dtype": config.dtype,
        "attention": config.attention,
        "remat": config.remat,
        "scan_layers": config.scan_layers,
        "init_s": round(init_s, 3),
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 5),
        "tokens_per_s": round(tokens_per_step / step_s, 1),
        "tflops_per_s": round(flops_per_token * tokens_per_step / step_s / 1e12, 4),
        "mfu": round(flops_per_token * tokens_per_step / step_s / (args.peak_flops * n_dev), 4),
        "peak_flops": args.peak_flops,
    }
    mem = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in mem:
        result["peak_gib"] = round(mem["peak_bytes_in_use"] / 2**30, 2)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
