"""The jitted train and eval steps and the state they carry.

`abstract_train_state` describes a stage's model, optimiser and train state on a mesh without
allocating anything (shapes, dtypes, shardings): `train` allocates into it and
`coda_trainer.preflight` compiles the same step from it for TPU devices it does not have.
`make_train_step` builds `train_step(state, batch, knobs, rng) -> (state, metrics)` (state donated,
gradient accumulation inside); `stage_knobs` computes the per-step values of the masking
curriculum on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from coda_trainer import curriculum
from coda_trainer.config import TrainJobConfig
from coda_trainer.loss import model_loss
from coda_trainer.model import Transformer
from coda_trainer.optimizer import make_optimizer, make_schedule
from coda_trainer.sharding import optimizer_state_shardings, state_shardings

__all__ = [
    "StepKnobs",
    "TrainLayout",
    "TrainState",
    "abstract_train_state",
    "initial_train_state",
    "make_eval_step",
    "make_train_step",
    "stage_knobs",
    "stage_model_config",
]


def stage_model_config(cfg: TrainJobConfig) -> Any:
    """The ModelConfig a stage trains: the run's model, causal for a `causal` stage, with the
    stage's own remat policy if it sets one."""
    model_config = cfg.model.resolve()
    if cfg.stage.kind == "causal":  # the same weights, attending only to earlier tokens
        model_config = model_config.model_copy(update={"causal": True})
    if cfg.stage.remat is not None:
        model_config = model_config.model_copy(update={"remat": cfg.stage.remat})
    return model_config


@struct.dataclass
class TrainState:
    """What one optimiser step reads and writes (a pytree; donated to the jitted step)."""

    step: Any  # int32 scalar: optimiser steps completed
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainLayout:
    """A stage's train state described without device memory: shapes, dtypes and shardings.

    `train` allocates the state into `shardings`; `coda_trainer.preflight` compiles the same step
    from `state` (ShapeDtypeStructs carrying those shardings) for devices it does not have.
    """

    model_config: Any
    graphdef: Any  # nnx.GraphDef of the Transformer
    rest: Any  # nnx.State of the model's non-Param variables (empty for the Transformer)
    tx: Any  # optax.GradientTransformation
    schedule: Callable[[Any], Any]
    state: TrainState  # leaves: jax.ShapeDtypeStruct with .sharding
    shardings: TrainState  # leaves: NamedSharding


def abstract_train_state(cfg: TrainJobConfig, mesh: Any) -> TrainLayout:
    """The stage's model, optimiser and train state on `mesh`, abstract (nothing is allocated).

    Parameter shardings come from the model's logical axes; optimiser moments take their
    parameter's sharding (never a replicated copy); the step counter is replicated.
    """
    stage = cfg.stage
    model_config = stage_model_config(cfg)
    abstract_model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(stage.seed)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    tx = make_optimizer(stage.optimizer, stage.steps, grad_accum=1)  # accumulation is in the step
    schedule = make_schedule(stage.optimizer, stage.steps)
    opt_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=state_shardings(params, mesh),
        opt_state=optimizer_state_shardings(opt_state, mesh),
    )
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32), params=params,
                        opt_state=opt_state)  # fmt: skip
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return TrainLayout(model_config, graphdef, rest, tx, schedule, state, shardings)


def initial_train_state(layout: TrainLayout, params: Any, step: int = 0) -> TrainState:
    """A fresh TrainState around (sharded) `params`: optimiser state created in its shardings."""
    opt_state = jax.jit(layout.tx.init, out_shardings=layout.shardings.opt_state)(params)
    step_array = jax.device_put(jnp.asarray(step, jnp.int32), layout.shardings.step)
    return TrainState(step=step_array, params=params, opt_state=opt_state)


class StepKnobs(NamedTuple):
    """The masking curriculum's values at one step, computed on the host and passed to the jitted
    step as traced (replicated) arrays, so a curriculum change never recompiles."""

    probs_3: Any  # f32[3]: S1 (unmaskable prefix), S2 (truncated suffix), S3 (block) probabilities
    prompt_keep_frac: Any  # f32[]: SFT prompt ramp, the share of prompts kept unmaskable (1 else)
    # f32[K]: S3 block-size weights over `spec`'s sizes for the current phase (None: uniform)
    block_weights: Any = None


def stage_knobs(stage: Any, spec: Any, step: int) -> StepKnobs:
    """The host-computed per-step values the step reads beside the data (numpy, by step)."""
    p = curriculum.probs_at(stage.masking, step, stage.steps)
    ramp = stage.sft_config.prompt_ramp_fraction
    return StepKnobs(
        probs_3=np.asarray([p.prefix_prob, p.truncate_prob, p.block_prob], np.float32),
        prompt_keep_frac=np.float32(
            curriculum.prompt_keep_frac_at(step, stage.steps, ramp) if stage.kind == "sft" else 1.0
        ),
        block_weights=spec.block_weights(
            curriculum.block_sizes_at(stage.masking, step, stage.steps)
        ),
    )


def _knob_loss(model: Any, data: dict[str, Any], rng: Any, knobs: StepKnobs, **static: Any):
    return model_loss(model, data, rng, knobs.probs_3, knobs.prompt_keep_frac,
                      block_weights_C=knobs.block_weights, **static)  # fmt: skip


def make_train_step(
    graphdef: Any,
    rest: Any,
    tx: Any,
    schedule: Callable[[Any], Any],
    *,
    spec: Any,
    kind: str,
    loss_norm: str,
    grad_accum: int,
    state_shardings: Any = None,
) -> Callable[..., Any]:
    """`train_step(state, batch, knobs, rng) -> (state, metrics)`, jitted, state donated.

    With `state_shardings` (a TrainState of shardings, `TrainLayout.shardings`) the new state is
    laid out exactly like the old one, so the step compiles once and runs in place; metrics are
    replicated.

    `batch` holds the data arrays (global B×L: tokens, segment_ids, positions[, prompt_mask]);
    `knobs` the step's curriculum values (`StepKnobs`, from `stage_knobs`). `rng` is the stage's
    base key; the step's key is `fold_in(rng, state.step)`. With `grad_accum` A the
    B rows are split into A interleaved micro-batches (row i → micro-batch i mod A, which keeps
    every device's rows local) whose gradients are averaged before one optimiser update.
    """

    def loss_fn(params, micro, rng, knobs):
        model = nnx.merge(graphdef, params, rest)
        return _knob_loss(model, micro, rng, knobs, spec=spec, kind=kind, loss_norm=loss_norm)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, data, knobs, rng):
        rng = jax.random.fold_in(rng, state.step)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, data, rng, knobs)
        else:
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(
                    x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1
                ),
                data,
            )

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, i = xs
                (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), knobs)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            m_shape = jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng, knobs)[0][1]
            )
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, metrics), _ = jax.lax.scan(
                body, (zeros_g, zeros_m), (micro, jnp.arange(grad_accum))
            )
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0,))
    replicated = jax.sharding.NamedSharding(state_shardings.step.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_shardings, replicated))


def make_eval_step(
    graphdef: Any, rest: Any, *, spec: Any, kind: str, loss_norm: str
) -> Callable[..., Any]:
    def eval_step(params, data, knobs, rng):
        model = nnx.merge(graphdef, params, rest)
        _, metrics = _knob_loss(model, data, rng, knobs, spec=spec, kind=kind, loss_norm=loss_norm)
        return metrics

    return jax.jit(eval_step)
