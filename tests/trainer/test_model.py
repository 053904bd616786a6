"""The CoDA transformer: layer-stacking, remat, segments, KV cache and attention switches.

Parity with the PyTorch reference lives in test_hf.py; these tests pin the model's own contracts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from coda_trainer.config import ModelConfig
from coda_trainer.model import KVCache, Transformer, resolve_attention_impl
from flax import nnx

B, L = 2, 16  # one shape for most tests: their compiled forwards are shared


def _tokens(seed: int, shape: tuple[int, int], vocab: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def _with_config(model: Transformer, **changes) -> Transformer:
    """The same weights under another config (scan_layers may differ: layers are (un)stacked)."""
    cfg = model.config.model_copy(update=changes)
    target = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    src = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model))}
    out = []
    for path, var in nnx.to_flat_state(nnx.state(target)):
        if path[0] == "layers" and not cfg.scan_layers and model.config.scan_layers:
            value = src[("layers", *path[2:])][path[1]]
        elif path[0] == "layers" and cfg.scan_layers and not model.config.scan_layers:
            n = cfg.num_layers
            value = jnp.stack([src[("layers", i, *path[1:])] for i in range(n)])
        else:
            value = src[path]
        out.append((path, var.replace(value)))
    return nnx.merge(nnx.graphdef(target), nnx.from_flat_state(out))


@functools.partial(nnx.jit, static_argnames=("return_kv",))
def _run(
    model, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, past_kv=None, return_kv=False
):
    return model(
        tokens_BxL,
        positions_BxL=positions_BxL,
        segment_ids_BxL=segment_ids_BxL,
        past_kv=past_kv,
        return_kv=return_kv,
    )


def test_forward_shapes_dtype_and_param_names(micro_model: Transformer, micro_config: ModelConfig):
    tokens = _tokens(0, (B, L), micro_config.vocab_size)
    logits_BxLxV = _run(micro_model, tokens)
    assert logits_BxLxV.shape == (B, L, micro_config.vocab_size)
    assert logits_BxLxV.dtype == jnp.float32
    assert bool(jnp.isfinite(logits_BxLxV).all())
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(micro_model))}
    assert "embed_tokens/embedding" in paths
    assert "layers/self_attn/q_proj/kernel" in paths
    assert "layers/mlp/down_proj/kernel" in paths
    assert "lm_head/kernel" in paths and "norm/scale" in paths
    q = micro_model.layers.self_attn.q_proj.kernel
    assert q.shape == (2, 64, 4, 16)
    assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_init_statistics(micro_config: ModelConfig):
    cfg = micro_config.model_copy(update={"hidden_size": 256, "intermediate_size": 512})
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    gate = np.asarray(model.layers.mlp.gate_proj.kernel[...])
    assert abs(gate.std() - 0.02) < 0.002 and abs(gate.mean()) < 0.002
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(model.layers.self_attn.q_norm.scale[...]), 1.0)


def test_scan_and_unrolled_layers_compute_the_same(
    micro_model: Transformer, micro_config: ModelConfig
):
    tokens = _tokens(1, (B, L), micro_config.vocab_size)
    unrolled = _with_config(micro_model, scan_layers=False)
    assert isinstance(unrolled.layers, nnx.List) and len(unrolled.layers) == 2
    scanned_logits, scanned_kv = _run(micro_model, tokens, return_kv=True)
    unrolled_logits, unrolled_kv = _run(unrolled, tokens, return_kv=True)
    np.testing.assert_allclose(scanned_logits, unrolled_logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scanned_kv.k_ZxBxSxKxH, unrolled_kv.k_ZxBxSxKxH, atol=1e-6, rtol=0)
    # Stacking back gives the original parameters exactly.
    back = _with_config(unrolled, scan_layers=True)
    for (pa, a), (pb, b) in zip(
        nnx.to_flat_state(nnx.state(back)), nnx.to_flat_state(nnx.state(micro_model)), strict=True
    ):
        assert pa == pb
        np.testing.assert_array_equal(a.get_value(), b.get_value())


def _loss_and_grads(model: Transformer, tokens_BxL: jax.Array):
    graphdef, params = nnx.split(model)

    def f(params):
        return jnp.mean(nnx.merge(graphdef, params)(tokens_BxL) ** 2)

    # LLVM -O0 halves the compile time that dominates these tiny runs; numerics are unchanged.
    step = (
        jax.jit(jax.value_and_grad(f)).lower(params).compile({"xla_backend_optimization_level": 0})
    )
    return step(params)


def test_remat_policies_change_nothing(micro_model: Transformer, micro_config: ModelConfig):
    tokens = _tokens(2, (B, L), micro_config.vocab_size)
    ref_loss, ref_grads = _loss_and_grads(micro_model, tokens)
    ref_leaves = jax.tree.leaves(ref_grads)
    assert max(float(jnp.abs(g).max()) for g in ref_leaves) > 0

    def check(loss, grads):
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), ref_leaves, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)

    for policy in ["full", "dots_no_batch", "minimal"]:
        check(*_loss_and_grads(_with_config(micro_model, remat=policy), tokens))
    # The unrolled stack shares the remat wrapper: check it once, restacking its gradients.
    unrolled = _with_config(micro_model, scan_layers=False, remat="full")
    loss, grads = _loss_and_grads(unrolled, tokens)
    restacked = _with_config(
        nnx.merge(nnx.graphdef(unrolled), grads), scan_layers=True, remat="none"
    )
    check(loss, nnx.state(restacked))


def test_bidirectional_sees_the_future_and_causal_does_not(
    micro_model: Transformer, micro_config: ModelConfig
):
    tokens = _tokens(3, (B, L), micro_config.vocab_size)
    changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % micro_config.vocab_size)
    causal = _with_config(micro_model, causal=True)
    bi_a, bi_b = _run(micro_model, tokens), _run(micro_model, changed)
    assert not np.allclose(bi_a[:, :12], bi_b[:, :12], atol=1e-6)
    ca, cb = _run(causal, tokens), _run(causal, changed)
    np.testing.assert_array_equal(ca[:, :12], cb[:, :12])
    assert not np.allclose(ca[:, 12:], cb[:, 12:], atol=1e-6)


# Row 0: doc 1 (6 tokens) | doc 2 (10 tokens). Row 1: 4 pads | doc 1 (12 tokens).
SEGMENTS_BxL = jnp.array([[1] * 6 + [2] * 10, [0] * 4 + [1] * 12], jnp.int32)


@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids_isolate_documents(
    micro_model: Transformer, micro_config: ModelConfig, causal: bool
):
    model = _with_config(micro_model, causal=True) if causal else micro_model
    V = micro_config.vocab_size
    tokens = _tokens(4, (B, L), V)
    other = tokens.at[0, 6:].set((tokens[0, 6:] + 7) % V).at[1, :4].set((tokens[1, :4] + 3) % V)
    a = _run(model, tokens, segment_ids_BxL=SEGMENTS_BxL)
    b = _run(model, other, segment_ids_BxL=SEGMENTS_BxL)
    assert bool(jnp.isfinite(a).all()) and bool(jnp.isfinite(b).all())
    np.testing.assert_array_equal(a[0, :6], b[0, :6])  # doc 1 never saw doc 2
    np.testing.assert_array_equal(a[1, 4:], b[1, 4:])  # real tokens never saw the pads
    assert not np.allclose(a[0, 6:], b[0, 6:])
    # A packed document computes what it computes alone (its positions restart at 0 there).
    alone = _run(model, tokens[:, 6:], positions_BxL=jnp.broadcast_to(jnp.arange(6, 16), (B, 10)))
    np.testing.assert_allclose(a[0, 6:], alone[0], atol=2e-6, rtol=0)


def test_all_padding_row_is_finite(micro_model: Transformer, micro_config: ModelConfig):
    tokens = _tokens(5, (B, L), micro_config.vocab_size)
    segments = SEGMENTS_BxL.at[0].set(0)
    assert bool(jnp.isfinite(_run(micro_model, tokens, segment_ids_BxL=segments)).all())


# KV cache. Bidirectional: cached k/v must be the ones computed with the block present, so they
# come from the full forward; the block is then recomputed against them and must match exactly.
P = 10  # cached positions; the block has L - P = 6 tokens


def _cache(kv: KVCache, keep: jax.Array) -> KVCache:
    return KVCache(
        kv.k_ZxBxSxKxH[:, :, keep], kv.v_ZxBxSxKxH[:, :, keep], kv.segment_ids_BxS[:, keep]
    )


def test_kv_cache_of_prefix_reproduces_full_forward(
    micro_model: Transformer, micro_config: ModelConfig
):
    tokens = _tokens(6, (B, L), micro_config.vocab_size)
    full, kv = _run(micro_model, tokens, return_kv=True)
    assert kv.k_ZxBxSxKxH.shape == (2, B, L, 2, 16) and kv.segment_ids_BxS.shape == (B, L)
    positions = jnp.broadcast_to(jnp.arange(P, L), (B, L - P))
    block, block_kv = _run(
        micro_model,
        tokens[:, P:],
        positions_BxL=positions,
        past_kv=_cache(kv, jnp.arange(P)),
        return_kv=True,
    )
    np.testing.assert_allclose(block, full[:, P:], atol=2e-6, rtol=0)
    np.testing.assert_allclose(block_kv.k_ZxBxSxKxH, kv.k_ZxBxSxKxH[:, :, P:], atol=2e-6, rtol=0)
    # Without the cache the block alone computes something else: the test can fail.
    alone = _run(micro_model, tokens[:, P:], positions_BxL=positions)
    assert not np.allclose(alone, full[:, P:], atol=1e-4)


def test_dual_cache_prefix_and_suffix_around_a_middle_block(
    micro_model: Transformer, micro_config: ModelConfig
):
    tokens = _tokens(7, (B, L), micro_config.vocab_size)
    full, kv = _run(micro_model, tokens, return_kv=True)
    past = _cache(kv, jnp.concatenate([jnp.arange(0, 4), jnp.arange(10, 16)]))  # prefix + suffix
    positions = jnp.broadcast_to(jnp.arange(4, 10), (B, 6))
    block = _run(
        micro_model, tokens[:, 4:10], positions_BxL=positions, past_kv=past, return_kv=True
    )[0]
    np.testing.assert_allclose(block, full[:, 4:10], atol=2e-6, rtol=0)


def test_kv_cache_padding_in_the_past_is_never_attended(
    micro_model: Transformer, micro_config: ModelConfig
):
    tokens = _tokens(9, (B, L), micro_config.vocab_size)
    segments = jnp.array([[0] * 4 + [1] * 12] * B, jnp.int32)
    full, kv = _run(micro_model, tokens, segment_ids_BxL=segments, return_kv=True)
    past = _cache(kv, jnp.arange(P))
    junk = 50 * jax.random.normal(jax.random.key(0), past.k_ZxBxSxKxH[:, :, :4].shape)
    past = past._replace(
        k_ZxBxSxKxH=past.k_ZxBxSxKxH.at[:, :, :4].set(junk),
        v_ZxBxSxKxH=past.v_ZxBxSxKxH.at[:, :, :4].set(junk),
    )
    positions = jnp.broadcast_to(jnp.arange(P, L), (B, L - P))
    block = _run(micro_model, tokens[:, P:], positions_BxL=positions, past_kv=past, return_kv=True)[
        0
    ]
    np.testing.assert_allclose(block, full[:, P:], atol=2e-6, rtol=0)


def test_kv_cache_causal_prefix_then_block(micro_model: Transformer, micro_config: ModelConfig):
    causal = _with_config(micro_model, causal=True)
    tokens = _tokens(8, (B, L), micro_config.vocab_size)
    full = _run(causal, tokens)
    _, prefix_kv = _run(causal, tokens[:, :P], return_kv=True)  # causal: the prefix alone suffices
    positions = jnp.broadcast_to(jnp.arange(P, L), (B, L - P))
    block = _run(causal, tokens[:, P:], positions_BxL=positions, past_kv=prefix_kv, return_kv=True)[
        0
    ]
    np.testing.assert_allclose(block, full[:, P:], atol=2e-6, rtol=0)


def test_tied_embeddings_have_no_lm_head(micro_config: ModelConfig):
    model = Transformer(
        micro_config.model_copy(update={"tie_word_embeddings": True}), rngs=nnx.Rngs(0)
    )
    assert not hasattr(model, "lm_head")
    tokens = _tokens(10, (B, L), micro_config.vocab_size)
    logits = _run(model, tokens)
    assert logits.shape == (B, L, micro_config.vocab_size)
    # The head reads the embedding table: scaling the table changes the logits.
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 2.0
    assert not np.allclose(_run(model, tokens), logits)


def test_bfloat16_compute_tracks_float32(micro_model: Transformer, micro_config: ModelConfig):
    tokens = _tokens(11, (B, L), micro_config.vocab_size)
    bf16 = _with_config(micro_model, dtype="bfloat16")
    a, b = _run(micro_model, tokens), _run(bf16, tokens)
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.05


def test_attention_impl_resolution():
    assert resolve_attention_impl("auto", "cpu") == "xla"
    assert resolve_attention_impl("auto", "gpu") == "cudnn"
    assert resolve_attention_impl("auto", "tpu") == "splash"
    with pytest.raises(ValueError, match="cudnn"):
        resolve_attention_impl("cudnn", "cpu")
    with pytest.raises(ValueError, match="splash"):
        resolve_attention_impl("splash", "cpu")


@pytest.mark.parametrize(
    ("platform", "impl"), [("tpu", "splash"), ("gpu", "cudnn"), ("cuda", "cudnn"), ("cpu", "xla")]
)
def test_attention_auto_follows_the_mesh_devices_not_the_host(platform: str, impl: str):
    """A step traced on this CPU host for a TPU mesh (pre-flight) must pick the TPU kernel."""
    from jax.sharding import AbstractDevice, AbstractMesh

    assert jax.default_backend() == "cpu"
    device = AbstractDevice(device_kind="some chip", num_cores=None, platform=platform)
    with jax.sharding.use_abstract_mesh(AbstractMesh((2,), ("fsdp",), abstract_device=device)):
        assert resolve_attention_impl("auto") == impl
    assert resolve_attention_impl("auto") == "xla"  # no mesh: the host's backend


@pytest.mark.parametrize("causal", [False, True])
def test_splash_kernel_matches_reference_attention(causal: bool):
    # The TPU kernel itself, run by the Pallas interpreter on CPU: segments, GQA and a KV past.
    from coda_trainer.model import _splash_attention, _visible_BxLxS, _xla_attention

    B, P, L, N, K, H = 1, 128, 128, 4, 2, 128
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, L, N, H))
    k = jax.random.normal(kk, (B, P + L, K, H))
    v = jax.random.normal(kv, (B, P + L, K, H))
    kv_segments = jnp.array([[1] * 100 + [2] * 60 + [3] * 96], jnp.int32)
    q_segments = kv_segments[:, P:]
    got = jax.jit(_splash_attention, static_argnums=5, static_argnames="interpret")(
        q, k, v, q_segments, kv_segments, causal, interpret=True
    )
    want = jax.jit(_xla_attention)(
        q, k, v, _visible_BxLxS(q_segments, kv_segments, L, P + L, causal)
    )
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("causal", "segmented", "past"),
    [(False, False, 0), (True, False, 0), (False, True, 4), (True, True, 4)],
)
def test_cudnn_call_conventions_match_reference(causal: bool, segmented: bool, past: int):
    # The cuDNN branch hands layout, GQA and masks to jax.nn.dot_product_attention; its XLA
    # implementation takes the same call on CPU, so the conventions are checked here.
    from coda_trainer.model import _cudnn_attention, _visible_BxLxS, _xla_attention

    Bq, Lq, N, K, H = 2, 8, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (Bq, Lq, N, H))
    k = jax.random.normal(kk, (Bq, past + Lq, K, H))
    v = jax.random.normal(kv, (Bq, past + Lq, K, H))
    kv_seg = jnp.array([[1] * 6 + [2] * (past + Lq - 6)] * Bq, jnp.int32) if segmented else None
    q_seg = kv_seg[:, past:] if segmented else None
    visible = _visible_BxLxS(q_seg, kv_seg, Lq, past + Lq, causal)
    causal_only = causal and not segmented and past == 0
    cudnn_call = jax.jit(_cudnn_attention, static_argnums=4, static_argnames="implementation")
    got = cudnn_call(q, k, v, visible, causal_only, implementation="xla")
    np.testing.assert_allclose(got, jax.jit(_xla_attention)(q, k, v, visible), atol=2e-6, rtol=0)
