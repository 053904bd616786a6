"""Hugging Face interop: load and save CoDA / Qwen3 checkpoints (safetensors + config.json).

Both released layouts share tensor names (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.
q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`); torch Linear weights are [out, in] and
become our [in..., out...] kernels. Loading streams: one tensor at a time is read from disk (gs://
shards are downloaded to a temp file first) and placed straight into its target sharding, so a model
never exists twice in host memory. Saving streams the other way, one tensor at a time.

The safetensors container is read and written here directly (an 8-byte header length, a JSON
header, raw little-endian data): the `safetensors` numpy backend has no bfloat16, and this keeps the
one-tensor-at-a-time guarantee for both directions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from coda_trainer import storage
from coda_trainer.config import ModelConfig
from coda_trainer.contract import PermanentError
from coda_trainer.hf_config import hf_config_from_model, model_config_from_hf
from coda_trainer.model import Transformer
from coda_trainer.sharding import state_shardings

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "hf_tensor_layout",
    "load_hf_weights_into",
    "load_pretrained",
    "save_pretrained",
    "state_to_hf_tensors",
]

ARCHITECTURES = ("CoDALanguageModel", "Qwen3ForCausalLM")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write; they are recomputed, never loaded.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(PermanentError):
    """A Hugging Face folder that cannot be loaded into the requested model (names file and tensor)."""


# --------------------------------------------------------------------------------------------------
# Name and layout mapping
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor ↔ one parameter (or one layer's slice of a scanned parameter)."""

    name: str
    param: tuple[str | int, ...]  # path in nnx.state(model)
    layer: int | None  # index on the leading `layers` axis of a scanned parameter
    kernel_shape: tuple[int, ...]  # our shape (of the slice, for scanned parameters)
    n_in: int | None  # leading input dims of a Linear kernel; None = stored as is

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return self.kernel_shape
        return (
            math.prod(self.kernel_shape[self.n_in :]),
            math.prod(self.kernel_shape[: self.n_in]),
        )

    def to_kernel(self, w: np.ndarray) -> np.ndarray:
        return w if self.n_in is None else np.ascontiguousarray(w.T).reshape(self.kernel_shape)

    def to_hf(self, kernel: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return kernel
        d_in = math.prod(self.kernel_shape[: self.n_in])
        return np.ascontiguousarray(kernel.reshape(d_in, -1).T)


def hf_tensor_layout(config: ModelConfig) -> list[HFTensor]:
    """Every HF tensor our model with `config` holds, in checkpoint order."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    per_layer: list[tuple[str, tuple[str, ...], tuple[int, ...], int | None]] = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), (d,), None),
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (d, n, h), 1),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (d, k, h), 1),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (d, k, h), 1),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (n, h, d), 2),
        ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), (h,), None),
        ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), (h,), None),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,), None),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (d, f), 1),
        ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (d, f), 1),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (f, d), 1),
    ]
    out = [HFTensor("model.embed_tokens.weight", ("embed_tokens", "embedding"), None, (v, d), None)]
    for i in range(config.num_layers):
        for suffix, path, shape, n_in in per_layer:
            if config.scan_layers:
                out.append(
                    HFTensor(f"model.layers.{i}.{suffix}", ("layers", *path), i, shape, n_in)
                )
            else:
                out.append(
                    HFTensor(f"model.layers.{i}.{suffix}", ("layers", i, *path), None, shape, n_in)
                )
    out.append(HFTensor("model.norm.weight", ("norm", "scale"), None, (d,), None))
    if not config.tie_word_embeddings:
        out.append(HFTensor("lm_head.weight", ("lm_head", "kernel"), None, (d, v), 1))
    return out


# --------------------------------------------------------------------------------------------------
# safetensors container
# --------------------------------------------------------------------------------------------------

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """Random access to the tensors of one local .safetensors file, one at a time."""

    def __init__(self, path: str, display_name: str | None = None):
        self.path = path
        self.display_name = display_name or path
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except Exception as e:
            self._f.close()
            raise CheckpointError(f"{self.display_name}: not a valid safetensors file ({e})") from e
        self._data_start = 8 + n
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(
                f"{self.display_name}: tensor {name!r} has unsupported dtype {info['dtype']}"
            )
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        self._f.seek(self._data_start + begin)
        buf = self._f.read(end - begin)
        return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(info["shape"])


def write_safetensors(
    f: IO[bytes], tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]
) -> None:
    """Stream tensors into a safetensors file: header from shapes first, then one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, get in tensors:
        arr = np.ascontiguousarray(get(), dtype=dtype)
        if arr.shape != tuple(shape):
            raise ValueError(
                f"tensor {name!r}: produced shape {arr.shape}, header says {tuple(shape)}"
            )
        f.write(arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local path for `uri`: itself when local, else a temp download removed afterwards."""
    if not storage.is_remote(uri):
        yield uri
        return
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as out, storage.open_file(uri, "rb") as src:
            shutil.copyfileobj(src, out, length=16 << 20)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_hf_config(path: str) -> dict[str, Any]:
    uri = storage.join(path, "config.json")
    if not storage.exists(uri):
        raise CheckpointError(f"{uri}: missing (a Hugging Face model folder needs config.json)")
    hf = json.loads(storage.read_text(uri))
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{uri}: unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return hf


def _weight_map(path: str) -> dict[str, str]:
    """tensor name → shard file name, from the index or the single file's header."""
    index_uri = storage.join(path, INDEX_FILE)
    single_uri = storage.join(path, SINGLE_FILE)
    if storage.exists(index_uri):
        weight_map: dict[str, str] = json.loads(storage.read_text(index_uri))["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            if not storage.exists(storage.join(path, file)):
                shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
                raise CheckpointError(
                    f"{storage.join(path, file)}: shard file listed in {INDEX_FILE} is missing "
                    f"({len(names)} tensors, e.g. {shown})"
                )
        return weight_map
    if storage.exists(single_uri):
        with _local_copy(single_uri) as local, SafetensorsReader(local, single_uri) as r:
            return dict.fromkeys(r.names(), SINGLE_FILE)
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _plan_lm_head(
    config: ModelConfig, hf: dict[str, Any], weight_map: dict[str, str], path: str
) -> str:
    """How lm_head is filled: 'load', 'copy_embedding' (tied Qwen3 → untied CoDA), or 'tied'."""
    arch = hf["architectures"][0]
    has_head = "lm_head.weight" in weight_map
    if config.tie_word_embeddings:
        return "tied"  # an lm_head.weight in the file must then equal the embedding (checked later)
    if has_head:
        return "load"
    file_tied = bool(hf.get("tie_word_embeddings", False)) and arch == "Qwen3ForCausalLM"
    if file_tied:
        return (
            "copy_embedding"  # how CoDA starts from Qwen3: the untied head begins as the embedding
        )
    files = ", ".join(sorted(set(weight_map.values())))
    raise CheckpointError(
        f"{path}: tied/untied mismatch: tensor 'lm_head.weight' is missing from {files} but the model "
        f"is untied (architecture {arch}, tie_word_embeddings={hf.get('tie_word_embeddings')!r} in config.json)"
    )


def _check_tensor_names(
    path: str,
    config: ModelConfig,
    by_name: dict[str, HFTensor],
    weight_map: dict[str, str],
    lm_head: str,
) -> None:
    """Every tensor the model needs is in the folder, and nothing the model does not know is."""
    required = [n for n in by_name if not (n == "lm_head.weight" and lm_head != "load")]
    missing = [n for n in required if n not in weight_map]
    if missing:
        where = sorted(set(weight_map.values())) or [SINGLE_FILE]
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{storage.join(path, where[0]) if len(where) == 1 else path}: missing tensor(s) {shown} "
            f"({len(missing)} missing; searched {', '.join(where)})"
        )
    unexpected = [
        n
        for n in weight_map
        if n not in by_name and n != "lm_head.weight" and not _IGNORED.match(n)
    ]
    if unexpected:
        file = storage.join(path, weight_map[unexpected[0]])
        raise CheckpointError(
            f"{file}: unexpected tensor {unexpected[0]!r} for a model with {config.num_layers} layers "
            f"({len(unexpected)} unexpected in total)"
        )


def _place(
    values: dict[tuple, jax.Array],
    flat_abstract: dict[tuple, Any],
    flat_sharding: dict[tuple, Any],
    t: HFTensor,
    kernel: np.ndarray,
) -> None:
    """Put one HF tensor (as a kernel) into `values` in its sharding: a whole parameter, or one
    layer of a stacked one (the stack is created as zeros on first use)."""
    sharding = flat_sharding[t.param].get_value()
    kernel = kernel.astype(flat_abstract[t.param].get_value().dtype, copy=False)
    if t.layer is None:
        values[t.param] = jax.device_put(kernel, sharding)
        return
    if t.param not in values:
        full = flat_abstract[t.param].get_value()
        values[t.param] = jax.jit(
            lambda: jnp.zeros(full.shape, full.dtype), out_shardings=sharding
        )()
    values[t.param] = _set_layer(
        values[t.param], jax.device_put(kernel, _slice_sharding(sharding)), t.layer
    )


def _finish_lm_head(
    path: str,
    lm_head: str,
    values: dict[tuple, jax.Array],
    flat_sharding: dict[tuple, Any],
    pending_head: np.ndarray | None,
) -> None:
    """A missing head copied from the embedding; a stored head of a tied model must equal it."""
    if lm_head == "copy_embedding":
        emb = values[("embed_tokens", "embedding")]
        values[("lm_head", "kernel")] = jax.jit(
            lambda e: e.T, out_shardings=flat_sharding[("lm_head", "kernel")].get_value()
        )(emb)
    if pending_head is not None:
        emb = np.asarray(jax.device_get(values[("embed_tokens", "embedding")]))
        if pending_head.shape != emb.shape or not np.array_equal(
            pending_head.astype(emb.dtype), emb
        ):
            raise CheckpointError(
                f"{path}: tied/untied mismatch: tensor 'lm_head.weight' differs from "
                "'model.embed_tokens.weight' but the model config ties them (set tie_word_embeddings=false)"
            )


def _load_into_state(
    path: str,
    config: ModelConfig,
    hf: dict[str, Any],
    abstract_state: Any,
    shardings: Any,
) -> Any:
    """Fill a state shaped like `abstract_state` from the HF folder, one tensor at a time."""
    weight_map = _weight_map(path)
    by_name = {t.name: t for t in hf_tensor_layout(config)}
    lm_head = _plan_lm_head(config, hf, weight_map, path)
    _check_tensor_names(path, config, by_name, weight_map, lm_head)

    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    flat_sharding = dict(nnx.to_flat_state(shardings))
    values: dict[tuple, jax.Array] = {}
    pending_head: np.ndarray | None = None
    for file in sorted(set(weight_map.values())):
        uri = storage.join(path, file)
        with _local_copy(uri) as local, SafetensorsReader(local, uri) as reader:
            for name in reader.names():
                if name == "lm_head.weight" and lm_head == "tied":
                    pending_head = reader.get(name)  # compared with the embedding once loaded
                    continue
                t = by_name.get(name)
                if t is None:
                    continue
                if reader.shape(name) != t.hf_shape:
                    raise CheckpointError(
                        f"{uri}: tensor {name!r} has shape {list(reader.shape(name))}, "
                        f"expected {list(t.hf_shape)} for this config"
                    )
                kernel = t.to_kernel(np.asarray(reader.get(name)))
                _place(values, flat_abstract, flat_sharding, t, kernel)
    _finish_lm_head(path, lm_head, values, flat_sharding, pending_head)

    new_flat = [(p, v.replace(values[p])) for p, v in flat_abstract.items()]
    return nnx.from_flat_state(new_flat)


def _slice_sharding(sharding: Sharding) -> Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


def _set_layer_impl(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)


def _set_layer(stacked: jax.Array, layer: jax.Array, index: int) -> jax.Array:
    # Donating the stacked buffer makes each update in place: no second copy of the parameter.
    fn = jax.jit(_set_layer_impl, donate_argnums=0, out_shardings=stacked.sharding)
    return fn(stacked, layer, jnp.int32(index))


def load_pretrained(
    path: str, *, mesh: Mesh | None = None, config_overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, Transformer]:
    """Load a Hugging Face folder (local or gs://) in the CoDA or Qwen3ForCausalLM layout.

    Parameters go straight into their shards on `mesh` (or onto the first local device). Use
    `config_overrides` for numerics/performance switches or to load a Qwen3 checkpoint as CoDA
    (`{"causal": False, "tie_word_embeddings": False}` copies the tied embedding into lm_head).
    """
    hf = _read_hf_config(path)
    try:
        config = model_config_from_hf(hf, **(config_overrides or {}))
    except ValueError as e:
        raise CheckpointError(f"{storage.join(path, 'config.json')}: {e}") from e
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(abstract_state, mesh)
    else:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(
            lambda v: v.replace(device),
            abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    state = _load_into_state(path, config, hf, abstract_state, shardings)
    return config, nnx.merge(graphdef, state)


def load_hf_weights_into(model: Transformer, path: str) -> Transformer:
    """Overwrite `model`'s parameters with a HF folder's, keeping each parameter's sharding."""
    hf = _read_hf_config(path)
    state = nnx.state(model)
    shardings = jax.tree.map(
        lambda v: v.replace(v.get_value().sharding),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    abstract = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    del state
    nnx.update(model, _load_into_state(path, model.config, hf, abstract, shardings))
    return model


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_entries(
    model: Transformer, *, untie: bool = False
) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(name, HF shape, dtype, fetch) for every tensor, fetching nothing yet.

    `untie` also writes a tied model's embedding as `lm_head.weight` (the CoDA layout always has one).
    """
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    entries = []
    if untie and model.config.tie_word_embeddings:
        emb = flat[("embed_tokens", "embedding")].get_value()
        entries.append(
            ("lm_head.weight", tuple(emb.shape), np.dtype(emb.dtype), lambda: _to_host(emb))
        )
    for t in hf_tensor_layout(model.config):
        arr = flat[t.param].get_value()
        expected = t.kernel_shape if t.layer is None else (arr.shape[0], *t.kernel_shape)
        if tuple(arr.shape) != tuple(expected):
            raise ValueError(
                f"parameter {'/'.join(map(str, t.param))} has shape {arr.shape}, expected {expected}"
            )

        def fetch(t: HFTensor = t, arr: jax.Array = arr) -> np.ndarray:
            value = arr if t.layer is None else arr[t.layer]
            return t.to_hf(_to_host(value))

        entries.append((t.name, t.hf_shape, np.dtype(arr.dtype), fetch))
    return entries


def state_to_hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF tensor name, array in the HF [out, in] layout), one tensor at a time."""
    for name, _, _, fetch in _hf_entries(model):
        yield name, fetch()


def _generation_config(config: ModelConfig, architecture: str) -> dict[str, Any]:
    ids = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if architecture == "Qwen3ForCausalLM":
        return ids
    # Fields of the release's DLMGenerationConfig; values are the paper's eval sampler settings.
    return {
        **ids,
        "mask_token_id": config.mask_token_id,
        "alg": "entropy",
        "alg_temp": 0.0,
        "steps": 128,
        "eps": 1e-3,
        "max_new_tokens": 256,
        "output_history": False,
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": None,
    }


def save_pretrained(
    model: Transformer,
    path: str,
    *,
    config: ModelConfig | None = None,
    architecture: str = "CoDALanguageModel",
    max_shard_bytes: int = 2**31,
) -> None:
    """Write safetensors (+ index when sharded), config.json and generation_config.json to `path`.

    Tensors stream from the devices one at a time. With several processes every process must call
    this (sharded parameters are gathered collectively); only process 0 writes.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    config = config or model.config
    untie = architecture == "CoDALanguageModel" and config.tie_word_embeddings
    if untie:  # the released CoDA model always has its own lm_head
        config = config.model_copy(update={"tie_word_embeddings": False})
    entries = _hf_entries(model, untie=untie)
    entries = (
        entries[1:] + entries[:1] if untie else entries
    )  # keep lm_head last, as torch writes it
    shards: list[list[Any]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    writer = jax.process_index() == 0
    if writer:
        storage.makedirs(path)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards, strict=True):
        if writer:
            _write_file(storage.join(path, file), shard)
        else:  # keep the collective gathers in step with the writer
            for entry in shard:
                entry[3]()
    if not writer:
        return
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(math.prod(e[1]) * e[2].itemsize for e in entries)},
            "weight_map": {
                e[0]: file for file, shard in zip(names, shards, strict=True) for e in shard
            },
        }
        storage.write_text(storage.join(path, INDEX_FILE), json.dumps(index, indent=2) + "\n")
    hf_config = hf_config_from_model(config, architecture)  # type: ignore[arg-type]
    storage.write_text(storage.join(path, "config.json"), json.dumps(hf_config, indent=2) + "\n")
    storage.write_text(
        storage.join(path, "generation_config.json"),
        json.dumps(_generation_config(config, architecture), indent=2) + "\n",
    )


def _write_file(uri: str, shard: list[Any]) -> None:
    if not storage.is_remote(uri):
        with storage.open_file(uri, "wb") as f:
            write_safetensors(f, shard)
        return
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
        write_safetensors(tmp, shard)
        tmp.flush()
        tmp.seek(0)
        with storage.open_file(uri, "wb") as out:
            shutil.copyfileobj(tmp, out, length=16 << 20)
