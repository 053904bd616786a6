"""Orbax step checkpoints, the skipped half-written checkpoint, final export and init_from."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from coda_trainer import checkpoint as ck
from coda_trainer import storage
from coda_trainer.config import ModelConfig
from coda_trainer.model import create_sharded_model
from coda_trainer.sharding import make_mesh
from flax import nnx

TINY = dict(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16
)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.preset("coda-tiny", **TINY)


@pytest.fixture(scope="module")
def base(cfg):
    return create_sharded_model(cfg, make_mesh(), seed=0)


def _clone(model, scale: float):
    """A new model like `model` with every parameter multiplied by `scale` (0 = a blank target).

    (Creating a sharded model compiles its init: seconds each, so tests derive variants instead.)
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * scale, state))


def _params(model):
    return nnx.state(model, nnx.Param)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _State:
    def __init__(self, value: bytes = b"{}"):
        self.value = value

    def get_state(self) -> bytes:
        return self.value

    def set_state(self, value) -> None:
        self.value = value if isinstance(value, bytes) else json.dumps(value).encode()

    def start_prefetch(self) -> None:
        pass


def _save_steps(stage_dir: str, base, steps, keep=5):
    """Save `steps`, each with params scaled by the step number; returns (checkpointer, tx)."""
    params = _params(base)
    tx = optax.adam(1e-3)
    ckptr = ck.Checkpointer(stage_dir, keep=keep, async_save=True)
    for s in steps:
        p = jax.tree.map(lambda x, s=s: x * s, params)
        ckptr.save(s, p, tx.init(p), json.dumps({"step": s}).encode(), {"note": f"s{s}"})
    ckptr.wait()
    return ckptr, params, tx


def test_roundtrip_params_opt_state_data_and_meta(tmp_path, cfg, base):
    stage_dir = str(tmp_path / "pretrain")
    ckptr, params, tx = _save_steps(stage_dir, base, [2, 4])
    assert ckptr.all_steps() == [2, 4]
    ckptr.close()
    fresh = _params(_clone(base, 0.0))
    data = _State()
    restored = ck.Checkpointer(stage_dir).restore_latest(fresh, tx.init(fresh), data)
    assert restored.step == 4 and restored.meta["note"] == "s4" and restored.meta["step"] == 4
    _assert_trees_equal(restored.params, jax.tree.map(lambda x: x * 4, params))
    _assert_trees_equal(restored.opt_state, tx.init(jax.tree.map(lambda x: x * 4, params)))
    assert json.loads(data.value) == {"step": 4}


def test_half_written_checkpoints_are_skipped(tmp_path, base, caplog):
    stage_dir = tmp_path / "pretrain"
    ckptr, params, tx = _save_steps(str(stage_dir), base, [2, 4, 6])
    ckptr.close()
    # An unfinished save (process killed mid-write) is a temporary directory: never a step.
    (stage_dir / "8.orbax-checkpoint-tmp-1234" / "params").mkdir(parents=True)
    # A finished step whose files were damaged afterwards: truncate every params data file of 6.
    damaged = [
        p for p in (stage_dir / "6" / "params").rglob("*") if p.is_file() and p.stat().st_size > 0
    ]
    for p in damaged:
        if "manifest" in p.name or p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:7])
    # ...and remove step 4's data state entirely.
    for p in (stage_dir / "4" / "data").iterdir():
        p.unlink()
    fresh = _params(_clone(base, 0.0))
    data = _State()
    reopened = ck.Checkpointer(str(stage_dir), keep=5)
    assert reopened.all_steps() == [2, 4, 6]
    with caplog.at_level(logging.WARNING, logger="coda_trainer.checkpoint"):
        restored = reopened.restore_latest(fresh, tx.init(fresh), data)
    assert restored is not None and restored.step == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "pretrain/6 is incomplete or unreadable" in warned and "pretrain/4 is incomplete" in warned
    )
    _assert_trees_equal(restored.params, jax.tree.map(lambda x: x * 2, params))
    # The unreadable ones are removed at the next save so they cannot shadow newer steps.
    reopened.save(3, restored.params, restored.opt_state, b"{}", {})
    reopened.close()
    assert ck.Checkpointer(str(stage_dir)).all_steps() == [2, 3]


def test_no_checkpoint_leaves_data_state_alone(tmp_path, cfg, base):
    fresh = _params(_clone(base, 0.0))
    data = _State(b'{"initial": 1}')
    assert (
        ck.Checkpointer(str(tmp_path / "s")).restore_latest(
            fresh, optax.adam(1e-3).init(fresh), data
        )
        is None
    )
    assert data.value == b'{"initial": 1}'


def test_final_export_and_init_from(tmp_path, cfg, base):
    model = _clone(base, 3.0)
    final = str(tmp_path / "run" / "pretrain" / "final")
    ck.write_final(model, cfg, final, tokenizer_path="project", meta={"step": 7})
    assert storage.is_committed(final)
    names = set(os.listdir(final))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        ck.FINAL_META,
        "COMMITTED",
    } <= names
    assert not [n for n in os.listdir(Path(final).parent) if ".tmp-" in n]  # staging removed
    assert ck.resolve_init_from(final) == ("hf", final)
    assert ck.resolve_init_from(str(Path(final).parent)) == ("hf", final)  # a stage dir → its final

    target = _clone(base, 0.0)
    ck.load_init_params(final, target)
    _assert_trees_equal(_params(target), _params(model))

    # An orbax step directory: only params are read.
    stage_dir = str(tmp_path / "run" / "midtrain")
    ckptr, params, _ = _save_steps(stage_dir, base, [5])
    ckptr.close()
    assert ck.resolve_init_from(f"{stage_dir}/5") == ("orbax", f"{stage_dir}/5")
    target = _clone(base, 0.0)
    ck.load_init_params(f"{stage_dir}/5", target)
    _assert_trees_equal(_params(target), jax.tree.map(lambda x: x * 5, params))


def test_init_from_errors(tmp_path):
    with pytest.raises(ck.InitFromError, match="does not exist"):
        ck.resolve_init_from(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ck.InitFromError, match="neither a Hugging Face folder"):
        ck.resolve_init_from(str(tmp_path / "junk"))
    half = tmp_path / "stage" / "final"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    (half / ck.FINAL_META).write_text("{}")
    with pytest.raises(ck.InitFromError, match="never completed"):
        ck.resolve_init_from(str(half))


def test_gcs_checkpoints_and_final(gcs_bucket, cfg, base):
    stage_dir = f"{gcs_bucket}/ckpt/pretrain"
    ckptr, params, tx = _save_steps(stage_dir, base, [1, 2], keep=1)
    assert ckptr.all_steps() == [2]  # keep-N on gs:// too
    ckptr.close()
    fresh = _params(_clone(base, 0.0))
    data = _State()
    restored = ck.Checkpointer(stage_dir).restore_latest(fresh, tx.init(fresh), data)
    assert restored.step == 2 and json.loads(data.value) == {"step": 2}
    _assert_trees_equal(restored.params, jax.tree.map(lambda x: x * 2, params))

    model = _clone(base, 5.0)
    final = f"{gcs_bucket}/ckpt/pretrain/final"
    ck.write_final(model, cfg, final, tokenizer_path="project", meta={"step": 2})
    assert storage.is_committed(final)
    target = _clone(base, 0.0)
    ck.load_init_params(f"{gcs_bucket}/ckpt/pretrain", target)
    _assert_trees_equal(_params(target), _params(model))
    assert jnp.asarray(0).dtype == jnp.int32  # x64 untouched by orbax/gcs
