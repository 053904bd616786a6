"""Host-side entry points: `generate` and `infill` (prompt layout in, tokens out).

Shape suffixes: see the legend in `coda_trainer/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_trainer.config import ModelConfig
from coda_trainer.sampling.config import SamplingConfig
from coda_trainer.sampling.decode import Knobs, Plan, decode
from coda_trainer.sampling.schedule import transfer_ratios

__all__ = [
    "Canvas",
    "GenerateOutput",
    "build_canvas",
    "compile_generate",
    "generate",
    "infill",
    "row_keys",
]

TokenRows = Sequence[Sequence[int]] | np.ndarray | jax.Array


@dataclasses.dataclass(frozen=True)
class Canvas:
    """A batch laid out as [left pads | prompt | n masks | suffix | right pads] (numpy, int32)."""

    tokens_BxT: np.ndarray
    segment_ids_BxT: np.ndarray  # 1 = real token or mask, 0 = padding (never attended)
    positions_BxT: np.ndarray  # counted from each row's first real token
    prompt_lengths_B: np.ndarray
    suffix_lengths_B: np.ndarray
    gen_start: int
    gen_len: int


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What a call produced.

    tokens_BxT: the whole canvas (left pads, prompt, generated tokens, suffix, right pads).
    generated_BxN: the `max_new_tokens` generated tokens of each row (columns gen_start..+N).
    num_steps_used: model forwards run (full ones plus block-only ones with a cache).
    """

    tokens_BxT: np.ndarray
    generated_BxN: np.ndarray
    prompt_lengths_B: np.ndarray
    gen_start: int
    num_steps_used: int
    num_full_forwards: int
    num_block_forwards: int
    # With record_history: the generated region after each of the `steps` steps (a step that did
    # not run, because its block was already complete, repeats the previous state).
    history_UxBxN: np.ndarray | None = None

    def completions(self, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Each row's generated tokens, cut before the first of `stop_ids`."""
        stops = set(int(s) for s in stop_ids)
        out = []
        for row in self.generated_BxN.tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
        return out


def _rows(ids: TokenRows, lengths: Sequence[int] | np.ndarray | None, what: str) -> list[list[int]]:
    if isinstance(ids, np.ndarray | jax.Array):
        arr = np.asarray(ids)
        if arr.ndim != 2:
            raise ValueError(f"{what} array must be 2-D (batch, length), got shape {arr.shape}")
        lens = [arr.shape[1]] * arr.shape[0] if lengths is None else [int(n) for n in lengths]
        if len(lens) != arr.shape[0] or any(not 0 <= n <= arr.shape[1] for n in lens):
            raise ValueError(f"{what} lengths {lens} do not fit an array of shape {arr.shape}")
        return [arr[b, :n].tolist() for b, n in enumerate(lens)]
    if lengths is not None:
        raise ValueError(f"{what} lengths are only meaningful with a padded array")
    return [[int(t) for t in row] for row in ids]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def build_canvas(
    prompts: list[list[int]],
    n_masks: int,
    *,
    model_config: ModelConfig,
    suffixes: list[list[int]] | None = None,
    pad_to_multiple_of: int = 1,
) -> Canvas:
    """Left-pad the prompts to a common (bucketed) length, append masks, then any suffixes."""
    if not prompts:
        raise ValueError("need at least one prompt")
    if suffixes is not None and len(suffixes) != len(prompts):
        raise ValueError(f"{len(prompts)} prefixes but {len(suffixes)} suffixes")
    vocab = model_config.vocab_size
    for what, rows in (("prompt", prompts), ("suffix", suffixes or [])):
        for b, row in enumerate(rows):
            if any(not 0 <= t < vocab for t in row):
                raise ValueError(f"{what} {b} holds token ids outside [0, {vocab})")
    if any(len(p) == 0 for p in prompts):
        # The first generated token is predicted by the last prompt token (logit shift).
        raise ValueError("every prompt needs at least one token (e.g. a BOS)")
    B = len(prompts)
    prompt_w = _round_up(max(len(p) for p in prompts), pad_to_multiple_of)
    suffixes = suffixes or [[] for _ in prompts]
    suffix_w = _round_up(max(len(s) for s in suffixes), pad_to_multiple_of) if any(suffixes) else 0
    T = prompt_w + n_masks + suffix_w
    if model_config.max_position_embeddings < T:
        raise ValueError(
            f"prompt ({prompt_w}) + new tokens ({n_masks}) + suffix ({suffix_w}) = {T} exceeds the "
            f"model's max_position_embeddings ({model_config.max_position_embeddings})"
        )
    tokens = np.full((B, T), model_config.pad_token_id, np.int32)
    seg = np.zeros((B, T), np.int32)
    for b, (p, s) in enumerate(zip(prompts, suffixes, strict=True)):
        tokens[b, prompt_w - len(p) : prompt_w] = p
        seg[b, prompt_w - len(p) : prompt_w + n_masks + len(s)] = 1
        tokens[b, prompt_w + n_masks : prompt_w + n_masks + len(s)] = s
    tokens[:, prompt_w : prompt_w + n_masks] = model_config.mask_token_id
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return Canvas(
        tokens_BxT=tokens,
        segment_ids_BxT=seg,
        positions_BxT=positions,
        prompt_lengths_B=np.array([len(p) for p in prompts], np.int32),
        suffix_lengths_B=np.array([len(s) for s in suffixes], np.int32),
        gen_start=prompt_w,
        gen_len=n_masks,
    )


# Host reports per whole-sequence generation when progress is reported (each one copies the B×N
# generated region to the host: a handful keeps the stream live without a sync every step).
PROGRESS_REPORTS = 16


def _plan(
    config: SamplingConfig,
    canvas: Canvas,
    mc: ModelConfig,
    *,
    stop_at_eos: bool,
    record_history: bool = False,
    report_blocks: bool = False,
) -> Plan:
    return Plan(
        alg=config.alg,
        greedy=config.greedy,
        use_top_k=config.top_k is not None,
        use_top_p=config.top_p is not None and config.top_p < 1.0,
        sample_positions=config.sample_positions,
        use_threshold=config.threshold is not None,
        # A causal model cannot see right of a query anyway, and a dual cache's right-hand keys
        # would be visible to it (a cache counts as the past): the prefix cache is the exact one.
        cache="prefix" if mc.causal and config.cache == "dual" else config.cache,
        stop_at_eos=stop_at_eos,
        gen_start=canvas.gen_start,
        gen_len=canvas.gen_len,
        block=config.block,
        num_blocks=config.num_blocks,
        steps_per_block=config.steps_per_block,
        mask_token_id=mc.mask_token_id,
        pad_token_id=mc.pad_token_id,
        eos_token_id=mc.eos_token_id,
        record_history=record_history,
        report_blocks=report_blocks and config.num_blocks > 1,
        # One block is the whole answer: report inside it instead, at most PROGRESS_REPORTS times.
        report_every_steps=(
            max(1, config.steps_per_block // PROGRESS_REPORTS)
            if report_blocks and config.num_blocks == 1
            else 0
        ),
    )


def _knobs(config: SamplingConfig) -> Knobs:
    f32 = jnp.float32
    return Knobs(
        ratios_U=jnp.asarray(transfer_ratios(config.eps, config.steps_per_block)),
        temperature=jnp.asarray(config.temperature or 1.0, f32),
        top_p=jnp.asarray(config.top_p or 1.0, f32),
        alg_temp=jnp.asarray(config.alg_temp or 1.0, f32),
        threshold=jnp.asarray(config.threshold or 1.0, f32),
        top_k=jnp.asarray(config.top_k or 1, jnp.int32),
    )


Rng = jax.Array | int | None


def row_keys(seeds: Sequence[int], streams: Sequence[int] | None = None) -> jax.Array:
    """One PRNG key per row: row b draws from key(seeds[b]) folded with streams[b] (e.g. the
    choice index of an `n > 1` request). Rows given the same (seed, stream) draw the same numbers
    wherever they sit in a batch."""
    streams = [0] * len(seeds) if streams is None else streams
    if len(streams) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(streams)} streams")
    seeds_B = jnp.asarray(np.asarray(seeds, np.uint32))
    streams_B = jnp.asarray(np.asarray(streams, np.uint32))
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_B, streams_B)


def _as_row_keys(rng: Rng, batch: int) -> jax.Array:
    """Per-row keys: `rng` may already be one key per row ([batch]); one key or an int seed is
    split into `batch` keys (row b's draws then depend on b, not on the other rows' contents)."""
    if rng is None:
        rng = 0
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    if rng.ndim == 1 and rng.shape[0] == batch:
        return rng
    if rng.ndim != 0:
        raise ValueError(f"rng must be one key or one key per row ({batch}), got shape {rng.shape}")
    return jax.random.split(rng, batch)


def _run(
    model: nnx.Module,
    canvas: Canvas,
    config: SamplingConfig,
    rng: Rng,
    *,
    stop_at_eos: bool,
    model_config: ModelConfig,
    record_history: bool,
    report_blocks: bool = False,
) -> GenerateOutput:
    graphdef, state = nnx.split(model)
    plan = _plan(
        config, canvas, model_config, stop_at_eos=stop_at_eos, record_history=record_history,
        report_blocks=report_blocks,
    )  # fmt: skip
    tokens_BxT, full, block, history = decode(
        graphdef,
        plan,
        state,
        jnp.asarray(canvas.tokens_BxT),
        jnp.asarray(canvas.segment_ids_BxT),
        jnp.asarray(canvas.positions_BxT),
        _knobs(config),
        _as_row_keys(rng, canvas.tokens_BxT.shape[0]),
    )
    tokens_BxT = np.asarray(tokens_BxT)
    lo, n = canvas.gen_start, canvas.gen_len
    if history is not None:
        history = np.asarray(history).copy()
        previous = canvas.tokens_BxT[:, lo : lo + n]
        for s in range(history.shape[0]):
            if history[s, 0, 0] == -1:
                history[s] = previous
            previous = history[s]
    return GenerateOutput(
        tokens_BxT=tokens_BxT,
        generated_BxN=tokens_BxT[:, lo : lo + n],
        prompt_lengths_B=canvas.prompt_lengths_B,
        gen_start=lo,
        num_steps_used=int(full) + int(block),
        num_full_forwards=int(full),
        num_block_forwards=int(block),
        history_UxBxN=history,
    )


def _model_config(model: nnx.Module, model_config: ModelConfig | None) -> ModelConfig:
    mc = model_config or getattr(model, "config", None)
    if not isinstance(mc, ModelConfig):
        raise TypeError("pass model_config= (the model carries no ModelConfig in .config)")
    return mc


def compile_generate(
    model: nnx.Module,
    config: SamplingConfig,
    batch: int,
    prompt_len: int,
    *,
    model_config: ModelConfig | None = None,
    report_blocks: bool = False,
) -> None:
    """Compile (without running) the program `generate` uses for `batch` prompts padded to
    `prompt_len` columns: a later call with those shapes finds it compiled."""
    mc = _model_config(model, model_config)
    canvas = build_canvas(
        [[mc.pad_token_id] * prompt_len] * batch, config.max_new_tokens, model_config=mc,
        pad_to_multiple_of=prompt_len,
    )  # fmt: skip
    graphdef, state = nnx.split(model)
    plan = _plan(config, canvas, mc, stop_at_eos=config.stop_at_eos, report_blocks=report_blocks)
    decode.lower(
        graphdef, plan, state, jnp.asarray(canvas.tokens_BxT),
        jnp.asarray(canvas.segment_ids_BxT), jnp.asarray(canvas.positions_BxT), _knobs(config),
        _as_row_keys(0, batch),
    ).compile()  # fmt: skip


def generate(
    model: nnx.Module,
    prompt_ids: TokenRows,
    config: SamplingConfig,
    rng: Rng = None,
    *,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    pad_to_multiple_of: int = 16,
    model_config: ModelConfig | None = None,
    record_history: bool = False,
    report_blocks: bool = False,
) -> GenerateOutput:
    """Generate `config.max_new_tokens` tokens after each prompt.

    With `report_blocks` (and several blocks) each finished block goes to the current
    `block_listener` while the program runs (see `decode`).

    `prompt_ids` is a list of token-id lists (any lengths), or a 2-D array whose row b holds its
    prompt in the first `prompt_lengths[b]` columns (all columns when `prompt_lengths` is None).
    Rows are left-padded to a multiple of `pad_to_multiple_of` (a compile-shape bucket); pads are
    invisible, so a row's tokens do not depend on its batch-mates or on the bucket.
    """
    mc = _model_config(model, model_config)
    prompts = _rows(prompt_ids, prompt_lengths, "prompt")
    canvas = build_canvas(
        prompts, config.max_new_tokens, model_config=mc, pad_to_multiple_of=pad_to_multiple_of
    )
    return _run(
        model,
        canvas,
        config,
        rng,
        stop_at_eos=config.stop_at_eos,
        model_config=mc,
        record_history=record_history,
        report_blocks=report_blocks,
    )


def infill(
    model: nnx.Module,
    prefix_ids: TokenRows,
    suffix_ids: TokenRows,
    n_tokens: int,
    config: SamplingConfig,
    rng: Rng = None,
    *,
    pad_to_multiple_of: int = 16,
    model_config: ModelConfig | None = None,
    record_history: bool = False,
) -> GenerateOutput:
    """Fill `n_tokens` masks between each prefix and suffix; prefix and suffix come back unchanged.

    `config.max_new_tokens` is replaced by `n_tokens` (block_length must still divide it). Early stop
    at eos does not apply (the suffix follows the hole). A `prefix` cache would hide the suffix from
    a block's later steps, so only `none` and `dual` are accepted.
    """
    if config.cache == "prefix":
        raise ValueError("infill needs cache='none' or 'dual': a prefix cache hides the suffix")
    config = SamplingConfig.model_validate({**config.model_dump(), "max_new_tokens": n_tokens})
    mc = _model_config(model, model_config)
    prefixes = _rows(prefix_ids, None, "prefix")
    suffixes = _rows(suffix_ids, None, "suffix")
    canvas = build_canvas(
        prefixes,
        n_tokens,
        model_config=mc,
        suffixes=suffixes,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return _run(
        model,
        canvas,
        config,
        rng,
        stop_at_eos=False,
        model_config=mc,
        record_history=record_history,
    )
