"""`coda-ctl describe`'s run sections: the run's spec and its typed status as text.

The status is read through the operator's own models (`coda_ctl.runstatus`); an entry that does
not validate (a hand-edited or foreign status) is left out and named here, never a crash:
`describe` is what people run on a run that went wrong.

The spec is read as the stored body, not parsed: a spec that the operator refused (its run Failed
with InvalidSpec) must still be described, and parsing it would raise exactly there.

Pure, like `views`: `now` is a parameter and golden tests pin the exact text. Imported by the
`describe` and `doctor` commands only (the models cost ~0.1 s that `coda-ctl --help` does not pay).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from coda_operator.api import CodaTrainingRunStatus, EvaluationStatus, PreflightStatus, Progress

from coda_ctl.runstatus import current_progress, read_status
from coda_ctl.views import gib, human_age, parse_time, plain_table

STAGE_HEADERS = ["NAME", "KIND", "PHASE", "STEPS", "JOBSET", "RETRIES", "RESTARTS",
                 "FINAL CHECKPOINT"]  # fmt: skip


# ---------------------------------------------------------------------------------------- sections


def _accelerator_text(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "-"
    parts = []
    if tpu := acc.get("tpu"):
        parts.append(
            f"TPU {tpu.get('type', '?')} {tpu.get('topology', '?')} x{tpu.get('slices', 1)} slice(s)"
        )
    if gpu := acc.get("gpu"):
        parts.append(
            f"GPU {gpu.get('type', '?')} {gpu.get('gpusPerNode', gpu.get('count', '?'))}/node"
            f" x{gpu.get('nodes', 1)} node(s)"
        )
    if acc.get("spot"):
        parts.append("spot")
    return ", ".join(parts) or "-"


def _progress_text(progress: Progress) -> str:
    step = "-" if progress.step is None else progress.step
    total = "-" if progress.total_steps is None else progress.total_steps
    bits = [f"step {step}/{total}"]
    if progress.loss is not None:
        bits.append(f"loss {progress.loss:.4f}")
    if progress.tokens_per_second is not None:
        bits.append(f"{progress.tokens_per_second:.3g} tokens/s")
    return ", ".join(bits)


def _summary_lines(
    run: dict[str, Any], status: CodaTrainingRunStatus, left_out: list[str], now: dt.datetime
) -> list[str]:
    """Name, phase, current stage and progress, then what the spec asks for: `Key: value` lines."""
    meta, spec = run["metadata"], run.get("spec") or {}
    stage_names = [s.get("name") for s in spec.get("stages", [])]
    current = status.stage
    stage = current or "-"
    if current in stage_names:
        stage = f"{current} ({stage_names.index(current) + 1}/{len(stage_names)})"
    fields: list[tuple[str, str]] = [
        ("Name", meta["name"]),
        ("Namespace", meta.get("namespace", "default")),
        ("Age", human_age(parse_time(meta.get("creationTimestamp")), now)),
        ("Phase", status.phase),
        ("Stage", stage),
    ]
    progress = current_progress(status)
    if progress.model_fields_set:
        fields.append(("Progress", _progress_text(progress)))
        if progress.checkpoint:
            fields.append(("Last checkpoint", progress.checkpoint))
    model = spec.get("model") or {}
    init_from = f" from {model['initFrom']}" if model.get("initFrom") else ""
    fields += [
        ("Image", spec.get("image", "-")),
        ("Model", model.get("preset", "-") + init_from),
        ("Checkpoints", (spec.get("checkpoints") or {}).get("uri", "-")),
        ("Accelerator", _accelerator_text(spec.get("accelerator"))),
        ("Suspend", str(bool(spec.get("suspend", False))).lower()),
    ]
    if left_out:
        fields.append(("Not shown", f"status entries that are not valid: {', '.join(left_out)}"))
    width = max(len(k) for k, _ in fields) + 2
    return [f"{k + ':':<{width}}{v}" for k, v in fields]


def _stage_lines(run: dict[str, Any], status: CodaTrainingRunStatus) -> list[str]:
    by_name = {s.name: s for s in status.stages}
    rows = []
    for s in (run.get("spec") or {}).get("stages", []):
        st = by_name.get(s.get("name"))
        rows.append([
            s.get("name", "?"), s.get("kind", "?"),
            st.phase if st else "Pending", str(s.get("steps", "-")),
            (st.job_set if st else None) or "-",
            str(st.retries if st else 0), str(st.job_set_restarts if st else 0),
            (st.final if st else None) or "-",
        ])  # fmt: skip
    return ["Stages:", plain_table(STAGE_HEADERS, rows, indent="  ")]


def preflight_report_cells(pf: PreflightStatus) -> list[str]:
    """FITS, PEAK GiB, HBM GiB of a stage's pre-flight: its report when it is for the stage's
    current spec (`reportKey == key`), else dashes (a report for an older spec says nothing)."""
    report = pf.report if pf.report_key is not None and pf.report_key == pf.key else None
    if report is None:
        return ["-", "-", "-"]
    return [
        "yes" if report.fits else "NO",
        gib(report.peak_bytes_per_device),
        gib(report.hbm_bytes_per_device),
    ]


def preflight_lines(status: CodaTrainingRunStatus) -> list[str]:
    """`Pre-flight:` of describe: per TPU stage the operator compiled before its JobSet, its
    phase, Job, the report's verdict and numbers, and the operator's message. Nothing for a run
    without pre-flights (GPU stages, spec.preflight false, or not started)."""
    if not status.preflight:
        return []
    rows = [
        [stage, pf.phase, pf.job or "-", *preflight_report_cells(pf), pf.message or "-"]
        for stage, pf in status.preflight.items()
    ]
    headers = ["STAGE", "PHASE", "JOB", "FITS", "PEAK GiB", "HBM GiB", "MESSAGE"]
    return ["Pre-flight:", plain_table(headers, rows, indent="  ")]


def _condition_lines(status: CodaTrainingRunStatus) -> list[str]:
    if not status.conditions:
        return ["Conditions:", "  <none>"]
    rows = [[c.type, c.status, c.reason, c.message or "-"] for c in status.conditions]
    return ["Conditions:", plain_table(["TYPE", "STATUS", "REASON", "MESSAGE"], rows, indent="  ")]


def evaluation_lines(
    spec: dict[str, Any] | None, evaluations: dict[str, EvaluationStatus] | None
) -> list[str]:
    """`Evaluation:` of describe: per evaluated stage its Job and pass@1 per benchmark, with the
    gate. Nothing for a run without spec.evaluation."""
    if not spec and not evaluations:
        return []
    out = ["Evaluation:"]
    gate = (spec or {}).get("minPassAt1") or {}
    if spec:
        out.append(f"  Benchmarks:  {', '.join(spec.get('benchmarks') or [])}")
        if gate:
            out.append(
                "  Gate:        " + ", ".join(f"{b} >= {100 * v:.1f}%" for b, v in gate.items())
            )
    if not evaluations:
        out.append("  <not started>")
    for stage, ev in (evaluations or {}).items():
        line = f"  {stage}: {ev.phase}"
        line += f" (Job {ev.job})" if ev.job else ""
        line += f"  report: {ev.report}" if ev.report else ""
        out.append(line)
        if ev.message:
            out.append(f"    {ev.message}")
        if ev.results:
            rows = [
                [b, f"{100 * r.pass_at1:.1f}", str(r.problems), str(r.failures),
                 f"{100 * gate[b]:.1f}" if b in gate else "-"]
                for b, r in ev.results.items()
            ]  # fmt: skip
            out.append(
                plain_table(["BENCHMARK", "PASS@1", "PROBLEMS", "FAILED", "MIN"], rows, "    ")
            )
    return out


def _sampler_lines(run: dict[str, Any], status: CodaTrainingRunStatus) -> list[str]:
    sampler = status.sampler
    sampler_spec = (run.get("spec") or {}).get("sampler") or {}
    if not (sampler is not None and sampler.model_fields_set) and not sampler_spec:
        return ["Sampler:", "  <none>"]
    return [
        "Sampler:",
        f"  Enabled:   {str(sampler_spec.get('enabled', True)).lower()}",
        f"  Endpoint:  {(sampler.endpoint if sampler else None) or '-'}",
        f"  Ready:     {str(bool(sampler and sampler.ready)).lower()}",
    ]


def _event_lines(events: Sequence[dict[str, Any]], now: dt.datetime) -> list[str]:
    if not events:
        return ["Events:", "  <none>"]
    rows = [
        [
            e.get("type", "Normal"),
            e.get("reason", "-"),
            human_age(
                parse_time(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp")),
                now,
            ),
            (e.get("message") or "").strip(),
        ]
        for e in events
    ]
    return ["Events:", plain_table(["TYPE", "REASON", "AGE", "MESSAGE"], rows, indent="  ")]


def describe_text(run: dict[str, Any], events: Sequence[dict[str, Any]], now: dt.datetime) -> str:
    """The run's own sections of `describe` (the cluster's objects follow, from `diagnose`)."""
    status, left_out = read_status(run)
    spec = run.get("spec") or {}
    return "\n".join([
        *_summary_lines(run, status, left_out, now),
        *_stage_lines(run, status),
        *preflight_lines(status),
        *_condition_lines(status),
        *evaluation_lines(spec.get("evaluation"), status.evaluation),
        *_sampler_lines(run, status),
        *_event_lines(events, now),
    ])  # fmt: skip
