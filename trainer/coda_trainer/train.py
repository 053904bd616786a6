"""Train one stage: `python -m coda_trainer.train --config job.yaml` (a `TrainJobConfig`).

What a run does, in order:

1. **Validate, before any device work**: the config (pydantic), the tokenizer against the model
   (`check_model`: vocab size and special ids), masking block sizes against `seq_len`, every data
   source (lists files, reads the first in its format, finds a usable document), `init_from`
   (resolves to an HF folder or orbax step). Any failure → exit `EXIT_PERMANENT` (78) with the
   reason on stderr. A stage whose `final/` is already published exits 0 at once.
2. `jax.distributed.initialize()` when the environment says multi-host (see
   `coda_trainer.distributed`).
3. Mesh (`stage.mesh`), model created in its shards, optimiser, data loader for this process's
   share of the global batch.
4. Resume from the newest complete checkpoint in `<checkpoints.uri>/<stage>/` if any (params,
   optimiser state, data iterator, step); otherwise load `init_from` weights if set.
5. Loop: one jitted `train_step(state, batch, knobs, rng) -> (state, metrics)`
   (`coda_trainer.step`); metrics every `log_every` steps (see `coda_trainer.metrics` for stdout
   JSON lines, `metrics.jsonl`, TensorBoard and `<stage>/status.json`); optional eval loss every
   `eval.every_steps`; checkpoint every `checkpoints.every_steps`.
6. SIGTERM/SIGINT (GKE preemption, `kubectl delete`): the current step finishes, a checkpoint is
   saved and waited for, exit `EXIT_RETRYABLE` (75). A rerun resumes exactly there. With several
   processes, a signal to any one of them stops all of them at the same step
   (`coda_trainer.distributed.StopVote`).
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
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coda_trainer import checkpoint as ckpt_lib
from coda_trainer import storage
from coda_trainer.checkpoint import FINAL_META, resolve_init_from
from coda_trainer.config import ConfigError, TrainJobConfig, load_job_config
from coda_trainer.contract import (
    ENV_LOG_LEVEL,
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRYABLE,
    PermanentError,
    metrics_uri,
)
from coda_trainer.data import Prefetch, make_loader, validate_sources
from coda_trainer.distributed import StopFlag, StopVote, maybe_initialize_distributed
from coda_trainer.k8s_progress import BackgroundProgress, ProgressReporter
from coda_trainer.masking import NoiseSpec
from coda_trainer.metrics import MetricsWriter, mfu
from coda_trainer.model import create_sharded_model
from coda_trainer.sharding import batch_sharding, make_mesh
from coda_trainer.step import (
    TrainState,
    abstract_train_state,
    initial_train_state,
    make_eval_step,
    make_train_step,
    stage_knobs,
    stage_model_config,
)
from coda_trainer.tokenizer import load_tokenizer

__all__ = [
    "PreparedJob",
    "main",
    "prepare",
    "run",
    "train",
]

log = logging.getLogger("coda_trainer.train")


@dataclasses.dataclass
class PreparedJob:
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
    meta_uri = storage.join(cfg.final_dir, FINAL_META)
    if not storage.is_committed(cfg.final_dir) or not storage.exists(meta_uri):
        return False
    return json.loads(storage.read_text(meta_uri)).get("step") == cfg.stage.steps


def prepare(cfg: TrainJobConfig) -> PreparedJob:
    """Validate everything that can be checked without devices. Raises ConfigError/DataError."""
    stage = cfg.stage
    model_config = stage_model_config(cfg)
    if _final_done(cfg):
        return PreparedJob(cfg, model_config, None, None, already_done=True)
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
    return PreparedJob(cfg, model_config, tokenizer, init_from, already_done=False)


# --------------------------------------------------------------------------------------------------
# 2. The loop
# --------------------------------------------------------------------------------------------------


def _global_batch(local: dict[str, Any], sharding: Any) -> dict[str, Any]:
    """This process's rows → global arrays sharded over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train(plan: PreparedJob, *, stop_after_steps: int | None = None) -> int:
    """Run the stage described by a validated plan; returns an exit code.

    `stop_after_steps` (tests, benchmarks) behaves like a SIGTERM after that many steps of this
    invocation: checkpoint, exit 75.
    """
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
    with jax.set_mesh(mesh):
        stage_run = _StageRun.start(plan, mesh, model, layout, data, ckpt, writer, progress)
        exit_code, step = stage_run.loop(stop_after_steps)
        if exit_code == EXIT_OK:
            stage_run.publish(step)
    return exit_code


@dataclasses.dataclass
class _Window:
    """Train metrics since the last log line, and the steps timed since the first (compiling) step."""

    pending: list[Any] = dataclasses.field(default_factory=list)
    start: float | None = None  # None until the first step has compiled and run
    steps: int = 0

    def retime(self) -> None:
        """Time from now (after a compile or an eval, which are not training throughput)."""
        self.start, self.steps = time.perf_counter(), 0

    def restart(self) -> None:
        """A new window after a log line."""
        self.pending = []
        self.retime()


@dataclasses.dataclass
class _StageRun:
    """One stage on this process once its model exists: the train state, the compiled steps and
    where results go (checkpoints, metrics, the run's status). `start` restores or initialises,
    `loop` trains until done or told to stop, `publish` writes the final checkpoint."""

    plan: PreparedJob
    mesh: Any
    data: Any  # Prefetch over this process's loader (checkpointable)
    ckpt: Any  # checkpoint.Checkpointer
    writer: Any  # metrics.MetricsWriter
    progress: Any  # k8s_progress.BackgroundProgress | None
    graphdef: Any
    rest: Any
    state: TrainState
    spec: Any  # masking.NoiseSpec
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    first_step: int
    last_ckpt: str | None

    @property
    def stage(self) -> Any:
        return self.plan.cfg.stage

    @classmethod
    def start(cls, plan, mesh, model, layout, data, ckpt, writer, progress) -> _StageRun:
        """Resume from the newest complete checkpoint, else start from `init_from` or the random
        initialisation, and build the jitted steps."""
        cfg, stage = plan.cfg, plan.cfg.stage
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
        log.info("model and optimiser ready at step %d; compiling the train step", start)
        step_array = jax.device_put(jnp.asarray(start, jnp.int32), layout.shardings.step)
        state = TrainState(step=step_array, params=params, opt_state=opt_state)

        spec = NoiseSpec.from_configs(plan.model_config, stage.masking)
        loss_norm = stage.sft_config.loss_norm if stage.kind == "sft" else "tokens"
        train_step = make_train_step(
            graphdef, rest, layout.tx, layout.schedule, spec=spec, kind=stage.kind,
            loss_norm=loss_norm, grad_accum=stage.batch.grad_accum,
            state_shardings=layout.shardings,
        )  # fmt: skip
        eval_step = make_eval_step(graphdef, rest, spec=spec, kind=stage.kind, loss_norm=loss_norm)
        last_ckpt = ckpt.step_uri(start) if restored is not None else None
        return cls(plan, mesh, data, ckpt, writer, progress, graphdef, rest, state, spec,
                   train_step, eval_step, start, last_ckpt)  # fmt: skip

    def loop(self, stop_after_steps: int | None) -> tuple[int, int]:
        """Train until the last step (EXIT_OK) or a stop (checkpoint, EXIT_RETRYABLE): a signal to
        any process, or `stop_after_steps` steps of this invocation. Returns (exit code, step)."""
        stage, cfg = self.stage, self.plan.cfg
        base_rng = jax.random.PRNGKey(stage.seed)
        sharding = batch_sharding(self.mesh)
        bar = self._progress_bar()
        vote = StopVote(self.mesh) if jax.process_count() > 1 else None
        window = _Window()
        step, exit_code = self.first_step, EXIT_OK
        # `compiling` until the first step is done (tens of seconds on a CPU, minutes at scale):
        # `coda-ctl local run` says so instead of showing a bar frozen at 0/N.
        self.writer.status(state="running", step=step, checkpoint=self.last_ckpt, compiling=True)
        compile_start = time.perf_counter()
        with StopFlag() as stop:
            while step < stage.steps:
                batch = _global_batch(next(self.data), sharding)
                knobs = stage_knobs(stage, self.spec, step)
                self.state, metrics = self.train_step(self.state, batch, knobs, base_rng)
                step += 1
                window.pending.append(metrics)
                if window.start is None:  # the first step compiles: start timing after it
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - compile_start
                    log.info("first step done (compiled in %.1f s)", compile_s)
                    self.writer.status(compiling=False, compile_seconds=compile_s)
                    window.retime()
                else:
                    window.steps += 1
                if bar is not None:
                    bar.update(1)
                if step % stage.log_every == 0 or step == stage.steps:
                    loss = self._log_train(step, window)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}")
                if stage.eval is not None and (
                    step % stage.eval.every_steps == 0 or step == stage.steps
                ):
                    self._run_eval(step)
                    window.retime()
                stopping = (
                    stop_after_steps is not None and step - self.first_step >= stop_after_steps
                )
                if vote is None:
                    stopping = stopping or stop.signal is not None
                else:  # one host's SIGTERM stops every host at the same step (see StopVote)
                    stopping = vote(stop.signal is not None) or stopping
                if step == stage.steps:
                    break
                if stopping:
                    self._save(step, wait=True)
                    self.writer.status(state="checkpointed")
                    exit_code = EXIT_RETRYABLE
                    break
                if step % cfg.checkpoints.every_steps == 0:
                    self._save(step, wait=False)
        if bar is not None:
            bar.close()
        if vote is not None:
            log.info(
                "stop votes: %.2f ms of host time per step",
                1000 * vote.seconds / max(step - self.first_step, 1),
            )
        return exit_code, step

    def publish(self, step: int) -> None:
        """The last step's checkpoint, then `final/` (HF export) and the done event."""
        cfg, stage = self.plan.cfg, self.stage
        if self.last_ckpt != self.ckpt.step_uri(step):
            self._save(step, wait=True)
        self.ckpt.wait()
        final_model = nnx.merge(self.graphdef, self.state.params, self.rest)
        ckpt_lib.write_final(
            final_model, self.plan.model_config, cfg.final_dir, tokenizer_path=cfg.tokenizer,
            meta={"run": cfg.run, "stage": stage.name, "kind": stage.kind, "step": step,
                  "checkpoint": self.last_ckpt},
        )  # fmt: skip
        # 1 unless a state's layout changed between steps (each compile costs minutes at scale).
        compiles = self.train_step._cache_size()
        self.writer.emit("done", step, {"final": cfg.final_dir, "train_step_compiles": compiles})
        self.writer.status(state="done", step=step, checkpoint=cfg.final_dir)
        if self.progress is not None:
            self.progress.submit(
                step=step, total_steps=stage.steps, checkpoint=cfg.final_dir, force=True
            )

    def _log_train(self, step: int, window: _Window) -> float:
        """Average the window's metrics into one train event (and status/progress); returns the loss."""
        stage = self.stage
        tokens_per_step = stage.batch.sequences * stage.batch.seq_len
        host = jax.device_get(window.pending)
        now = time.perf_counter()
        values = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        values["lr"] = float(host[-1]["lr"])
        if window.start is not None and window.steps:
            tps = window.steps * tokens_per_step / (now - window.start)
            flops_per_token = self.plan.model_config.train_flops_per_token(stage.batch.seq_len)
            devices = jax.devices()
            values.update(tokens_per_second=tps, step_seconds=(now - window.start) / window.steps,
                          mfu=mfu(flops_per_token, tps, devices[0].device_kind, len(devices)))  # fmt: skip
        values["tokens"] = step * tokens_per_step
        self.writer.emit("train", step, values)
        self.writer.status(step=step, loss=values["loss"], tokens_per_second=values.get("tokens_per_second"),
                           mfu=values.get("mfu"))  # fmt: skip
        if self.progress is not None:
            self.progress.submit(step=step, total_steps=stage.steps, loss=values["loss"],
                                 tokens_per_second=values.get("tokens_per_second"))  # fmt: skip
        window.restart()
        return values["loss"]

    def _run_eval(self, step: int) -> None:
        """Mean eval metrics over `eval.batches` fixed batches with fixed noise (comparable
        between evals: a separate data stream and rng from training)."""
        stage = self.stage
        assert stage.eval is not None
        pi, pc = jax.process_index(), jax.process_count()
        ev_loader = make_loader(
            stage.eval.data, self.plan.tokenizer, kind=stage.kind,
            batch_size=stage.batch.sequences // stage.batch.grad_accum // pc,
            seq_len=stage.batch.seq_len, seed=stage.seed + 1, process_index=pi, process_count=pc,
            readers=stage.batch.readers, over_length=stage.sft_config.over_length,
            prompt_span=stage.sft_config.prompt_span,
        )  # fmt: skip
        eval_rng = jax.random.fold_in(jax.random.PRNGKey(stage.seed), 0x7FFFFFFF)
        sharding = batch_sharding(self.mesh)
        knobs = stage_knobs(stage, self.spec, step)
        sums: dict[str, float] = {}
        for i in range(stage.eval.batches):
            batch = _global_batch(next(ev_loader), sharding)
            m = jax.device_get(
                self.eval_step(self.state.params, batch, knobs, jax.random.fold_in(eval_rng, i))
            )
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) / stage.eval.batches
        self.writer.emit("eval", step, sums)

    def _save(self, step: int, wait: bool) -> None:
        cfg, stage = self.plan.cfg, self.stage
        self.ckpt.save(step, self.state.params, self.state.opt_state, self.data.get_state(),
                       {"run": cfg.run, "stage": stage.name, "seed": stage.seed})  # fmt: skip
        if wait:
            self.ckpt.wait()
        self.last_ckpt = self.ckpt.step_uri(step)
        self.writer.emit("checkpoint", step, {"uri": self.last_ckpt})
        self.writer.status(step=step, checkpoint=self.last_ckpt)
        if self.progress is not None:
            self.progress.submit(
                step=step, total_steps=stage.steps, checkpoint=self.last_ckpt, force=True
            )

    def _progress_bar(self) -> Any:
        if jax.process_index() != 0 or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        stage = self.stage
        return tqdm(total=stage.steps, initial=self.first_step, desc=stage.name, unit="step",
                    dynamic_ncols=True)  # fmt: skip


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
    # Importing orbax (and grain) already put a bare StreamHandler on the root logger, which
    # would make basicConfig a silent no-op and our INFO lines (mesh, resumed, …) vanish. Only
    # those bare handlers go: subclasses (a test runner's capture handlers) stay.
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root.setLevel(level.upper())  # also when a capture handler kept basicConfig from acting
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
