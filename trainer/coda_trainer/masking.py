"""Forward noising for masked-diffusion training (CoDA §3): σ, `<|mask|>` and the S1/S2/S3 strategies.

Everything here runs inside `jax.jit` with static shapes. Per-step knobs that change during a stage
(the strategy probabilities, the SFT prompt ramp) are traced arrays, so a curriculum never recompiles;
only `NoiseSpec` (token ids, ε, block sizes) is static.

Pre-training / mid-training, per sequence (row) b of a B×L batch:

* σ_b = (1−ε)·u + ε with u ~ U[0, 1).
* S1, unmaskable prefix, with probability `probs_3[0]`: a prefix length p ~ U{1..L−1}; positions
  < p are never masked (they condition the row and carry no loss).
* S2, truncated suffix, **only on rows without S1** (S1 and S2 are exclusive per row, as in the
  release). `NoiseSpec.strategy_shares` says what `probs_3[1]` means: `paper` (default) — the
  share of all rows that get S2, as paper Table 3 states ("the proportion of sequences affected by
  each strategy"), so rows without S1 are cut with probability truncate/(1−prefix); `release` —
  the probability per row without S1, so the share is truncate·(1−prefix) (16% instead of Table
  3's 20% in epoch 5). Either way the cut is c ~ U{1..L−1}; positions ≥ c become
  `pad` in both the model input and the targets, and are never masked (no loss). The row's
  segment ids are left alone: like the release, the model attends to the pad tail.
* S3, block masking, with probability `probs_3[2]` rolled **per row** (the release applies block
  masking to the whole batch whenever the probability is > 0): a block size k drawn uniformly from
  `spec.block_sizes` for that row. Blocks tile the row on a k-grid with a random offset
  o ~ U{0..k−1}: position i belongs to block ⌊(i+o)/k⌋ (so the first block is k−o long). Each
  block is masked with probability σ_b, independently, and every maskable position of a masked
  block becomes `<|mask|>`. Each position lies in exactly one block, so its marginal mask rate is
  exactly σ_b for every offset and every k — unlike a sliding-window scheme, nothing needs
  rescaling and the row ends are not under-masked. A block may straddle an S1 prefix or padding;
  those positions stay unmasked while the rest of the block is masked.
* Otherwise every maskable position is masked independently with probability σ_b.

Positions with `valid_BxL == False` (packing padding, `segment_ids == 0`) are never masked.

SFT (`noise_sft`): no S1/S2/S3. Prompt tokens (`prompt_BxL`: by default through
`<|im_start|>assistant`, see `sft.prompt_span` in data.py) are unmaskable, pads after the answer
are maskable so the model learns to stop. During the prompt ramp only part of each prompt is kept: see `prompt_keep_mask`. As in the release (`src_mask` shrunk by
`progress_src_mask`, loss on every position that became `<|mask|>`), a prompt token that the ramp
left maskable and that got masked carries loss like any other masked token.

Shape suffixes: see the legend in `coda_trainer/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from coda_trainer.config import MaskingConfig, ModelConfig

__all__ = [
    "NoisePlan",
    "NoiseSpec",
    "Noised",
    "apply_plan",
    "noise_pretrain",
    "noise_sft",
    "prompt_keep_mask",
    "sample_plan",
]


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """Static (hashable) noising settings: safe as a `jax.jit` static argument."""

    mask_token_id: int
    pad_token_id: int
    sampling_eps: float = 1e-3
    block_sizes: tuple[int, ...] = (2, 4, 8)
    # What the S2 probability means (see the module doc): "paper" = share of all rows, "release" =
    # probability on the rows without S1.
    strategy_shares: str = "paper"

    def __post_init__(self) -> None:
        if self.strategy_shares not in ("paper", "release"):
            raise ValueError(
                f"strategy_shares must be 'paper' or 'release', got {self.strategy_shares!r}"
            )
        if not self.block_sizes or any(int(k) < 1 for k in self.block_sizes):
            raise ValueError(
                f"block_sizes must be a non-empty tuple of ints ≥ 1, got {self.block_sizes}"
            )
        if not 0.0 < self.sampling_eps < 1.0:
            raise ValueError(f"sampling_eps must be in (0, 1), got {self.sampling_eps}")
        object.__setattr__(self, "block_sizes", tuple(int(k) for k in self.block_sizes))

    @classmethod
    def from_configs(cls, model_cfg: ModelConfig, masking: MaskingConfig) -> NoiseSpec:
        return cls(
            mask_token_id=model_cfg.mask_token_id,
            pad_token_id=model_cfg.pad_token_id,
            sampling_eps=masking.sampling_eps,
            block_sizes=masking.all_block_sizes(),
            strategy_shares=masking.strategy_shares,
        )

    def block_weights(self, allowed: Sequence[int]) -> np.ndarray:
        """f32[K] over `block_sizes`: 1 for the sizes a phase may draw, else 0 (a traced knob)."""
        unknown = set(allowed) - set(self.block_sizes)
        if not allowed or unknown:
            raise ValueError(
                f"block sizes {list(allowed)} not a non-empty subset of {self.block_sizes}"
            )
        return np.asarray([k in allowed for k in self.block_sizes], np.float32)


class Noised(NamedTuple):
    noisy_BxL: jax.Array  # int32 tokens after truncation and masking (model input)
    targets_BxL: jax.Array  # int32 clean tokens after truncation (pad beyond the cut)
    masked_BxL: jax.Array  # bool: replaced by <|mask|> (these carry loss)
    sigma_B: jax.Array  # f32


class NoisePlan(NamedTuple):
    """The per-row random choices of one noising draw, before any token is touched."""

    sigma_B: jax.Array  # f32 in [ε, 1)
    prefix_len_B: jax.Array  # int32; 0 = no S1 on this row, else positions < prefix_len are kept
    cut_B: jax.Array  # int32; L = no S2 on this row, else positions ≥ cut become pad
    block_B: jax.Array  # int32; 1 = token-wise masking, else the S3 block size k


def _sample_sigma(rng: jax.Array, batch: int, eps: float) -> jax.Array:
    return (1.0 - eps) * jax.random.uniform(rng, (batch,), jnp.float32) + eps


def _check_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"sequence length must be ≥ 2 for the shifted objective, got {seq_len}")


def sample_plan(
    rng: jax.Array,
    batch: int,
    seq_len: int,
    probs_3: jax.Array,
    spec: NoiseSpec,
    block_weights_C: jax.Array | None = None,
) -> NoisePlan:
    """Draw σ and the S1/S2/S3 choices for `batch` rows of length `seq_len`.

    `probs_3` = f32[3] (prefix, truncate, block) probabilities, traced so a curriculum does not
    recompile. `block_weights_C` (f32 over `spec.block_sizes`, traced): a row's S3 block size is
    drawn from the sizes with weight > 0 (`NoiseSpec.block_weights` of a phase); None = all.
    """
    _check_len(seq_len)
    probs_3 = jnp.asarray(probs_3, jnp.float32)
    k_sigma, k_pre, k_pre_len, k_cut, k_cut_pos, k_blk, k_blk_size = jax.random.split(rng, 7)

    sigma_B = _sample_sigma(k_sigma, batch, spec.sampling_eps)

    apply_prefix_B = jax.random.uniform(k_pre, (batch,)) < probs_3[0]
    prefix_len_B = jax.random.randint(k_pre_len, (batch,), 1, seq_len, jnp.int32)
    prefix_len_B = jnp.where(apply_prefix_B, prefix_len_B, 0)

    # S1 and S2 are exclusive per row, as in the release: a row that keeps a clean prefix to
    # condition on is not also cut short. For S2 to reach `probs_3[1]` of all rows (the paper's
    # share), the rows left without S1 are cut with probability truncate/(1−prefix).
    cut_prob = probs_3[1]
    if spec.strategy_shares == "paper":
        cut_prob = jnp.minimum(cut_prob / jnp.maximum(1.0 - probs_3[0], 1e-6), 1.0)
    apply_cut_B = (jax.random.uniform(k_cut, (batch,)) < cut_prob) & ~apply_prefix_B
    cut_B = jax.random.randint(k_cut_pos, (batch,), 1, seq_len, jnp.int32)
    cut_B = jnp.where(apply_cut_B, cut_B, seq_len)

    apply_block_B = jax.random.uniform(k_blk, (batch,)) < probs_3[2]
    sizes_C = jnp.asarray(spec.block_sizes, jnp.int32)
    if block_weights_C is None:
        choice_B = jax.random.randint(k_blk_size, (batch,), 0, len(spec.block_sizes))
    else:
        logits_C = jnp.log(jnp.asarray(block_weights_C, jnp.float32))
        choice_B = jax.random.categorical(k_blk_size, logits_C, shape=(batch,))
    size_B = sizes_C[choice_B]
    block_B = jnp.where(apply_block_B, size_B, 1)

    return NoisePlan(sigma_B, prefix_len_B, cut_B, block_B)


def _block_draw(rng: jax.Array, sigma_B: jax.Array, seq_len: int, k: int) -> jax.Array:
    """bool B×L: positions whose k-block (on a randomly offset k-grid) was drawn for masking."""
    batch = sigma_B.shape[0]
    k_off, k_draw = jax.random.split(rng)
    offset_B = jax.random.randint(k_off, (batch,), 0, k, jnp.int32)
    pos_L = jnp.arange(seq_len, dtype=jnp.int32)
    block_id_BxL = (pos_L[None, :] + offset_B[:, None]) // k
    num_blocks = (seq_len - 1 + k - 1) // k + 1  # largest id is ⌊(L−1+k−1)/k⌋
    drawn_BxJ = jax.random.uniform(k_draw, (batch, num_blocks)) < sigma_B[:, None]
    return jnp.take_along_axis(drawn_BxJ, block_id_BxL, axis=1)


def _draw_mask(
    rng: jax.Array, sigma_B: jax.Array, block_B: jax.Array, seq_len: int, spec: NoiseSpec
) -> jax.Array:
    """bool B×L drawn with marginal rate σ_b per position: token-wise, or by blocks where block_B > 1."""
    batch = sigma_B.shape[0]
    k_tok, *k_blocks = jax.random.split(rng, 1 + len(spec.block_sizes))
    drawn_BxL = jax.random.uniform(k_tok, (batch, seq_len)) < sigma_B[:, None]
    # Block sizes are static, so each gets its own static-shape draw; a row keeps the one it chose.
    for key, k in zip(k_blocks, spec.block_sizes, strict=True):
        if k == 1:
            continue
        drawn_BxL = jnp.where(
            (block_B == k)[:, None], _block_draw(key, sigma_B, seq_len, k), drawn_BxL
        )
    return drawn_BxL


def apply_plan(
    rng: jax.Array,
    tokens_BxL: jax.Array,
    plan: NoisePlan,
    spec: NoiseSpec,
    *,
    valid_BxL: jax.Array | None = None,
) -> Noised:
    """Truncate, choose the masked positions and substitute `<|mask|>` according to `plan`."""
    batch, seq_len = tokens_BxL.shape
    _check_len(seq_len)
    tokens_BxL = tokens_BxL.astype(jnp.int32)
    valid_BxL = jnp.ones((batch, seq_len), bool) if valid_BxL is None else valid_BxL.astype(bool)
    pos_1xL = jnp.arange(seq_len, dtype=jnp.int32)[None, :]

    prefix_BxL = pos_1xL < plan.prefix_len_B[:, None]
    cut_BxL = pos_1xL >= plan.cut_B[:, None]
    targets_BxL = jnp.where(cut_BxL, jnp.int32(spec.pad_token_id), tokens_BxL)
    maskable_BxL = valid_BxL & ~prefix_BxL & ~cut_BxL

    drawn_BxL = _draw_mask(rng, plan.sigma_B, plan.block_B, seq_len, spec)
    masked_BxL = drawn_BxL & maskable_BxL
    noisy_BxL = jnp.where(masked_BxL, jnp.int32(spec.mask_token_id), targets_BxL)
    return Noised(noisy_BxL, targets_BxL, masked_BxL, plan.sigma_B)


def noise_pretrain(
    rng: jax.Array,
    tokens_BxL: jax.Array,
    probs_3: jax.Array,
    spec: NoiseSpec,
    *,
    valid_BxL: jax.Array | None = None,
    block_weights_C: jax.Array | None = None,
) -> Noised:
    """Pre-/mid-training noising with S1/S2/S3 rolled per row at `probs_3` = (prefix, truncate, block).

    `valid_BxL`: False on packing padding (`segment_ids == 0`); never masked, never in the loss.
    `block_weights_C`: the S3 block sizes in force (see `sample_plan`).
    """
    batch, seq_len = tokens_BxL.shape
    k_plan, k_mask = jax.random.split(rng)
    plan = sample_plan(k_plan, batch, seq_len, probs_3, spec, block_weights_C)
    return apply_plan(k_mask, tokens_BxL, plan, spec, valid_BxL=valid_BxL)


def prompt_keep_mask(prompt_BxL: jax.Array, prompt_keep_frac: jax.Array) -> jax.Array:
    """bool B×L: the prompt tokens that stay unmaskable at ramp progress `prompt_keep_frac` ∈ [0, 1].

    For every contiguous run of prompt tokens (one per packed example) of length n, its first
    ⌊frac·n⌋ tokens are kept — the release's rule (`floor(true_count · ratio)` leading positions),
    applied per run so packed rows work too. frac = 1 keeps the whole prompt; frac = 0 keeps none.
    """
    prompt_BxL = prompt_BxL.astype(bool)
    batch, seq_len = prompt_BxL.shape
    pos_1xL = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None, :], (batch, seq_len))
    before_BxL = jnp.pad(prompt_BxL[:, :-1], ((0, 0), (1, 0)))
    after_BxL = jnp.pad(prompt_BxL[:, 1:], ((0, 0), (0, 1)))
    starts_BxL = prompt_BxL & ~before_BxL
    ends_BxL = prompt_BxL & ~after_BxL
    run_start_BxL = jax.lax.cummax(jnp.where(starts_BxL, pos_1xL, -1), axis=1)
    run_end_BxL = jax.lax.cummin(jnp.where(ends_BxL, pos_1xL, seq_len), axis=1, reverse=True)
    run_len_BxL = run_end_BxL - run_start_BxL + 1
    frac = jnp.clip(jnp.asarray(prompt_keep_frac, jnp.float32), 0.0, 1.0)
    keep_len_BxL = jnp.floor(frac * run_len_BxL.astype(jnp.float32)).astype(jnp.int32)
    return prompt_BxL & (pos_1xL - run_start_BxL < keep_len_BxL)


def noise_sft(
    rng: jax.Array,
    tokens_BxL: jax.Array,
    prompt_BxL: jax.Array,
    prompt_keep_frac: jax.Array,
    spec: NoiseSpec,
    *,
    valid_BxL: jax.Array | None = None,
) -> Noised:
    """SFT noising: token-wise σ-masking of everything but the kept part of the prompt.

    `prompt_BxL`: True on prompt tokens. Pads after the answer must be valid (maskable): the model
    learns to stop. `prompt_keep_frac`: f32 scalar from `curriculum.prompt_keep_frac_at`.
    """
    batch, seq_len = tokens_BxL.shape
    _check_len(seq_len)
    k_sigma, k_mask = jax.random.split(rng)
    plan = NoisePlan(
        sigma_B=_sample_sigma(k_sigma, batch, spec.sampling_eps),
        prefix_len_B=jnp.zeros((batch,), jnp.int32),
        cut_B=jnp.full((batch,), seq_len, jnp.int32),
        block_B=jnp.ones((batch,), jnp.int32),
    )
    valid_BxL = jnp.ones((batch, seq_len), bool) if valid_BxL is None else valid_BxL.astype(bool)
    maskable_BxL = valid_BxL & ~prompt_keep_mask(prompt_BxL, prompt_keep_frac)
    return apply_plan(k_mask, tokens_BxL, plan, spec, valid_BxL=maskable_BxL)
