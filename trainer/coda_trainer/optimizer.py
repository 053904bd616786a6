"""Optimisers and learning-rate schedules (optax).

* Schedule: linear warmup from 0 at step 0 to `peak_lr` at step `warmup`, then constant, linear or
  cosine decay reaching `end_lr_ratio · peak_lr` at `total_steps` (and holding it after).
  `constant` ignores `end_lr_ratio`.
* AdamW: optax.adamw with decoupled weight decay (scaled by the lr, as in PyTorch/optax).
* Adafactor: configured like the release's pre-training (HF `Adafactor(relative_step=False,
  scale_parameter=False)`): absolute step size from our schedule (no parameter-scale multiplier),
  factored second moments, update RMS clipping at 1.0, decay rate 0.8, and **no momentum** (no
  first-moment state) unless `momentum` is set. Weight decay, if any, is multiplied by the scheduled
  lr like AdamW's rather than optax's default lr-independent rate.
* Both: global-norm gradient clipping at `clip_norm` first, on the (accumulated) gradient.
* Weight decay applies only where `weight_decay_mask` says True: ≥2-D weight matrices (attention
  and MLP projections, an untied lm_head). Embedding tables, norm scales, biases and every 1-D
  parameter are not decayed. With scanned layers a norm scale is 2-D (layers × D), so the rule is by
  name first (`embed`, `norm`, `scale`, `bias` in the path), by rank second.
* Gradient accumulation: `grad_accum > 1` wraps the optimiser in `optax.MultiSteps`: feed it one
  micro-batch gradient per call; every `grad_accum`-th call applies their mean (other calls return
  zero updates). The schedule counts optimiser updates, not micro-steps. A train step that already
  accumulates micro-batches itself should pass `grad_accum=1`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from coda_trainer.config import OptimizerConfig

__all__ = ["make_optimizer", "make_schedule", "weight_decay_mask"]

_NO_DECAY_NAME_PARTS = ("embed", "norm", "scale", "bias")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate at each optimiser step (0-based)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    peak = cfg.peak_lr
    end = cfg.end_lr_ratio * peak
    warmup = cfg.warmup(total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)).lower())
                break
    return names


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where weight decay applies (see the module docstring)."""

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        if any(part in name for name in _path_names(path) for part in _NO_DECAY_NAME_PARTS):
            return False
        return jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, *, grad_accum: int = 1
) -> optax.GradientTransformation:
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be ≥ 1, got {grad_accum}")
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        base = optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
        )
    else:
        wd = cfg.weight_decay
        base = optax.adafactor(
            learning_rate=schedule,
            multiply_by_parameter_scale=False,
            clipping_threshold=1.0,
            decay_rate=0.8,
            momentum=cfg.momentum,
            weight_decay_rate=(lambda step: wd * schedule(step)) if wd > 0 else None,
            weight_decay_mask=weight_decay_mask,
        )
    chain = [base] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm), base]
    tx = optax.chain(*chain)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum).gradient_transformation()
    return tx
