"""The masked-diffusion objective: shifted cross-entropy on masked tokens, weighted by 1/σ (and the
plain next-token objective of a `causal` stage, which trains the base the diffusion stages adapt).

Logit shift (Dream/DiffuLLaMA, kept by CoDA): position i predicts token i+1, so `logits[:, i]` is
scored against `targets[:, i+1]`, and position i carries loss iff token i+1 was masked. Position 0's
token is never predicted and the last position's logits are never scored.

Normalisation:
* "tokens" (CoDA): Σ_b Σ_i (1/σ_b)·CE_bi over loss-carrying positions / (B·L), L the full row length
  as in the release. 1/σ already accounts for how many tokens were masked.
* "answer_length" (LLaDA SFT): per row Σ_i (1/σ_b)·CE_bi / answer_len_b, then the mean over rows.

Shape suffixes: see the legend in `coda_trainer/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from coda_trainer.masking import Noised, NoiseSpec, noise_pretrain, noise_sft

__all__ = ["LOSS_NORMS", "causal_loss", "diffusion_loss", "model_loss"]

LOSS_NORMS = ("tokens", "answer_length")
_KINDS = ("causal", "pretrain", "midtrain", "sft")


def _shift_left(x_BxL: jax.Array, fill) -> jax.Array:
    """x[:, i+1] at position i, `fill` at the last position."""
    return jnp.concatenate([x_BxL[:, 1:], jnp.full_like(x_BxL[:, :1], fill)], axis=1)


def _scored_ce(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, scored_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CE per position (0 where not scored), the count of scored positions, and their accuracy."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    ce_BxL = jnp.where(scored_BxL, ce_BxL, 0.0)
    n_scored = scored_BxL.sum().astype(jnp.float32)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL) & scored_BxL
    accuracy = correct_BxL.sum().astype(jnp.float32) / jnp.maximum(n_scored, 1.0)
    return ce_BxL, n_scored, accuracy


def diffusion_loss(
    logits_BxLxV: jax.Array,
    noised: Noised,
    *,
    norm: str = "tokens",
    answer_len_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and f32 scalar metrics from the model's raw (unshifted) logits.

    `answer_len_B` (int or float, per row) is required for norm="answer_length"; rows with no answer
    tokens are divided by 1 instead of 0.
    """
    if norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss norm {norm!r}; expected one of {LOSS_NORMS}")
    batch, seq_len, _ = logits_BxLxV.shape
    # Shift the (small) targets rather than slicing the (huge) logits: the last position scores a
    # dummy target and never carries loss, so the result equals logits[:, :-1] vs targets[:, 1:].
    targets_BxL = _shift_left(noised.targets_BxL.astype(jnp.int32), 0)
    carries_BxL = _shift_left(noised.masked_BxL.astype(bool), False)

    ce_BxL, n_masked, accuracy = _scored_ce(logits_BxLxV, targets_BxL, carries_BxL)
    weighted_BxL = ce_BxL / noised.sigma_B.astype(jnp.float32)[:, None]

    if norm == "tokens":
        loss = weighted_BxL.sum() / (batch * seq_len)
    else:
        if answer_len_B is None:
            raise ValueError('norm="answer_length" needs answer_len_B')
        answer_len_B = jnp.maximum(jnp.asarray(answer_len_B, jnp.float32), 1.0)
        loss = jnp.mean(weighted_BxL.sum(axis=1) / answer_len_B)

    metrics = {
        "loss": loss.astype(jnp.float32),
        "masked_accuracy": accuracy,
        "masked_tokens": n_masked,
        # Fraction of all B·L positions that were replaced by <|mask|> (E ≈ mean σ over maskable).
        "mask_rate": noised.masked_BxL.astype(jnp.float32).mean(),
        # Unweighted mean CE per loss-carrying token: comparable across σ draws, unlike the loss.
        "masked_ce": ce_BxL.sum() / jnp.maximum(n_masked, 1.0),
        "sigma_mean": noised.sigma_B.astype(jnp.float32).mean(),
    }
    return loss.astype(jnp.float32), metrics


def causal_loss(
    logits_BxLxV: jax.Array, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy of a causal model, averaged over the scored positions.

    Position i is scored against token i+1 when both belong to the same packed document (a
    document's first token is never predicted; packing padding, segment 0, never counts). The
    metrics carry the diffusion loss's keys so every stage logs one schema: here every scored token
    counts as "masked" and σ is 1.
    """
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    targets_BxL = _shift_left(tokens_BxL.astype(jnp.int32), 0)
    next_segment_BxL = _shift_left(segment_ids_BxL, 0)
    scored_BxL = (segment_ids_BxL != 0) & (next_segment_BxL == segment_ids_BxL)
    ce_BxL, n_scored, accuracy = _scored_ce(logits_BxLxV, targets_BxL, scored_BxL)
    loss = ce_BxL.sum() / jnp.maximum(n_scored, 1.0)
    metrics = {
        "loss": loss,
        "masked_accuracy": accuracy,
        "masked_tokens": n_scored,
        "mask_rate": jnp.float32(0.0),
        "masked_ce": loss,
        "sigma_mean": jnp.float32(1.0),
    }
    return loss, metrics


def model_loss(
    model: Callable[..., jax.Array],
    batch: dict[str, jax.Array],
    rng: jax.Array,
    probs_3: jax.Array,
    prompt_keep_frac: jax.Array,
    *,
    spec: NoiseSpec,
    kind: str,
    loss_norm: str = "tokens",
    block_weights_C: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Noise a batch, run the model on it and score it. Differentiate w.r.t. the model's params.

    batch: "tokens" int32 B×L, "segment_ids" int32 B×L (0 = packing padding: never masked, no
    loss), "positions" int32 B×L, and for kind="sft" "prompt_mask" bool B×L. In SFT the pads after
    an answer must carry a non-zero segment id: they are maskable. `probs_3` is used by
    pretrain/midtrain (with `block_weights_C`, the S3 sizes of the current phase), `prompt_keep_frac`
    by sft; the other is ignored. kind="causal" scores next tokens without noising (`causal_loss`);
    the model must then be a causal one.

    answer_length normalisation divides each row by its count of valid non-prompt tokens (the
    answer plus its trailing pads, as LLaDA counts it); in pretrain/midtrain every valid token counts.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {_KINDS}")
    tokens_BxL = batch["tokens"]
    segment_ids_BxL = batch["segment_ids"]
    valid_BxL = segment_ids_BxL != 0
    if kind == "causal":
        logits_BxLxV = model(
            tokens_BxL, positions_BxL=batch["positions"], segment_ids_BxL=segment_ids_BxL
        )
        return causal_loss(logits_BxLxV, tokens_BxL, segment_ids_BxL)
    if kind == "sft":
        prompt_BxL = batch["prompt_mask"].astype(bool)
        noised = noise_sft(rng, tokens_BxL, prompt_BxL, prompt_keep_frac, spec, valid_BxL=valid_BxL)
        answer_BxL = valid_BxL & ~prompt_BxL
    else:
        noised = noise_pretrain(
            rng, tokens_BxL, probs_3, spec, valid_BxL=valid_BxL, block_weights_C=block_weights_C
        )
        answer_BxL = valid_BxL
    logits_BxLxV = model(
        noised.noisy_BxL, positions_BxL=batch["positions"], segment_ids_BxL=segment_ids_BxL
    )
    return diffusion_loss(logits_BxLxV, noised, norm=loss_norm, answer_len_B=answer_BxL.sum(axis=1))
