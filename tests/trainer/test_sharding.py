"""Sharding: the logical-axis rules, the mesh helper, and a real 2×2×2 run on 8 simulated devices.

The multi-device checks run in a subprocess so `--xla_force_host_platform_device_count=8` is set
before JAX initialises (this process already holds a 1-device CPU backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from coda_trainer.config import MeshConfig, ModelConfig
from coda_trainer.model import Transformer, create_sharded_model, shard_model
from coda_trainer.sharding import (
    batch_sharding,
    constrain,
    logical_sharding,
    logical_to_spec,
    make_mesh,
)
from flax import nnx
from jax.sharding import PartitionSpec as P

REPO = Path(__file__).resolve().parents[2]


def test_rules_map_parameters_and_activations():
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(
        None, "fsdp", "tensor", None
    )
    # Activations: batch takes data+fsdp, so embed (fsdp) falls back to replicated.
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "length", "vocab")) == P(("data", "fsdp"), None, "tensor")
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        logical_to_spec(("embd",))


def test_rules_drop_mesh_axes_that_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 4, "tensor": 4}
    # 2 kv heads cannot be split 4 ways: replicated instead of an error at placement time.
    spec = logical_to_spec(
        ("embed", "kv_heads", "head_dim"), shape=(64, 2, 16), mesh_shape=mesh_shape
    )
    assert spec == P("fsdp", None, None)
    # A batch of 2 keeps data (2) but not data×fsdp (8).
    assert logical_to_spec(("batch", "length"), shape=(2, 16), mesh_shape=mesh_shape) == P(
        "data", None
    )


def test_single_device_mesh_and_model(micro_config: ModelConfig):
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2))
    model = create_sharded_model(micro_config, mesh, seed=0)
    reference = Transformer(micro_config, rngs=nnx.Rngs(0))
    for (pa, a), (pb, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reference)), strict=True
    ):
        assert pa == pb  # jit-compiled init may differ from eager init in the last bit
        np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-6, atol=1e-9)
    assert model.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    tokens = jnp.zeros((2, 4), jnp.int32)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    assert logical_sharding(mesh, ("embed",)).spec == P("fsdp")
    fwd = nnx.jit(lambda m, t: m(t))
    with jax.set_mesh(mesh):
        logits = fwd(model, jax.device_put(tokens, batch_sharding(mesh)))
    np.testing.assert_allclose(logits, fwd(reference, tokens), atol=1e-6)


def test_constrain_is_a_noop_without_mesh():
    x = jnp.ones((2, 3, 4))
    assert constrain(x, ("batch", "length", "embed")) is x


def test_shard_model_moves_existing_parameters(micro_model: Transformer):
    mesh = make_mesh()
    shard_model(micro_model, mesh)
    assert micro_model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")


_EIGHT_DEVICES = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from coda_trainer import hf
    from coda_trainer.config import MeshConfig, ModelConfig
    from coda_trainer.model import KVCache, Transformer
    from coda_trainer.model import create_sharded_model, shard_model
    from coda_trainer.sharding import batch_sharding, make_mesh

    assert jax.device_count() == 8, jax.devices()
    out = {}
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    out["mesh"] = dict(mesh.shape)
    out["default_mesh"] = dict(make_mesh().shape)
    cfg = ModelConfig.preset("test-micro", attention="xla", dtype="float32")
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, cfg.vocab_size)
    segments = jnp.array([[1] * 6 + [2] * 10] * 2 + [[1] * 12 + [0] * 4] * 2, jnp.int32)
    fwd = nnx.jit(lambda m, t, s: m(t, segment_ids_BxL=s, return_kv=True))

    reference = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()  # unsharded, on one device
    ref_logits, ref_kv = fwd(reference, tokens, segments)

    def specs(model):
        return {
            "/".join(map(str, p)): [list(a) if isinstance(a, tuple) else a for a in v.get_value().sharding.spec]
            for p, v in nnx.to_flat_state(nnx.state(model))
        }

    def run(model):
        with jax.set_mesh(mesh):
            t = jax.device_put(tokens, batch_sharding(mesh))
            s = jax.device_put(segments, batch_sharding(mesh))
            logits, kv = fwd(model, t, s)
        return {
            "logits_err": float(jnp.max(jnp.abs(logits - ref_logits))),
            "kv_err": float(jnp.max(jnp.abs(kv.k_ZxBxSxKxH - ref_kv.k_ZxBxSxKxH))),
            "logits_spec": [list(a) if isinstance(a, tuple) else a for a in logits.sharding.spec],
            "devices_per_param": min(len(v.get_value().sharding.device_set) for _, v in nnx.to_flat_state(nnx.state(model))),
        }

    created = create_sharded_model(cfg, mesh, seed=0)
    out["created"] = {"specs": specs(created), **run(created)}
    out["created"]["param_err"] = max(
        float(jnp.max(jnp.abs(a.get_value() - b.get_value())))
        for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(created)), nnx.to_flat_state(nnx.state(reference)))
    )
    q = created.layers.self_attn.q_proj.kernel.get_value()
    out["created"]["q_shard_shape"] = list(q.addressable_shards[0].data.shape)

    moved = shard_model(Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    out["moved"] = {"specs": specs(moved), **run(moved)}

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(reference, d, max_shard_bytes=50_000)
        _, loaded = hf.load_pretrained(d, mesh=mesh, config_overrides={"dtype": "float32", "attention": "xla"})
        out["loaded"] = {"specs": specs(loaded), **run(loaded)}
        _, unrolled = hf.load_pretrained(
            d, mesh=mesh, config_overrides={"dtype": "float32", "attention": "xla", "scan_layers": False}
        )
        out["unrolled"] = {"specs": specs(unrolled), **run(unrolled)}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    env = {
        **os.environ,
        # 8 simulated devices; LLVM at -O0 halves the compile time that dominates this tiny run.
        "XLA_FLAGS": (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        ).strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [
                str(REPO / "trainer"),
                str(REPO / "operator"),
                str(REPO / "cli"),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_eight_device_mesh_shapes(eight_devices: dict):
    assert eight_devices["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert eight_devices["default_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("how", ["created", "moved", "loaded", "unrolled"])
def test_sharded_forward_matches_unsharded(eight_devices: dict, how: str):
    r = eight_devices[how]
    assert r["logits_err"] <= 1e-5 and r["kv_err"] <= 1e-5, r
    assert r["logits_spec"] == [["data", "fsdp"], None, "tensor"]
    assert r["devices_per_param"] == 8  # every parameter is laid out over the whole mesh


@pytest.mark.parametrize("how", ["created", "moved", "loaded"])
def test_parameters_are_really_sharded(eight_devices: dict, how: str):
    specs = eight_devices[how]["specs"]
    assert specs["embed_tokens/embedding"] == ["tensor", "fsdp"]
    assert specs["lm_head/kernel"] == ["fsdp", "tensor"]
    assert specs["layers/self_attn/q_proj/kernel"] == [None, "fsdp", "tensor", None]
    assert specs["layers/self_attn/k_proj/kernel"] == [None, "fsdp", "tensor", None]
    assert specs["layers/self_attn/o_proj/kernel"] == [None, "tensor", None, "fsdp"]
    assert specs["layers/mlp/gate_proj/kernel"] == [None, "fsdp", "tensor"]
    assert specs["layers/mlp/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert specs["layers/input_layernorm/scale"] in ([None, None], [None], [])


def test_created_parameters_equal_unsharded_init(eight_devices: dict):
    assert (
        eight_devices["created"]["param_err"] <= 1e-8
    )  # same values (up to jit-vs-eager last bits)
    # (2 layers, 64/fsdp, 4/tensor, 16): each device holds a quarter of the q projection.
    assert eight_devices["created"]["q_shard_shape"] == [2, 32, 2, 16]


def test_unrolled_layers_shard_per_layer(eight_devices: dict):
    specs = eight_devices["unrolled"]["specs"]
    assert specs["layers/0/self_attn/q_proj/kernel"] == ["fsdp", "tensor", None]
    assert specs["layers/1/mlp/down_proj/kernel"] == ["tensor", "fsdp"]
