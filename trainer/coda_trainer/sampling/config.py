"""`SamplingConfig`: every knob of the diffusion sampler, validated at the boundary.

Names follow Dream/CoDA's `DLMGenerationConfig` (steps, max_new_tokens, eps, temperature, top_p,
top_k, alg, alg_temp) so settings copied from the release mean the same thing here; the options
beyond the release (block_length, threshold, cache, stop_at_eos) are off by default, which makes the
defaults reproduce the release's `diffusion_generate` exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

Alg = Literal["origin", "maskgit_plus", "topk_margin", "entropy"]
CacheMode = Literal["none", "prefix", "dual"]


class SamplingConfig(BaseModel):
    """How to turn `max_new_tokens` masks into text.

    Attributes (see the package docstring for each option's effect on speed and output):
        steps: denoising steps (model forwards) over the whole generation; with `block_length` they
            are split evenly across blocks; with `threshold` they are an upper bound.
        max_new_tokens: masks appended after the prompt (the generation length is fixed up front).
        eps: the last timestep; timesteps are linspace(1, eps, steps + 1) as in Dream.
        temperature: 0 = greedy (argmax), > 0 samples each position's token.
        top_p, top_k: nucleus / top-k filtering of each position's distribution (None = off).
        alg: which masked positions to reveal: `origin` (each with probability 1 - s/t),
            `maskgit_plus` (highest p(x0)), `topk_margin` (highest p1 - p2), `entropy` (lowest
            entropy).
        alg_temp: 0/None = reveal the k most confident; > 0 = draw the k positions without
            replacement from softmax(confidence / alg_temp).
        block_length: None = the whole generation is one block (Dream); otherwise semi-
            autoregressive blocks of this many tokens, decoded left to right (LLaDA).
        threshold: None = schedule only; τ = also reveal every masked position of the current
            block whose p(x0) ≥ τ (Fast-dLLM's confidence-threshold parallel decoding).
        cache: `none`, `prefix` (reuse keys/values of everything left of the current block) or
            `dual` (also those right of it); refreshed once per block.
        stop_at_eos: finish a row once it holds an eos with no mask before it (rest = pad).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )

    steps: int = Field(default=128, ge=1)
    max_new_tokens: int = Field(default=128, ge=1)
    eps: float = Field(default=1e-3, gt=0.0, lt=1.0)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    alg: Alg = "entropy"
    alg_temp: float | None = Field(default=None, ge=0.0)
    block_length: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    cache: CacheMode = "none"
    stop_at_eos: bool = False

    @field_validator("alg", mode="before")
    @classmethod
    def _alias_alg(cls, v: object) -> object:
        # The release's generation_config.json says "original" for Dream's "origin".
        return "origin" if v == "original" else v

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        block = self.block_length or self.max_new_tokens
        if self.max_new_tokens % block:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be a multiple of block_length ({block})"
            )
        num_blocks = self.max_new_tokens // block
        if self.steps % num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks ({num_blocks} = "
                f"max_new_tokens {self.max_new_tokens} / block_length {block})"
            )
        if self.threshold is not None and self.alg == "origin":
            raise ValueError("threshold decoding needs a confidence alg, not 'origin'")
        return self

    # ---- derived quantities the sampler uses ----

    @property
    def block(self) -> int:
        return self.block_length or self.max_new_tokens

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sample_positions(self) -> bool:
        return bool(self.alg_temp)
