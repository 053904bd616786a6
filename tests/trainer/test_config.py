"""ModelConfig ↔ Hugging Face config.json: the released CoDA file, Qwen3 files, round trips."""

from __future__ import annotations

import pytest
from coda_trainer.config import ModelConfig
from coda_trainer.hf_config import hf_config_from_model, model_config_from_hf

# CoDALanguageModel/config.json of the release (SalesforceAIResearch/CoDA), verbatim values.
RELEASED_CODA_CONFIG = {
    "architectures": ["CoDALanguageModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attention_kernel": "flash_attention",
    "auto_map": {
        "AutoConfig": "model_config.CoDAConfig",
        "AutoModel": "modeling_coda.CoDALanguageModel",
    },
    "block_masking_probability": [0.25, 0.5, 0.5, 0.75, 0.25],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "mask_block_sizes": [4, 8, 16, 32],
    "mask_token_id": 151669,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "CoDA",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "pad_token_id": 151643,
    "prefix_probability": 0,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sampling_eps": [0.001, 0.25, 0.5, 0.25, 0.001],
    "sliding_window": None,
    "torch_dtype": "float32",
    "transformers_version": "4.47.1",
    "truncate_probability": 0,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_RUNTIME = ("dtype", "param_dtype", "attention", "remat", "scan_layers")


def _arch(cfg: ModelConfig) -> dict:
    return cfg.model_dump(exclude=set(_RUNTIME))


def test_released_coda_config_is_the_coda_preset():
    cfg = model_config_from_hf(RELEASED_CODA_CONFIG)
    # The file omits tie_word_embeddings (CoDAConfig's default says True) but the model is untied.
    assert not cfg.tie_word_embeddings and not cfg.causal
    assert _arch(cfg) == _arch(ModelConfig.preset("coda-1.7b"))
    assert cfg.num_params() == pytest.approx(
        2.03e9, rel=0.01
    )  # 1.7B body + untied 151936×2048 head


@pytest.mark.parametrize("preset", ["coda-1.7b", "qwen3-1.7b", "coda-tiny", "test-micro"])
@pytest.mark.parametrize("architecture", ["CoDALanguageModel", "Qwen3ForCausalLM"])
def test_round_trip(preset: str, architecture: str):
    cfg = ModelConfig.preset(preset)
    if architecture == "CoDALanguageModel":
        cfg = cfg.model_copy(update={"causal": False, "tie_word_embeddings": False})
    hf = hf_config_from_model(cfg, architecture)
    assert hf["architectures"] == [architecture]
    back = model_config_from_hf(hf, **{k: getattr(cfg, k) for k in _RUNTIME})
    if architecture == "Qwen3ForCausalLM":
        back = back.model_copy(update={"mask_token_id": cfg.mask_token_id, "causal": cfg.causal})
    assert back == cfg


def test_transformers_5_rope_parameters_are_read():
    hf = {
        **hf_config_from_model(ModelConfig.preset("test-micro"), "Qwen3ForCausalLM"),
        "rope_parameters": {"rope_theta": 10_000.0, "rope_type": "default"},
    }
    del hf["rope_theta"]
    assert model_config_from_hf(hf).rope_theta == 10_000.0
    hf["rope_parameters"] = {"rope_theta": 10_000.0, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type=default"):
        model_config_from_hf(hf)


def test_small_qwen3_without_special_ids_stays_in_vocab():
    hf = {
        "architectures": ["Qwen3ForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "bos_token_id": None, "eos_token_id": None,
    }  # fmt: skip
    cfg = model_config_from_hf(hf)
    assert cfg.causal and cfg.mask_token_id == 255 and cfg.eos_token_id == 255


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        model_config_from_hf({**RELEASED_CODA_CONFIG, "architectures": ["LlamaForCausalLM"]})
