"""Declarative sharding: logical axis names → mesh axes (`data`, `fsdp`, `tensor`), in one table.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "mlp")`) and the model constrains
its activations with logical names (`batch`, `length`, `embed`, `heads`, `mlp`, `vocab`). Only
`LOGICAL_RULES` says where those names land on the mesh, so the same model runs on 1 CPU, 8 GPUs or
a TPU slice by changing the mesh, never the model (as in MaxText).

Activation constraints are no-ops unless a mesh is set (`with jax.set_mesh(mesh): ...`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from coda_trainer.config import MeshConfig

__all__ = [
    "LOGICAL_RULES",
    "MESH_AXES",
    "batch_sharding",
    "constrain",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "optimizer_state_shardings",
    "param_logical_axes",
    "state_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Logical name → mesh axes, tried in order. A mesh axis is used at most once per array: when an
# entry's axes are already taken (activations `(batch, length, embed)`: batch took fsdp), the next
# entry for the same name is tried, and with none left the dimension is replicated.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv_length", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

_KNOWN = frozenset(name for name, _ in LOGICAL_RULES)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    *,
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES,
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have these logical names.

    With `shape` and `mesh_shape`, mesh axes that do not divide a dimension are dropped (a 2-head
    KV projection on a 4-way tensor axis is replicated instead of failing to place).
    """
    rules = tuple(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in _KNOWN:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(_KNOWN)}")
        chosen: tuple[str, ...] = ()
        for rule_name, mesh_axes in rules:
            if rule_name != name:
                continue
            candidate = tuple(a for a in _as_tuple(mesh_axes) if a not in used)
            if candidate != _as_tuple(mesh_axes):
                continue  # some of its axes are taken: try the next rule for this name
            chosen = candidate
            break
        if shape is not None and mesh_shape is not None:
            kept: list[str] = []
            for axis in chosen:
                if shape[i] % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]) == 0:
                    kept.append(axis)
            chosen = tuple(kept)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*out)


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axes (divisibility-checked if `shape`)."""
    spec = logical_to_spec(logical_axes, shape=shape, mesh_shape=dict(mesh.shape))
    return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of `(batch, length)` model inputs (token ids, positions, segment ids)."""
    return logical_sharding(mesh, ("batch", "length"))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, shape=x.shape, mesh_shape=dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


def make_mesh(mesh_config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sizes from `mesh_config`.

    The default `MeshConfig()` puts every device on `fsdp`. On multi-slice TPU jobs the `data` axis
    spans slices (DCN) and the others stay inside a slice (ICI).
    """
    mesh_config = mesh_config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_config.resolve(len(devices))
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        from jax.experimental import mesh_utils

        if sizes[0] % num_slices:
            raise ValueError(
                f"mesh data={sizes[0]} must be a multiple of the {num_slices} slices (data spans slices)"
            )
        ici = (sizes[0] // num_slices, sizes[1], sizes[2])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
    elif devices and devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def param_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes recorded on a parameter (scanned layers include the leading `layers`)."""
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if axes is None:
        return (None,) * len(shape)
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} has logical axes {axes} of another rank")
    return tuple(axes)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree like `state` (an nnx.State, abstract or concrete) holding each leaf's NamedSharding."""

    def one(v: Any) -> Any:
        if _is_variable(v):
            return v.replace(logical_sharding(mesh, param_logical_axes(v), v.get_value().shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def optimizer_state_shardings(opt_state: Any, mesh: Mesh) -> Any:
    """A tree like `opt_state` (optax state over nnx params, abstract or concrete) of NamedShardings.

    Optimiser moments built by mapping over the params (AdamW's mu/nu, Adafactor's unfactored v)
    keep each parameter's `logical_axes` and get that parameter's sharding: every chip holds only
    its shard of them. Leaves whose rank no longer matches their axes (Adafactor's factored row and
    column statistics, a vector per matrix) and plain scalars (step counts) are replicated; they
    are small. Without explicit shardings `jit(tx.init)` would replicate the zeros it creates.
    """

    def one(v: Any) -> Any:
        if _is_variable(v):
            axes = v.get_metadata().get("logical_axes")
            shape = v.get_value().shape
            if axes is not None and len(axes) == len(shape):
                return v.replace(logical_sharding(mesh, tuple(axes), shape))
            return v.replace(NamedSharding(mesh, PartitionSpec()))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, opt_state, is_leaf=_is_variable)
