"""Hugging Face interop: parity with transformers' Qwen3 (torch, CPU, float32) through safetensors.

The torch side writes with `save_pretrained`, we load with `load_pretrained`, and the logits must
agree to 1e-4 in causal mode and in bidirectional mode (CoDA). Our `save_pretrained` must load back
into transformers. Bad folders fail with errors naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the reference implementation (dev extra); never skipped
import transformers
from coda_trainer import hf
from coda_trainer.config import ModelConfig
from coda_trainer.hf_config import hf_config_from_model
from coda_trainer.model import Transformer
from flax import nnx

F32 = {"dtype": "float32", "param_dtype": "float32", "attention": "xla"}
TOL = 1e-4
B, L = 2, 12


def _torch_config(*, tied: bool):
    return transformers.Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,  # not the 1e6 default: proves theta is read from config.json
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        attn_implementation="eager",
    )


def _random_torch_model(*, tied: bool, seed: int):
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(_torch_config(tied=tied)).eval()
    with torch.no_grad():  # large enough weights that attention patterns, norms and RoPE matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model


def _torch_logits(model, tokens: np.ndarray, *, bidirectional: bool) -> np.ndarray:
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = not bidirectional
    with torch.no_grad():
        if bidirectional:  # an all-zeros additive mask per layer type: every token sees every token
            mask = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
            out = model(input_ids=ids, attention_mask={"full_attention": mask})
        else:
            out = model(input_ids=ids)
    return out.logits.float().numpy()


@nnx.jit
def _logits(model, tokens_BxL):
    return model(tokens_BxL)


def _tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(B, L))


@pytest.fixture(scope="module")
def torch_untied(tmp_path_factory):
    model = _random_torch_model(tied=False, seed=0)
    path = tmp_path_factory.mktemp("qwen3-untied")
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def torch_tied(tmp_path_factory):
    model = _random_torch_model(tied=True, seed=1)
    path = tmp_path_factory.mktemp("qwen3-tied")
    model.save_pretrained(path)
    return model, str(path)


def test_parity_causal_qwen3(torch_untied):
    model, path = torch_untied
    tokens = _tokens(0)
    expected = _torch_logits(model, tokens, bidirectional=False)
    config, ours = hf.load_pretrained(path, config_overrides=F32)
    assert config.causal and not config.tie_word_embeddings and config.rope_theta == 10_000.0
    got = np.asarray(_logits(ours, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero tensors
    # The unrolled layer stack loads the same tensors into per-layer parameters.
    _, unrolled = hf.load_pretrained(path, config_overrides={**F32, "scan_layers": False})
    got_unrolled = np.asarray(_logits(unrolled, jnp.asarray(tokens)))
    assert np.abs(got_unrolled - expected).max() <= TOL


def test_parity_bidirectional(torch_untied):
    model, path = torch_untied
    tokens = _tokens(1)
    expected = _torch_logits(model, tokens, bidirectional=True)
    # The torch side really is bidirectional: a later token changes an earlier position's logits.
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    assert (
        np.abs(_torch_logits(model, changed, bidirectional=True)[:, 0] - expected[:, 0]).max()
        > 1e-3
    )
    assert np.abs(_torch_logits(model, tokens, bidirectional=False) - expected).max() > 1e-3

    config, ours = hf.load_pretrained(path, config_overrides={**F32, "causal": False})
    assert not config.causal
    got = np.asarray(_logits(ours, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()


def test_save_pretrained_round_trips_through_transformers(torch_untied, tmp_path: Path):
    model, path = torch_untied
    tokens = _tokens(2)
    _, ours = hf.load_pretrained(path, config_overrides=F32)
    out = tmp_path / "qwen3"
    hf.save_pretrained(ours, str(out), architecture="Qwen3ForCausalLM", max_shard_bytes=200_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    np.testing.assert_allclose(
        _torch_logits(reloaded, tokens, bidirectional=False),
        _torch_logits(model, tokens, bidirectional=False),
        atol=0,
    )


def test_coda_layout_round_trip(torch_untied, tmp_path: Path):
    model, path = torch_untied
    tokens = _tokens(3)
    _, ours = hf.load_pretrained(path, config_overrides={**F32, "causal": False})
    hf.save_pretrained(ours, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["CoDALanguageModel"] and cfg["model_type"] == "CoDA"
    assert cfg["auto_map"]["AutoModel"] == "modeling_coda.CoDALanguageModel"
    assert (tmp_path / "generation_config.json").exists()
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    # The released CoDA model loads these names with torch: check them with safetensors' own reader.
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = f.keys()
        assert set(names) == set(model.state_dict())
        for name in names:
            assert torch.equal(f.get_tensor(name), model.state_dict()[name]), name
    config, again = hf.load_pretrained(str(tmp_path), config_overrides=F32)
    assert not config.causal and not config.tie_word_embeddings and config.rope_theta == 10_000.0
    expected = _torch_logits(model, tokens, bidirectional=True)
    assert np.abs(np.asarray(_logits(again, jnp.asarray(tokens))) - expected).max() <= TOL


def test_tied_qwen3_loads_tied_or_as_untied_coda(torch_tied):
    model, path = torch_tied
    tokens = _tokens(4)
    from safetensors import safe_open

    with safe_open(Path(path) / "model.safetensors", framework="pt") as f:
        names = f.keys()
        assert "lm_head.weight" not in names  # transformers drops the tied copy
    config, tied = hf.load_pretrained(path, config_overrides=F32)
    assert config.tie_word_embeddings and not hasattr(tied, "lm_head")
    expected = _torch_logits(model, tokens, bidirectional=False)
    assert np.abs(np.asarray(_logits(tied, jnp.asarray(tokens))) - expected).max() <= TOL

    # How CoDA starts from Qwen3: untie (lm_head := embedding) and attend bidirectionally.
    config, coda = hf.load_pretrained(
        path, config_overrides={**F32, "causal": False, "tie_word_embeddings": False}
    )
    assert not config.tie_word_embeddings
    np.testing.assert_array_equal(coda.lm_head.kernel[...], coda.embed_tokens.embedding[...].T)
    expected = _torch_logits(model, tokens, bidirectional=True)
    assert np.abs(np.asarray(_logits(coda, jnp.asarray(tokens))) - expected).max() <= TOL


def test_tied_model_saved_as_coda_gets_an_lm_head(micro_config: ModelConfig, tmp_path: Path):
    tied = Transformer(
        micro_config.model_copy(update={"tie_word_embeddings": True}), rngs=nnx.Rngs(0)
    )
    hf.save_pretrained(tied, str(tmp_path))
    names = [n for n, _ in hf.state_to_hf_tensors(tied)]
    assert "lm_head.weight" not in names
    config, untied = hf.load_pretrained(str(tmp_path), config_overrides=F32)
    assert not config.tie_word_embeddings
    tokens = jnp.asarray(_tokens(5))
    np.testing.assert_allclose(_logits(untied, tokens), _logits(tied, tokens), atol=1e-6)


def test_load_hf_weights_into_existing_model(
    micro_model: Transformer, micro_config: ModelConfig, tmp_path: Path
):
    hf.save_pretrained(micro_model, str(tmp_path))
    fresh = Transformer(micro_config, rngs=nnx.Rngs(42))
    tokens = jnp.asarray(_tokens(6))
    assert not np.allclose(_logits(fresh, tokens), _logits(micro_model, tokens))
    hf.load_hf_weights_into(fresh, str(tmp_path))
    np.testing.assert_array_equal(_logits(fresh, tokens), _logits(micro_model, tokens))


def test_state_to_hf_tensors_layout(micro_model: Transformer, micro_config: ModelConfig):
    tensors = dict(hf.state_to_hf_tensors(micro_model))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (4 * 16, 64)
    assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 16)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (128, 64)[::-1]
    assert tensors["lm_head.weight"].shape == (256, 64)
    q1 = np.asarray(micro_model.layers.self_attn.q_proj.kernel[...])[1]
    np.testing.assert_array_equal(
        tensors["model.layers.1.self_attn.q_proj.weight"], q1.reshape(64, -1).T
    )
    assert len(tensors) == 2 + 11 * micro_config.num_layers + 1


# --------------------------------------------------------------------------------------------------
# Bad folders
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_micro(micro_model: Transformer, tmp_path: Path) -> Path:
    hf.save_pretrained(micro_model, str(tmp_path), max_shard_bytes=60_000)
    return tmp_path


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_shard_names_file_and_tensors(saved_micro: Path):
    index = json.loads((saved_micro / hf.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    held = sorted(n for n, f in index["weight_map"].items() if f == victim)
    (saved_micro / victim).unlink()
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_pretrained(str(saved_micro))
    assert victim in str(err.value) and held[0] in str(err.value)


def test_wrong_shape_names_file_and_tensor(saved_micro: Path):
    _edit_config(saved_micro, intermediate_size=96)
    with pytest.raises(
        hf.CheckpointError,
        match=r"model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\], expected",
    ):
        hf.load_pretrained(str(saved_micro))


def test_unknown_architecture_names_the_file(saved_micro: Path):
    _edit_config(saved_micro, architectures=["LlamaForCausalLM"])
    with pytest.raises(
        hf.CheckpointError, match=r"config\.json: unknown architecture 'LlamaForCausalLM'"
    ):
        hf.load_pretrained(str(saved_micro))


def test_missing_tensor_names_file_and_tensor(micro_model: Transformer, tmp_path: Path):
    hf.save_pretrained(micro_model, str(tmp_path))
    entries = [
        (name, arr.shape, arr.dtype, lambda arr=arr: arr)
        for name, arr in hf.state_to_hf_tensors(micro_model)
        if name != "model.layers.1.self_attn.k_norm.weight"
    ]
    with open(tmp_path / "model.safetensors", "wb") as f:
        hf.write_safetensors(f, entries)
    with pytest.raises(
        hf.CheckpointError,
        match=r"model\.safetensors: missing tensor\(s\) 'model\.layers\.1\.self_attn\.k_norm\.weight'",
    ):
        hf.load_pretrained(str(tmp_path))


def test_coda_folder_without_lm_head_is_a_tied_untied_mismatch(
    micro_config: ModelConfig, tmp_path: Path
):
    tied = Transformer(
        micro_config.model_copy(update={"tie_word_embeddings": True}), rngs=nnx.Rngs(0)
    )
    hf.save_pretrained(
        tied, str(tmp_path), architecture="Qwen3ForCausalLM"
    )  # tied: no lm_head.weight
    _edit_config(tmp_path, architectures=["CoDALanguageModel"])
    with pytest.raises(
        hf.CheckpointError,
        match=r"tied/untied mismatch: tensor 'lm_head\.weight' is missing from model\.safetensors",
    ):
        hf.load_pretrained(str(tmp_path))


def test_tied_config_with_a_distinct_lm_head_is_a_mismatch(
    micro_model: Transformer, tmp_path: Path
):
    hf.save_pretrained(micro_model, str(tmp_path), architecture="Qwen3ForCausalLM")
    _edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.raises(
        hf.CheckpointError, match=r"tied/untied mismatch: tensor 'lm_head\.weight' differs"
    ):
        hf.load_pretrained(str(tmp_path))


def test_missing_folder_contents(tmp_path: Path):
    with pytest.raises(hf.CheckpointError, match=r"config\.json"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps(hf_config_from_model(ModelConfig.preset("test-micro")))
    )
    with pytest.raises(hf.CheckpointError, match=r"no model\.safetensors"):
        hf.load_pretrained(str(tmp_path))


def test_bfloat16_tensors_load(micro_model: Transformer, tmp_path: Path):
    entries = [
        (name, arr.shape, np.dtype(jnp.bfloat16), lambda arr=arr: arr.astype(jnp.bfloat16))
        for name, arr in hf.state_to_hf_tensors(micro_model)
    ]
    hf.save_pretrained(micro_model, str(tmp_path))
    with open(tmp_path / "model.safetensors", "wb") as f:
        hf.write_safetensors(f, entries)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    _, loaded = hf.load_pretrained(str(tmp_path), config_overrides=F32)
    emb = np.asarray(loaded.embed_tokens.embedding[...])
    assert emb.dtype == np.float32
    expected = (
        np.asarray(micro_model.embed_tokens.embedding[...]).astype(jnp.bfloat16).astype(np.float32)
    )
    np.testing.assert_array_equal(emb, expected)
    assert jax.tree.leaves(nnx.state(loaded))[0].dtype == jnp.float32


def test_gcs_round_trip(micro_model: Transformer, gcs_bucket: str):
    uri = f"{gcs_bucket}/models/micro"
    hf.save_pretrained(micro_model, uri, max_shard_bytes=60_000)
    from coda_trainer import storage

    assert storage.exists(f"{uri}/{hf.INDEX_FILE}") and storage.exists(f"{uri}/config.json")
    config, loaded = hf.load_pretrained(uri, config_overrides=F32)
    assert config.num_layers == micro_model.config.num_layers
    tokens = jnp.asarray(_tokens(7))
    np.testing.assert_array_equal(_logits(loaded, tokens), _logits(micro_model, tokens))
