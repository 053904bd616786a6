"""Train-step throughput and MFU: `python bench/train.py [--preset coda-tiny --batch 8 --seq 256]`.

Times the real jitted `train_step` of `coda_trainer.train` (noising, forward, loss, backward,
optimiser update) on random tokens, after a compile-and-warm-up step, and prints one JSON line:
tokens/s, seconds per step and MFU = train_flops_per_token(seq) · tokens/s / (peak · devices),
counting full bidirectional attention (null on CPU, whose peak is not tabulated).

GPU example (the DESIGN.md anchor shape): `python bench/train.py --preset coda-1.7b --batch 8
--seq 2048 --remat dots_no_batch --attention cudnn --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="coda-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kind", default="pretrain", choices=["causal", "pretrain", "midtrain", "sft"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--attention", default=None, choices=[None, "auto", "xla", "cudnn", "splash"])
    p.add_argument(
        "--remat", default=None, choices=[None, "none", "full", "dots", "dots_no_batch", "minimal"]
    )
    p.add_argument("--no-scan", action="store_true", help="unrolled layers instead of scan")
    p.add_argument("--fsdp", type=int, default=-1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument(
        "--profile", default=None, help="write a jax.profiler trace of the timed steps here"
    )
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from coda_trainer.config import MaskingConfig, MeshConfig, ModelConfig, OptimizerConfig
    from coda_trainer.masking import NoiseSpec
    from coda_trainer.metrics import mfu
    from coda_trainer.model import create_sharded_model
    from coda_trainer.optimizer import make_optimizer, make_schedule
    from coda_trainer.sharding import (
        batch_sharding,
        make_mesh,
        optimizer_state_shardings,
    )
    from coda_trainer.step import StepKnobs, TrainState, make_train_step
    from flax import nnx

    overrides = {
        k: v
        for k, v in {"dtype": args.dtype, "attention": args.attention, "remat": args.remat}.items()
        if v
    }
    if args.no_scan:
        overrides["scan_layers"] = False
    cfg = ModelConfig.preset(args.preset, **overrides)
    mesh = make_mesh(MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor))
    B, L = args.batch, args.seq
    total = args.steps + 1
    opt = OptimizerConfig(name=args.optimizer, peak_lr=1e-4, warmup_steps=0)
    tx, schedule = make_optimizer(opt, total), make_schedule(opt, total)
    masking = MaskingConfig(prefix_prob=0.01, truncate_prob=0.01, block_prob=0.01)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(10, cfg.vocab_size - 10, (B, L)).astype(np.int32),
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
    }
    if args.kind == "sft":
        batch["prompt_mask"] = np.arange(L)[None, :].repeat(B, 0) < L // 4
    with jax.set_mesh(mesh):
        model = create_sharded_model(cfg, mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        del model
        opt_shardings = optimizer_state_shardings(jax.eval_shape(tx.init, params), mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)  # no replicated copy
        state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state)
        step_fn = make_train_step(
            graphdef, rest, tx, schedule, spec=NoiseSpec.from_configs(cfg, masking), kind=args.kind,
            loss_norm="tokens", grad_accum=args.grad_accum,
        )  # fmt: skip
        sharding = batch_sharding(mesh)
        gbatch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
        knobs = StepKnobs(jnp.asarray([0.01, 0.01, 0.01], jnp.float32), jnp.float32(1.0))
        key = jax.random.PRNGKey(0)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, gbatch, knobs, key)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        if args.profile:
            jax.profiler.start_trace(args.profile)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step_fn(state, gbatch, knobs, key)
        loss = float(jax.device_get(metrics["loss"]))
        elapsed = time.perf_counter() - t0
        if args.profile:
            jax.profiler.stop_trace()
    tps = args.steps * B * L / elapsed
    dev = jax.devices()[0]
    result = {
        "bench": "train_step",
        "preset": args.preset,
        "params": cfg.num_params(),
        "batch": B,
        "seq": L,
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "dtype": cfg.dtype,
        "attention": cfg.attention,
        "remat": cfg.remat,
        "compile_s": round(compile_s, 2),
        "step_s": round(elapsed / args.steps, 4),
        "tokens_per_s": round(tps, 1),
        "mfu": mfu(cfg.train_flops_per_token(L), tps, dev.device_kind, jax.device_count()),
        "loss": loss,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
