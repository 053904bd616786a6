"""Hugging Face `config.json` ↔ `ModelConfig`: the released CoDA checkpoint's and Qwen3's
configs, read and written. Pure (pydantic only); the weights are hf.py's business."""

from __future__ import annotations

from typing import Any, Literal

from coda_trainer.config import ModelConfig

__all__ = ["Architecture", "hf_config_from_model", "model_config_from_hf"]

Architecture = Literal["CoDALanguageModel", "Qwen3ForCausalLM"]

# Our field name → the Hugging Face config.json key.
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
    "bos_token_id": "bos_token_id",
    "initializer_range": "initializer_range",
}


def model_config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Build from a released `config.json` (CoDALanguageModel or Qwen3ForCausalLM)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ("CoDALanguageModel", "Qwen3ForCausalLM"):
        raise ValueError(
            f"unsupported architecture {arch!r} in config.json; expected CoDALanguageModel or Qwen3ForCausalLM"
        )
    if hf.get("rope_scaling"):
        raise ValueError(f"rope_scaling={hf['rope_scaling']!r} is not supported")
    # transformers >= 5 writes `rope_parameters: {rope_type, rope_theta}` instead of `rope_theta`.
    rope_parameters = hf.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_parameters={rope_parameters!r} is not supported (only rope_type=default)"
        )
    if "rope_theta" not in hf and "rope_theta" in rope_parameters:
        hf = {**hf, "rope_theta": rope_parameters["rope_theta"]}
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported (Qwen3/CoDA have no attention bias)")
    kwargs: dict[str, Any] = {}
    for ours, theirs in HF_FIELDS.items():
        if theirs in hf and hf[theirs] is not None:
            value = hf[theirs]
            if isinstance(value, list):  # eos_token_id may be a list in generation configs
                value = value[0]
            kwargs[ours] = value
    if "head_dim" not in kwargs:
        kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    # The released CoDA config.json omits tie_word_embeddings although its lm_head is untied,
    # and CoDAConfig's own default says True: trust the architecture, not the default.
    kwargs.setdefault("tie_word_embeddings", False)
    if arch == "CoDALanguageModel":
        kwargs["tie_word_embeddings"] = False
        kwargs["causal"] = False
        if "mask_token_id" in hf:
            kwargs["mask_token_id"] = hf["mask_token_id"]
    else:
        kwargs["causal"] = True
    # Qwen3's config.json carries token ids of the 151k vocab; keep mask id in range for small vocabs.
    kwargs.update(overrides)
    for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        if name not in kwargs and ModelConfig.model_fields[name].default >= kwargs["vocab_size"]:
            kwargs[name] = kwargs["vocab_size"] - 1
    return ModelConfig(**kwargs)


def hf_config_from_model(
    config: ModelConfig, architecture: Architecture = "CoDALanguageModel"
) -> dict[str, Any]:
    """The config.json a Hugging Face loader reads for `config` (see hf.py's exporter)."""
    hf: dict[str, Any] = {theirs: getattr(config, ours) for ours, theirs in HF_FIELDS.items()}
    hf.update(
        architectures=[architecture],
        attention_bias=False,
        attention_dropout=0.0,
        hidden_act="silu",
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=config.num_layers,
        torch_dtype=config.param_dtype,
    )
    if architecture == "CoDALanguageModel":
        hf.update(
            model_type="CoDA",
            mask_token_id=config.mask_token_id,
            attention_kernel="flash_attention",
            auto_map={
                "AutoConfig": "model_config.CoDAConfig",
                "AutoModel": "modeling_coda.CoDALanguageModel",
            },
        )
    else:
        hf.update(model_type="qwen3")
    return hf
