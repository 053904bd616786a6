"""Train one stage: `python -m coda_trainer.train --config job.yaml` (a `TrainJobConfig`).

What a run does, in order:

1. **Validate, before any device work**: the config (pydantic), the tokenizer against the model
   (`check_model`: vocab size and special ids), masking block sizes against `seq_len`, every data
   source (lists files, reads the first in its format, finds a usable document), `init_from`
   (resolves to an HF folder or orbax step). Any failure → exit `EXIT_PERMANENT` (78) with the
   reason on stderr. A stage whose `final/` is already published exits 0 at once.
2. `jax.distributed.initialize()` when the environment says multi-host (`JAX_COORDINATOR_ADDRESS`,
   or a multi-host TPU slice: `TPU_WORKER_HOSTNAMES` with several hosts, `MEGASCALE_*`), with the
   process id from the operator's pod env (`distributed_settings`), bounded heartbeat/shutdown
   timeouts (a dead peer fails the others instead of hanging them) and gloo collectives when the
   devices are CPUs.
3. Mesh (`stage.mesh`), model created in its shards, optimiser, data loader for this process's
   share of the global batch.
4. Resume from the newest complete checkpoint in `<checkpoints.uri>/<stage>/` if any (params,
   optimiser state, data iterator, step); otherwise load `init_from` weights if set.
5. Loop: one jitted `train_step(state, batch, rng) -> (state, metrics)`; metrics every `log_every`
   steps (see `coda_trainer.metrics` for stdout JSON lines, `metrics.jsonl`, TensorBoard and
   `<stage>/status.json`); optional eval loss every `eval.every_steps`; checkpoint every
   `checkpoints.every_steps`.
6. SIGTERM/SIGINT (GKE preemption, `kubectl delete`): the current step finishes, a checkpoint is
   saved and waited for, exit `EXIT_RETRYABLE` (75). A rerun resumes exactly there. With several
   processes, a signal to any one of them stops all of them at the same step (`StopVote`).
7. Done: final checkpoint of the last step, then `<stage>/final/` (HF export) published atomically;
   exit `EXIT_OK` (0).

Exit codes (`coda_trainer.contract`): 0 done; 75 retryable (preempted after saving, transient
I/O error); 78 permanent (bad config or data); 1 unexpected crash (traceback on stderr).

Determinism: the rng of step s is `fold_in(PRNGKey(seed), s)` and the data order depends only on
the seed and the iterator state, so a resumed run computes exactly the steps an uninterrupted one
would (bit-identical on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from flax import struct

from coda_trainer import storage
from coda_trainer.config import TrainJobConfig, load_job_config
from coda_trainer.contract import (
    ENV_HOST_ID,
    ENV_HOSTS_PER_SLICE,
    ENV_LOG_LEVEL,
    ENV_NUM_SLICES,
    ENV_SLICE_ID,
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRYABLE,
    PermanentError,
    metrics_uri,
)

__all__ = [
    "ConfigError",
    "Plan",
    "TrainLayout",
    "TrainState",
    "abstract_train_state",
    "initial_train_state",
    "main",
    "make_eval_step",
    "make_train_step",
    "prepare",
    "run",
    "stage_knobs",
    "stage_model_config",
    "train",
]

log = logging.getLogger("coda_trainer.train")


class ConfigError(PermanentError):
    """The job cannot run as configured."""


@dataclasses.dataclass
class Plan:
    """What `prepare` validated, handed to `train`."""

    cfg: TrainJobConfig
    model_config: Any
    tokenizer: Any
    init_from: tuple[str, str] | None  # (kind, uri) from checkpoint.resolve_init_from
    already_done: bool


# --------------------------------------------------------------------------------------------------
# 1. Validation (no JAX device work)
# --------------------------------------------------------------------------------------------------


def _final_done(cfg: TrainJobConfig) -> bool:
    from coda_trainer.checkpoint import FINAL_META

    meta_uri = storage.join(cfg.final_dir, FINAL_META)
    if not storage.is_committed(cfg.final_dir) or not storage.exists(meta_uri):
        return False
    return json.loads(storage.read_text(meta_uri)).get("step") == cfg.stage.steps


def stage_model_config(cfg: TrainJobConfig) -> Any:
    """The ModelConfig a stage trains: the run's model, causal for a `causal` stage, with the
    stage's own remat policy if it sets one."""
    model_config = cfg.model.resolve()
    if cfg.stage.kind == "causal":  # the same weights, attending only to earlier tokens
        model_config = model_config.model_copy(update={"causal": True})
    if cfg.stage.remat is not None:
        model_config = model_config.model_copy(update={"remat": cfg.stage.remat})
    return model_config


def prepare(cfg: TrainJobConfig) -> Plan:
    """Validate everything that can be checked without devices. Raises ConfigError/DataError."""
    from coda_trainer.checkpoint import resolve_init_from
    from coda_trainer.data import validate_sources
    from coda_trainer.tokenizer import load_tokenizer

    stage = cfg.stage
    model_config = stage_model_config(cfg)
    if _final_done(cfg):
        return Plan(cfg, model_config, None, None, already_done=True)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r}: {e}") from e
    try:
        tokenizer.check_model(model_config)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    seq_len = stage.batch.seq_len
    if stage.kind in ("pretrain", "midtrain") and max(stage.masking.all_block_sizes()) > seq_len:
        raise ConfigError(
            f"masking block sizes {list(stage.masking.all_block_sizes())} exceed seq_len={seq_len}"
        )
    if stage.batch.sequences < stage.batch.grad_accum:
        raise ConfigError("batch.sequences must be ≥ batch.grad_accum")
    sft_rows = {
        "over_length": stage.sft_config.over_length,
        "prompt_span": stage.sft_config.prompt_span,
    }
    validate_sources(stage.data, tokenizer, kind=stage.kind, seq_len=seq_len, **sft_rows)
    if stage.eval is not None:
        validate_sources(stage.eval.data, tokenizer, kind=stage.kind, seq_len=seq_len, **sft_rows)
    init = stage.init_from or cfg.model.init_from
    init_from = resolve_init_from(init) if init else None
    return Plan(cfg, model_config, tokenizer, init_from, already_done=False)


# --------------------------------------------------------------------------------------------------
# 2. Multi-host
# --------------------------------------------------------------------------------------------------


def _multihost_env(env: dict[str, str]) -> bool:
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


# How the distributed runtime notices a dead process. The coordination service (hosted by process
# 0) declares a process dead when its heartbeats (sent by a C++ thread, so a long compile or a busy
# Python thread does not delay them) stop for HEARTBEAT_TIMEOUT_S, and then aborts every other
# process: without this, survivors of a kill -9 / lost VM wait in their next collective forever
# (gloo and the TPU/GPU collectives have no useful timeout of their own). JAX's default is 100 s;
# 60 s still rides out a network blip or a stalled host, and on GKE the JobSet restarts the whole
# group anyway as soon as the dead pod's Job fails, so this only bounds how long survivors linger.
# Measured (tests/trainer/test_multihost.py, 2 CPU processes, kill -9 of process 1): gloo reports
# the reset connection at once, and the survivor aborts (SIGABRT) 33-41 s after the kill, at the
# runtime's shutdown barrier, once the heartbeat timeout has marked its peer dead.
HEARTBEAT_TIMEOUT_S = 60
# A process that exits (done, exit 75, or a Python error on that host only) waits at most this
# long for the others at the runtime's shutdown barrier, then fails instead of hanging (JAX: 300).
SHUTDOWN_TIMEOUT_S = 60
# How long processes wait for each other to connect at start: pods of one JobSet can start minutes
# apart (image pulls on fresh nodes). JAX's default.
INITIALIZATION_TIMEOUT_S = 300


def distributed_settings(env: dict[str, str]) -> dict[str, Any]:
    """`jax.distributed.initialize` arguments from a trainer pod's environment (pure).

    The operator renders `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and the contract's
    `ENV_SLICE_ID` (JobSet job index), `ENV_NUM_SLICES`, `ENV_HOST_ID` (the Job's completion index:
    the host within its slice) and `ENV_HOSTS_PER_SLICE`; its launch line exports `JAX_PROCESS_ID`
    = slice_id * hosts_per_slice + host_id, so the processes of slice 0 come first. The id is
    computed here from the same variables (so the trainer does not depend on the shell step) and
    must agree with `JAX_PROCESS_ID` when both are set. Without `ENV_HOST_ID`: `JAX_PROCESS_ID`,
    or `JOB_COMPLETION_INDEX` (one slice); without any of them (a TPU slice without our env) JAX
    detects the cluster itself.
    """
    kwargs: dict[str, Any] = {
        "initialization_timeout": INITIALIZATION_TIMEOUT_S,
        "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
        "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S,
    }
    if not env.get("JAX_COORDINATOR_ADDRESS"):
        return kwargs
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    num = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
    if num is not None:
        kwargs["num_processes"] = num
    if env.get(ENV_HOST_ID):
        hosts, host = int(env.get(ENV_HOSTS_PER_SLICE) or 1), int(env[ENV_HOST_ID])
        slice_id, slices = int(env.get(ENV_SLICE_ID) or 0), int(env.get(ENV_NUM_SLICES) or 1)
        if not (0 <= host < hosts and 0 <= slice_id < slices):
            raise ConfigError(
                f"host {host} of slice {slice_id} is outside {slices} slice(s) × {hosts} host(s)"
            )
        if num is not None and num != slices * hosts:
            raise ConfigError(
                f"JAX_NUM_PROCESSES={num} but the job has {slices} slice(s) × {hosts} host(s)"
            )
        kwargs["process_id"] = slice_id * hosts + host
        if env.get("JAX_PROCESS_ID") and int(env["JAX_PROCESS_ID"]) != kwargs["process_id"]:
            raise ConfigError(
                f"JAX_PROCESS_ID={env['JAX_PROCESS_ID']} but host {host} of slice {slice_id} "
                f"({hosts} host(s) per slice) is process {kwargs['process_id']}"
            )
    elif pid := env.get("JAX_PROCESS_ID") or env.get("JOB_COMPLETION_INDEX"):
        kwargs["process_id"] = int(pid)
    return kwargs


def _accelerator_plugins() -> list[str]:
    """Installed JAX accelerator backends (PJRT plugins, libtpu), found without initialising JAX."""
    import importlib.util
    import pkgutil
    from importlib.metadata import entry_points

    found = [ep.name for ep in entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # namespace package of the CUDA/ROCm/TPU plugins

        found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def cpu_only(platforms: str | None, accelerator_plugins: Sequence[str]) -> bool:
    """Whether JAX will run on CPU devices only (pure): `JAX_PLATFORMS`/`jax_platforms` if set,
    else whether no accelerator backend is installed."""
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not accelerator_plugins


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize()` on multi-host jobs; returns whether it did."""
    import jax

    env = dict(os.environ if env is None else env)
    if not _multihost_env(env):
        return False
    kwargs = distributed_settings(env)
    if cpu_only(env.get("JAX_PLATFORMS") or jax.config.jax_platforms, _accelerator_plugins()):
        # Cross-process collectives of CPU devices (several processes on one machine in the tests,
        # CPU-only pods) go through gloo over TCP; the choice is read when the CPU backend is
        # created, so it is made before `initialize`. TPU/GPU devices use their own interconnect.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service would catch SIGTERM in C++, but our handler (`_StopFlag`, installed
    # later) replaces it; the processes agree on the step to stop at with `StopVote` instead.
    jax.config.update("jax_enable_preemption_service", False)
    log.info(
        "jax.distributed.initialize(%s)",
        ", ".join(f"{k}={v}" for k, v in kwargs.items()),
    )
    jax.distributed.initialize(**kwargs)
    return True


# --------------------------------------------------------------------------------------------------
# 3. The jitted step
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """What one optimiser step reads and writes (a pytree; donated to the jitted step)."""

    step: Any  # int32 scalar: optimiser steps completed
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainLayout:
    """A stage's train state described without device memory: shapes, dtypes and shardings.

    `train` allocates the state into `shardings`; `coda_trainer.preflight` compiles the same step
    from `state` (ShapeDtypeStructs carrying those shardings) for devices it does not have.
    """

    model_config: Any
    graphdef: Any  # nnx.GraphDef of the Transformer
    rest: Any  # nnx.State of the model's non-Param variables (empty for the Transformer)
    tx: Any  # optax.GradientTransformation
    schedule: Callable[[Any], Any]
    state: TrainState  # leaves: jax.ShapeDtypeStruct with .sharding
    shardings: TrainState  # leaves: NamedSharding


def abstract_train_state(cfg: TrainJobConfig, mesh: Any) -> TrainLayout:
    """The stage's model, optimiser and train state on `mesh`, abstract (nothing is allocated).

    Parameter shardings come from the model's logical axes; optimiser moments take their
    parameter's sharding (never a replicated copy); the step counter is replicated.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from coda_trainer.model import Transformer
    from coda_trainer.optimizer import make_optimizer, make_schedule
    from coda_trainer.sharding import optimizer_state_shardings, state_shardings

    stage = cfg.stage
    model_config = stage_model_config(cfg)
    abstract_model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(stage.seed)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    tx = make_optimizer(stage.optimizer, stage.steps, grad_accum=1)  # accumulation is in the step
    schedule = make_schedule(stage.optimizer, stage.steps)
    opt_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=state_shardings(params, mesh),
        opt_state=optimizer_state_shardings(opt_state, mesh),
    )
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32), params=params,
                        opt_state=opt_state)  # fmt: skip
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return TrainLayout(model_config, graphdef, rest, tx, schedule, state, shardings)


def initial_train_state(layout: TrainLayout, params: Any, step: int = 0) -> TrainState:
    """A fresh TrainState around (sharded) `params`: optimiser state created in its shardings."""
    import jax
    import jax.numpy as jnp

    opt_state = jax.jit(layout.tx.init, out_shardings=layout.shardings.opt_state)(params)
    step_array = jax.device_put(jnp.asarray(step, jnp.int32), layout.shardings.step)
    return TrainState(step=step_array, params=params, opt_state=opt_state)


def stage_knobs(stage: Any, spec: Any, step: int) -> dict[str, Any]:
    """The host-computed per-step values the step reads beside the data (numpy, by step)."""
    import numpy as np

    from coda_trainer.masking import prompt_keep_frac_at

    p = stage.masking.probs_at(step, stage.steps)
    ramp = stage.sft_config.prompt_ramp_fraction
    return {
        "probs_3": np.asarray([p.prefix_prob, p.truncate_prob, p.block_prob], np.float32),
        "block_weights": spec.block_weights(stage.masking.block_sizes_at(step, stage.steps)),
        "prompt_keep_frac": np.float32(
            prompt_keep_frac_at(step, stage.steps, ramp) if stage.kind == "sft" else 1.0
        ),
    }


# Host-computed per-step values that travel in the batch dict beside the data arrays.
_KNOBS = ("probs_3", "prompt_keep_frac", "block_weights")


def _split_knobs(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    data = {k: v for k, v in batch.items() if k not in _KNOBS}
    return data, {k: batch[k] for k in _KNOBS if k in batch}


def _knob_loss(model: Any, data: dict[str, Any], rng: Any, knobs: dict[str, Any], **static: Any):
    from coda_trainer.loss import model_loss

    return model_loss(model, data, rng, knobs["probs_3"], knobs["prompt_keep_frac"],
                      block_weights_K=knobs.get("block_weights"), **static)  # fmt: skip


def make_train_step(
    graphdef: Any,
    rest: Any,
    tx: Any,
    schedule: Callable[[Any], Any],
    *,
    spec: Any,
    kind: str,
    loss_norm: str,
    grad_accum: int,
    state_shardings: Any = None,
) -> Callable[..., Any]:
    """`train_step(state, batch, rng) -> (state, metrics)`, jitted, state donated.

    With `state_shardings` (a TrainState of shardings, `TrainLayout.shardings`) the new state is
    laid out exactly like the old one, so the step compiles once and runs in place; metrics are
    replicated.

    `batch` holds the data arrays (global B×L: tokens, segment_ids, positions[, prompt_mask]) plus
    the host-computed per-step knobs `probs_3` (f32[3]), `prompt_keep_frac` (f32[]) and optionally
    `block_weights` (f32[K], the S3 block sizes of the current phase). `rng` is
    the stage's base key; the step's key is `fold_in(rng, state.step)`. With `grad_accum` A the
    B rows are split into A interleaved micro-batches (row i → micro-batch i mod A, which keeps
    every device's rows local) whose gradients are averaged before one optimiser update.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def loss_fn(params, micro, rng, knobs):
        model = nnx.merge(graphdef, params, rest)
        return _knob_loss(model, micro, rng, knobs, spec=spec, kind=kind, loss_norm=loss_norm)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, rng):
        data, knobs = _split_knobs(batch)
        rng = jax.random.fold_in(rng, state.step)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, data, rng, knobs)
        else:
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(
                    x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1
                ),
                data,
            )

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, i = xs
                (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), knobs)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            m_shape = jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng, knobs)[0][1]
            )
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, metrics), _ = jax.lax.scan(
                body, (zeros_g, zeros_m), (micro, jnp.arange(grad_accum))
            )
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0,))
    replicated = jax.sharding.NamedSharding(state_shardings.step.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_shardings, replicated))


def make_eval_step(
    graphdef: Any, rest: Any, *, spec: Any, kind: str, loss_norm: str
) -> Callable[..., Any]:
    import jax
    from flax import nnx

    def eval_step(params, batch, rng):
        data, knobs = _split_knobs(batch)
        model = nnx.merge(graphdef, params, rest)
        _, metrics = _knob_loss(model, data, rng, knobs, spec=spec, kind=kind, loss_norm=loss_norm)
        return metrics

    return jax.jit(eval_step)


# --------------------------------------------------------------------------------------------------
# 4. The loop
# --------------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops without saving
        self.signal = signum
        log.warning(
            "received %s: finishing this step, saving a checkpoint (every process, at the step "
            "they agree on), then exiting",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopVote:
    """Every process learns whether any process wants to stop, at the same step.

    SIGTERM reaches one host (GKE preempts one VM; `kubectl delete` signals pods one by one), but a
    checkpoint is collective: every process must save the same step, and a process that left the
    loop alone would leave the others blocked in the next step's collectives. So after every step
    each process casts its stop flag and all of them take the maximum: one int32 all-reduce over all
    devices (each device holds its process's flag). The vote cast after step s is read after step
    s+1 has been dispatched, so the host never waits for the step it just dispatched (it stays one
    step ahead of the devices) and every process decides on the same vote: a SIGTERM received
    during step s stops every process after step s+1 (or s+2 if it arrives after the vote of s was
    cast). `seconds` counts the host time the loop spends in it, logged at the end ("stop votes");
    measured on CPU (2 processes × 2 devices, gloo on loopback, 2 shared cores): 1–3 ms per step.
    """

    def __init__(self, mesh: Any):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = np.asarray(mesh.devices).reshape(-1)
        voters = Mesh(devices, ("voter",))
        self._sharding = NamedSharding(voters, PartitionSpec("voter"))
        self._local = len([d for d in devices if d.process_index == jax.process_index()])
        self._shape = (len(devices),)
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(voters, PartitionSpec()))
        # Compiled (and the collective proven to work) before training starts, not in step 1.
        jax.block_until_ready(self._max(self._flags(False)))
        self._cast: Any = None  # the vote cast after the previous step, not read yet
        self.seconds = 0.0

    def _flags(self, stop_here: bool) -> Any:
        import jax
        import numpy as np

        flags = np.full((self._local,), int(stop_here), np.int32)
        return jax.make_array_from_process_local_data(self._sharding, flags, self._shape)

    def __call__(self, stop_here: bool) -> bool:
        """Cast this process's flag for the step just dispatched; return the previous vote."""
        import jax

        t0 = time.perf_counter()
        cast = self._max(self._flags(stop_here))
        previous, self._cast = self._cast, cast
        agreed = previous is not None and bool(jax.device_get(previous))
        self.seconds += time.perf_counter() - t0
        return agreed


def _global_batch(local: dict[str, Any], sharding: Any) -> dict[str, Any]:
    """This process's rows → global arrays sharded over the mesh's batch axes."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train(plan: Plan, *, stop_after_steps: int | None = None) -> int:
    """Run the stage described by a validated plan; returns an exit code.

    `stop_after_steps` (tests, benchmarks) behaves like a SIGTERM after that many steps of this
    invocation: checkpoint, exit 75.
    """
    import jax

    from coda_trainer import checkpoint as ckpt_lib
    from coda_trainer.data import Prefetch, make_loader
    from coda_trainer.metrics import MetricsWriter
    from coda_trainer.model import create_sharded_model
    from coda_trainer.sharding import make_mesh

    cfg, stage, model_config = plan.cfg, plan.cfg.stage, plan.model_config
    maybe_initialize_distributed()
    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    B, L, A = stage.batch.sequences, stage.batch.seq_len, stage.batch.grad_accum
    if B % pc:
        raise ConfigError(f"batch.sequences={B} must be divisible by the {pc} processes")
    try:
        mesh = make_mesh(stage.mesh)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from e
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (B // A) % batch_shards:
        raise ConfigError(
            f"micro-batch batch.sequences/grad_accum = {B // A} must be divisible by mesh data×fsdp = {batch_shards}"
        )

    # ---- model, optimiser, data ----
    log.info("mesh %s on %d %s device(s), %d process(es)", dict(mesh.shape), jax.device_count(),
             jax.devices()[0].device_kind, pc)  # fmt: skip
    layout = abstract_train_state(cfg, mesh)
    model = create_sharded_model(model_config, mesh, seed=stage.seed)
    # A fixed `batch.readers` keeps the global batch independent of the number of hosts.
    readers = stage.batch.readers or pc
    if readers % pc:
        raise ConfigError(f"batch.readers={readers} must be a multiple of the {pc} processes")
    loader = make_loader(
        stage.data, plan.tokenizer, kind=stage.kind, batch_size=B // pc, seq_len=L, seed=stage.seed,
        process_index=pi, process_count=pc, readers=readers,
        over_length=stage.sft_config.over_length, prompt_span=stage.sft_config.prompt_span,
    )  # fmt: skip
    data = Prefetch(loader)
    ckpt = ckpt_lib.Checkpointer(
        cfg.stage_dir, keep=cfg.checkpoints.keep, async_save=cfg.checkpoints.async_save
    )
    metrics_dir = cfg.metrics_dir or metrics_uri(cfg.checkpoints.uri, stage.name)
    writer = MetricsWriter(
        metrics_dir, cfg.status_file, run=cfg.run, stage=stage.name,
        total_steps=stage.steps, enabled=primary,
    )  # fmt: skip
    progress = _progress_reporter() if primary else None
    try:
        return _fit(plan, mesh, model, layout, data, ckpt, writer, stop_after_steps, progress)
    except BaseException:
        writer.status(state="failed")
        raise
    finally:
        if progress is not None:
            progress.close()
        data.close()
        writer.close()
        try:
            ckpt.close()
        except Exception as e:  # the original error (if any) matters more
            log.warning("closing the checkpoint manager failed: %s", e)


def _progress_reporter() -> Any:
    """Progress into the CodaTrainingRun's status when the operator's pod env asks for it."""
    from coda_trainer.k8s_progress import BackgroundProgress, ProgressReporter

    try:
        reporter = ProgressReporter.from_env()
    except Exception as e:  # a malformed env must not stop training
        log.warning("progress reporting disabled: %s", e)
        return None
    if reporter is None:
        return None
    log.info("reporting progress to %s", reporter.url)
    return BackgroundProgress(reporter)


def _fit(plan, mesh, model, layout, data, ckpt, writer, stop_after_steps, progress=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from coda_trainer import checkpoint as ckpt_lib
    from coda_trainer.data import make_loader
    from coda_trainer.masking import NoiseSpec
    from coda_trainer.metrics import mfu
    from coda_trainer.sharding import batch_sharding

    cfg, stage, model_config = plan.cfg, plan.cfg.stage, plan.model_config
    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    B, L, A = stage.batch.sequences, stage.batch.seq_len, stage.batch.grad_accum
    over_length, prompt_span = stage.sft_config.over_length, stage.sft_config.prompt_span
    with jax.set_mesh(mesh):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # Created in its shardings (as a restore target too): no replicated copy of the moments.
        opt_state = initial_train_state(layout, params).opt_state
        restored = ckpt.restore_latest(params, opt_state, data)
        if restored is not None:
            params, opt_state, start = restored.params, restored.opt_state, restored.step
            log.info("resumed %s from step %d", cfg.stage_dir, start)
        else:
            start = 0
            if plan.init_from is not None:
                uri = ckpt_lib.load_init_params(plan.init_from[1], model)
                graphdef, params, rest = nnx.split(model, nnx.Param, ...)
                log.info("initialised weights from %s", uri)
        del model
        log.info("model and optimiser ready at step %d; compiling the train step", start)
        step_array = jax.device_put(jnp.asarray(start, jnp.int32), layout.shardings.step)
        state = TrainState(step=step_array, params=params, opt_state=opt_state)
        del params, opt_state

        spec = NoiseSpec.from_configs(model_config, stage.masking)
        loss_norm = stage.sft_config.loss_norm if stage.kind == "sft" else "tokens"
        train_step = make_train_step(
            graphdef,
            rest,
            layout.tx,
            layout.schedule,
            spec=spec,
            kind=stage.kind,
            loss_norm=loss_norm,
            grad_accum=A,
            state_shardings=layout.shardings,
        )
        eval_step = make_eval_step(graphdef, rest, spec=spec, kind=stage.kind, loss_norm=loss_norm)
        sharding = batch_sharding(mesh)
        base_rng = jax.random.PRNGKey(stage.seed)
        # Eval batches see the same noise at every eval (a separate stream from training).
        eval_rng = jax.random.fold_in(jax.random.PRNGKey(stage.seed), 0x7FFFFFFF)
        flops_per_token = model_config.train_flops_per_token(L)
        device_kind, n_devices = jax.devices()[0].device_kind, jax.device_count()

        def knobs(step: int) -> dict[str, Any]:
            return stage_knobs(stage, spec, step)

        def run_eval(step: int) -> None:
            assert stage.eval is not None
            ev_loader = make_loader(
                stage.eval.data, plan.tokenizer, kind=stage.kind, batch_size=B // A // pc, seq_len=L,
                seed=stage.seed + 1, process_index=pi, process_count=pc,
                readers=stage.batch.readers, over_length=over_length, prompt_span=prompt_span,
            )  # fmt: skip
            sums: dict[str, float] = {}
            for i in range(stage.eval.batches):
                batch = {**_global_batch(next(ev_loader), sharding), **knobs(step)}
                m = jax.device_get(eval_step(state.params, batch, jax.random.fold_in(eval_rng, i)))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / stage.eval.batches
            writer.emit("eval", step, sums)

        last_ckpt = ckpt.step_uri(start) if restored is not None else None

        def save(step: int, wait: bool) -> None:
            nonlocal last_ckpt
            ckpt.save(step, state.params, state.opt_state, data.get_state(),
                      {"run": cfg.run, "stage": stage.name, "seed": stage.seed})  # fmt: skip
            if wait:
                ckpt.wait()
            last_ckpt = ckpt.step_uri(step)
            writer.emit("checkpoint", step, {"uri": last_ckpt})
            writer.status(step=step, checkpoint=last_ckpt)
            if progress is not None:
                progress.submit(
                    step=step, total_steps=stage.steps, checkpoint=last_ckpt, force=True
                )

        bar = None
        if primary and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=stage.steps, initial=start, desc=stage.name, unit="step", dynamic_ncols=True
            )

        vote = StopVote(mesh) if pc > 1 else None
        pending: list[Any] = []
        window_start: float | None = None
        window_steps = 0
        step = start
        exit_code = EXIT_OK
        writer.status(state="running", step=start, checkpoint=last_ckpt)
        with _StopFlag() as stop:
            while step < stage.steps:
                batch = {**_global_batch(next(data), sharding), **knobs(step)}
                state, metrics = train_step(state, batch, base_rng)
                step += 1
                pending.append(metrics)
                if window_start is None:  # the first step compiles: start timing after it
                    jax.block_until_ready(metrics)
                    log.info("first step done (compiled)")
                    window_start, window_steps = time.perf_counter(), 0
                else:
                    window_steps += 1
                if bar is not None:
                    bar.update(1)
                if step % stage.log_every == 0 or step == stage.steps:
                    host = jax.device_get(pending)
                    now = time.perf_counter()
                    values = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    values["lr"] = float(host[-1]["lr"])
                    if window_start is not None and window_steps:
                        tps = window_steps * B * L / (now - window_start)
                        values.update(tokens_per_second=tps, step_seconds=(now - window_start) / window_steps,
                                      mfu=mfu(flops_per_token, tps, device_kind, n_devices))  # fmt: skip
                    values["tokens"] = step * B * L
                    writer.emit("train", step, values)
                    writer.status(step=step, loss=values["loss"], tokens_per_second=values.get("tokens_per_second"),
                                  mfu=values.get("mfu"))  # fmt: skip
                    if progress is not None:
                        progress.submit(step=step, total_steps=stage.steps, loss=values["loss"],
                                        tokens_per_second=values.get("tokens_per_second"))  # fmt: skip
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.3f}")
                    pending, window_start, window_steps = [], time.perf_counter(), 0
                if stage.eval is not None and (
                    step % stage.eval.every_steps == 0 or step == stage.steps
                ):
                    run_eval(step)
                    window_start, window_steps = time.perf_counter(), 0
                stopping = stop_after_steps is not None and step - start >= stop_after_steps
                if vote is None:
                    stopping = stopping or stop.signal is not None
                else:  # one host's SIGTERM stops every host at the same step (see StopVote)
                    stopping = vote(stop.signal is not None) or stopping
                if step == stage.steps:
                    break
                if stopping:
                    save(step, wait=True)
                    writer.status(state="checkpointed")
                    exit_code = EXIT_RETRYABLE
                    break
                if step % cfg.checkpoints.every_steps == 0:
                    save(step, wait=False)
        if bar is not None:
            bar.close()
        if vote is not None:
            log.info(
                "stop votes: %.2f ms of host time per step",
                1000 * vote.seconds / max(step - start, 1),
            )
        if exit_code == EXIT_OK:
            if last_ckpt != ckpt.step_uri(step):
                save(step, wait=True)
            ckpt.wait()
            final_model = nnx.merge(graphdef, state.params, rest)
            ckpt_lib.write_final(
                final_model, model_config, cfg.final_dir, tokenizer_path=cfg.tokenizer,
                meta={"run": cfg.run, "stage": stage.name, "kind": stage.kind, "step": step,
                      "checkpoint": last_ckpt},
            )  # fmt: skip
            # 1 unless a state's layout changed between steps (each compile costs minutes at scale).
            compiles = train_step._cache_size()
            writer.emit("done", step, {"final": cfg.final_dir, "train_step_compiles": compiles})
            writer.status(state="done", step=step, checkpoint=cfg.final_dir)
            if progress is not None:
                progress.submit(
                    step=step, total_steps=stage.steps, checkpoint=cfg.final_dir, force=True
                )
    return exit_code


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _is_transient(error: BaseException) -> bool:
    """I/O failures a retry may cure: OS/network errors, HTTP 429 and 5xx (gcsfs, google-cloud)."""
    for e in (error, error.__cause__, error.__context__):
        if e is None:
            continue
        if isinstance(e, OSError | TimeoutError | ConnectionError):
            return True
        code = getattr(e, "code", None)
        if isinstance(code, int) and (code == 429 or 500 <= code < 600):
            return True
    return False


def run(cfg: TrainJobConfig, *, stop_after_steps: int | None = None) -> int:
    """Validate and train one stage; failures map to exit codes (unexpected errors propagate).

    Every `PermanentError` (bad config, data, init_from, a checkpoint of the wrong shape) exits
    `EXIT_PERMANENT`, transient I/O errors `EXIT_RETRYABLE`; anything else is a crash (exit 1).
    """
    try:
        plan = prepare(cfg)
    except PermanentError as e:
        log.error("invalid job (%s): %s", type(e).__name__, e)
        return EXIT_PERMANENT
    except Exception as e:
        if _is_transient(e):
            log.error("cannot read the job's inputs (retryable): %s", e)
            return EXIT_RETRYABLE
        # `prepare` only reads and validates inputs: a ValueError there (from a library parsing
        # them) is a bad input however it is spelled.
        if isinstance(e, ValueError):
            log.error("invalid job (%s): %s", type(e).__name__, e)
            return EXIT_PERMANENT
        raise
    if plan.already_done:
        log.info("stage %s is already complete: %s", cfg.stage.name, cfg.final_dir)
        return EXIT_OK
    try:
        return train(plan, stop_after_steps=stop_after_steps)
    except PermanentError as e:
        log.error("%s: %s", type(e).__name__, e)
        return EXIT_PERMANENT
    except Exception as e:
        if not _is_transient(e):
            raise
        log.exception("I/O error (retryable; a restart resumes from the last checkpoint): %s", e)
        return EXIT_RETRYABLE


def configure_logging(level: str = "INFO") -> None:
    """Our messages at `level` on stderr; orbax/absl/jax chatter only from WARNING (unless DEBUG)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level.upper() != "DEBUG":
        for name in ("absl", "jax", "orbax", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # gcsfs probes each bucket for hierarchical namespaces with a client that needs credentials;
        # without them (emulator, anonymous) it warns on every open and then works normally.
        logging.getLogger("gcsfs").addFilter(
            lambda r: "Could not determine bucket type" not in r.getMessage()
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coda_trainer.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, help="job YAML (TrainJobConfig), local path")
    parser.add_argument("--log-level", default=os.environ.get(ENV_LOG_LEVEL, "INFO"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        cfg = load_job_config(args.config)
    except (OSError, ValueError) as e:
        log.error("%s", e)
        return EXIT_PERMANENT
    try:
        return run(cfg)
    except Exception:  # report and exit 1 (a crash the operator counts)
        log.exception("training crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
