"""`coda-ctl plan`: will each stage of a run start, and fit, on the slice it asks for?

Always the arithmetic admission (`coda_operator.admission`: shapes that would fail at step 0) and
the analytic cost (FLOPs per step, ideal time at 100% MFU); with `compile=True` also
`coda_trainer.preflight`: the stage's real train and eval steps compiled for its TPU slice on this
CPU machine (libtpu from the `preflight` extra), giving the peak HBM per chip. Stages refused by
the arithmetic are not compiled (the step would not build); GPU stages cannot be compiled from a
CPU (their `note` says so).
"""

from __future__ import annotations

import os
from typing import Any

from coda_ctl import runspec
from coda_ctl.errors import CtlError, Exit
from coda_ctl.views import gib


def load_spec_docs(path: str) -> list[dict[str, Any]]:
    """Every run in `path`, schema- and model-valid but *without* the admission arithmetic (which
    `plan` reports stage by stage instead of refusing the file)."""
    from coda_operator import api

    docs = runspec.load_documents(path)
    problems: list[str] = []
    for i, doc in enumerate(docs):
        name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
        errors = runspec.schema_errors(doc) if isinstance(doc, dict) else ["<root>: not a mapping"]
        if not errors:
            try:
                api.parse_spec(doc.get("spec"), admission=False)
            except api.InvalidSpec as e:
                errors = list(e.errors)
        problems += [f"  {name or f'document {i + 1}'}: {err}" for err in errors]
    if problems:
        raise CtlError(f"{path}: invalid CodaTrainingRun:\n" + "\n".join(problems), Exit.INVALID)
    return docs


def plan_run(doc: dict[str, Any], *, compile: bool = False, search: bool = False) -> dict[str, Any]:
    """`{"name", "stages": [{"name", "fits", "peakBytesPerDevice", "hbmBytesPerDevice",
    "compileSeconds", "flopsPerStep", "idealStepSeconds", "problems", ...}]}` for one run."""
    from coda_operator import api
    from coda_operator.render import stage_job_config
    from coda_trainer import api as trainer

    name = doc["metadata"]["name"]
    spec = api.parse_spec(doc["spec"], admission=False)
    if compile:
        # Compile-only TPU devices need no accelerator: keep JAX (and libtpu) off any local one
        # (JAX is imported by the first compile, after this).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    stages = []
    for index, stage in enumerate(spec.stages):
        cfg = stage_job_config(name, spec, index)
        acc = spec.stage_accelerator(index)
        devices = spec.stage_devices(index)
        kind = f"TPU {acc.tpu.type}" if acc.tpu else acc.gpu.type.removeprefix("nvidia-")
        entry: dict[str, Any] = {
            "name": stage.name,
            "accelerator": devices.what,
            "fits": None,
            "peakBytesPerDevice": None,
            "hbmBytesPerDevice": None,
            "compileSeconds": None,
            **trainer.arithmetic_report(cfg, devices.devices, trainer.peak_flops_per_device(kind)),
            "problems": spec.stage_problems(index),
        }
        if entry["problems"]:
            entry["fits"] = False
        elif compile and acc.tpu is None:
            entry["note"] = "GPU programs cannot be compiled without the GPU: not compiled"
        elif compile:
            one = acc.tpu.slice
            target = trainer.TpuTarget(
                acc.tpu.type, one.topology, acc.tpu.slices, one.chips_per_host
            )
            try:
                entry.update(trainer.stage_report(cfg, target, search=search))
            except trainer.PreflightUnavailable as e:
                raise CtlError(str(e), Exit.ERROR) from None
        stages.append(entry)
    return {"name": name, "stages": stages}


def runnable(plan: dict[str, Any]) -> bool:
    """No stage is known not to run (refused by the arithmetic or out of HBM)."""
    return all(s["fits"] is not False for s in plan["stages"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.2f}s"


def table_rows(plan: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in plan["stages"]:
        fits = {True: "yes", False: "NO", None: "?"}[s["fits"]]
        rows.append([
            plan["name"], s["name"], s["accelerator"], fits,
            f"{gib(s['peakBytesPerDevice'])} / {gib(s['hbmBytesPerDevice'])}",
            s.get("remat") or "-", str(s.get("gradAccum") or "-"),
            f"{s['flopsPerStep']:.3g}",
            "-" if s["idealStepSeconds"] is None else f"{s['idealStepSeconds']:.3g}s",
            _duration(s.get("idealStageSeconds")),
            "-" if s["compileSeconds"] is None else f"{s['compileSeconds']:.0f}s",
        ])  # fmt: skip
    return rows


TABLE_HEADERS = ["RUN", "STAGE", "SLICE", "FITS", "PEAK/HBM GiB", "REMAT", "ACCUM",
                 "FLOPS/STEP", "IDEAL STEP", "IDEAL STAGE", "COMPILE"]  # fmt: skip
