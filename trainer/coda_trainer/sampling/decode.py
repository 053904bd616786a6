"""The compiled denoising loop: one `jax.jit` per (plan, batch, canvas length).

The canvas `x_BxT` is laid out as [left pads | prompt | max_new_tokens masks | suffix | right pads];
the generated region starts at the static column `gen_start` for every row, so blocks are static-size
windows at dynamic offsets. Pads carry segment id 0 and are never attended by real tokens.

Loop structure: `fori_loop` over blocks; inside, a `while_loop` over the block's steps that stops as
soon as the block has no masks left (a no-op for the schedule, which reveals everything at a block's
last step, and the speed-up of threshold decoding). With a cache, a block starts with one full forward
that also returns every layer's keys/values; the block's later steps run only the block (plus the one
column to its left, whose logits predict the block's first token: the logit shift) against that cache.
The cache always spans the whole canvas so its shape never changes; which columns a step may see is
expressed by setting the others' segment id to 0.

Progress (`Plan.report_blocks`): a revealed token never changes, and block decoding finishes a block
before the next starts, so after block b the first (b+1)·block generated tokens of every row are
final. With `report_blocks` the program hands them to the host after each block (one
`jax.debug.callback` per block, the generated region only) and `block_listener` says who receives
them; the server streams text from it. Whole-sequence decoding has one block, the whole answer, so
there the program also reports every `report_every_steps` steps inside the block: the leftmost run
of revealed tokens of each row is final and the host streams it as it grows (how early depends on
the model: a confidence order that reveals left to right streams early, a random one late). The
tokens are the same with or without it.

Shape suffixes (`x_BxT`, `history_UxBxN`): see the legend in `coda_trainer/__init__.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_trainer.model import KVCache
from coda_trainer.sampling.scoring import choose_tokens, rank_descending

__all__ = ["Knobs", "Plan", "block_listener", "decode"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that changes the compiled program (hashable, a static jit argument)."""

    alg: str
    greedy: bool
    use_top_k: bool
    use_top_p: bool
    sample_positions: bool
    use_threshold: bool
    cache: str
    stop_at_eos: bool
    gen_start: int
    gen_len: int
    block: int
    num_blocks: int
    steps_per_block: int
    mask_token_id: int
    pad_token_id: int
    eos_token_id: int
    record_history: bool = False  # keep the generated region after every step (tests, debugging)
    report_blocks: bool = False  # hand each finished block to the host (`block_listener`)
    report_every_steps: int = 0  # also every this many steps inside a block (0: block ends only)


class Knobs(NamedTuple):
    """Numeric settings passed as traced values, so changing them does not recompile."""

    ratios_U: jax.Array  # float32 1 − s/t per step of a block (last = 1)
    temperature: jax.Array
    top_p: jax.Array
    alg_temp: jax.Array
    threshold: jax.Array
    top_k: jax.Array  # int32


class _Carry(NamedTuple):
    x_BxT: jax.Array
    full_forwards: jax.Array
    block_forwards: jax.Array
    history_UxBxN: jax.Array | None  # -1 = step not run (its block finished early)


# Who gets finished blocks: (block index, generated region B×N) → None, called on a runtime thread.
# One listener per process: model calls run one at a time (the server's single model thread).
_block_listener: Callable[[int, np.ndarray], None] | None = None


@contextlib.contextmanager
def block_listener(fn: Callable[[int, np.ndarray], None] | None) -> Iterator[None]:
    """Send the finished blocks of the `report_blocks` programs run inside to `fn`."""
    global _block_listener
    previous, _block_listener = _block_listener, fn
    try:
        yield
    finally:
        _block_listener = previous


def _emit_block(b: jax.Array, gen_BxN: jax.Array) -> None:
    listener = _block_listener
    if listener is not None:
        listener(int(b), np.asarray(gen_BxN))


def _record(plan: Plan, carry: _Carry, step: jax.Array) -> _Carry:
    if not plan.record_history:
        return carry
    lo, n = plan.gen_start, plan.gen_len
    gen_BxN = carry.x_BxT[:, lo : lo + n]
    return carry._replace(history_UxBxN=carry.history_UxBxN.at[step].set(gen_BxN))


def _reveal_counts_B(plan: Plan, knobs: Knobs, is_mask_BxW: jax.Array, i: jax.Array) -> jax.Array:
    """k per row: int(masked · (1 − s/t)) in float32, everything at the block's last step."""
    m_B = jnp.sum(is_mask_BxW, axis=-1, dtype=jnp.int32)
    k_B = jnp.floor(m_B.astype(jnp.float32) * knobs.ratios_U[i]).astype(jnp.int32)
    k_B = jnp.where(i == plan.steps_per_block - 1, m_B, k_B)
    if plan.use_threshold:
        k_B = jnp.maximum(k_B, 1)  # at least one per step
    return jnp.minimum(k_B, m_B)


def _finish_rows_at_eos(plan: Plan, x_BxT: jax.Array) -> jax.Array:
    """A row whose first generated eos has no mask before it is done: pad everything after it."""
    lo, n = plan.gen_start, plan.gen_len
    gen_BxN = x_BxT[:, lo : lo + n]
    col_N = jnp.arange(n)
    is_eos_BxN = gen_BxN == plan.eos_token_id
    first_B = jnp.where(jnp.any(is_eos_BxN, -1), jnp.argmax(is_eos_BxN, -1), n)
    masks_before_B = jnp.any((gen_BxN == plan.mask_token_id) & (col_N < first_B[:, None]), -1)
    done_B = (first_B < n) & ~masks_before_B
    gen_BxN = jnp.where(done_B[:, None] & (col_N > first_B[:, None]), plan.pad_token_id, gen_BxN)
    return x_BxT.at[:, lo : lo + n].set(gen_BxN)


def _update(
    plan: Plan,
    knobs: Knobs,
    x_BxT: jax.Array,
    logits_BxWxV: jax.Array,
    i: jax.Array,
    c0: jax.Array,
    rng_B: jax.Array,
) -> jax.Array:
    """One denoising step on the block starting at column c0, given its (shifted) logits.
    `rng_B` holds this step's key of each row: a row's draws never depend on its batch-mates."""
    W = plan.block
    split_Bx2 = jax.vmap(jax.random.split)(rng_B)
    rng_tokens, rng_positions = split_Bx2[:, 0], split_Bx2[:, 1]
    blk_BxW = jax.lax.dynamic_slice_in_dim(x_BxT, c0, W, axis=1)
    is_mask_BxW = blk_BxW == plan.mask_token_id
    x0_BxW, p_x0_BxW, confidence_BxW = choose_tokens(
        logits_BxWxV,
        rng_tokens,
        alg=plan.alg,
        greedy=plan.greedy,
        temperature=knobs.temperature,
        top_p=knobs.top_p if plan.use_top_p else None,
        top_k=knobs.top_k if plan.use_top_k else None,
        mask_token_id=plan.mask_token_id,
    )
    if plan.alg == "origin":
        # Each mask independently with probability 1 − s/t (1 at the last step).
        u_BxW = jax.vmap(lambda k: jax.random.uniform(k, (W,)))(rng_positions)
        transfer_BxW = is_mask_BxW & (u_BxW < knobs.ratios_U[i])
    else:
        k_B = _reveal_counts_B(plan, knobs, is_mask_BxW, i)
        score_BxW = jnp.where(is_mask_BxW, confidence_BxW, -jnp.inf)
        if plan.sample_positions:
            # Gumbel-top-k = k draws without replacement from softmax(confidence / alg_temp).
            gumbel_BxW = jax.vmap(lambda k: jax.random.gumbel(k, (W,)))(rng_positions)
            score_BxW = score_BxW / knobs.alg_temp + gumbel_BxW
        transfer_BxW = is_mask_BxW & (rank_descending(score_BxW) < k_B[:, None])
        if plan.use_threshold:
            transfer_BxW |= is_mask_BxW & (p_x0_BxW >= knobs.threshold)
    blk_BxW = jnp.where(transfer_BxW, x0_BxW, blk_BxW)
    x_BxT = jax.lax.dynamic_update_slice_in_dim(x_BxT, blk_BxW, c0, axis=1)
    if plan.stop_at_eos:
        x_BxT = _finish_rows_at_eos(plan, x_BxT)
    return x_BxT


class _Inputs(NamedTuple):
    """What every part of one compiled decode reads: the model, the static plan and the traced
    per-call values (a plain Python bundle, built inside the trace)."""

    model: nnx.Module
    plan: Plan
    knobs: Knobs
    segment_ids_BxT: jax.Array
    positions_BxT: jax.Array
    rng_B: jax.Array
    col_T: jax.Array  # the canvas's column indices


def _first_step(plan: Plan, c0: jax.Array) -> jax.Array:
    """The run-wide index of the first step of the block starting at column c0."""
    return (c0 - plan.gen_start) // plan.block * plan.steps_per_block


def _step_keys(inputs: _Inputs, c0: jax.Array, i: jax.Array) -> jax.Array:
    # Each row's key for step i of the block at c0, folded from the row's own key and the step's
    # index: the same whatever other rows (or earlier blocks) ran for how many steps.
    step = _first_step(inputs.plan, c0) + i
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(inputs.rng_B, step)


def _block_masks_BxW(plan: Plan, x_BxT: jax.Array, c0: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x_BxT, c0, plan.block, axis=1) == plan.mask_token_id


def _full_logits(
    inputs: _Inputs, x_BxT: jax.Array, c0: jax.Array, return_kv: bool = False
) -> tuple[jax.Array, KVCache | None]:
    """A forward over the whole canvas; the block's (shifted) logits and, if asked, the cache."""
    out = inputs.model(
        x_BxT,
        positions_BxL=inputs.positions_BxT,
        segment_ids_BxL=inputs.segment_ids_BxT,
        return_kv=return_kv,
    )
    logits_BxTxV, kv = out if return_kv else (out, None)
    # Logit shift: column c predicts token c + 1, so the block [c0, c0+W) reads [c0-1, c0+W-1).
    return jax.lax.dynamic_slice_in_dim(logits_BxTxV, c0 - 1, inputs.plan.block, axis=1), kv


def _cached_logits(inputs: _Inputs, x_BxT: jax.Array, kv: KVCache, c0: jax.Array) -> jax.Array:
    """A forward over the block and the column left of it only, against the cache."""
    W, q0 = inputs.plan.block, c0 - 1
    tokens_BxQ = jax.lax.dynamic_slice_in_dim(x_BxT, q0, W + 1, axis=1)
    positions_BxQ = jax.lax.dynamic_slice_in_dim(inputs.positions_BxT, q0, W + 1, axis=1)
    segments_BxQ = jax.lax.dynamic_slice_in_dim(inputs.segment_ids_BxT, q0, W + 1, axis=1)
    logits_BxQxV = inputs.model(
        tokens_BxQ, positions_BxL=positions_BxQ, segment_ids_BxL=segments_BxQ, past_kv=kv
    )
    return logits_BxQxV[:, :W]


def _report_inside_block(plan: Plan, x_BxT: jax.Array, c0: jax.Array, i: jax.Array) -> None:
    """Every `report_every_steps` steps: the generated region to the block listener."""
    lo, n = plan.gen_start, plan.gen_len
    jax.lax.cond(
        (i + 1) % plan.report_every_steps == 0,
        lambda x_BxT: jax.debug.callback(
            _emit_block, (c0 - plan.gen_start) // plan.block, x_BxT[:, lo : lo + n]
        ),
        lambda x_BxT: None,
        x_BxT,
    )


def _step_loop(
    inputs: _Inputs,
    carry: _Carry,
    c0: jax.Array,
    first_step: int,
    forward: Callable[[jax.Array], jax.Array],
) -> _Carry:
    """The block's steps from `first_step` on, until its last step or until it has no mask left;
    `forward` gives the block's logits for a canvas. Counts its forwards into `block_forwards`."""
    plan, knobs = inputs.plan, inputs.knobs

    def cond(state):
        i, carry = state
        return (i < plan.steps_per_block) & jnp.any(_block_masks_BxW(plan, carry.x_BxT, c0))

    def body(state):
        i, carry = state

        def run(carry):
            logits_BxWxV = forward(carry.x_BxT)
            x_BxT = _update(
                plan, knobs, carry.x_BxT, logits_BxWxV, i, c0, _step_keys(inputs, c0, i)
            )
            return carry._replace(x_BxT=x_BxT, block_forwards=carry.block_forwards + 1)

        if plan.alg == "origin" or plan.use_threshold:
            carry = run(carry)
        else:
            # A step whose schedule reveals nothing in any row changes nothing: skip its forward
            # (the release runs it anyway, e.g. when steps > max_new_tokens).
            k_B = _reveal_counts_B(plan, knobs, _block_masks_BxW(plan, carry.x_BxT, c0), i)
            carry = jax.lax.cond(jnp.any(k_B > 0), run, lambda c: c, carry)
        carry = _record(plan, carry, _first_step(plan, c0) + i)
        if plan.report_every_steps:
            _report_inside_block(plan, carry.x_BxT, c0, i)
        return i + 1, carry

    _, carry = jax.lax.while_loop(cond, body, (jnp.int32(first_step), carry))
    return carry


def _uncached_block(inputs: _Inputs, c0: jax.Array, carry: _Carry) -> _Carry:
    # _step_loop counts into block_forwards; without a cache they are all full forwards (swapped
    # back on return from `_decode`).
    return _step_loop(inputs, carry, c0, 0, lambda x_BxT: _full_logits(inputs, x_BxT, c0)[0])


def _cached_block(inputs: _Inputs, c0: jax.Array, carry: _Carry) -> _Carry:
    """Step 0 as a full forward that also fills the cache, the later steps against the cache."""
    plan, knobs = inputs.plan, inputs.knobs
    logits_BxWxV, kv = _full_logits(inputs, carry.x_BxT, c0, return_kv=True)
    col_T = inputs.col_T
    if plan.cache == "prefix":
        visible_T = col_T < c0 - 1
    else:  # dual: everything but the queried window [c0-1, c0+W)
        visible_T = (col_T < c0 - 1) | (col_T >= c0 + plan.block)
    kv = KVCache(kv.k_ZxBxSxKxH, kv.v_ZxBxSxKxH, jnp.where(visible_T, inputs.segment_ids_BxT, 0))
    first = jnp.int32(0)
    x_BxT = _update(
        plan, knobs, carry.x_BxT, logits_BxWxV, first, c0, _step_keys(inputs, c0, first)
    )
    carry = carry._replace(x_BxT=x_BxT, full_forwards=carry.full_forwards + 1)
    carry = _record(plan, carry, _first_step(plan, c0))
    return _step_loop(inputs, carry, c0, 1, functools.partial(_cached_logits, inputs, kv=kv, c0=c0))


def _run_block(inputs: _Inputs, b: jax.Array, carry: _Carry) -> _Carry:
    """Block b (a `fori_loop` body): its steps if it has masks, then its report if asked."""
    plan = inputs.plan
    c0 = plan.gen_start + b * plan.block
    block_fn = _uncached_block if plan.cache == "none" else _cached_block
    body = functools.partial(block_fn, inputs, c0)
    carry = jax.lax.cond(jnp.any(_block_masks_BxW(plan, carry.x_BxT, c0)), body, lambda c: c, carry)
    if plan.report_blocks:
        lo, n = plan.gen_start, plan.gen_len
        jax.debug.callback(_emit_block, b, carry.x_BxT[:, lo : lo + n])
    return carry


def _decode(
    graphdef: nnx.GraphDef,
    plan: Plan,
    state: nnx.State,
    x_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    knobs: Knobs,
    rng_B: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    model = nnx.merge(graphdef, state)
    col_T = jnp.arange(x_BxT.shape[1])
    inputs = _Inputs(model, plan, knobs, segment_ids_BxT, positions_BxT, rng_B, col_T)
    zero = jnp.int32(0)
    history = None
    if plan.record_history:
        B, U = x_BxT.shape[0], plan.num_blocks * plan.steps_per_block
        history = jnp.full((U, B, plan.gen_len), -1, jnp.int32)
    carry = jax.lax.fori_loop(
        0,
        plan.num_blocks,
        functools.partial(_run_block, inputs),
        _Carry(x_BxT, zero, zero, history),
    )
    if plan.cache == "none":
        return carry.x_BxT, carry.block_forwards, zero, carry.history_UxBxN
    return carry.x_BxT, carry.full_forwards, carry.block_forwards, carry.history_UxBxN


decode = jax.jit(_decode, static_argnames=("graphdef", "plan"))
