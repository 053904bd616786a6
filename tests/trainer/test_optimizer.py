"""Schedules, AdamW/Adafactor, clipping, weight-decay masks and gradient accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from coda_trainer.config import ModelConfig, OptimizerConfig
from coda_trainer.model import Transformer
from coda_trainer.optimizer import make_optimizer, make_schedule, weight_decay_mask
from flax import nnx

PEAK, END = 1e-3, 1e-4


def _cfg(**kw) -> OptimizerConfig:
    return OptimizerConfig(**{"peak_lr": PEAK, "end_lr_ratio": END / PEAK, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_values(schedule):
    total, warmup = 110, 10
    lr = make_schedule(_cfg(schedule=schedule, warmup_steps=warmup), total)
    at = lambda s: float(lr(s))  # noqa: E731
    assert at(0) == 0.0
    assert at(5) == pytest.approx(PEAK / 2)
    assert at(warmup) == pytest.approx(PEAK)
    if schedule == "constant":
        assert at(60) == at(total) == at(10 * total) == pytest.approx(PEAK)
        return
    assert at(60) == pytest.approx((PEAK + END) / 2)  # halfway through the decay
    quarter = 0.75 if schedule == "linear" else (1 + math.cos(math.pi / 4)) / 2
    assert at(35) == pytest.approx(END + (PEAK - END) * quarter)
    assert at(total) == pytest.approx(END)
    assert at(10 * total) == pytest.approx(END)
    assert all(at(s) >= at(s + 1) - 1e-12 for s in range(warmup, total))


def test_schedule_warmup_ratio_and_no_warmup():
    lr = make_schedule(_cfg(schedule="cosine", warmup_ratio=0.1), 1000)
    assert float(lr(50)) == pytest.approx(PEAK / 2)
    assert float(lr(100)) == pytest.approx(PEAK)
    lr = make_schedule(_cfg(schedule="linear"), 100)
    assert float(lr(0)) == pytest.approx(PEAK)
    assert float(lr(100)) == pytest.approx(END)
    with pytest.raises(ValueError):
        make_schedule(_cfg(), 0)


def _state_leaves(state) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]


def _contains(state, kind: type) -> bool:
    return any(
        isinstance(s, kind) for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, kind))
    )


def test_adafactor_without_momentum_has_no_first_moment():
    params = {"w": jnp.ones((256, 192)), "b": jnp.ones((192,))}
    state = make_optimizer(_cfg(name="adafactor"), 100).init(params)
    assert not _contains(state, optax.EmaState)
    # Only factored second moments: row + column statistics for the matrix, a vector for the bias.
    n_state = sum(x.size for x in _state_leaves(state) if x.ndim > 0)
    assert n_state <= 256 + 192 + 192 + 16
    with_momentum = make_optimizer(_cfg(name="adafactor", momentum=0.9), 100).init(params)
    assert _contains(with_momentum, optax.EmaState)
    assert sum(x.size for x in _state_leaves(with_momentum)) > 256 * 192


def test_adafactor_matches_the_release_optimizer():
    """Same updates as the release's HF `Adafactor(relative_step=False, scale_parameter=False)`."""
    import torch
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(0)
    shapes = {"w": (256, 192), "b": (192,)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) * (1 + 5 * t) for k, s in shapes.items()}
        for t in range(4)
    ]

    lr = 1e-2
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    ref = Adafactor(
        list(torch_params.values()),
        lr=lr,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )
    for g in grads:
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        ref.step()

    tx = make_optimizer(
        _cfg(name="adafactor", peak_lr=lr, schedule="constant", clip_norm=None), 100
    )
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
    for k, p in torch_params.items():
        np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_global_norm_clipping_bounds_the_update(name):
    # With eps ≫ |g| AdamW's first update is lr·g/eps (linear in g), so the gradient's norm shows
    # through; Adafactor's first update is g/|g| per entry, so compare directions on a mixed tree.
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))}
    grads = {"a": jnp.full((4, 3), 30.0), "b": jnp.arange(5.0) * 100}
    gnorm = float(optax.global_norm(grads))
    assert gnorm > 100
    if name == "adamw":
        kw = dict(eps=1e6, b1=0.0, peak_lr=1.0, schedule="constant")
        for clip, want in ((1.0, 1.0), (None, gnorm)):
            tx = make_optimizer(_cfg(name="adamw", clip_norm=clip, **kw), 10)
            updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
            assert float(optax.global_norm(updates)) * 1e6 == pytest.approx(want, rel=1e-3)
    else:
        clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
        assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
        tx = make_optimizer(_cfg(name="adafactor", clip_norm=1.0, schedule="constant"), 10)
        ref = make_optimizer(_cfg(name="adafactor", clip_norm=None, schedule="constant"), 10)
        got = tx.update(grads, tx.init(params), params)[0]
        want = ref.update(clipped, ref.init(params), params)[0]
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4)


def _micro_params(*, scan_layers: bool = True):
    """The real model's parameter tree (shapes and names) filled with random values.

    Built with `nnx.eval_shape`: constructing the scanned model eagerly costs seconds on CPU.
    """
    cfg = ModelConfig.preset("test-micro", scan_layers=scan_layers)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    leaves, treedef = jax.tree.flatten(abstract)
    r = np.random.default_rng(0)  # numpy: no per-shape compilation
    values = [jnp.asarray(r.normal(size=x.shape), x.dtype) for x in leaves]
    return jax.tree.unflatten(treedef, values)


def test_weight_decay_mask_on_the_real_model():
    params = _micro_params()
    flat = {
        jax.tree_util.keystr(path): decays
        for path, decays in jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))[0]
    }
    decayed = {k for k, v in flat.items() if v}
    assert decayed and all("kernel" in k for k in decayed)
    assert any("lm_head" in k for k in decayed)
    assert any("q_proj" in k for k in decayed) and any("down_proj" in k for k in decayed)
    for k, v in flat.items():
        if "embed" in k or "norm" in k or "scale" in k:
            assert not v, k
    # Rank alone would be wrong with scanned layers: stacked norm scales are 2-D.
    assert any(
        "layernorm" in k and np.ndim(x) == 2
        for k, x in zip(flat, jax.tree.leaves(params), strict=True)
    )
    # Plain pytrees: 1-D leaves and biases are not decayed.
    assert weight_decay_mask(
        {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2, 2))}, "v": jnp.ones(3)}
    ) == {
        "dense": {"kernel": True, "bias": False},
        "v": False,
    }


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_applies_only_where_masked(name):
    params = _micro_params()
    lr, wd = 0.1, 0.5
    tx = make_optimizer(_cfg(name=name, peak_lr=lr, schedule="constant", weight_decay=wd), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = weight_decay_mask(params)
    for p, q, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask), strict=True
    ):
        np.testing.assert_allclose(q, p * (1 - lr * wd) if m else p, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_equals_mean_gradient_steps():
    cfg = _cfg(name="adamw", schedule="linear", warmup_steps=1, weight_decay=0.1)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    rng = np.random.default_rng(1)
    micro = [
        {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=2))}
        for _ in range(4)
    ]

    accum = make_optimizer(cfg, 10, grad_accum=2)
    p_acc, s_acc = params, accum.init(params)
    for i, g in enumerate(micro):
        updates, s_acc = jax.jit(accum.update)(g, s_acc, p_acc)
        if i % 2 == 0:  # between optimiser steps nothing moves
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
        p_acc = optax.apply_updates(p_acc, updates)

    plain = make_optimizer(cfg, 10)
    p_ref, s_ref = params, plain.init(params)
    for a, b in ((micro[0], micro[1]), (micro[2], micro[3])):
        mean = jax.tree.map(lambda x, y: (x + y) / 2, a, b)
        updates, s_ref = plain.update(mean, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, updates)
    for x, y in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        make_optimizer(cfg, 10, grad_accum=0)
