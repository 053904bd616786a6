"""Score a model on HumanEval/MBPP: generate, extract, execute in the sandbox, aggregate pass@k.

A `CompletionSource` produces the responses; there are three:
- `InProcessSource`: a JAX model + tokenizer + `coda_trainer.sampling` in this process;
- `OpenAISource`: any OpenAI-compatible endpoint (our server or another model's), via
  /v1/completions (rendered chat template + generation prefix, stop at "```") or /v1/chat/completions;
- `ReferenceSource`: the benchmark's reference solutions (or deliberately broken ones) shaped like
  model responses, to check the harness itself end to end.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from coda_trainer.evaluate import prompts
from coda_trainer.evaluate.datasets import Problem, load_benchmark
from coda_trainer.evaluate.extract import extract_code
from coda_trainer.evaluate.passk import mean_pass_at_k
from coda_trainer.evaluate.sandbox import ExecResult, SandboxLimits, isolation_info, run_many

__all__ = [
    "CompletionSource",
    "EvalReport",
    "InProcessSource",
    "OpenAISource",
    "ReferenceSource",
    "format_table",
    "run_eval",
]


class CompletionSource(Protocol):
    """Produces `n` responses per problem. `prefixed`: responses continue the generation prefix."""

    name: str
    prefixed: bool

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[str]]: ...


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------

_WRONG_SUFFIX = """
_reference_{name} = {name}


def {name}(*args, **kwargs):
    # Deliberately wrong: the reference answer, perturbed.
    r = _reference_{name}(*args, **kwargs)
    if isinstance(r, bool):
        return not r
    if isinstance(r, int):
        return r + 1
    if isinstance(r, float):
        return r * 1.5 + 1
    if isinstance(r, str):
        return r + "?"
    if isinstance(r, list | tuple):
        return type(r)([*r, None])
    if r is None:
        return 0
    return None
"""


@dataclasses.dataclass
class ReferenceSource:
    """Reference solutions as model responses; `wrong=True` perturbs every return value."""

    wrong: bool = False
    name: str = "reference"
    prefixed: bool = True

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[str]]:
        out = []
        for p in problems:
            body = p.reference
            if self.wrong:
                body = body.rstrip() + "\n" + _WRONG_SUFFIX.format(name=p.entry_point)
            out.append([f"{body}\n```\n"] * n)
        return out


@dataclasses.dataclass
class InProcessSource:
    """Generate with `coda_trainer.sampling.generate` on a model held in this process."""

    model: Any
    tokenizer: Any
    config: Any  # coda_trainer.sampling.SamplingConfig
    batch_size: int = 8
    seed: int = 0
    name: str = "in-process"
    prefixed: bool = True

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[str]]:
        import jax

        from coda_trainer import sampling

        rows = [
            (i, prompts.prompt_ids(p, self.tokenizer))
            for i, p in enumerate(problems)
            for _ in range(n)
        ]
        texts: list[list[str]] = [[] for _ in problems]
        rng = jax.random.key(self.seed)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            rng, key = jax.random.split(rng)
            out = sampling.generate(self.model, [ids for _, ids in chunk], self.config, key)
            for (i, _), ids in zip(chunk, generated_rows(out), strict=True):
                texts[i].append(decode_until_eos(self.tokenizer, ids))
        return texts


def generated_rows(out: Any) -> list[list[int]]:
    """The generated ids per row from a sampler output (GenerateOutput or an array)."""
    for attr in ("generated_BxN", "generated"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    return [[int(t) for t in row] for row in out]


def decode_until_eos(tokenizer: Any, ids: Sequence[int]) -> str:
    stop = {tokenizer.eos_id, tokenizer.pad_id, getattr(tokenizer, "mask_id", -1)}
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


@dataclasses.dataclass
class OpenAISource:
    """Query an OpenAI-compatible server; `api="completions"` sends the CoDA instruct prompt text
    (chat template + generation prefix) and stops at the closing fence; `api="chat"` sends the
    user message only and extracts code from the free-form answer."""

    base_url: str
    model: str = "coda"
    api_key: str | None = None
    api: Literal["completions", "chat"] = "completions"
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)
    concurrency: int = 8
    timeout_s: float = 600.0
    render: Callable[[Problem], str] | None = None  # prompt text for api="completions"
    name: str = "openai"

    @property
    def prefixed(self) -> bool:  # type: ignore[override]
        return self.api == "completions"

    def _render(self, problem: Problem) -> str:
        if self.render is not None:
            return self.render(problem)
        from coda_trainer.tokenizer import load_tokenizer

        return prompts.render_prompt_text(problem, load_tokenizer("project"))

    def _one(self, client: Any, problem: Problem) -> str:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, **self.extra_body,
        }  # fmt: skip
        if self.api == "completions":
            body.update(prompt=self._render(problem), stop=["```"])
            path = "/completions"
        else:
            body.update(messages=prompts.chat_messages(problem))
            path = "/chat/completions"
        r = client.post(path, json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["text"] if self.api == "completions" else choice["message"]["content"]

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[str]]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        base = self.base_url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        with httpx.Client(base_url=base, headers=headers, timeout=self.timeout_s) as client:
            pool = ThreadPoolExecutor(self.concurrency)
            jobs = [pool.submit(self._one, client, p) for p in problems for _ in range(n)]
            try:
                flat = [j.result() for j in jobs]
            finally:
                # On an error or Ctrl-C the requests not yet sent are dropped, not sent one by one
                # while the executor waits for them; those in flight end with their responses.
                pool.shutdown(wait=True, cancel_futures=True)
        return [flat[i * n : (i + 1) * n] for i in range(len(problems))]


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


class SampleResult(BaseModel):
    status: str
    reason: str
    duration_s: float
    response: str | None = None
    code: str | None = None


class ProblemResult(BaseModel):
    task_id: str
    n: int
    passed: int
    samples: list[SampleResult]


class EvalReport(BaseModel):
    benchmark: str
    source: str
    n_problems: int
    n_samples: int
    pass_at_k: dict[str, float]
    status_counts: dict[str, int]
    generation_s: float
    execution_s: float
    sandbox: dict[str, Any]
    settings: dict[str, Any] = Field(default_factory=dict)
    problems: list[ProblemResult]

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.model_dump_json(indent=2))


def format_table(reports: Sequence[EvalReport]) -> str:
    """A plain-text table (one row per report)."""
    ks = sorted({k for r in reports for k in r.pass_at_k}, key=lambda s: int(s.split("@")[1]))
    header = ["benchmark", "source", "problems", "samples", *ks, "gen s", "exec s"]
    rows = [
        [r.benchmark, r.source, str(r.n_problems), str(r.n_samples),
         *(f"{100 * r.pass_at_k[k]:.1f}" if k in r.pass_at_k else "-" for k in ks),
         f"{r.generation_s:.1f}", f"{r.execution_s:.1f}"]
        for r in reports
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "  ".join(
            c.rjust(w) if i >= 2 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------


def run_eval(
    benchmark: str | Sequence[Problem],
    source: CompletionSource,
    *,
    n_samples: int = 1,
    ks: Sequence[int] = (1,),
    limit: int | None = None,
    task_ids: list[str] | None = None,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    keep_text: bool = True,
    out: str | Path | None = None,
    settings: dict[str, Any] | None = None,
) -> EvalReport:
    """Generate `n_samples` per problem with `source`, execute each, and report pass@k."""
    if isinstance(benchmark, str):
        problems = load_benchmark(benchmark, limit=limit, task_ids=task_ids)
        name = benchmark
    else:
        problems = list(benchmark)[:limit]
        name = problems[0].benchmark if problems else "empty"
    if not problems:
        raise ValueError("no problems to evaluate")
    if any(k > n_samples for k in ks):
        raise ValueError(f"pass@k needs k <= n_samples; got ks={list(ks)}, n_samples={n_samples}")

    t0 = time.monotonic()
    responses = source.complete(problems, n_samples)
    t1 = time.monotonic()
    codes = [
        [extract_code(p, r, prefixed=source.prefixed) for r in rs]
        for p, rs in zip(problems, responses, strict=True)
    ]
    flat = [p.program(c) for p, cs in zip(problems, codes, strict=True) for c in cs]
    results = run_many(flat, limits, workers=workers)
    t2 = time.monotonic()

    per_problem: list[ProblemResult] = []
    for i, p in enumerate(problems):
        rs: list[ExecResult] = results[i * n_samples : (i + 1) * n_samples]
        samples = [
            SampleResult(
                status=r.status, reason=r.reason, duration_s=round(r.duration_s, 4),
                response=responses[i][j] if keep_text else None, code=codes[i][j] if keep_text else None,
            )
            for j, r in enumerate(rs)
        ]  # fmt: skip
        per_problem.append(
            ProblemResult(
                task_id=p.task_id, n=n_samples, passed=sum(r.passed for r in rs), samples=samples
            )
        )
    counts = [(pr.n, pr.passed) for pr in per_problem]
    info = isolation_info()
    report = EvalReport(
        benchmark=name,
        source=source.name,
        n_problems=len(problems),
        n_samples=n_samples,
        pass_at_k={f"pass@{k}": mean_pass_at_k(counts, k) for k in ks},
        status_counts=dict(Counter(r.status for r in results)),
        generation_s=round(t1 - t0, 3),
        execution_s=round(t2 - t1, 3),
        sandbox={**dataclasses.asdict(limits or SandboxLimits()), **dataclasses.asdict(info)},
        settings=settings or {},
        problems=per_problem,
    )
    if out is not None:
        report.write(out)
    return report


def report_json(report: EvalReport) -> str:
    return json.dumps(report.model_dump(), indent=2)
