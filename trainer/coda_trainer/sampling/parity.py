"""Random weights with a fixed recipe, for token-exact parity checks against the released sampler.

The recipe is written in the Hugging Face CoDA layout (tensor names and [out, in] shapes are fixed by
the release), so it does not depend on how our model stores its parameters: numpy seed → named
float32 tensors → a safetensors folder that both `coda_trainer.hf.load_pretrained` and the released
PyTorch `CoDALanguageModel` load. Scales are chosen so that a random model has peaked, well-separated
next-token distributions (unit-variance activations, logits with a standard deviation of about 2):
with the default 0.02 initialisation every distribution is nearly uniform and confidence rankings
would hinge on the last bits of float32, which no two implementations share.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coda_trainer.config import ModelConfig
from coda_trainer.hf_config import hf_config_from_model

__all__ = ["GOLDEN_MODEL_CONFIG", "hf_weight_shapes", "random_hf_weights", "write_hf_folder"]

# Spelled out (not a preset name) so the fixture does not move when presets change.
GOLDEN_MODEL_CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    causal=False,
    mask_token_id=255,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=0,
    dtype="float32",
    param_dtype="float32",
    attention="xla",
    scan_layers=True,
)


def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the CoDA Hugging Face layout with its [out, in] shape."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (n * h, d),
            p + "self_attn.k_proj.weight": (k * h, d),
            p + "self_attn.v_proj.weight": (k * h, d),
            p + "self_attn.o_proj.weight": (d, n * h),
            p + "self_attn.q_norm.weight": (h,),
            p + "self_attn.k_norm.weight": (h,),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def random_hf_weights(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The recipe: tensors drawn in sorted-name order from `np.random.default_rng(seed)`.

    Norm weights 1 + N(0, 0.1²); embedding N(0, 1); Linear weights N(0, 1/fan_in), the LM head
    N(0, 4/fan_in) except the mask token's row, scaled by 0.01 (its logit stays near 0, so it is
    never the argmax: a trained model never predicts the mask, and the release would happily
    "reveal" a mask as a mask). All float32.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(hf_weight_shapes(config).items()):
        z = rng.standard_normal(shape)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * z
        elif name == "model.embed_tokens.weight":
            w = z
        else:
            fan_in = shape[1]
            w = z * ((4.0 if name == "lm_head.weight" else 1.0) / fan_in) ** 0.5
            if name == "lm_head.weight":
                w[config.mask_token_id] *= 0.01
        out[name] = w.astype(np.float32)
    return out


def write_hf_folder(path: str | Path, config: ModelConfig, weights: dict[str, np.ndarray]) -> Path:
    """`model.safetensors` + `config.json` (CoDA layout) that hf.load_pretrained reads."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path / "model.safetensors")
    )
    (path / "config.json").write_text(
        json.dumps(hf_config_from_model(config, "CoDALanguageModel"), indent=2)
    )
    return path
