"""The CoDA transformer (Qwen3 blocks, bidirectional by default) in Flax NNX.

Same function as the released PyTorch `CoDALanguageModel` / Hugging Face `Qwen3ForCausalLM`:
pre-norm blocks of GQA attention (per-head RMSNorm on q and k *before* RoPE, rotate-half RoPE) and a
SwiGLU MLP, a final RMSNorm and an untied (optionally tied) LM head. Returns raw, unshifted logits.

Shape suffixes (legend in `coda_trainer/__init__.py`): B batch, L query length, S key length (past +
own), D hidden, A query heads, K kv heads, G = A/K query heads per kv head, H head dim, F MLP width,
V vocab, P past length, Z stacked layers.

`config.dtype` is the compute dtype, `config.param_dtype` the storage dtype; norms and softmax run
in float32 whatever the compute dtype, logits come back in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from coda_trainer.config import ModelConfig
from coda_trainer.sharding import constrain, state_shardings

__all__ = [
    "KVCache",
    "Transformer",
    "attention",
    "create_sharded_model",
    "mesh_platform",
    "resolve_attention_impl",
    "rope_cos_sin",
    "shard_model",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays NaN-free


class KVCache(NamedTuple):
    """Keys/values of earlier tokens, already q/k-normed and rotated, stacked over layers."""

    k_ZxBxSxKxH: jax.Array
    v_ZxBxSxKxH: jax.Array
    segment_ids_BxS: jax.Array  # int32; 0 = padding (never attended by non-padding queries)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """Normalise in float32, cast back, then scale (the order Hugging Face uses)."""

    def __init__(
        self, dim: int, *, eps: float, param_dtype: Any, axes: tuple[str, ...] = ("norm",)
    ):
        self.scale = _param(jnp.ones((dim,), param_dtype), axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * self.scale[...].astype(x.dtype)


def _input_rank(spec: str) -> int:
    """How many leading kernel axes a `bl<in>,<in><out>->bl<out>` projection contracts."""
    lhs, _ = spec.split("->")
    x_axes, kernel_axes = lhs.split(",")
    if not x_axes.startswith("bl") or not kernel_axes.startswith(x_axes[2:]):
        raise ValueError(f"projection spec {spec!r} is not of the form bl<in>,<in><out>->bl<out>")
    return len(x_axes) - 2


def project_tokens(
    x_BxLxI: jax.Array,
    kernel_IxO: jax.Array,
    *,
    in_axes: int = 1,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Contract x's trailing `in_axes` axes with the kernel's leading ones, per token.

    The same product as the einsum `bl<in>,<in><out>->bl<out>`, computed as one 2-D matmul over
    B·L tokens. XLA:CPU lays out the backward of the 3-D einsum with a transposing copy of each
    activation gradient (a third of a coda-tiny train step); the 2-D form needs none and is the
    same dot on GPU and TPU. Merging B and L keeps any sharding of either.
    """
    lead, ins = x_BxLxI.shape[:2], x_BxLxI.shape[2:]
    outs = kernel_IxO.shape[in_axes:]
    n_in = math.prod(ins)
    y = jnp.dot(
        x_BxLxI.reshape(-1, n_in),
        kernel_IxO.reshape(n_in, -1),
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*lead, *outs)


class Dense(nnx.Module):
    """A bias-free projection with a multi-axis kernel, applied by an einsum `spec`."""

    def __init__(
        self,
        shape: tuple[int, ...],
        axes: tuple[str, ...],
        spec: str,
        *,
        config: ModelConfig,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(config.initializer_range)
        self.kernel = _param(init(rngs.params(), shape, _DTYPES[config.param_dtype]), axes)
        self.spec = spec
        self.dtype = _DTYPES[config.dtype]

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return project_tokens(x.astype(self.dtype), kernel, in_axes=_input_rank(self.spec))


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, config: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        shape = (vocab_size, dim)
        self.embedding = _param(
            init(rngs.params(), shape, _DTYPES[config.param_dtype]), ("vocab", "embed")
        )


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Dense((d, f), ("embed", "mlp"), "bld,df->blf", config=config, rngs=rngs)
        self.up_proj = Dense((d, f), ("embed", "mlp"), "bld,df->blf", config=config, rngs=rngs)
        self.down_proj = Dense((f, d), ("mlp", "embed"), "blf,fd->bld", config=config, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate_BxLxF = constrain(self.gate_proj(x_BxLxD), ("batch", "length", "mlp"))
        up_BxLxF = constrain(self.up_proj(x_BxLxD), ("batch", "length", "mlp"))
        h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        return self.down_proj(h_BxLxF)


def rope_cos_sin(
    positions_BxL: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape BxLxH (float32) for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    emb_BxLxH = jnp.concatenate([freqs_BxLxH2, freqs_BxLxH2], axis=-1)
    return jnp.cos(emb_BxLxH), jnp.sin(emb_BxLxH)


def _apply_rope(x_BxLxAxH: jax.Array, cos_BxLxH: jax.Array, sin_BxLxH: jax.Array) -> jax.Array:
    x = x_BxLxAxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxLxH[:, :, None, :] + rotated * sin_BxLxH[:, :, None, :]
    return out.astype(x_BxLxAxH.dtype)


class AttentionContext(NamedTuple):
    """Per-forward inputs every layer's attention shares."""

    cos_BxLxH: jax.Array
    sin_BxLxH: jax.Array
    q_segment_ids_BxL: jax.Array
    kv_segment_ids_BxS: jax.Array
    segmented: bool  # False: every token attends to every token (no mask needed)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        pdt = _DTYPES[config.param_dtype]
        self.q_proj = Dense(
            (d, n, h), ("embed", "heads", "head_dim"), "bld,dnh->blnh", config=config, rngs=rngs
        )
        self.k_proj = Dense(
            (d, k, h), ("embed", "kv_heads", "head_dim"), "bld,dkh->blkh", config=config, rngs=rngs
        )
        self.v_proj = Dense(
            (d, k, h), ("embed", "kv_heads", "head_dim"), "bld,dkh->blkh", config=config, rngs=rngs
        )
        self.o_proj = Dense(
            (n, h, d), ("heads", "head_dim", "embed"), "blnh,nhd->bld", config=config, rngs=rngs
        )
        self.q_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=pdt, axes=("head_dim",))
        self.k_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=pdt, axes=("head_dim",))
        self.causal = config.causal
        self.impl = config.attention

    def __call__(
        self,
        x_BxLxD: jax.Array,
        ctx: AttentionContext,
        past_k_BxPxKxH: jax.Array | None = None,
        past_v_BxPxKxH: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_BxLxAxH = self.q_norm(self.q_proj(x_BxLxD))
        k_BxLxKxH = self.k_norm(self.k_proj(x_BxLxD))
        v_BxLxKxH = self.v_proj(x_BxLxD)
        q_BxLxAxH = constrain(
            _apply_rope(q_BxLxAxH, ctx.cos_BxLxH, ctx.sin_BxLxH),
            ("batch", "length", "heads", "head_dim"),
        )
        k_BxLxKxH = constrain(
            _apply_rope(k_BxLxKxH, ctx.cos_BxLxH, ctx.sin_BxLxH),
            ("batch", "length", "kv_heads", "head_dim"),
        )
        v_BxLxKxH = constrain(v_BxLxKxH, ("batch", "length", "kv_heads", "head_dim"))
        if past_k_BxPxKxH is None:
            k_BxSxKxH, v_BxSxKxH = k_BxLxKxH, v_BxLxKxH
        else:
            k_BxSxKxH = jnp.concatenate([past_k_BxPxKxH.astype(k_BxLxKxH.dtype), k_BxLxKxH], axis=1)
            v_BxSxKxH = jnp.concatenate([past_v_BxPxKxH.astype(v_BxLxKxH.dtype), v_BxLxKxH], axis=1)
        out_BxLxAxH = attention(
            q_BxLxAxH,
            k_BxSxKxH,
            v_BxSxKxH,
            q_segment_ids_BxL=ctx.q_segment_ids_BxL if ctx.segmented else None,
            kv_segment_ids_BxS=ctx.kv_segment_ids_BxS if ctx.segmented else None,
            causal=self.causal,
            impl=self.impl,
        )
        out_BxLxAxH = checkpoint_name(out_BxLxAxH, "attention_out")
        out_BxLxD = self.o_proj(constrain(out_BxLxAxH, ("batch", "length", "heads", "head_dim")))
        return out_BxLxD, k_BxLxKxH, v_BxLxKxH


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pdt = _DTYPES[config.param_dtype]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pdt)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=pdt
        )
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x_BxLxD: jax.Array,
        ctx: AttentionContext,
        past_k: jax.Array | None = None,
        past_v: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        attn_BxLxD, k, v = self.self_attn(self.input_layernorm(x_BxLxD), ctx, past_k, past_v)
        x_BxLxD = constrain(x_BxLxD + attn_BxLxD, ("batch", "length", "embed"))
        x_BxLxD = x_BxLxD + self.mlp(self.post_attention_layernorm(x_BxLxD))
        return constrain(x_BxLxD, ("batch", "length", "embed")), k, v


# --------------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------------


def mesh_platform() -> str:
    """The platform the computation being traced runs on: the current mesh's devices' platform
    (`jax.set_mesh`), else the default backend. A program compiled for TPU devices on a CPU host
    (`coda_trainer.preflight`) is a TPU program even though the host's backend is the CPU."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def resolve_attention_impl(impl: str, backend: str | None = None) -> str:
    """`auto` → cudnn on GPU, splash on TPU, xla elsewhere; explicit kernels are checked.

    `backend` defaults to `mesh_platform()`: the mesh's devices decide, not the host's backend.
    """
    backend = backend or mesh_platform()
    if impl == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU backend, running on {backend!r}")
    if impl == "splash" and backend != "tpu":
        raise ValueError(f"attention='splash' needs a TPU backend, running on {backend!r}")
    return impl


def _visible_BxLxS(
    q_segment_ids_BxL: jax.Array | None,
    kv_segment_ids_BxS: jax.Array | None,
    L: int,
    S: int,
    causal: bool,
) -> jax.Array | None:
    """Which keys each query may attend to; queries are the LAST L of the S key positions."""
    mask = None
    if q_segment_ids_BxL is not None:
        mask = q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :]
    if causal:
        causal_LxS = (jnp.arange(L)[:, None] + (S - L)) >= jnp.arange(S)[None, :]
        mask = causal_LxS[None] if mask is None else mask & causal_LxS[None]
    return mask


def _xla_attention(q_BxLxAxH, k_BxSxKxH, v_BxSxKxH, visible_BxLxS) -> jax.Array:
    B, L, A, H = q_BxLxAxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxLxKxGxH = q_BxLxAxH.reshape(B, L, K, A // K, H)
    logits_BxKxGxLxS = jnp.einsum(
        "blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * (H**-0.5)
    if visible_BxLxS is not None:
        logits_BxKxGxLxS = jnp.where(visible_BxLxS[:, None, None], logits_BxKxGxLxS, _MASK_VALUE)
    probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxLxKxGxH = jnp.einsum(
        "bkgls,bskh->blkgh", probs_BxKxGxLxS, v_BxSxKxH, preferred_element_type=jnp.float32
    )
    return out_BxLxKxGxH.reshape(B, L, A, H).astype(q_BxLxAxH.dtype)


def _cudnn_attention(
    q_BxLxAxH,
    k_BxSxKxH,
    v_BxSxKxH,
    visible_BxLxS,
    causal_only: bool,
    *,
    implementation: str = "cudnn",
) -> jax.Array:
    if causal_only:  # pure causal self-attention: let cuDNN skip the masked blocks
        return jax.nn.dot_product_attention(
            q_BxLxAxH, k_BxSxKxH, v_BxSxKxH, is_causal=True, implementation=implementation
        )
    mask = None if visible_BxLxS is None else visible_BxLxS[:, None]
    return jax.nn.dot_product_attention(
        q_BxLxAxH, k_BxSxKxH, v_BxSxKxH, mask=mask, implementation=implementation
    )


def _splash_attention(
    q_BxLxAxH,
    k_BxSxKxH,
    v_BxSxKxH,
    q_segment_ids_BxL,
    kv_segment_ids_BxS,
    causal: bool,
    *,
    interpret: bool = False,
) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, L, A, H = q_BxLxAxH.shape
    S = k_BxSxKxH.shape[1]
    if q_segment_ids_BxL is None:
        q_segment_ids_BxL = jnp.ones((B, L), jnp.int32)
        kv_segment_ids_BxS = jnp.ones((B, S), jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    head_shards = 1 if mesh.empty else mesh.shape.get("tensor", 1)
    if A % head_shards or k_BxSxKxH.shape[2] % head_shards:
        head_shards = 1
    one = sm.CausalMask((L, S), offset=S - L) if causal else sm.FullMask((L, S))
    block = next(b for b in (512, 256, 128) if L % b == 0 and S % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([one] * A),
        block_sizes=sizes,
        head_shards=head_shards,
        q_seq_shards=1,
        interpret=interpret,
    )
    # The kernel takes heads-major, per-example inputs and no scale: scale q up front.
    q_BxAxLxH = (q_BxLxAxH * (H**-0.5)).transpose(0, 2, 1, 3)
    k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)

    def run(kernel, q, k, v, qs, ks):
        return jax.vmap(
            lambda q1, k1, v1, qs1, ks1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(qs1, ks1))
        )(q, k, v, qs, ks)

    if mesh.empty:
        out_BxAxLxH = run(
            kernel, q_BxAxLxH, k_BxKxSxH, v_BxKxSxH, q_segment_ids_BxL, kv_segment_ids_BxS
        )
    else:
        from jax.sharding import NamedSharding, PartitionSpec

        from coda_trainer.sharding import logical_to_spec

        shape = dict(mesh.shape)
        qspec = logical_to_spec(
            ("batch", "heads", "length", "head_dim"), shape=q_BxAxLxH.shape, mesh_shape=shape
        )
        kvspec = logical_to_spec(
            ("batch", "kv_heads", "length", "head_dim"), shape=k_BxKxSxH.shape, mesh_shape=shape
        )
        if head_shards == 1:
            qspec = PartitionSpec(qspec[0], None, None, None)
            kvspec = PartitionSpec(kvspec[0], None, None, None)
        segspec = PartitionSpec(qspec[0], None)
        kspec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(qspec[1], None)))
        out_BxAxLxH = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(kspec, qspec, kvspec, kvspec, segspec, segspec),
            out_specs=qspec,
            check_vma=False,
        )(kernel, q_BxAxLxH, k_BxKxSxH, v_BxKxSxH, q_segment_ids_BxL, kv_segment_ids_BxS)
    return out_BxAxLxH.transpose(0, 2, 1, 3)


def attention(
    q_BxLxAxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    *,
    q_segment_ids_BxL: jax.Array | None,
    kv_segment_ids_BxS: jax.Array | None,
    causal: bool,
    impl: str = "xla",
) -> jax.Array:
    """Grouped-query attention; queries are the last L of the S key positions.

    A query attends to keys with its segment id (None: all keys); with `causal`, also only to keys at
    or before its own position (all of a cache's past keys are before it).
    """
    L, S = q_BxLxAxH.shape[1], k_BxSxKxH.shape[1]
    auto = impl == "auto"
    impl = resolve_attention_impl(impl)
    if auto and impl == "cudnn" and q_BxLxAxH.dtype == jnp.float32:
        impl = "xla"  # cuDNN flash attention takes half precision only
    if impl == "splash":
        if L % 128 == 0 and S % 128 == 0:
            return _splash_attention(
                q_BxLxAxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxL, kv_segment_ids_BxS, causal
            )
        impl = "xla"  # the kernel tiles by 128; short sampler blocks take the reference path
    visible_BxLxS = _visible_BxLxS(q_segment_ids_BxL, kv_segment_ids_BxS, L, S, causal)
    if impl == "cudnn":
        causal_only = causal and q_segment_ids_BxL is None and L == S
        return _cudnn_attention(q_BxLxAxH, k_BxSxKxH, v_BxSxKxH, visible_BxLxS, causal_only)
    return _xla_attention(q_BxLxAxH, k_BxSxKxH, v_BxSxKxH, visible_BxLxS)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

_REMAT_POLICIES: dict[str, Callable[[], Any]] = {
    "full": lambda: None,  # save nothing: recompute the whole block
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep only the attention output (the quadratic op); recompute projections and the MLP.
    "minimal": lambda: jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class Transformer(nnx.Module):
    """CoDA / Qwen3 decoder stack. `model(tokens_BxL)` → raw float32 logits_BxLxV."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        pdt = _DTYPES[config.param_dtype]
        self.embed_tokens = Embed(v, d, config=config, rngs=rngs)
        if config.scan_layers:
            self.layers = _stacked_blocks(config, rngs)
        else:
            self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(d, eps=config.rms_norm_eps, param_dtype=pdt)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(
                (d, v), ("embed", "vocab"), "bld,dv->blv", config=config, rngs=rngs
            )

    def __call__(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
        past_kv: KVCache | None = None,
        return_kv: bool = False,
    ):
        cfg = self.config
        dtype = _DTYPES[cfg.dtype]
        B, L = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        segmented = segment_ids_BxL is not None or past_kv is not None
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((B, L), jnp.int32)
        segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
        kv_segment_ids_BxS = segment_ids_BxL
        if past_kv is not None:
            kv_segment_ids_BxS = jnp.concatenate(
                [past_kv.segment_ids_BxS.astype(jnp.int32), segment_ids_BxL], axis=1
            )
        cos_BxLxH, sin_BxLxH = rope_cos_sin(positions_BxL, cfg.head_dim, cfg.rope_theta)
        ctx = AttentionContext(cos_BxLxH, sin_BxLxH, segment_ids_BxL, kv_segment_ids_BxS, segmented)

        embedding_VxD = self.embed_tokens.embedding[...]
        # FSDP: gather the table's embed dim first; the lookup then only splits over vocab shards.
        table_VxD = constrain(embedding_VxD, ("vocab", None))
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))

        past_k = None if past_kv is None else past_kv.k_ZxBxSxKxH
        past_v = None if past_kv is None else past_kv.v_ZxBxSxKxH
        x_BxLxD, k_ZxBxLxKxH, v_ZxBxLxKxH = self._run_layers(
            x_BxLxD, ctx, past_k, past_v, return_kv=return_kv
        )

        x_BxLxD = self.norm(x_BxLxD)
        if cfg.tie_word_embeddings:
            head_DxV = embedding_VxD.astype(dtype).T
        else:
            head_DxV = self.lm_head.kernel[...].astype(dtype)
        logits_BxLxV = project_tokens(x_BxLxD, head_DxV, preferred_element_type=jnp.float32)
        logits_BxLxV = constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "vocab"))
        if return_kv:
            return logits_BxLxV, KVCache(k_ZxBxLxKxH, v_ZxBxLxKxH, segment_ids_BxL)
        return logits_BxLxV

    def _run_layers(self, x_BxLxD, ctx, past_k, past_v, *, return_kv: bool):
        remat = self.config.remat

        def apply(graphdef, x, xs):
            state, pk, pv = xs
            x, k, v = nnx.merge(graphdef, state)(x, ctx, pk, pv)
            # Only stack per-layer k/v when asked: the training step never carries them.
            return x, ((k, v) if return_kv else None)

        def wrap(fn: Callable, prevent_cse: bool) -> Callable:
            if remat == "none":
                return fn
            return jax.checkpoint(fn, policy=_REMAT_POLICIES[remat](), prevent_cse=prevent_cse)

        if self.config.scan_layers:
            graphdef, state = nnx.split(self.layers)
            body = wrap(functools.partial(apply, graphdef), prevent_cse=False)
            x_BxLxD, kv = jax.lax.scan(body, x_BxLxD, (state, past_k, past_v))
            return (x_BxLxD, *kv) if return_kv else (x_BxLxD, None, None)

        kvs = []
        for i, layer in enumerate(self.layers):
            graphdef, state = nnx.split(layer)
            pk = None if past_k is None else past_k[i]
            pv = None if past_v is None else past_v[i]
            x_BxLxD, kv = wrap(functools.partial(apply, graphdef), prevent_cse=True)(
                x_BxLxD, (state, pk, pv)
            )
            kvs.append(kv)
        if not return_kv:
            return x_BxLxD, None, None
        return x_BxLxD, jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs])


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """`num_layers` Blocks whose parameters are stacked on a leading `layers` axis (for scan)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"},
    )
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs)

    return make(rngs)


def create_sharded_model(config: ModelConfig, mesh: Mesh, seed: int = 0) -> Transformer:
    """Initialise a Transformer with every parameter created directly in its shards.

    The init function runs under `jit` with `out_shardings`, so no device (or host) ever holds an
    unsharded copy; values equal `Transformer(config, rngs=nnx.Rngs(seed))`'s.
    """

    def init_state() -> Any:
        return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))[1]

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed))))
    abstract_state = jax.eval_shape(init_state)
    shardings = state_shardings(abstract_state, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: Transformer, mesh: Mesh) -> Transformer:
    """Move an existing model's parameters into their shardings on `mesh` (in place; returns it)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model
