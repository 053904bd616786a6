"""Typed configuration shared by the trainer, the operator and the CLI.

This module is the single source of truth for what a model, a stage and a training job look like.
The operator's CRD schema is generated from these models, so it must import nothing heavier than
pydantic (the operator image installs no JAX).

Field names are snake_case in Python; every model also accepts and emits camelCase aliases, so the
same class reads the trainer's own YAML and a Kubernetes object's spec.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from coda_trainer import contract

__all__ = [
    "MAX_NEW_TOKENS",
    "PRESETS",
    "SAMPLER_BUILTIN",
    "SAMPLER_PRESETS",
    "SAMPLER_PRESET_KNOBS",
    "BatchConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataSource",
    "EvalConfig",
    "MaskingConfig",
    "MaskingProbs",
    "MeshConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimizerConfig",
    "SFTConfig",
    "SamplerDefaults",
    "SamplerKnobs",
    "SamplerPreset",
    "SamplerSettings",
    "StageConfig",
    "StrictModel",
    "TrainJobConfig",
    "add_sampler_flags",
    "load_job_config",
    "resolve_sampler_settings",
    "sampler_flag",
    "sampler_settings_from_args",
]


class ConfigError(contract.PermanentError):
    """The job cannot run as configured (exit 78: retrying the same config fails the same way)."""


class StrictModel(BaseModel):
    """Base for every config model: unknown fields are errors, camelCase and snake_case both accepted."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        protected_namespaces=(),
    )

    def to_yaml_dict(self, *, by_alias: bool = False) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=by_alias, exclude_none=True)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "minimal"]
DType = Literal["float32", "bfloat16"]


class ModelConfig(StrictModel):
    """Architecture of a Qwen3-style transformer, bidirectional by default (CoDA)."""

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    rope_theta: float = Field(default=1_000_000.0, gt=0)
    max_position_embeddings: int = Field(default=40960, gt=0)
    tie_word_embeddings: bool = False
    causal: bool = False
    # Special token ids; the presets use Qwen3's, the embedded default uses the project tokenizer's.
    mask_token_id: int = Field(default=151669, ge=0)
    pad_token_id: int = Field(default=151643, ge=0)
    eos_token_id: int = Field(default=151645, ge=0)
    bos_token_id: int = Field(default=151643, ge=0)
    # Numerics and performance switches: they change speed and memory, never the function computed.
    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"
    attention: AttentionImpl = "auto"
    remat: RematPolicy = "none"
    scan_layers: bool = True
    initializer_range: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside vocab_size={self.vocab_size}"
                )
        return self

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
        return cls(**{**base.model_dump(), **overrides})

    # ---- parameter and FLOP counts (used by MFU reporting and the benchmarks) ----

    def num_params(self, *, include_embedding: bool = True) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * hd * d + 2 * hd
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        body = self.num_layers * per_layer + d
        head = self.vocab_size * d
        emb = 0 if self.tie_word_embeddings else self.vocab_size * d
        return body + head + (emb if include_embedding else 0)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward+backward FLOPs per token, counting full (bidirectional) attention.

        6·N for the matmuls (embedding lookups excluded) plus 12·L·S·H·hd for attention scores and
        values, not halved: the model attends to the whole sequence.
        """
        n = self.num_params(include_embedding=False)
        attn = 12 * self.num_layers * seq_len * self.num_heads * self.head_dim
        return 6.0 * n + attn


_QWEN3_1P7B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)

# Project tokenizer (trainer/coda_trainer/assets/tokenizer): specials take the first ids.
PROJECT_TOKENIZER_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=2, mask_token_id=3)
PROJECT_VOCAB_SIZE = 4096

PRESETS: dict[str, ModelConfig] = {
    "coda-1.7b": ModelConfig(**_QWEN3_1P7B, causal=False),
    "qwen3-1.7b": ModelConfig(**{**_QWEN3_1P7B, "tie_word_embeddings": True}, causal=True),
    # ~100M parameters with the Qwen3 vocabulary: CPU benchmarks.
    "coda-100m": ModelConfig(
        vocab_size=151936,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # The embedded default: trains on 2 CPU cores in minutes with the project tokenizer. Four
    # unrolled layers compile in seconds and step ≈15% faster than a scan on XLA:CPU.
    "coda-tiny": ModelConfig(
        vocab_size=PROJECT_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        dtype="float32",
        scan_layers=False,
        **PROJECT_TOKENIZER_IDS,
    ),
    # Unit tests: a few thousand parameters, f32 so comparisons are exact to 1e-5.
    "test-micro": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        dtype="float32",
        mask_token_id=255,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=0,
    ),
}


class ModelSpec(StrictModel):
    """What to build: a preset, field overrides, and optionally weights to start from."""

    preset: str = Field(
        default="coda-1.7b",
        description="Model architecture preset (coda-1.7b is the paper's Qwen3-1.7B backbone; "
        "tiny presets are for tests and local runs).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="ModelConfig fields that replace the preset's values, e.g. {num_layers: 4, remat: full}; "
        "the result is validated like a preset.",
    )
    init_from: str | None = Field(
        default=None,
        description="Weights the first stage starts from (unless it sets its own initFrom; later "
        "stages start from the previous stage's final): a Hugging Face folder or an orbax step "
        "directory, local or gs://. Unset: random initialisation.",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown model preset {v!r}; known: {sorted(PRESETS)}")
        return v

    def resolve(self) -> ModelConfig:
        return ModelConfig(**{**PRESETS[self.preset].model_dump(), **self.overrides})


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------

URI_PATTERN = re.compile(r"^(gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?|[^:]+)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")


def check_uri(uri: str) -> str:
    """Accept a local path or a well-formed gs:// URI (bucket naming rules); reject other schemes."""
    if "://" in uri and not uri.startswith("gs://"):
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or gs://bucket/path")
    if not URI_PATTERN.match(uri):
        raise ValueError(
            f"malformed URI {uri!r}: gs:// URIs need a valid bucket name (gs://bucket/path)"
        )
    return uri


class BatchConfig(StrictModel):
    sequences: int = Field(gt=0, description="Global batch size in sequences per optimizer step.")
    seq_len: int = Field(gt=1, le=1 << 20, description="Tokens per sequence.")
    grad_accum: int = Field(
        default=1, gt=0, description="Micro-batches accumulated per optimizer step."
    )
    readers: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Data readers that fill the global batch: reader j reads its own share of every "
            "source's files (or documents) and fills rows [j*sequences/readers, "
            "(j+1)*sequences/readers). Default: one reader per JAX process. A fixed number keeps "
            "the global batch the same whatever the number of hosts (each process runs "
            "readers/processes of them); it must be a multiple of the process count and divide "
            "sequences/grad_accum."
        ),
    )

    @model_validator(mode="after")
    def _divisible(self) -> BatchConfig:
        if self.sequences % self.grad_accum:
            raise ValueError(
                f"batch.sequences ({self.sequences}) must be divisible by batch.grad_accum ({self.grad_accum})"
            )
        if self.readers is not None and (self.sequences // self.grad_accum) % self.readers:
            raise ValueError(
                f"batch.sequences/grad_accum ({self.sequences // self.grad_accum}) must be "
                f"divisible by batch.readers ({self.readers})"
            )
        return self


class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adafactor"] = Field(
        default="adamw",
        description="Optimizer (optax). adafactor is what CoDA pre-trained with (factored second "
        "moments, no momentum unless `momentum` is set); adamw for mid-training and SFT.",
    )
    peak_lr: float = Field(
        default=3e-4,
        gt=0,
        description="Learning rate at the end of warmup, the schedule's maximum (e.g. 3e-4).",
    )
    end_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Final lr as a fraction of peak."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="cosine",
        description="Decay after warmup, from peakLr to peakLr × endLrRatio at the stage's last "
        "step (constant: no decay).",
    )
    warmup_steps: int | None = Field(
        default=None,
        ge=0,
        description="Linear warmup from 0 to peakLr over this many steps (capped at the stage's "
        "steps). Unset with warmupRatio unset: no warmup.",
    )
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Warmup as a fraction of the stage's steps (0.01 = the first 1%); the "
        "alternative to warmupSteps.",
    )
    weight_decay: float = Field(
        default=0.0, ge=0, description="Decoupled weight decay coefficient (0: none)."
    )
    b1: float = Field(
        default=0.9, ge=0, lt=1, description="AdamW first-moment decay (β1); unused by adafactor."
    )
    b2: float = Field(
        default=0.95,
        ge=0,
        lt=1,
        description="AdamW second-moment decay (β2); adafactor uses a fixed decay rate of 0.8.",
    )
    eps: float = Field(
        default=1e-8,
        gt=0,
        description="AdamW ε added to the second-moment root for stability; unused by adafactor.",
    )
    clip_norm: float | None = Field(
        default=1.0,
        gt=0,
        description="Clip gradients to this global L2 norm before the update; null: no clipping.",
    )
    # CoDA pre-trained with Adafactor without momentum; set a value to add first-moment momentum.
    momentum: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Adafactor first-moment momentum (β1); unset keeps the paper's momentum-free "
        "Adafactor. Ignored by adamw (use b1).",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimizerConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set optimizer.warmup_steps or optimizer.warmup_ratio, not both")
        return self

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        if self.warmup_ratio is not None:
            return int(self.warmup_ratio * total_steps)
        return 0


class DataSource(StrictModel):
    uri: str = Field(description="File, directory or glob; local or gs://.")
    weight: float = Field(
        default=1.0,
        gt=0,
        description="Relative share of this source in the mixture: of tokens in pre/mid-training, "
        "of examples in SFT (weights need not sum to 1).",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "chat", "python"] = Field(
        default="auto",
        description="How files are read. auto: by extension (.jsonl/.json/.parquet; anything else "
        "is text, one document per file); chat: rows with `messages` or instruction/output (SFT).",
    )
    text_field: str = Field(
        default="text",
        description="JSONL key or Parquet column holding a document's text (jsonl/parquet formats).",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class MaskingProbs(StrictModel):
    """Per-sequence probabilities of the three masking strategies (paper §3, S1–S3)."""

    prefix_prob: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="S1 (paper Table 3), unmaskable prefix: the share of sequences whose random-"
        "length prefix is never masked and conditions the rest.",
    )
    truncate_prob: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="S2 (paper Table 3), truncated suffix: the share of sequences cut at a random "
        "position and padded (never on S1 rows; see strategyShares).",
    )
    block_prob: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="S3 (paper Table 3), block masking: the share of sequences masked in whole "
        "blocks (size drawn from blockSizes) instead of token by token.",
    )


# Paper Table 3 (mid-training): S1:S2:S3 per epoch.
PAPER_TABLE_3: tuple[MaskingProbs, ...] = tuple(
    MaskingProbs(prefix_prob=p, truncate_prob=t, block_prob=b)
    for p, t, b in [
        (0.01, 0.01, 0.05),
        (0.05, 0.05, 0.10),
        (0.10, 0.10, 0.15),
        (0.15, 0.15, 0.20),
        (0.20, 0.20, 0.25),
    ]
)


_DEFAULT_BLOCK_SIZES = (2, 4, 8)


class MaskingConfig(MaskingProbs):
    sampling_eps: float = Field(
        default=1e-3,
        gt=0,
        lt=1,
        description="ε, the smallest mask rate: each sequence's σ = (1−ε)·u + ε with u ~ U[0, 1).",
    )
    block_sizes: list[int] = Field(
        default_factory=lambda: list(_DEFAULT_BLOCK_SIZES),
        min_length=1,
        description="S3 block sizes in tokens; each block-masked sequence draws one uniformly.",
    )
    block_size_phases: list[list[int]] | None = Field(
        default=None,
        description=(
            "S3 block sizes by phase, e.g. [[2], [2, 4], [2, 4, 8]]: the stage's steps split into "
            "equal phases, phase i drawing its block size from entry i. Replaces the flat list."
        ),
    )
    curriculum: Literal["constant", "linear", "paper-table-3"] = Field(
        default="constant",
        description="How S1/S2/S3 change over the stage. constant: the probabilities above; "
        "linear: ramp to rampTo; paper-table-3: the paper's mid-training schedule (Table 3, "
        "five epochs from 1/1/5% to 20/20/25%).",
    )
    strategy_shares: Literal["paper", "release"] = Field(
        default="paper",
        description=(
            "What the S2 probability means; S1 and S2 are exclusive per row either way. paper: the "
            "share of all sequences cut (Table 3's 'proportion of sequences affected'), so S1 and "
            "S2 together may not exceed 1. release: the probability on rows without S1 (share "
            "truncate·(1−prefix), as SalesforceAIResearch/CoDA rolls it)."
        ),
    )
    # linear: probabilities move from the fields above to ramp_to over the stage's steps.
    ramp_to: MaskingProbs | None = Field(
        default=None,
        description="curriculum linear: S1/S2/S3 probabilities reached at the stage's last step.",
    )
    # paper-table-3: the stage's steps are split into this many equal "epochs".
    epochs: int = Field(
        default=5,
        gt=0,
        description="curriculum paper-table-3: equal step ranges the stage is split into, stepping "
        "through Table 3's rows (5 = the paper's five epochs).",
    )

    @field_validator("block_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"block sizes must be ≥ 1, got {v}")
        return v

    @field_validator("block_size_phases")
    @classmethod
    def _phases(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        if v is not None and (not v or any(not phase for phase in v)):
            raise ValueError(f"block_size_phases needs ≥ 1 phase, each with ≥ 1 size; got {v}")
        if v is not None and any(k < 1 for phase in v for k in phase):
            raise ValueError(f"block sizes must be ≥ 1, got {v}")
        return v

    @model_validator(mode="after")
    def _ramp(self) -> MaskingConfig:
        if self.curriculum == "linear" and self.ramp_to is None:
            raise ValueError("masking.curriculum=linear needs masking.ramp_to")
        if self.strategy_shares == "paper":
            for probs in (self, self.ramp_to):
                if probs is not None and probs.prefix_prob + probs.truncate_prob > 1.0:
                    raise ValueError(
                        "with masking.strategy_shares=paper, prefix_prob + truncate_prob are shares "
                        "of exclusive strategies and must not exceed 1, got "
                        f"{probs.prefix_prob} + {probs.truncate_prob}"
                    )
        # Compared with the default rather than "was it set": configs are dumped and re-validated
        # on their way to the trainer, and a dump spells the default out.
        if self.block_size_phases is not None and tuple(self.block_sizes) != _DEFAULT_BLOCK_SIZES:
            raise ValueError("give masking.block_sizes or masking.block_size_phases, not both")
        return self

    def all_block_sizes(self) -> tuple[int, ...]:
        """Every S3 block size the stage can draw (sorted): the static set the jitted step knows."""
        phases = self.block_size_phases or [self.block_sizes]
        return tuple(sorted({k for phase in phases for k in phase}))


PromptSpan = Literal["assistant-role", "generation-prompt"]


class SFTConfig(StrictModel):
    prompt_ramp_fraction: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description=(
            "Over this fraction of steps the unmaskable prompt span grows from 0 to the full prompt. "
            "0.1: the paper's first of 10 epochs; the release's config uses 0.05."
        ),
    )
    over_length: Literal["drop", "truncate"] = Field(
        default="drop",
        description="Examples longer than batch.seqLen: drop skips them, truncate cuts the answer "
        "to fit (a prompt that alone fills seqLen is dropped either way).",
    )
    prompt_span: PromptSpan = Field(
        default="assistant-role",
        description=(
            "Where the unmaskable prompt ends. assistant-role: through `<|im_start|>assistant`, the "
            "newline after it is maskable (SalesforceAIResearch/CoDA's src_mask; the paper says "
            "only 'the user prompt'). generation-prompt: through `<|im_start|>assistant\\n`."
        ),
    )
    loss_norm: Literal["tokens", "answer_length"] = Field(
        default="tokens",
        description="tokens: CoDA's Σ/(B·L); answer_length: LLaDA's per-example answer-length normalisation.",
    )


class CheckpointConfig(StrictModel):
    uri: str = Field(
        default="./checkpoints", description="Root for <uri>/<stage>/<step>/ and <stage>/final."
    )
    every_steps: int = Field(
        default=1000,
        gt=0,
        description="Save a resumable orbax checkpoint every N optimizer steps.",
    )
    keep: int = Field(
        default=3, gt=0, description="Step checkpoints kept per stage; older ones are deleted."
    )
    async_save: bool = Field(
        default=True,
        description="Write checkpoints in the background while training continues.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class EvalConfig(StrictModel):
    data: list[DataSource] = Field(
        min_length=1, description="Held-out sources for the evaluation loss (same form as data)."
    )
    every_steps: int = Field(
        default=500,
        gt=0,
        description="Compute the eval loss every N optimizer steps and at the stage's last step.",
    )
    batches: int = Field(
        default=4,
        gt=0,
        description="Micro-batches (sequences / gradAccum each) averaged into one eval loss.",
    )


class MeshConfig(StrictModel):
    """Device mesh sizes; -1 takes the devices left over (at most one axis may be -1)."""

    data: int = Field(
        default=1, description="Pure data-parallel axis size (replicas of the parameters)."
    )
    fsdp: int = Field(
        default=-1,
        description="Fully-sharded data-parallel axis (parameters and optimizer state sharded); "
        "-1: every device the other axes leave.",
    )
    tensor: int = Field(
        default=1, description="Tensor-parallel axis (attention heads and MLP columns split)."
    )

    @model_validator(mode="after")
    def _sizes(self) -> MeshConfig:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError("at most one mesh axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
        return self

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {sizes} does not divide {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {sizes} needs {math.prod(sizes)} devices, have {num_devices}")
        return tuple(sizes)  # type: ignore[return-value]


class StageConfig(StrictModel):
    """One training stage. The CodaTrainingRun CRD's `spec.stages[]` schema is generated from this."""

    name: str = Field(
        description="Stage name, a DNS label; names the JobSet and checkpoint directory."
    )
    kind: Literal["causal", "pretrain", "midtrain", "sft"] = Field(
        description=(
            "pretrain/midtrain/sft: the paper's diffusion stages. causal: next-token training of "
            "the autoregressive base the diffusion stages adapt (the role Qwen3-1.7B plays for "
            "CoDA-1.7B), for runs that have no such base to start from."
        )
    )
    steps: int = Field(
        gt=0, description="Optimizer steps this stage trains (tokens = steps × sequences × seqLen)."
    )
    batch: BatchConfig = Field(
        description="Batch shape: sequences per step and tokens per sequence."
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="Optimizer and learning-rate schedule of this stage (a fresh state per stage).",
    )
    data: list[DataSource] = Field(
        min_length=1, description="Training sources, mixed by weight (local or gs://)."
    )
    masking: MaskingConfig = Field(
        default_factory=MaskingConfig,
        description="Forward-noising: σ and the S1/S2/S3 strategies of paper §3 (pre/mid-training).",
    )
    sft: SFTConfig | None = Field(
        default=None,
        description="SFT-only settings (kind sft): prompt masking and length handling.",
    )
    eval: EvalConfig | None = Field(
        default=None, description="Periodic held-out loss during the stage; unset: none."
    )
    init_from: str | None = Field(
        default=None,
        description="Weights to start from: a previous stage's final, an orbax step dir, or an HF folder.",
    )
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    remat: RematPolicy | None = Field(
        default=None,
        description=(
            "Rematerialisation for this stage, overriding the model's (memory vs recompute: "
            "long-sequence stages may need it where SFT does not). `coda-ctl plan --compile "
            "--search` proposes the fastest policy that fits the slice."
        ),
    )
    seed: int = Field(
        default=0, description="Seeds parameter init, data order and masking noise of the stage."
    )
    log_every: int = Field(
        default=10,
        gt=0,
        description="Log loss, lr and tokens/s every N steps (stdout, TensorBoard).",
    )

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(
                f"stage name {v!r} must be a lowercase DNS label of at most 40 characters"
            )
        return v

    @field_validator("init_from")
    @classmethod
    def _init_uri(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v)

    @model_validator(mode="after")
    def _sft_only_for_sft(self) -> StageConfig:
        if self.sft is not None and self.kind != "sft":
            raise ValueError(f"stage {self.name!r}: the sft block is only valid for kind=sft")
        return self

    @property
    def sft_config(self) -> SFTConfig:
        return self.sft or SFTConfig()


class TrainJobConfig(StrictModel):
    """Everything `python -m coda_trainer.train --config job.yaml` needs to run one stage."""

    run: str = Field(default="local", description="Run name (metrics and logs).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: str = Field(
        description="HF tokenizer folder (local or gs://), or 'project' for the built-in one."
    )
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    stage: StageConfig
    metrics_dir: str | None = None

    @model_validator(mode="after")
    def _shapes(self) -> TrainJobConfig:
        cfg = self.model.resolve()
        if self.stage.batch.seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"stage.batch.seq_len={self.stage.batch.seq_len} exceeds the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        return self

    @property
    def stage_dir(self) -> str:
        return contract.stage_uri(self.checkpoints.uri, self.stage.name)

    @property
    def final_dir(self) -> str:
        return contract.final_uri(self.checkpoints.uri, self.stage.name)

    @property
    def status_file(self) -> str:
        return contract.status_uri(self.checkpoints.uri, self.stage.name)


def load_job_config(path: str | Path) -> TrainJobConfig:
    """Read a job YAML; errors name the file and the offending field."""
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return TrainJobConfig.model_validate(raw)
    except Exception as e:
        raise ValueError(f"{path}: invalid training config:\n{e}") from e


# --------------------------------------------------------------------------------------------------
# Sampler service
# --------------------------------------------------------------------------------------------------


SamplerAlg = Literal["origin", "maskgit_plus", "topk_margin", "entropy"]
SamplerCache = Literal["none", "prefix", "dual"]
SamplerPresetName = Literal["quality", "balanced", "fast"]
# The largest generation any surface accepts (a server caps it further at its largest bucket).
MAX_NEW_TOKENS = 32768


class SamplerKnobs(BaseModel):
    """The sampler's user-settable knobs: one definition (bounds, descriptions) for every surface.

    Each surface derives from this class: `SamplerSettings` (the server's defaults, the CRD's
    `spec.sampler.defaults` and `spec.evaluation.sampler`, the CLIs' flags through
    `add_sampler_flags`, the evaluation Job's flags through `sampler_flag`) and the HTTP requests'
    per-request overrides (`coda_trainer.serve.schemas.SamplingParams`). A knob added here appears
    on all of them. Every knob is optional: None = the next layer's value (request → request's
    preset → server defaults → server's preset → `SAMPLER_BUILTIN`); where a knob's final value is
    None it means "off" (steps: one step per generated token).

    `top_k`: None or 0 means no top-k filter (0 has always been accepted by the CRD; the sampler
    itself takes None).
    """

    preset: SamplerPresetName | None = Field(
        default=None,
        description="A named combination of steps, blockLength, threshold and cache (quality, "
        "balanced, fast; see the README's sampler section); knobs set beside it win over it.",
    )
    steps: int | None = Field(
        default=None, ge=1, le=4096,
        description="Denoising steps (model forwards) over the whole generation; unset: one per "
        "generated token. More is slower and usually better.",
    )  # fmt: skip
    alg: SamplerAlg | None = Field(
        default=None,
        description="Which masked positions are revealed each step: origin (each with "
        "probability 1 − s/t), maskgit_plus (highest p(x0)), topk_margin (largest top-1 − top-2 "
        "margin), entropy (lowest entropy; the default).",
    )
    alg_temp: float | None = Field(
        default=None, ge=0,
        description="0 or unset: reveal the most confident positions; > 0: draw them from "
        "softmax(confidence / algTemp).",
    )  # fmt: skip
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Token sampling temperature (0, the default: argmax)."
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="Nucleus sampling: keep tokens within this mass."
    )
    top_k: int | None = Field(
        default=None,
        ge=0,
        description="Keep only the k most likely tokens (0 or unset: no filter).",
    )
    block_length: int | None = Field(
        default=None, ge=1,
        description="Semi-autoregressive blocks of this many tokens, decoded left to right "
        "(LLaDA); unset: the whole generation is one block.",
    )  # fmt: skip
    threshold: float | None = Field(
        default=None, gt=0, le=1,
        description="Also reveal every masked position of the current block with p(x0) ≥ this "
        "(Fast-dLLM parallel decoding); unset: the step schedule only.",
    )  # fmt: skip
    cache: SamplerCache | None = Field(
        default=None,
        description="Key/value cache: none (the default), prefix (reuse the left context's, "
        "refreshed once per block) or dual (the right side's too); an approximation for a "
        "bidirectional model.",
    )


class SamplerSettings(StrictModel, SamplerKnobs):
    """Sampler settings as configuration: the server's defaults (`python -m coda_trainer.serve`
    flags, `spec.sampler.defaults`, which the operator hands to the server as JSON in env
    CODA_SAMPLER_DEFAULTS; an explicit flag wins over it) and the evaluation's settings
    (`spec.evaluation.sampler`, `python -m coda_trainer.evaluate` flags)."""

    max_new_tokens: int | None = Field(
        default=None, ge=1, le=MAX_NEW_TOKENS,
        description="New tokens per generation: the server's default for a request that sets no "
        "max_tokens (capped at its largest generation bucket); the evaluation's length.",
    )  # fmt: skip


# The old name (the operator's and the trainer's spec.sampler.defaults model).
SamplerDefaults = SamplerSettings
# What a knob is when no layer sets it (None: off / one step per generated token).
SAMPLER_BUILTIN = SamplerSettings(alg="entropy", temperature=0.0, cache="none", max_new_tokens=128)
SAMPLER_PRESET_KNOBS = ("steps", "block_length", "threshold", "cache")


class SamplerPreset(StrictModel):
    """A named speed/quality trade-off: it sets exactly `steps`, `block_length`, `threshold` and
    `cache` (None included: quality's None block length means "one block", not "unset")."""

    summary: str
    steps: int | None
    block_length: int | None
    threshold: float | None
    cache: SamplerCache

    def knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLER_PRESET_KNOBS}


SAMPLER_PRESETS: dict[str, SamplerPreset] = {
    # The release's evaluation setting: every token gets its own step over the whole canvas.
    "quality": SamplerPreset(
        summary="one step per token, the whole generation as one block, exact attention",
        steps=None,
        block_length=None,
        threshold=None,
        cache="none",
    ),
    # Blocks of 32 with Fast-dLLM's threshold 0.9: a step reveals every token of the block the model
    # is at least 90% sure of (at least one), so confident spans take fewer forwards; attention stays
    # exact. The step budget is still one per token: it is only used where the model is unsure.
    "balanced": SamplerPreset(
        summary="blocks of 32, confidence threshold 0.9, exact attention (no cache)",
        steps=None,
        block_length=32,
        threshold=0.9,
        cache="none",
    ),
    # As balanced plus Fast-dLLM's dual cache: after one full forward per block, each step runs only
    # the 32-token block against cached keys/values of both sides. Cheapest per step; the cache is
    # stale within a block (an approximation for CoDA's bidirectional attention).
    "fast": SamplerPreset(
        summary="blocks of 32, confidence threshold 0.9, dual key/value cache",
        steps=None,
        block_length=32,
        threshold=0.9,
        cache="dual",
    ),
}


def resolve_sampler_settings(*layers: SamplerKnobs) -> SamplerSettings:
    """The settings in force: `SAMPLER_BUILTIN`, then each layer (lowest first: server defaults,
    then a request) applied as its preset's knobs followed by the knobs it sets itself. The result
    names no preset; None left in it means off (steps: one per generated token; top_k 0 → None)."""
    values = SAMPLER_BUILTIN.model_dump()
    for layer in layers:
        if layer.preset is not None:
            values.update(SAMPLER_PRESETS[layer.preset].knobs())
        for name in SamplerSettings.model_fields:  # a request's knobs have no max_new_tokens
            value = getattr(layer, name, None)
            if name != "preset" and value is not None:
                values[name] = value
    values["preset"] = None
    if values["top_k"] == 0:
        values["top_k"] = None
    return SamplerSettings(**values)


def sampler_flag(name: str) -> str:
    """The command-line flag of a `SamplerSettings` field (the same in both CLIs)."""
    return "--" + name.replace("_", "-")


def add_sampler_flags(parser: Any, *, aliases: dict[str, list[str]] | None = None) -> None:
    """One flag per `SamplerSettings` field on an argparse parser or group, default None (= not
    given), typed, bounded and described by the field; `sampler_settings_from_args` reads them
    back. `aliases` adds other spellings of a field's flag."""
    import argparse
    import typing

    def typed(name: str, kind: type) -> Any:
        def convert(text: str) -> Any:
            try:
                value = kind(text)
                SamplerSettings.model_validate({name: value})
            except (ValueError, TypeError) as e:
                detail = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
                raise argparse.ArgumentTypeError(f"{text!r}: {detail}") from None
            return value

        convert.__name__ = kind.__name__
        return convert

    for name, field in SamplerSettings.model_fields.items():
        args = typing.get_args(field.annotation)
        inner = next(a for a in args if a is not type(None))
        help_text = (field.description or "").replace("%", "%%")  # argparse formats help with %
        options: dict[str, Any] = {"default": None, "dest": name, "help": help_text}
        if typing.get_origin(inner) is Literal:
            options["choices"] = list(typing.get_args(inner))
        else:
            options["type"] = typed(name, inner)
            options["metavar"] = name.upper()
        parser.add_argument(sampler_flag(name), *(aliases or {}).get(name, []), **options)


def sampler_settings_from_args(args: Any) -> SamplerSettings:
    """The `SamplerSettings` the flags of `add_sampler_flags` gave (unset fields None)."""
    return SamplerSettings(**{name: getattr(args, name) for name in SamplerSettings.model_fields})
