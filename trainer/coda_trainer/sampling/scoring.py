"""Per-position token choice and confidence: pure functions on `logits_BxWxV`.

Mirrors Dream/CoDA's `sample_tokens`: temperature (skipped at 0), top-p, top-k (filtered logits are
set to float32 min, not -inf, as the release does), softmax, then x0 = argmax (temperature 0) or a
sample, and a confidence per alg. Two deliberate differences, both invisible whenever the release
itself produces valid text:
- the `<|mask|>` token is never chosen as x0 (the release can "unmask" a position to the mask token
  when the model's argmax is the mask; a trained model never does that, a random one does). The
  confidence is still computed from the full distribution, so rankings are unchanged;
- top-p keeps every token whose logit ties with the last kept one (the release keeps an arbitrary
  subset of such ties, depending on its sort).

Shape suffixes: see the legend in `coda_trainer/__init__.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["choose_tokens", "rank_descending"]

_F32_MIN = float(jnp.finfo(jnp.float32).min)


def _top_p_filter(logits_BxWxV: jax.Array, top_p: jax.Array) -> jax.Array:
    sorted_BxWxV = -jnp.sort(-logits_BxWxV, axis=-1)
    cum_BxWxV = jnp.cumsum(jax.nn.softmax(sorted_BxWxV, axis=-1), axis=-1)
    # The release removes sorted[j] when cum[j-1] > top_p (the first token always stays).
    keep_count_BxW = 1 + jnp.sum(cum_BxWxV[..., :-1] <= top_p, axis=-1)
    cutoff_BxW = jnp.take_along_axis(sorted_BxWxV, keep_count_BxW[..., None] - 1, axis=-1)
    return jnp.where(logits_BxWxV < cutoff_BxW, _F32_MIN, logits_BxWxV)


def _top_k_filter(logits_BxWxV: jax.Array, top_k: jax.Array) -> jax.Array:
    # k is a traced value (a new k does not recompile): the k-th largest logit read from a sort.
    k = jnp.clip(top_k, 1, logits_BxWxV.shape[-1])
    sorted_BxWxV = -jnp.sort(-logits_BxWxV, axis=-1)
    kth_BxW = jax.lax.dynamic_index_in_dim(sorted_BxWxV, k - 1, axis=-1, keepdims=True)
    return jnp.where(logits_BxWxV < kth_BxW, _F32_MIN, logits_BxWxV)


def choose_tokens(
    logits_BxWxV: jax.Array,
    rng: jax.Array,
    *,
    alg: str,
    greedy: bool,
    temperature: jax.Array,
    top_p: jax.Array | None,
    top_k: jax.Array | None,
    mask_token_id: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (x0_BxW int32, p_x0_BxW, confidence_BxW) for every position of the window;
    `rng` holds one key per row."""
    logits_BxWxV = logits_BxWxV.astype(jnp.float32)
    if not greedy:
        logits_BxWxV = logits_BxWxV / temperature
    if top_p is not None:
        logits_BxWxV = _top_p_filter(logits_BxWxV, top_p)
    if top_k is not None:
        logits_BxWxV = _top_k_filter(logits_BxWxV, top_k)
    probs_BxWxV = jax.nn.softmax(logits_BxWxV, axis=-1)

    is_mask_V = jnp.arange(probs_BxWxV.shape[-1]) == mask_token_id
    if greedy:
        # argmax over probabilities, first index on ties, as torch's `probs.max(-1)`.
        x0_BxW = jnp.argmax(jnp.where(is_mask_V, -1.0, probs_BxWxV), axis=-1)
    else:
        # One key per row (rng of shape [B]): a row's draw never depends on its batch-mates.
        logits_BxWxV = jnp.where(is_mask_V, -jnp.inf, logits_BxWxV)
        x0_BxW = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(rng, logits_BxWxV)
    x0_BxW = x0_BxW.astype(jnp.int32)
    p_x0_BxW = jnp.take_along_axis(probs_BxWxV, x0_BxW[..., None], axis=-1)[..., 0]

    if alg == "topk_margin":
        top2_BxWx2 = jax.lax.top_k(probs_BxWxV, 2)[0]
        confidence_BxW = top2_BxWx2[..., 0] - top2_BxWx2[..., 1]
    elif alg == "entropy":
        confidence_BxW = jnp.sum(probs_BxWxV * jnp.log(probs_BxWxV + 1e-10), axis=-1)
    else:  # maskgit_plus (and origin, which ignores it)
        confidence_BxW = p_x0_BxW
    return x0_BxW, p_x0_BxW, confidence_BxW


def rank_descending(score_BxW: jax.Array) -> jax.Array:
    """Rank of each entry when sorted by descending score; equal scores rank by lower index.

    torch.topk documents no order among ties (its CPU kernel is an introselect); taking the lower
    index agrees with it whenever k = 1 and whenever the scores are distinct, which is the case for
    real-valued confidences except at exact saturation.
    """
    order_BxW = jnp.argsort(-score_BxW, axis=-1, stable=True)
    return jnp.argsort(order_BxW, axis=-1, stable=True)
