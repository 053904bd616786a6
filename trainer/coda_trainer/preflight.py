"""Pre-flight: compile a stage's real train step for its TPU slice on this CPU machine.

A user's first real run costs hours of slice time; most ways to lose them (a batch that does not
divide, an out-of-HBM step) show up when the step is compiled. With libtpu installed
(`pip install 'coda[preflight]'`, Linux x86_64), `jax.experimental.topologies` gives
*compile-only* TPU devices of any topology on a plain CPU host — the way MaxText's
`train_compile.py` checks its configs — and XLA compiles for them exactly what the slice would run:
the trainer's own mesh (`make_mesh`), abstract state (`abstract_train_state`) and step
(`make_train_step`, splash attention kernels included), for each stage and its eval step.

What a report says, per stage:

- `peakBytesPerDevice`: argument + output − aliased + temporaries + generated code, from
  `compiled.memory_analysis()` — XLA's static buffer assignment. Runtime extras (the runtime's own
  reservations, fragmentation, host transfers, the data pipeline's prefetch) are not in it.
- `hbmBytesPerDevice`: the chip's usable HBM as the TPU compiler reports it (it refuses a program
  above it with RESOURCE_EXHAUSTED; a probe program reads the number).
- `fits`: peak ≤ (1 − SAFETY_MARGIN) · HBM. Within 10% of the limit counts as not fitting: the
  static numbers leave out what the runtime adds.
- `flopsPerStep`: analytic, `ModelConfig.train_flops_per_token` × tokens per step (never
  `cost_analysis()`, which counts a scanned layer loop once and Pallas kernels as 0).
- `idealStepSeconds` / `idealStageSeconds`: those FLOPs (plus the recompute of the remat policy)
  at 100% of the chips' bf16 peak: a floor, never a prediction.

Only TPU programs can be compiled this way: GPU programs need the GPU (a GPU stage is reported as
not compiled). The results hold for the jax/libtpu versions installed here (`jax`, `libtpu` in
the report); another libtpu may lay buffers out differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import pydantic
import yaml

from coda_trainer.config import TrainJobConfig
from coda_trainer.contract import EXIT_PERMANENT, EXIT_RETRYABLE
from coda_trainer.k8s_progress import ProgressReporter
from coda_trainer.metrics import peak_flops_per_device

__all__ = [
    "SAFETY_MARGIN",
    "CompileResult",
    "PreflightUnavailable",
    "TpuTarget",
    "compile_stage",
    "ideal_step_seconds",
    "parse_oom",
    "recompute_flops_per_token",
    "search_stage",
    "stage_report",
    "status_report",
    "tpu_devices",
    "usable_hbm_bytes",
]

# Fraction of the compiler's usable HBM kept free: a peak above (1 − margin) · HBM "does not fit".
SAFETY_MARGIN = 0.10

# Remat policies in the order a search tries them (cheapest recompute first).
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "minimal", "full")

_GIB = 1 << 30


class PreflightUnavailable(RuntimeError):
    """This machine cannot compile for TPUs (no libtpu); the message says how to get it."""


# --------------------------------------------------------------------------------------------------
# Compile-only TPU devices
# --------------------------------------------------------------------------------------------------

# Our TPU type → (generation name for libtpu's topology strings, chip config). v4 and v5p run one
# megacore device per chip (as on a real slice); v5e and v6e chips have one TensorCore.
_TPU_GENERATIONS = {
    "v4": ("v4", "megacore"),
    "v5p": ("v5", "megacore"),
    "v5e": ("v5e", "default"),
    "v6e": ("v6e", "default"),
}
# Chips per host → the host's chip grid (libtpu's chips_per_host_bounds).
_HOST_BOUNDS = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}


def _check_platform() -> None:
    """Compile-only devices need no accelerator: unless told otherwise JAX runs on the CPU (with
    libtpu installed it would otherwise try, and fail, to open a local TPU). libtpu also takes a
    host-wide lock (/tmp/libtpu_lockfile) so that two processes never drive one chip; a
    compile-only client drives none, so several pre-flights (or one beside a test that loaded
    libtpu) may share the host."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.cache
def tpu_devices(
    tpu_type: str, topology: str, chips_per_host: int, slices: int = 1
) -> tuple[Any, ...]:
    """Compile-only devices of `slices` × (`tpu_type`, `topology`), one per chip."""
    _check_platform()
    from jax.experimental import topologies

    generation, chip_config = _TPU_GENERATIONS[tpu_type]
    dims = topology.count("x") + 1
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{generation}:{topology}",
            chip_config_name=chip_config,
            chips_per_host_bounds=_HOST_BOUNDS[chips_per_host],
            num_slices=slices,
            wrap=(False,) * max(dims, 3),
        )
    except Exception as e:  # no libtpu: jax raises a RuntimeError/ValueError about the plugin
        raise PreflightUnavailable(
            f"cannot create compile-only TPU devices ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "install the pre-flight extra on Linux x86_64: pip install 'coda[preflight]'"
        ) from e
    return tuple(desc.devices)


_OOM_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")
_OOM_REQUIRED = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def parse_oom(message: str) -> tuple[int | None, int | None]:
    """(bytes required, usable HBM bytes) from the TPU compiler's RESOURCE_EXHAUSTED message."""
    used = _OOM_USED.search(message)
    if used:
        return _bytes(used.group(1), used.group(2)), _bytes(used.group(3), used.group(4))
    available = _OOM_AVAILABLE.search(message)
    required = _OOM_REQUIRED.search(message)
    return (
        _bytes(required.group(1), required.group(2)) if required else None,
        _bytes(available.group(1), available.group(2)) if available else None,
    )


@functools.cache
def usable_hbm_bytes(tpu_type: str) -> int:
    """The HBM per chip the TPU compiler lets a program use, read from its own refusal of a probe
    program that needs 1 TiB per chip (v5p: 95.74 GiB, v6e 31.25, v5e 15.75, v4 30.75)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    chips = {"v4": "2x2x1", "v5p": "2x2x1", "v5e": "2x2", "v6e": "2x2"}[tpu_type]
    devices = tpu_devices(tpu_type, chips, 4)
    mesh = Mesh(np.asarray(devices), ("x",))
    probe = jax.jit(
        lambda: jnp.zeros((len(devices), 1 << 39), jnp.int16),
        out_shardings=NamedSharding(mesh, PartitionSpec("x")),
    )
    try:
        probe.lower().compile()
    except Exception as e:
        _, hbm = parse_oom(str(e))
        if hbm is not None:
            return hbm
        raise RuntimeError(f"the {tpu_type} HBM probe failed unexpectedly: {e}") from e
    raise RuntimeError(f"the {tpu_type} compiler accepted a 1 TiB/chip program: HBM unknown")


# --------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """The compiled train (and eval) step of one stage configuration on its slice."""

    remat: str
    grad_accum: int
    fits: bool
    peak_bytes: int | None  # per device, train step (or the compiler's figure when out of HBM)
    eval_peak_bytes: int | None
    hbm_bytes: int
    compile_seconds: float
    error: str | None = None  # why it does not fit / did not compile

    def to_json(self) -> dict[str, Any]:
        return {
            "remat": self.remat,
            "gradAccum": self.grad_accum,
            "fits": self.fits,
            "peakBytesPerDevice": self.peak_bytes,
            "evalPeakBytesPerDevice": self.eval_peak_bytes,
            "hbmBytesPerDevice": self.hbm_bytes,
            "compileSeconds": round(self.compile_seconds, 2),
            **({"error": self.error} if self.error else {}),
        }


def recompute_flops_per_token(model_config: Any, seq_len: int) -> float:
    """Extra FLOPs per token the model's remat policy spends recomputing the forward pass.

    full: the whole forward (matmuls 2N, attention 4·layers·S·heads·hd); minimal keeps only the
    attention output, so the projections and MLP (2N) run twice; dots_no_batch keeps the weight
    matmuls and recomputes attention's (batch-dimension) dots; dots and none recompute no matmul.
    """
    matmuls = 2.0 * model_config.num_params(include_embedding=False)
    attention = (
        4.0 * model_config.num_layers * seq_len * model_config.num_heads * model_config.head_dim
    )
    return {
        "none": 0.0,
        "dots": 0.0,
        "dots_no_batch": attention,
        "minimal": matmuls,
        "full": matmuls + attention,
    }[model_config.remat]


def _memory_peak(compiled: Any) -> int:
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )


def _abstract_batch(cfg: TrainJobConfig, mesh: Any, rows: int, spec: Any) -> tuple[Any, Any]:
    """ShapeDtypeStructs of a global batch of `rows` as the loader yields it, and of the knobs."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    # lazy: imports JAX (+9-11 s measured); --help and bad-config exits stay at ~1 s; data is
    # NumPy, which `coda-ctl plan`'s arithmetic-only report (this module's top) must not load
    from coda_trainer.data import batch_fields
    from coda_trainer.sharding import batch_sharding
    from coda_trainer.step import stage_knobs

    stage = cfg.stage
    rows_sharding = batch_sharding(mesh)
    batch = {
        name: jax.ShapeDtypeStruct((rows, stage.batch.seq_len), dtype, sharding=rows_sharding)
        for name, dtype in batch_fields(stage.kind).items()
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def abstract(value: Any) -> Any:
        value = np.asarray(value)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=replicated)

    return batch, jax.tree.map(abstract, stage_knobs(stage, spec, 0))


class _CompileFailed(Exception):
    def __init__(self, error: Exception, seconds: float) -> None:
        super().__init__(str(error))
        self.error, self.seconds = error, seconds


def _compile(fn: Any, *args: Any) -> tuple[Any, float]:
    """(compiled, seconds); a failure (out of HBM included) comes back with its seconds too."""
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:
        raise _CompileFailed(e, time.perf_counter() - start) from e
    return compiled, time.perf_counter() - start


def compile_stage(
    cfg: TrainJobConfig,
    devices: Sequence[Any],
    *,
    hbm_bytes: int,
    remat: str | None = None,
    grad_accum: int | None = None,
    eval_step: bool = True,
) -> CompileResult:
    """Compile `cfg`'s stage for `devices` (compile-only TPU devices); optionally with another
    remat policy or gradAccum. Out-of-HBM programs come back as `fits=False`, not as errors."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    # lazy: imports JAX (+9-11 s measured); --help and bad-config exits stay at ~1 s
    from coda_trainer.masking import NoiseSpec
    from coda_trainer.sharding import make_mesh
    from coda_trainer.step import abstract_train_state, make_eval_step, make_train_step

    stage_update: dict[str, Any] = {}
    if remat is not None:
        stage_update["remat"] = remat
    if grad_accum is not None:
        stage_update["batch"] = cfg.stage.batch.model_copy(update={"grad_accum": grad_accum})
    if stage_update:
        cfg = cfg.model_copy(update={"stage": cfg.stage.model_copy(update=stage_update)})
    stage = cfg.stage
    accum = stage.batch.grad_accum
    mesh = make_mesh(stage.mesh, devices)
    seconds = 0.0
    with jax.set_mesh(mesh):
        layout = abstract_train_state(cfg, mesh)
        policy = layout.model_config.remat
        spec = NoiseSpec.from_configs(layout.model_config, stage.masking)
        loss_norm = stage.sft_config.loss_norm if stage.kind == "sft" else "tokens"
        rng = jax.ShapeDtypeStruct(
            (2,), jax.numpy.uint32, sharding=NamedSharding(mesh, PartitionSpec())
        )
        train_step = make_train_step(
            layout.graphdef, layout.rest, layout.tx, layout.schedule, spec=spec, kind=stage.kind,
            loss_norm=loss_norm, grad_accum=accum, state_shardings=layout.shardings,
        )  # fmt: skip
        batch, knobs = _abstract_batch(cfg, mesh, stage.batch.sequences, spec)
        try:
            compiled, seconds = _compile(train_step, layout.state, batch, knobs, rng)
        except _CompileFailed as e:
            return _refused(e.error, policy, accum, hbm_bytes, e.seconds)
        peak = _memory_peak(compiled)
        eval_peak = None
        if eval_step and stage.eval is not None:
            step = make_eval_step(layout.graphdef, layout.rest, spec=spec, kind=stage.kind,
                                  loss_norm=loss_norm)  # fmt: skip
            eval_batch, knobs = _abstract_batch(cfg, mesh, stage.batch.sequences // accum, spec)
            try:
                compiled_eval, eval_seconds = _compile(
                    step, layout.state.params, eval_batch, knobs, rng
                )
            except _CompileFailed as e:
                return _refused(e.error, policy, accum, hbm_bytes, seconds + e.seconds, peak=peak,
                                what="eval step")  # fmt: skip
            seconds += eval_seconds
            eval_peak = _memory_peak(compiled_eval)
    limit = (1 - SAFETY_MARGIN) * hbm_bytes
    worst = max(peak, eval_peak or 0)
    error = None
    if worst > limit:
        error = (
            f"needs {worst / _GIB:.2f} GiB per chip, above {1 - SAFETY_MARGIN:.0%} of the "
            f"{hbm_bytes / _GIB:.2f} GiB the compiler allows"
        )
    return CompileResult(policy, accum, worst <= limit, peak, eval_peak, hbm_bytes, seconds, error)


def _refused(
    e: Exception,
    remat: str,
    accum: int,
    hbm_bytes: int,
    seconds: float,
    *,
    peak: int | None = None,
    what: str = "train step",
) -> CompileResult:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
        raise e
    required, hbm = parse_oom(message)
    first = next((ln for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message)
    return CompileResult(
        remat, accum, False, required if peak is None else peak, required if peak else None,
        hbm or hbm_bytes, seconds, f"{what} out of HBM: {first.strip()}",
    )  # fmt: skip


def _admissible_accums(sequences: int, shards: int, limit: int = 64) -> list[int]:
    return [
        a
        for a in range(1, min(sequences, limit) + 1)
        if sequences % a == 0 and (sequences // a) % shards == 0
    ]


def search_stage(
    cfg: TrainJobConfig,
    devices: Sequence[Any],
    *,
    hbm_bytes: int,
    peak_flops: float,
    max_compiles: int = 12,
    known: Sequence[CompileResult] = (),
) -> tuple[CompileResult | None, list[CompileResult]]:
    """Try remat × gradAccum; return the fastest fitting combination and every compile tried.

    "Fastest" is analytic: step FLOPs plus the policy's recompute (`recompute_flops_per_token`)
    at the chips' peak, then fewer micro-batches (bigger matmuls) first. Candidates are tried in
    that order and the first that fits wins, so the search compiles only what it must.
    """
    # lazy: imports JAX (+9-11 s measured); --help and bad-config exits stay at ~1 s
    from coda_trainer.sharding import make_mesh
    from coda_trainer.step import stage_model_config

    stage = cfg.stage
    data, fsdp, _ = make_mesh(stage.mesh, devices).devices.shape
    shards = data * fsdp
    base = stage_model_config(cfg)
    tokens = stage.batch.sequences * stage.batch.seq_len

    def step_seconds(policy: str) -> float:
        model = base.model_copy(update={"remat": policy})
        return ideal_step_seconds(model, stage.batch.seq_len, tokens, peak_flops, len(devices))

    candidates = sorted(
        ((policy, accum) for policy in REMAT_POLICIES
         for accum in _admissible_accums(stage.batch.sequences, shards)),
        key=lambda c: (step_seconds(c[0]), c[1], REMAT_POLICIES.index(c[0])),
    )  # fmt: skip
    tried: list[CompileResult] = []
    skip_policy: set[str] = set()
    for policy, accum in candidates:
        if len(tried) >= max_compiles:
            break
        if policy in skip_policy:
            continue
        result = next((k for k in known if (k.remat, k.grad_accum) == (policy, accum)), None)
        if result is None:
            result = compile_stage(
                cfg, devices, hbm_bytes=hbm_bytes, remat=policy, grad_accum=accum
            )
            tried.append(result)
        if result.fits:
            return result, tried
        if result.peak_bytes is not None and result.peak_bytes > 8 * hbm_bytes:
            skip_policy.add(policy)  # hopeless with any accumulation this search would try
    return None, tried


def ideal_step_seconds(
    model_config: Any, seq_len: int, tokens: int, peak_flops: float, devices: int
) -> float:
    """Seconds per step at 100% of `devices` chips' peak: analytic FLOPs plus remat recompute."""
    per_token = model_config.train_flops_per_token(seq_len)
    per_token += recompute_flops_per_token(model_config, seq_len)
    return per_token * tokens / (peak_flops * devices)


def versions() -> dict[str, str | None]:
    """The compiler the results hold for."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("jax", "jaxlib", "libtpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / _GIB, 2)


# --------------------------------------------------------------------------------------------------
# A stage's report (what `coda-ctl plan` prints per stage)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """The slice(s) a stage runs on: `slices` × (`tpu_type`, `topology`)."""

    tpu_type: str  # v4 | v5p | v5e | v6e
    topology: str  # "2x2x2", "16x16", ...
    slices: int = 1
    chips_per_host: int | None = None  # None: GKE's machine for the topology

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split("x")) * self.slices

    def host_chips(self) -> int:
        """Chips per TPU VM: 4 on multi-host slices and v4/v5p; 1/4/8 on single-host v5e/v6e."""
        if self.chips_per_host is not None:
            return self.chips_per_host
        per_slice = self.chips // self.slices
        return per_slice if per_slice in (1, 8) and self.tpu_type in ("v5e", "v6e") else 4

    def device_kind(self) -> str:
        return f"TPU {self.tpu_type}"


def peak_flops(tpu_type: str) -> float:
    flops = peak_flops_per_device(f"TPU {tpu_type}")
    if flops is None:
        raise ValueError(f"no peak FLOP/s known for TPU {tpu_type}")
    return flops


def arithmetic_report(
    cfg: TrainJobConfig, chips: int, device_peak_flops: float | None
) -> dict[str, Any]:
    """What a stage costs without compiling: FLOPs per step and the ideal (100% MFU) times."""
    # lazy: imports JAX (+9-11 s measured); --help and bad-config exits stay at ~1 s
    from coda_trainer.step import stage_model_config

    stage = cfg.stage
    model = stage_model_config(cfg)
    tokens = stage.batch.sequences * stage.batch.seq_len
    flops = model.train_flops_per_token(stage.batch.seq_len) * tokens
    step = (
        ideal_step_seconds(model, stage.batch.seq_len, tokens, device_peak_flops, chips)
        if device_peak_flops
        else None
    )
    return {
        "flopsPerStep": flops,
        "idealStepSeconds": step,
        "idealStageSeconds": None if step is None else step * stage.steps,
        "remat": model.remat,
        "gradAccum": stage.batch.grad_accum,
    }


def stage_report(cfg: TrainJobConfig, target: TpuTarget, *, search: bool = False) -> dict[str, Any]:
    """Compile `cfg`'s stage for `target` and say whether it fits (the `coda-ctl plan` fields).

    `problems` gets one line when the stage as written does not fit, naming the numbers and, with
    `search`, the fastest remat × gradAccum that does.
    """
    devices = tpu_devices(target.tpu_type, target.topology, target.host_chips(), target.slices)
    hbm = usable_hbm_bytes(target.tpu_type)
    flops = peak_flops(target.tpu_type)
    report = arithmetic_report(cfg, len(devices), flops)
    result = compile_stage(cfg, devices, hbm_bytes=hbm)
    report.update(
        fits=result.fits,
        peakBytesPerDevice=result.peak_bytes,
        evalPeakBytesPerDevice=result.eval_peak_bytes,
        hbmBytesPerDevice=result.hbm_bytes,
        compileSeconds=round(result.compile_seconds, 2),
        problems=[],
    )
    if search:
        best, tried = search_stage(cfg, devices, hbm_bytes=hbm, peak_flops=flops, known=[result])
        report["compileSeconds"] = round(
            result.compile_seconds + sum(t.compile_seconds for t in tried), 2
        )
        report["search"] = {
            "tried": [t.to_json() for t in tried],
            "proposal": None if best is None else {
                **best.to_json(),
                "idealStepSeconds": ideal_step_seconds(
                    stage_model_config_with(cfg, best.remat), cfg.stage.batch.seq_len,
                    cfg.stage.batch.sequences * cfg.stage.batch.seq_len, flops, len(devices),
                ),
            },
        }  # fmt: skip
    if not result.fits:
        line = f"{result.error} (remat {result.remat}, gradAccum {result.grad_accum})"
        proposal = report.get("search", {}).get("proposal")
        if proposal:
            line += (
                f"; fits with remat: {proposal['remat']}, batch.gradAccum: {proposal['gradAccum']} "
                f"({gib(proposal['peakBytesPerDevice'])} GiB per chip)"
            )
        elif search:
            line += "; no remat × gradAccum tried fits: use a bigger slice or a shorter seqLen"
        else:
            line += (
                "; set the stage's remat or batch.gradAccum (`coda-ctl plan --compile --search`)"
            )
        report["problems"].append(line)
    return report


def stage_model_config_with(cfg: TrainJobConfig, remat: str) -> Any:
    # lazy: imports JAX (+9-11 s measured); --help and bad-config exits stay at ~1 s
    from coda_trainer.step import stage_model_config

    return stage_model_config(cfg).model_copy(update={"remat": remat})


# The report fields the operator keeps in status.preflight.<stage>.report (the rest stays in the log).
_STATUS_FIELDS = (
    "fits", "peakBytesPerDevice", "evalPeakBytesPerDevice", "hbmBytesPerDevice",
    "compileSeconds", "idealStepSeconds", "problems", "versions",
)  # fmt: skip


def status_report(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a stage report the operator caches in the run's status."""
    return {k: report[k] for k in _STATUS_FIELDS if k in report}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m coda_trainer.preflight --config job.yaml --tpu v5p:2x2x2 [--slices N] [--search]`:
    one stage's report as JSON on stdout. Exit codes as the trainer's (coda_trainer.contract):
    0 it fits; 78 (EXIT_PERMANENT) it does not fit, the config is invalid or this image cannot
    compile for TPUs; 75 (EXIT_RETRYABLE) the report could not be written to the run's status.

    In the operator's pre-flight Job (`--report-key`, with the pod env `CODA_PROGRESS=status`,
    `CODA_RUN_NAME`, `CODA_RUN_NAMESPACE`, `CODA_STAGE`) the report is also merge-patched into
    `status.preflight.<stage>` with that key, which tells the operator which spec it is for."""
    parser = argparse.ArgumentParser(
        prog="python -m coda_trainer.preflight", description=main.__doc__
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="stage job YAML (the operator's ConfigMap)")
    source.add_argument("--config-env", help="environment variable holding the stage job YAML")
    parser.add_argument("--tpu", required=True, help="TYPE:TOPOLOGY, e.g. v5p:4x4x4")
    parser.add_argument("--slices", type=int, default=1)
    parser.add_argument("--search", action="store_true", help="try remat × gradAccum")
    parser.add_argument(
        "--report-key", help="write the report to the run's status.preflight.<stage> with this key"
    )
    args = parser.parse_args(argv)

    reporter = None
    if args.report_key:
        reporter = ProgressReporter.from_env()
        if reporter is None:
            print("--report-key needs the operator's pod env (CODA_PROGRESS=status, CODA_RUN_NAME, "
                  "CODA_STAGE)", file=sys.stderr)  # fmt: skip
            return EXIT_PERMANENT

    def publish(report: dict[str, Any]) -> bool:
        print(json.dumps(report, indent=2), flush=True)
        if reporter is None:
            return True
        entry = {"reportKey": args.report_key, "report": status_report(report)}
        return reporter.patch_status({"preflight": {reporter.stage: entry}})

    tpu_type, _, topology = args.tpu.partition(":")
    try:
        if args.config_env:
            text = os.environ.get(args.config_env)
            if text is None:
                raise ValueError(f"environment variable {args.config_env} is not set")
        else:
            with open(args.config) as f:
                text = f.read()
        cfg = TrainJobConfig.model_validate(yaml.safe_load(text))
        target = TpuTarget(tpu_type, topology, args.slices)
        report = {"name": cfg.stage.name, **stage_report(cfg, target, search=args.search),
                  "versions": versions()}  # fmt: skip
    except (PreflightUnavailable, pydantic.ValidationError, ValueError, KeyError, OSError) as e:
        # No retry fixes these: the same config or image fails the same way.
        reason = str(e) if not isinstance(e, KeyError) else f"unknown TPU type {tpu_type!r}"
        report = {"name": None, "fits": False, "problems": [f"pre-flight cannot run: {reason}"],
                  "versions": versions()}  # fmt: skip
        return EXIT_PERMANENT if publish(report) else EXIT_RETRYABLE
    if not publish(report):
        return EXIT_RETRYABLE
    return 0 if report["fits"] else EXIT_PERMANENT


if __name__ == "__main__":
    raise SystemExit(main())
