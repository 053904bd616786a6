"""The serving engine: request settings → sampler configs and shape buckets → batched model calls.

Shapes. A model call is compiled per (sampling plan, batch size, canvas length). To keep the set of
programs small and compiled before traffic arrives, every call is padded into buckets:
- batch: the next of `batch_buckets` (filler rows repeat the first row; their output is dropped);
- prompt length: the next of `prompt_buckets` (left padding, invisible to the model);
- new tokens: `max_tokens` is rounded up to the next of `gen_buckets` and the answer is cut back to
  `max_tokens` (a diffusion model fixes its canvas up front; the first `max_tokens` tokens of a
  longer canvas are what the caller gets). Infill is the exception: the hole has exactly
  `max_tokens` masks, since the text must join the suffix.
Randomness is per row: each row carries its request's seed (a fresh random one when the request
names none) and its choice index, and draws only from the key those two make
(`sampling.row_keys`); so a seeded request gets the same text alone, among any batch-mates, at any
row. Different shape buckets compile different programs, whose float rounding may differ: a
near-tie between two tokens can then break differently (greedy or sampled alike).
Compile keys. A program is compiled per (kind, Plan, shapes). Everything numeric a request sets is
traced (temperature, top_p, top_k, alg_temp, threshold, seed), so the request-controlled part of a
Plan is a finite set: alg (4) × greedy or sampled × top_p on/off × top_k on/off × alg_temp on/off ×
threshold on/off × block_length (a divisor of the gen bucket) × cache (none, prefix, dual) × steps
per block (a power of two up to the block's tokens: a request's steps are rounded up to it, never
down) — times the buckets. A `preset` only chooses among those (steps, block_length, threshold,
cache), so it adds no compile keys of its own.
Warm-up compiles (does not run) the default settings' programs: first every batch bucket of the
default generation length at the smallest prompt bucket, after which the server is ready, then the
other buckets in the background, one program at a time between batches (`warmup_programs`).
Requests with other sampling settings compile on first use (numeric knobs never recompile).

`Generator` is the seam between batching and the sampler: `SamplerGenerator` drives
`coda_trainer.sampling` on an in-process model.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from coda_trainer.config import SamplerSettings, resolve_sampler_settings
from coda_trainer.sampling import SamplingConfig
from coda_trainer.serve.schemas import SamplingParams

__all__ = [
    "Engine",
    "EngineError",
    "GenKey",
    "Generator",
    "SamplerGenerator",
    "SamplingDefaults",
    "ServeSettings",
    "Shapes",
    "WarmupAbandoned",
    "bucket_for",
    "request_seed",
]


class EngineError(ValueError):
    """A request the engine cannot serve (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class WarmupAbandoned(RuntimeError):
    """The server began stopping during warm-up; the remaining buckets were not compiled."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The padded shape of one model call."""

    batch: int
    prompt: int  # prompt (infill: prefix and suffix each) columns
    gen: int  # masks


# Each row's randomness: (seed, stream); stream = the row's choice index within its request.
RowSeed = tuple[int, int]


class Generator(Protocol):
    """Runs one padded batch. Returns the generated ids of each row (len = shapes.gen)."""

    def generate(
        self, prompts: Sequence[list[int]], config: SamplingConfig, shapes: Shapes,
        seeds: Sequence[RowSeed],
    ) -> list[list[int]]: ...  # fmt: skip

    def infill(
        self, prefixes: Sequence[list[int]], suffixes: Sequence[list[int]], config: SamplingConfig,
        shapes: Shapes, seeds: Sequence[RowSeed],
    ) -> list[list[int]]: ...  # fmt: skip

    def compile(self, config: SamplingConfig, shapes: Shapes) -> None:
        """Compile the generate program for these shapes without running it (warm-up)."""


# The server's defaults are the shared settings model (a request overrides each knob; a preset,
# the server's or the request's, sets four at once): see coda_trainer.config.SamplerKnobs.
SamplingDefaults = SamplerSettings


def _powers_of_two_upto(n: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return (*out, n)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model_name: str = "coda"
    # Other names a request's `model` may use (the project's own clients send "coda" by default;
    # in a cluster the run's name, which `coda-ctl sample` sends, is added).
    model_aliases: tuple[str, ...] = ("coda",)
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 1024
    prompt_buckets: tuple[int, ...] = (128, 512, 1024)
    gen_buckets: tuple[int, ...] = (64, 128, 256, 512)
    batch_buckets: tuple[int, ...] | None = None  # None = powers of two up to max_batch
    default_max_tokens: int = 128
    max_steps: int = 1024
    defaults: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)
    warmup: bool = True
    # Bounds on what one request may ask for (denial of service): the request body's size (413)
    # and its rows, prompts × n (400).
    max_body_bytes: int = 4 * 1024 * 1024
    max_request_rows: int = 64

    def __post_init__(self) -> None:
        for name in ("prompt_buckets", "gen_buckets"):
            b = getattr(self, name)
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise ValueError(f"{name} must be increasing positive integers, got {b}")
        if self.batch_buckets is not None and (max(self.batch_buckets) != self.max_batch):
            raise ValueError("the largest batch bucket must equal max_batch")
        if not 1 <= self.default_max_tokens <= self.gen_buckets[-1]:
            raise ValueError("default_max_tokens must lie within the largest gen bucket")

    def check_positions(self, max_positions: int) -> None:
        """Every generation canvas (largest prompt bucket + largest gen bucket) must fit the
        model's positions; raises ValueError saying which flags to change."""
        longest = self.prompt_buckets[-1] + self.gen_buckets[-1]
        if longest > max_positions:
            raise ValueError(
                f"the largest prompt bucket ({self.prompt_buckets[-1]}) plus the largest "
                f"generation bucket ({self.gen_buckets[-1]}) is {longest} positions; the model has "
                f"{max_positions} (max_position_embeddings): lower --prompt-buckets or "
                "--gen-buckets"
            )

    @property
    def served_names(self) -> frozenset[str]:
        return frozenset((self.model_name, *self.model_aliases))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (
            tuple(sorted(self.batch_buckets))
            if self.batch_buckets
            else _powers_of_two_upto(self.max_batch)
        )


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in buckets if b >= n), None)


# A batch key: the call kind and the exact SamplingConfig (hashable, frozen). Seeds are per row.
GenKey = tuple[Literal["generate", "infill"], SamplingConfig]


def request_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one (unseeded requests must not all draw alike)."""
    return secrets.randbits(31) if seed is None else seed


@dataclasses.dataclass(frozen=True)
class Row:
    prompt: list[int]  # generate: prompt ids; infill: prefix ids
    suffix: list[int] | None = None
    seed: RowSeed = (0, 0)
    # Streaming: receives the row's settled tokens (a growing prefix of its answer) after each
    # finished block of a block-decoding generation; called on a runtime thread, must not block.
    on_settled: Callable[[list[int]], None] | None = None


class Engine:
    """Tokenizer + generator + settings; `run_batch` is the batcher's runner (worker thread)."""

    def __init__(
        self,
        generator: Generator,
        tokenizer: Any,
        settings: ServeSettings,
        *,
        eos_ids: Sequence[int] = (),
        max_positions: int | None = None,
    ):
        self.generator = generator
        self.max_positions = max_positions
        self.tokenizer = tokenizer
        self.settings = settings
        self.stop_ids = {tokenizer.eos_id, tokenizer.pad_id, *eos_ids}
        self.ready = False
        self.warmup_seconds: float | None = None
        # Set when the server starts stopping: warm-up checks it between programs (one XLA
        # compile cannot be interrupted, so a stop waits for at most the program in flight).
        self.stop_warmup = threading.Event()
        self.on_batch_tokens: Any = lambda rows, seconds, tokens: None

    # ---- request → config ----

    @property
    def max_prompt_tokens(self) -> int:
        return self.settings.prompt_buckets[-1]

    @property
    def max_new_tokens(self) -> int:
        return self.settings.gen_buckets[-1]

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """The longest token's text (byte-level tokens: one character per byte, so a text of c
        characters has at least c / this many tokens)."""
        tok = self.tokenizer
        return max(len(tok.id_to_token(i) or "") for i in range(tok.vocab_size)) or 1

    def check_prompt_text(self, text: str, param: str = "prompt") -> None:
        """Reject a text that cannot fit before tokenizing it (tokenizing megabytes takes seconds)."""
        if len(text) > self.max_prompt_tokens * self.max_chars_per_token:
            raise EngineError(
                f"the prompt has {len(text)} characters, so more than {self.max_prompt_tokens} "
                f"tokens, the most this server accepts", param, "context_length_exceeded",
            )  # fmt: skip

    def check_rows(self, rows: int) -> None:
        if rows > self.settings.max_request_rows:
            raise EngineError(
                f"this request asks for {rows} generations (prompts × n); this server accepts "
                f"at most {self.settings.max_request_rows} per request", "n",
            )  # fmt: skip

    def check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise EngineError("the prompt encodes to no tokens", param)
        if len(ids) > self.max_prompt_tokens:
            raise EngineError(
                f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}",
                param, "context_length_exceeded",
            )  # fmt: skip
        vocab = self.tokenizer.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise EngineError(f"token ids must be integers in [0, {vocab})", param)

    def sampling_config(
        self, p: SamplingParams, n_tokens: int, *, infill: bool = False
    ) -> SamplingConfig:
        """The SamplingConfig for a request; `n_tokens` = masks in the canvas."""
        d = resolve_sampler_settings(self.settings.defaults, p)
        block = d.block_length
        if infill:
            block = None if block is None or n_tokens % block else block
        elif block is not None:
            block = min(block, n_tokens)
            if n_tokens % block:
                raise EngineError(
                    f"block_length {block} must divide the generation length {n_tokens} "
                    f"(max_tokens is rounded up to one of {list(self.settings.gen_buckets)})",
                    "block_length",
                )  # fmt: skip
        steps = d.steps or n_tokens
        if steps > self.settings.max_steps:
            raise EngineError(f"steps must be <= {self.settings.max_steps}", "steps")
        # A step reveals at least one token per block at the schedule's end, so more steps than
        # masks only repeat forwards; and steps must split evenly across blocks.
        num_blocks = n_tokens // (block or n_tokens)
        per_block = -(-max(1, min(steps, n_tokens)) // num_blocks)
        # Steps per block are compiled in: rounded up to a power of two (capped at the block's
        # tokens) they take few values, so no client can force a compile per step count.
        per_block = min(1 << (per_block - 1).bit_length(), n_tokens // num_blocks)
        steps = per_block * num_blocks
        cache = d.cache
        if infill and cache == "prefix":
            cache = "dual"
        try:
            return SamplingConfig(
                steps=steps,
                max_new_tokens=n_tokens,
                temperature=d.temperature,
                top_p=d.top_p,
                top_k=d.top_k,
                alg=d.alg,
                alg_temp=d.alg_temp,
                block_length=block,
                threshold=d.threshold,
                cache=cache,
                stop_at_eos=not infill,
            )
        except ValueError as e:
            raise EngineError(f"invalid sampling settings: {e}", None) from e

    def gen_bucket(self, max_tokens: int) -> int:
        b = bucket_for(max_tokens, self.settings.gen_buckets)
        if b is None:
            raise EngineError(f"max_tokens must be <= {self.max_new_tokens}", "max_tokens")
        return b

    def generate_key(self, p: SamplingParams, max_tokens: int) -> GenKey:
        return ("generate", self.sampling_config(p, self.gen_bucket(max_tokens)))

    def infill_key(self, p: SamplingParams, n_tokens: int) -> GenKey:
        if n_tokens > self.max_new_tokens:
            raise EngineError(f"max_tokens must be <= {self.max_new_tokens}", "max_tokens")
        return ("infill", self.sampling_config(p, n_tokens, infill=True))

    def check_infill_fits(self, prefix: list[int], suffix: list[int], n_tokens: int) -> None:
        """An infill canvas is [bucket | hole | bucket], the bucket of the longer of prefix and
        suffix (a batch-mate's suffix pads a suffix-less row's too): it may pass the model's
        positions where a generation of the same prompt does not."""
        if self.max_positions is None:
            return
        bucket = bucket_for(max(len(prefix), len(suffix)), self.settings.prompt_buckets) or 0
        total = 2 * bucket + n_tokens
        if total > self.max_positions:
            raise EngineError(
                f"prefix and suffix (each padded to {bucket} tokens) plus {n_tokens} new tokens "
                f"need {total} positions; the model has {self.max_positions}",
                "suffix", "context_length_exceeded",
            )  # fmt: skip

    # ---- batches (worker thread) ----

    def shapes_for(self, key: GenKey, rows: Sequence[Row]) -> Shapes:
        _kind, config = key
        longest = max(max(len(r.prompt), len(r.suffix or [])) for r in rows)
        prompt = bucket_for(longest, self.settings.prompt_buckets)
        batch = bucket_for(len(rows), self.settings.batch_sizes)
        if prompt is None or batch is None:
            raise EngineError("batch does not fit the configured buckets")
        return Shapes(batch=batch, prompt=prompt, gen=config.max_new_tokens)

    def run_batch(self, key: Hashable, rows: Sequence[Row]) -> list[list[int]]:
        kind, config = key  # type: ignore[misc]
        shapes = self.shapes_for(key, rows)  # type: ignore[arg-type]
        padded = list(rows) + [rows[0]] * (shapes.batch - len(rows))
        seeds = [r.seed for r in padded]
        start = time.monotonic()
        if kind == "generate":
            with _settled_tokens_to(rows, self.tokenizer.mask_id):
                out = self.generator.generate([r.prompt for r in padded], config, shapes, seeds)
        else:
            out = self.generator.infill(
                [r.prompt for r in padded], [r.suffix or [] for r in padded], config, shapes, seeds
            )
        out = [list(map(int, o)) for o in out[: len(rows)]]
        tokens = sum(len(self.cut_at_stop(o)) for o in out)
        self.on_batch_tokens(len(rows), time.monotonic() - start, tokens)
        return out

    def cut_at_stop(self, ids: Sequence[int]) -> list[int]:
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return list(ids[:cut])

    def warmup_programs(self) -> tuple[list[Shapes], list[Shapes]]:
        """(first, rest): the shapes compiled before the server turns ready — every batch bucket
        of the default generation length at the smallest prompt bucket — and the others, compiled
        in the background while it serves."""
        st = self.settings
        default_gen = self.gen_bucket(st.default_max_tokens)
        every = [
            Shapes(batch, prompt, gen)
            for gen in st.gen_buckets
            for prompt in st.prompt_buckets
            for batch in st.batch_sizes
        ]
        first = [s for s in every if s.gen == default_gen and s.prompt == st.prompt_buckets[0]]
        return first, [s for s in every if s not in first]

    def compile_program(self, shapes: Shapes) -> None:
        """Compile (not run) the default settings' program for `shapes`. Raises WarmupAbandoned
        once `stop_warmup` is set (checked before each program: one compile cannot be stopped)."""
        if self.stop_warmup.is_set():
            raise WarmupAbandoned("the server is stopping")
        _, config = self.generate_key(SamplingParams(), shapes.gen)
        self.generator.compile(config, shapes)


def _settled_tokens_to(rows: Sequence[Row], mask_token_id: int) -> Any:
    """While a generation runs: each row's settled tokens (the run of revealed tokens from the
    start of its answer, which never change) to the rows that stream, at every progress report."""
    from coda_trainer import sampling

    listeners = [(i, r.on_settled) for i, r in enumerate(rows) if r.on_settled is not None]
    if not listeners:
        return sampling.block_listener(None)

    def deliver(_block: int, gen_BxN: np.ndarray) -> None:
        for i, on_settled in listeners:
            masks = np.flatnonzero(gen_BxN[i] == mask_token_id)
            upto = int(masks[0]) if masks.size else gen_BxN.shape[1]
            on_settled(gen_BxN[i, :upto].tolist())

    return sampling.block_listener(deliver)


class SamplerGenerator:
    """`Generator` over `coda_trainer.sampling` and an in-process model. Its programs report
    progress (each finished block; a whole-sequence generation up to 16 times inside its one
    block) and the server streams from the reports."""

    def __init__(self, model: Any, model_config: Any):
        self.model = model
        self.model_config = model_config

    def generate(
        self, prompts: Sequence[list[int]], config: SamplingConfig, shapes: Shapes,
        seeds: Sequence[RowSeed],
    ) -> list[list[int]]:  # fmt: skip
        from coda_trainer import sampling

        assert len(prompts) == shapes.batch and max(map(len, prompts)) <= shapes.prompt
        # pad_to_multiple_of = the bucket makes the canvas exactly `shapes.prompt` columns of prompt.
        out = sampling.generate(
            self.model, [list(p) for p in prompts], config, _keys(seeds),
            pad_to_multiple_of=shapes.prompt, model_config=self.model_config, report_blocks=True,
        )  # fmt: skip
        return np.asarray(out.generated_BxN).tolist()

    def compile(self, config: SamplingConfig, shapes: Shapes) -> None:
        from coda_trainer import sampling

        sampling.compile_generate(
            self.model, config, shapes.batch, shapes.prompt, model_config=self.model_config,
            report_blocks=True,
        )  # fmt: skip

    def infill(
        self, prefixes: Sequence[list[int]], suffixes: Sequence[list[int]], config: SamplingConfig,
        shapes: Shapes, seeds: Sequence[RowSeed],
    ) -> list[list[int]]:  # fmt: skip
        from coda_trainer import sampling

        out = sampling.infill(
            self.model, [list(p) for p in prefixes], [list(s) for s in suffixes], config.max_new_tokens,
            config, _keys(seeds), pad_to_multiple_of=shapes.prompt, model_config=self.model_config,
        )  # fmt: skip
        return np.asarray(out.generated_BxN).tolist()


def _keys(seeds: Sequence[RowSeed]) -> Any:
    from coda_trainer import sampling

    return sampling.row_keys([s for s, _ in seeds], [i for _, i in seeds])
