"""The diffusion objective: hand-computed values, shift, 1/σ weighting, both normalisations; and
the next-token objective of a `causal` stage."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from coda_trainer.config import MaskingConfig, ModelConfig, OptimizerConfig
from coda_trainer.loss import causal_loss, diffusion_loss, model_loss
from coda_trainer.masking import Noised, NoiseSpec, noise_pretrain, noise_sft
from coda_trainer.optimizer import make_optimizer
from flax import nnx

X = 9.0  # logits at positions that must not be scored: any use of them changes the value


def _tiny_example() -> tuple[jax.Array, Noised]:
    """B=2, L=4, V=3. Carrying positions (after the shift): row 0 → 1 and 2, row 1 → 0."""
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = np.array(
        [
            [[X, 0, 0], [0, 0, 0], [0, ln3, 0], [0, 0, X]],  # row 0
            [[0, 0, ln2], [X, 0, 0], [0, X, 0], [0, 0, X]],  # row 1
        ],
        np.float32,
    )
    targets = np.array([[0, 1, 2, 1], [2, 2, 0, 1]], np.int32)
    # Row 0 position 0 is masked but no logit predicts it; rows score logits[i] vs targets[i+1].
    masked = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], bool)
    noisy = np.where(masked, 7, targets)
    sigma = np.array([0.5, 0.25], np.float32)
    return jnp.asarray(logits), Noised(*map(jnp.asarray, (noisy, targets, masked, sigma)))


def test_loss_matches_hand_computation():
    logits, noised = _tiny_example()
    # CE = logsumexp − logit[target]:
    #   row 0, logits[1]=[0,0,0]   vs targets[2]=2 → ln 3
    #   row 0, logits[2]=[0,ln3,0] vs targets[3]=1 → ln 5 − ln 3
    #   row 1, logits[0]=[0,0,ln2] vs targets[1]=2 → ln 4 − ln 2 = ln 2
    # Weighted by 1/σ: row 0 → (ln 3 + ln 5/3)/0.5 = 2 ln 5; row 1 → ln 2/0.25 = 4 ln 2.
    loss, metrics = jax.jit(diffusion_loss)(logits, noised)
    assert float(loss) == pytest.approx((2 * math.log(5) + 4 * math.log(2)) / (2 * 4), rel=1e-6)
    assert float(loss) == pytest.approx(math.log(20) / 4, rel=1e-6)
    # argmax: row 0 pos 1 → 0 ≠ 2, row 0 pos 2 → 1 = 1, row 1 pos 0 → 2 = 2.
    assert float(metrics["masked_accuracy"]) == pytest.approx(2 / 3)
    assert float(metrics["masked_tokens"]) == 3.0
    assert float(metrics["mask_rate"]) == pytest.approx(4 / 8)
    assert float(metrics["masked_ce"]) == pytest.approx(math.log(10) / 3, rel=1e-6)
    assert float(metrics["loss"]) == float(loss)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())


def test_causal_loss_matches_hand_computation():
    """B=1, L=5, V=3, two packed documents [0 1 2 | 1 0]: positions 0, 1 and 3 are scored."""
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = jnp.asarray(
        [[[0, 0, 0], [0, 0, ln2], [X, 0, 0], [ln3, 0, 0], [0, X, 0]]], jnp.float32
    )  # position 2 would predict across the document boundary, position 4 has no next token
    tokens = jnp.asarray([[0, 1, 2, 1, 0]], jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 2, 2]], jnp.int32)
    loss, metrics = jax.jit(causal_loss)(logits, tokens, segments)
    # pos 0 → token 1: ln 3; pos 1 → token 2: ln 4 − ln 2 = ln 2; pos 3 → token 0: ln 5 − ln 3.
    assert float(loss) == pytest.approx(math.log(10) / 3, rel=1e-6)
    assert float(metrics["masked_tokens"]) == 3.0
    assert float(metrics["masked_accuracy"]) == pytest.approx(2 / 3)  # pos 1 and pos 3 right
    assert float(metrics["masked_ce"]) == float(loss) and float(metrics["mask_rate"]) == 0.0
    padded = jnp.asarray([[1, 1, 1, 0, 0]], jnp.int32)  # packing padding is never scored
    assert float(causal_loss(logits, tokens, padded)[1]["masked_tokens"]) == 2.0


def test_answer_length_normalisation():
    logits, noised = _tiny_example()
    fn = jax.jit(diffusion_loss, static_argnames="norm")
    loss, _ = fn(logits, noised, norm="answer_length", answer_len_B=jnp.array([2, 4]))
    # mean(2 ln 5 / 2, 4 ln 2 / 4) = ln 10 / 2
    assert float(loss) == pytest.approx(math.log(10) / 2, rel=1e-6)
    # A row without answer tokens divides by 1, not 0.
    loss0, _ = fn(logits, noised, norm="answer_length", answer_len_B=jnp.array([0, 4]))
    assert float(loss0) == pytest.approx((2 * math.log(5) + math.log(2)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="answer_len_B"):
        diffusion_loss(logits, noised, norm="answer_length")
    with pytest.raises(ValueError, match="unknown loss norm"):
        diffusion_loss(logits, noised, norm="mean")


def test_shift_and_weighting_are_what_matter():
    logits, noised = _tiny_example()
    base = float(diffusion_loss(logits, noised)[0])
    # The noisy input does not enter the loss; the clean targets do.
    assert float(diffusion_loss(logits, noised._replace(noisy_BxL=noised.noisy_BxL * 0))[0]) == base
    # The last position and unmasked-target positions are never scored.
    changed = logits.at[:, -1].set(-50.0).at[1, 1:].set(3.0)
    assert float(diffusion_loss(changed, noised)[0]) == pytest.approx(base, rel=1e-6)
    # Halving σ doubles the loss: 1/σ weighting.
    doubled = float(diffusion_loss(logits, noised._replace(sigma_B=noised.sigma_B / 2))[0])
    assert doubled == pytest.approx(2 * base, rel=1e-6)
    # bf16 logits are scored in f32.
    loss_bf16, _ = diffusion_loss(logits.astype(jnp.bfloat16), noised)
    assert loss_bf16.dtype == jnp.float32


class _StandIn:
    """A deterministic logits function; its output depends on positions and segment ids too."""

    def __init__(self, table_VxV: jax.Array):
        self.table_VxV = table_VxV

    def __call__(self, tokens_BxL, *, positions_BxL, segment_ids_BxL):
        bias_BxL = 0.01 * positions_BxL + 0.1 * segment_ids_BxL
        return self.table_VxV[tokens_BxL] + bias_BxL[..., None]


SPEC = NoiseSpec(mask_token_id=255, pad_token_id=0, block_sizes=(2, 4))


def _batch(batch: int = 8, seq_len: int = 16, *, sft: bool = False) -> dict[str, jax.Array]:
    r = np.random.default_rng(0)
    tokens = r.integers(4, 255, (batch, seq_len)).astype(np.int32)
    segment_ids = np.ones((batch, seq_len), np.int32)
    segment_ids[:, -3:] = 0  # packing padding at the row end
    segment_ids[:, :5] = 2
    tokens[:, -3:] = 0
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    out = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    if sft:
        out["prompt_mask"] = np.arange(seq_len)[None, :] < r.integers(1, seq_len // 2, (batch, 1))
    return {k: jnp.asarray(v) for k, v in out.items()}


def test_model_loss_wires_noise_model_and_loss():
    model = _StandIn(jax.random.normal(jax.random.key(0), (256, 256)))
    rng, probs, frac = jax.random.key(1), jnp.asarray([0.3, 0.3, 0.5]), jnp.float32(0.5)

    @jax.jit
    def both(batch):
        pre = model_loss(model, batch, rng, probs, frac, spec=SPEC, kind="pretrain")
        mid = model_loss(model, batch, rng, probs, frac, spec=SPEC, kind="midtrain")
        noised = noise_pretrain(
            rng, batch["tokens"], probs, SPEC, valid_BxL=batch["segment_ids"] != 0
        )
        logits = model(
            noised.noisy_BxL, positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"]
        )
        return pre, mid, diffusion_loss(logits, noised)

    (loss, metrics), (mid, _), (want, _) = both(_batch())
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(mid) == float(loss)  # mid-training noises exactly like pre-training
    assert float(metrics["masked_tokens"]) > 0

    @jax.jit
    def sft(batch):
        got = model_loss(
            model, batch, rng, probs, frac, spec=SPEC, kind="sft", loss_norm="answer_length"
        )
        valid = batch["segment_ids"] != 0
        noised = noise_sft(rng, batch["tokens"], batch["prompt_mask"], frac, SPEC, valid_BxL=valid)
        logits = model(
            noised.noisy_BxL, positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"]
        )
        answer_len = (valid & ~batch["prompt_mask"]).sum(axis=1)
        return got, diffusion_loss(logits, noised, norm="answer_length", answer_len_B=answer_len)

    (loss, metrics), (want, _) = sft(_batch(sft=True))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(metrics["masked_tokens"]) > 0
    with pytest.raises(ValueError, match="kind"):
        model_loss(model, _batch(), rng, probs, frac, spec=SPEC, kind="rl")

    batch = _batch()  # causal: the clean tokens go in, no noise, next-token loss
    got, _ = model_loss(model, batch, rng, probs, frac, spec=SPEC, kind="causal")
    logits = model(
        batch["tokens"], positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"]
    )
    want, _ = causal_loss(logits, batch["tokens"], batch["segment_ids"])
    assert float(got) == pytest.approx(float(want), rel=1e-6)


@pytest.fixture(scope="module")
def micro_model():
    from coda_trainer.model import Transformer

    # Unrolled layers: the same function as the scanned model, and much faster to build on CPU.
    cfg = ModelConfig.preset("test-micro", scan_layers=False)
    return cfg, nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_end_to_end_with_real_model_trains_jitted(kind, micro_model):
    """The real Transformer under jit: finite loss and gradients, and optimiser steps reduce it."""
    cfg, (graphdef, params, rest) = micro_model
    spec = NoiseSpec.from_configs(cfg, MaskingConfig(block_sizes=[2, 4]))
    tx = make_optimizer(
        OptimizerConfig(name="adamw", peak_lr=3e-3, schedule="constant", clip_norm=1.0), 100
    )
    opt_state = tx.init(params)
    batch = _batch(sft=kind == "sft")
    probs = jnp.asarray([0.2, 0.2, 0.5], jnp.float32)

    def loss_fn(params, rng):
        m = nnx.merge(graphdef, params, rest)
        return model_loss(m, batch, rng, probs, jnp.float32(1.0), spec=spec, kind=kind)

    @jax.jit
    def step(params, opt_state, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    rng = jax.random.key(11)  # same noise every step: the loss on it must fall
    losses = []
    for _ in range(15):
        params, opt_state, loss, grads = step(params, opt_state, rng)
        losses.append(float(loss))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert np.isfinite(losses).all() and losses[0] > 0
    assert losses[-1] < 0.7 * losses[0], losses
