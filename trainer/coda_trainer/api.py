"""The trainer's public surface for the tools built on it (`coda-ctl`): the only trainer module,
beside `coda_trainer.config` and `coda_trainer.contract`, that the CLI imports
(tests/cli/test_imports.py holds it to that).

What it offers, each a documented entry point whose internals may move without the CLI noticing:

- `run_stage(argv)`: one training stage, the container's `python -m coda_trainer.train`;
- `evaluate(argv)`: the code-benchmark harness, `python -m coda_trainer.evaluate`, and
  `BENCHMARKS`, the benchmark names it knows;
- the embedded default run (`PRESET_NAMES`, `embedded_default_spec`,
  `EMBEDDED_DEFAULT_EVALUATION`) and the standard-library corpora it trains on
  (`build_default_corpora`, `sft_instruction`, the SFT prompt format);
- `data_source_problem`: why a data source cannot be read (None when it can);
- the pre-flight report of `coda-ctl plan` (`arithmetic_report`, `peak_flops_per_device`,
  `TpuTarget`, `stage_report`, `PreflightUnavailable`).

Importing this module costs what `coda_trainer.config` costs (pydantic, no JAX, no NumPy): the
entry points that need JAX or NumPy import their module when called.
"""

from __future__ import annotations

from collections.abc import Sequence

from coda_trainer.config import DataSource
from coda_trainer.corpus import build_default_corpora, sft_instruction
from coda_trainer.evaluate.__main__ import main as _evaluate_main
from coda_trainer.evaluate.datasets import BENCHMARKS
from coda_trainer.metrics import peak_flops_per_device
from coda_trainer.preflight import (
    PreflightUnavailable,
    TpuTarget,
    arithmetic_report,
    stage_report,
)
from coda_trainer.presets import EMBEDDED_DEFAULT_EVALUATION, PRESET_NAMES, embedded_default_spec

__all__ = [
    "BENCHMARKS",
    "EMBEDDED_DEFAULT_EVALUATION",
    "PRESET_NAMES",
    "PreflightUnavailable",
    "TpuTarget",
    "arithmetic_report",
    "build_default_corpora",
    "data_source_problem",
    "embedded_default_spec",
    "evaluate",
    "peak_flops_per_device",
    "run_stage",
    "sft_instruction",
    "stage_report",
]


def run_stage(argv: Sequence[str]) -> int:
    """Train one stage: `argv` as for `python -m coda_trainer.train` (`--config JOB.yaml`, …).
    Returns the process exit code (`contract.EXIT_*`)."""
    from coda_trainer import train  # JAX: seconds to import, only when a stage runs

    return train.main(list(argv)) or 0


def evaluate(argv: Sequence[str]) -> int:
    """Run the benchmark harness in this process: `argv` as for `python -m coda_trainer.evaluate`
    (`--benchmark NAME`, `--url URL` or `--checkpoint DIR`, …). It prints the pass@k table and
    returns its exit status; a failure of the harness itself (unreachable server, bad checkpoint)
    raises."""
    return _evaluate_main(list(argv))


def data_source_problem(source: DataSource, *, sft: bool = False) -> str | None:
    """Why `source` cannot be used (its glob matches nothing, or cannot be listed), or None."""
    from coda_trainer.data import DataError, resolve_sources  # NumPy: only when data is checked

    try:
        resolve_sources([source], sft=sft)
    except DataError as e:
        return str(e)
    return None
