"""Pure formatting of CodaTrainingRuns for people and scripts: rows, tables, -o formats (`describe`'s
run sections are `coda_ctl.describe`).

Nothing here talks to a cluster or reads the clock implicitly (`now` is a parameter), so golden
tests pin the exact output.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

TERMINAL_PHASES = ("Succeeded", "Failed")

GET_COLUMNS = ("NAME", "PHASE", "STAGE", "STEP", "LOSS", "AGE")
WIDE_COLUMNS = (*GET_COLUMNS, "TOKENS/S", "CHECKPOINT", "SAMPLER", "PASS@1")


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def gib(n: int | None) -> str:
    """Bytes as GiB with two decimals; "-" when unknown."""
    return "-" if n is None else f"{n / (1 << 30):.2f}"


def human_age(start: dt.datetime | None, now: dt.datetime) -> str:
    """kubectl-like coarse age: 45s, 12m, 5h, 3d."""
    if start is None:
        return "<unknown>"
    seconds = max(int((now - start).total_seconds()), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


# The functions below that read a run's status import `coda_ctl.runstatus` (the operator's typed
# models) when called: `coda-ctl --help` imports this module and must not pay for the models.


def phase_of(run: dict[str, Any]) -> str:
    from coda_ctl.runstatus import status_of

    return status_of(run).phase


def run_row(run: dict[str, Any], now: dt.datetime, *, wide: bool = False) -> list[str]:
    from coda_ctl.runstatus import current_progress, status_of

    status = status_of(run)
    progress = current_progress(status)
    step, total = progress.step, progress.total_steps
    step_text = (
        f"{step}/{total}"
        if step is not None and total
        else (str(step) if step is not None else "-")
    )
    row = [
        run["metadata"]["name"],
        status.phase,
        status.stage or "-",
        step_text,
        _num(progress.loss, ".4f"),
        human_age(parse_time(run["metadata"].get("creationTimestamp")), now),
    ]
    if wide:
        sampler = status.sampler
        endpoint = (sampler.endpoint if sampler else None) or "-"
        row += [
            _num(progress.tokens_per_second, ".3g"),
            progress.checkpoint or "-",
            endpoint + (" (ready)" if sampler and sampler.ready else ""),
            status.score or "-",  # the newest finished evaluation (spec.evaluation)
        ]
    return row


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Columns padded to the widest cell, three spaces apart, like kubectl."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append((indent + "   ".join(cells)).rstrip())
    return "\n".join(lines)


def get_table(
    runs: Sequence[dict[str, Any]], now: dt.datetime, *, wide: bool = False
) -> tuple[list[str], list[list[str]]]:
    headers = list(WIDE_COLUMNS if wide else GET_COLUMNS)
    return headers, [run_row(r, now, wide=wide) for r in runs]


# ---------------------------------------------------------------------------------------- -o formats


@dataclass(frozen=True)
class OutputFormat:
    """A parsed `-o`: kind is table | wide | json | yaml | name | jsonpath | custom-columns."""

    kind: str
    spec: str = ""


def parse_output(output: str | None) -> OutputFormat:
    """kubectl's `-o` values that make sense for runs; CtlError(USAGE) for anything else."""
    from coda_ctl.errors import CtlError, Exit

    if output is None:
        return OutputFormat("table")
    if output in ("wide", "json", "yaml", "name"):
        return OutputFormat(output)
    for kind in ("jsonpath", "custom-columns"):
        if output.startswith(kind + "="):
            spec = output[len(kind) + 1 :]
            if not spec:
                break
            if kind == "custom-columns":
                custom_column_spec(spec)  # validate now: a usage error, not a later crash
            else:
                jsonpath_template(spec)
            return OutputFormat(kind, spec)
    raise CtlError(
        f"unknown output format {output!r}: use wide, json, yaml, name, jsonpath=TEMPLATE or "
        "custom-columns=HEADER:.path,...",
        Exit.USAGE,
    )


def _path_tokens(path: str) -> list[str | int | None]:
    """`.status.stages[0].name` → ["status", "stages", 0, "name"]; `[*]` → None (every item).
    Keys with dots are written kubectl's way: `.metadata.labels.coda\\.dev/run`."""
    from coda_ctl.errors import CtlError, Exit

    path = path.strip()
    if path in ("", "."):
        return []
    if not path.startswith((".", "[")):
        raise CtlError(f"bad field path {path!r}: it starts with '.'", Exit.USAGE)
    tokens: list[str | int | None] = []
    i, key = 0, ""
    while i < len(path):
        c = path[i]
        if c == "\\" and i + 1 < len(path):
            key += path[i + 1]
            i += 2
            continue
        if c in ".[":
            if key:
                tokens.append(key)
                key = ""
            if c == "[":
                end = path.find("]", i)
                if end < 0:
                    raise CtlError(f"bad field path {path!r}: unclosed [", Exit.USAGE)
                inner = path[i + 1 : end].strip()
                if inner == "*":
                    tokens.append(None)
                elif inner.lstrip("-").isdigit():
                    tokens.append(int(inner))
                else:
                    raise CtlError(f"bad field path {path!r}: [{inner}]", Exit.USAGE)
                i = end + 1
                continue
        else:
            key += c
        i += 1
    if key:
        tokens.append(key)
    return tokens


def field_values(obj: Any, path: str) -> list[Any]:
    """Every value `path` selects in `obj` (several through `[*]`), missing ones left out."""
    nodes = [obj]
    for token in _path_tokens(path):
        out: list[Any] = []
        for node in nodes:
            if token is None:
                out.extend(
                    node
                    if isinstance(node, list)
                    else (node.values() if isinstance(node, dict) else [])
                )
            elif isinstance(token, int):
                if isinstance(node, list) and -len(node) <= token < len(node):
                    out.append(node[token])
            elif isinstance(node, dict) and token in node:
                out.append(node[token])
        nodes = out
    return nodes


def _scalar(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def jsonpath_template(template: str) -> list[tuple[str, str]]:
    """kubectl's JSONPath template as parts: ("text", s), ("path", p), ("range", p), ("end", "").
    Supported: `{.a.b[0]}`, `{.items[*].x}`, `{range .items[*]}…{end}`, `\\n`/`\\t` in text."""
    from coda_ctl.errors import CtlError, Exit

    parts: list[tuple[str, str]] = []
    i, depth = 0, 0
    while i < len(template):
        if template[i] == "{":
            end = template.find("}", i)
            if end < 0:
                raise CtlError(f"bad jsonpath template {template!r}: unclosed {{", Exit.USAGE)
            expr = template[i + 1 : end].strip()
            if expr.startswith("range "):
                parts.append(("range", expr[6:].strip()))
                _path_tokens(expr[6:])
                depth += 1
            elif expr == "end":
                parts.append(("end", ""))
                depth -= 1
            else:
                _path_tokens(expr)
                parts.append(("path", expr))
            i = end + 1
        else:
            end = template.find("{", i)
            end = len(template) if end < 0 else end
            text = template[i:end].replace("\\n", "\n").replace("\\t", "\t")
            parts.append(("text", text))
            i = end
    if depth != 0:
        raise CtlError(f"bad jsonpath template {template!r}: range without end", Exit.USAGE)
    return parts


def render_jsonpath(template: str, obj: Any) -> str:
    parts = jsonpath_template(template)

    def run(parts: list[tuple[str, str]], node: Any) -> str:
        out, i = [], 0
        while i < len(parts):
            kind, arg = parts[i]
            if kind == "text":
                out.append(arg)
            elif kind == "path":
                out.append(" ".join(_scalar(v) for v in field_values(node, arg)))
            elif kind == "range":
                depth, j = 1, i + 1
                while depth:
                    depth += {"range": 1, "end": -1}.get(parts[j][0], 0)
                    j += 1
                body = parts[i + 1 : j - 1]
                out.extend(run(body, item) for item in field_values(node, arg))
                i = j - 1
            i += 1
        return "".join(out)

    return run(parts, obj)


def custom_column_spec(spec: str) -> list[tuple[str, str]]:
    from coda_ctl.errors import CtlError, Exit

    columns = []
    for col in spec.split(","):
        header, sep, path = col.partition(":")
        if not sep or not header or not path:
            raise CtlError(
                f"bad custom-columns {spec!r}: each column is HEADER:.field.path", Exit.USAGE
            )
        _path_tokens(path)
        columns.append((header, path))
    return columns


def custom_columns(spec: str, runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """kubectl's custom columns: one value per cell (several joined by ','), `<none>` if absent."""
    columns = custom_column_spec(spec)
    rows = []
    for run in runs:
        row = []
        for _, path in columns:
            values = field_values(run, path)
            row.append(",".join(_scalar(v) for v in values) if values else "<none>")
        rows.append(row)
    return [h for h, _ in columns], rows


def render_output(fmt: OutputFormat, runs: Sequence[dict[str, Any]], *, single: bool) -> str:
    """-o name and -o jsonpath; jsonpath sees one object for one named run, else a List."""
    if fmt.kind == "name":
        return "\n".join(f"codatrainingrun.coda.dev/{r['metadata']['name']}" for r in runs)
    return render_jsonpath(fmt.spec, runs[0] if single else as_list(runs))


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (ConfigMap job.yaml, messages) as readable `|` blocks; a dict that
    appears twice (one probe for liveness and readiness) is written out twice, not as an
    `&id001` anchor and `*id001` alias that readers of a manifest do not expect."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = (
        "|" if "\n" in value and not value.endswith((" ", "\t")) and " \n" not in value else None
    )
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(obj: Any) -> str:
    return yaml.dump(
        obj, Dumper=_BlockDumper, sort_keys=False, width=100, allow_unicode=True
    ).rstrip("\n")


def dump(obj: Any, output: str) -> str:
    if output == "json":
        return json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False)
    return to_yaml(obj)


def as_list(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": list(items)}


# ---------------------------------------------------------------------------------------- logs


def leader_labels(jobset: str) -> dict[str, str]:
    """Labels selecting the leader pod of a stage: job 0, completion index 0 of its JobSet."""
    from coda_ctl.kube import COMPLETION_INDEX_LABEL, JOB_INDEX_LABEL, JOBSET_NAME_LABEL

    return {JOBSET_NAME_LABEL: jobset, JOB_INDEX_LABEL: "0", COMPLETION_INDEX_LABEL: "0"}


def stage_jobset(run: dict[str, Any], stage: str | None) -> tuple[str, str]:
    """(stage, jobset name) for `logs`: the named stage, else the current one, else the last started.

    The JobSet name comes from status (it carries the operator's `-r<N>` retry suffix); before the
    operator has written it, the deterministic `<run>-<stage>` is used.
    """
    from coda_ctl.runstatus import status_of

    name = run["metadata"]["name"]
    spec_stages = [s.get("name") for s in (run.get("spec") or {}).get("stages", [])]
    status = status_of(run)
    jobsets = {s.name: s.job_set for s in status.stages if s.job_set}
    if stage is None:
        stage = status.stage
        if stage is None:
            started = [s for s in spec_stages if s in jobsets]
            stage = started[-1] if started else (spec_stages[0] if spec_stages else None)
    if stage is None or stage not in spec_stages:
        from coda_ctl.errors import CtlError, Exit

        known = ", ".join(spec_stages) or "none"
        raise CtlError(f'run "{name}" has no stage {stage!r} (stages: {known})', Exit.NOT_FOUND)
    return stage, jobsets.get(stage) or f"{name}-{stage}"


# ---------------------------------------------------------------------------------------- watch


def stage_progress(run: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """Per stage: (name, completed steps, total steps, phase) from the run's spec and status."""
    from coda_ctl.runstatus import current_progress, status_of

    status = status_of(run)
    phases = {s.name: s.phase for s in status.stages}
    progress = current_progress(status)
    out = []
    for s in (run.get("spec") or {}).get("stages", []):
        name, total = s.get("name", "?"), int(s.get("steps", 0) or 0)
        phase = phases.get(name, "Pending")
        if phase == "Succeeded":
            done = total
        elif name == status.stage:
            done = progress.step or 0
            total = progress.total_steps or total
        else:
            done = 0
        out.append((name, done, total, phase))
    return out


def evaluation_progress(run: dict[str, Any]) -> str | None:
    """`watch`'s evaluation line: per evaluated stage its phase and pass@1 per benchmark, then the
    gate's verdict (QualityGate condition); None for a run without spec.evaluation."""
    from coda_ctl.runstatus import status_of

    spec = (run.get("spec") or {}).get("evaluation")
    status = status_of(run)
    evaluations = status.evaluation or {}
    if not spec and not evaluations:
        return None
    parts = []
    for stage, ev in evaluations.items():
        part = f"{stage} {ev.phase}"
        if ev.results:
            part += " " + ", ".join(f"{b} {100 * r.pass_at1:.1f}%" for b, r in ev.results.items())
        parts.append(part)
    line = "eval: " + ("; ".join(parts) or "pending")
    gate = status.condition("QualityGate")
    if gate is not None:
        line += "  gate: " + ("passed" if gate.status == "True" else f"FAILED ({gate.message})")
    elif (spec or {}).get("minPassAt1"):
        line += "  gate: pending"
    return line
