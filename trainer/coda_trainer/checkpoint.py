"""Checkpoints: orbax step checkpoints during a stage, an HF-format `final` at its end.

Layout under a stage directory `<checkpoints.uri>/<stage>/` (local or gs://):

- `<step>/` — one orbax checkpoint per saved step with four items: `params` and `opt_state`
  (sharded arrays, written by every process for its shards), `data` (one data-iterator state file
  per process, via grain's orbax handler), `meta` (JSON: step, run, stage, seed). Orbax
  writes each step to a temporary name and marks it finished (`commit_success.txt` on gs://, a
  rename locally); unfinished ones are invisible to `all_steps()`. A finished one that fails to
  restore (a truncated file, a deleted item) is skipped with a warning and the next older one is
  used; it is deleted at the next save so it cannot shadow newer checkpoints.
- `final/` — a self-contained Hugging Face folder (`config.json`, `model.safetensors` from
  `hf.save_pretrained`, the tokenizer files, `coda_final.json`), published atomically with
  `storage.atomic_publish` (a `COMMITTED` marker is written last).

`init_from` accepts a previous stage's `final` (or its stage directory), an orbax step directory
(only `params` is read: the optimiser may differ between stages), or any HF folder in the CoDA or
Qwen3 layout.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from coda_trainer import hf, storage
from coda_trainer.contract import PermanentError
from coda_trainer.tokenizer import PROJECT, project_tokenizer_dir

__all__ = [
    "Checkpointer",
    "InitFromError",
    "Restored",
    "abstract_like",
    "load_init_params",
    "resolve_init_from",
    "write_final",
]

log = logging.getLogger(__name__)

FINAL_META = "coda_final.json"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip


class InitFromError(PermanentError):
    """`init_from` does not point at usable weights (permanent)."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""

    def one(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class _FrozenIteratorState:
    """The data-iterator state at save time: async saves must not read a later state."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


@dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    meta: dict[str, Any]


class Checkpointer:
    """Orbax CheckpointManager over `<uri>/<stage>`; saves params, opt state, data state and meta."""

    def __init__(self, stage_dir: str, *, keep: int = 3, async_save: bool = True):
        self.stage_dir = stage_dir
        storage.makedirs(stage_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # On gs:// orbax treats every directory of its root without `commit_success.txt` as an
            # unfinished checkpoint and deletes it in the background, and its root is the stage
            # directory, which also holds `metrics/` and `final/`. Locally unfinished saves carry
            # an `.orbax-checkpoint-tmp-` suffix, so the cleanup only ever touches those; on gs://
            # an unfinished step is skipped by `restore_latest` instead.
            cleanup_tmp_directories=not storage.is_remote(stage_dir),
        )
        # Arrays go to OCDBT locally (few files); on gs:// to plain zarr, one object per chunk:
        # OCDBT's manifest writes need GCS generation preconditions that gcp-storage-emulator does
        # not implement, and the format our tests exercise should be the one production uses.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("params", "opt_state"):
            handler = ocp.StandardCheckpointHandler(use_ocdbt=not storage.is_remote(stage_dir))
            registry.add(item, ocp.args.StandardSave, handler)
            registry.add(item, ocp.args.StandardRestore, handler)
        self.manager = ocp.CheckpointManager(stage_dir, options=options, handler_registry=registry)
        self._bad_steps: set[int] = set()

    # ---- queries ----

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_uri(self, step: int) -> str:
        return storage.join(self.stage_dir, str(step))

    # ---- save / restore ----

    def save(
        self, step: int, params: Any, opt_state: Any, data_state: bytes, meta: dict[str, Any]
    ) -> None:
        """Start saving `step` (async if configured; `wait()` to block until it is complete)."""
        import grain

        for bad in sorted(self._bad_steps):
            log.warning("deleting unreadable checkpoint %s", self.step_uri(bad))
            self.manager.delete(bad)
        self._bad_steps.clear()
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state)),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(self, params: Any, opt_state: Any, data_iterator: Any) -> Restored | None:
        """Restore the newest checkpoint that reads back completely, or None if there is none.

        `params`/`opt_state` are the freshly initialised (sharded) trees, used as restore targets;
        `data_iterator` gets its state set (it must have `set_state`/`get_state`).
        """
        import grain

        initial_data_state = data_iterator.get_state()
        for step in reversed(self.all_steps()):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_like(params)),
                        opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # any failure means this checkpoint is unusable
                log.warning(
                    "checkpoint %s is incomplete or unreadable (%s: %s); trying an older one",
                    self.step_uri(step),
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                self._bad_steps.add(step)
                continue
            return Restored(step, out.params, out.opt_state, dict(out.meta))
        data_iterator.set_state(initial_data_state)
        return None


# --------------------------------------------------------------------------------------------------
# Final export and init_from
# --------------------------------------------------------------------------------------------------


def _copy_tokenizer(tokenizer_path: str, dest: str) -> None:
    src = str(project_tokenizer_dir()) if tokenizer_path == PROJECT else tokenizer_path
    for name in _TOKENIZER_FILES:
        uri = storage.join(src, name)
        if storage.exists(uri):
            storage.write_bytes(storage.join(dest, name), storage.read_bytes(uri))


def write_final(
    model: Any,
    model_config: Any,
    final_uri: str,
    *,
    tokenizer_path: str | None = None,
    meta: dict[str, Any] | None = None,
) -> str:
    """Publish `final_uri` atomically: HF export (+ tokenizer files + `coda_final.json`).

    Every process must call this (the export gathers sharded parameters); process 0 writes.
    """
    staging = f"{final_uri.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    primary = jax.process_index() == 0
    if primary:
        storage.makedirs(staging)
    # A causal model (the base a `causal` stage trains) is exported as the Qwen3 layout, which is
    # what it is; diffusion models as the released CoDA layout.
    architecture = "Qwen3ForCausalLM" if model_config.causal else "CoDALanguageModel"
    hf.save_pretrained(model, staging, config=model_config, architecture=architecture)
    if primary:
        if tokenizer_path is not None:
            _copy_tokenizer(tokenizer_path, staging)
        storage.write_text(
            storage.join(staging, FINAL_META), json.dumps(meta or {}, indent=1, default=str)
        )
        storage.atomic_publish(staging, final_uri)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("coda_write_final")
    return final_uri


def _is_orbax_step(uri: str) -> bool:
    return storage.exists(storage.join(uri, "params")) and (
        storage.exists(storage.join(uri, "_CHECKPOINT_METADATA"))
        or storage.exists(storage.join(uri, "commit_success.txt"))
    )


def resolve_init_from(uri: str) -> tuple[str, str]:
    """(kind, uri) with kind "hf" or "orbax"; a stage directory resolves to its final.

    Raises InitFromError (before any device work) when nothing usable is there.
    """
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, "config.json")):
        if storage.exists(storage.join(uri, FINAL_META)) and not storage.is_committed(uri):
            raise InitFromError(f"init_from {uri} is a final checkpoint that was never completed")
        return "hf", uri
    if _is_orbax_step(uri):
        return "orbax", uri
    final = storage.join(uri, "final")
    if storage.exists(storage.join(final, "config.json")) and storage.is_committed(final):
        return "hf", final
    if not storage.exists(uri):
        raise InitFromError(f"init_from {uri} does not exist")
    raise InitFromError(
        f"init_from {uri} is neither a Hugging Face folder (config.json), an orbax step directory "
        "(params/ + _CHECKPOINT_METADATA), nor a stage directory with a completed final/"
    )


def load_init_params(uri: str, model: Any) -> str:
    """Load weights from `uri` into `model` in place (sharding kept). Returns the resolved uri."""
    kind, resolved = resolve_init_from(uri)
    if kind == "hf":
        hf.load_hf_weights_into(model, resolved)
        return resolved
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(storage.join(resolved, "params"), abstract_like(params))
        except (ValueError, KeyError, TypeError) as e:  # orbax's words for "other tree/shapes"
            raise InitFromError(
                f"init_from {resolved}: the orbax checkpoint does not fit this model: {e}"
            ) from e
    nnx.update(model, restored)
    return resolved
