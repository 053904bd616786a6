"""Score a model on HumanEval/MBPP: generate, extract, execute in the sandbox, aggregate pass@k.

A `CompletionSource` produces the responses; there are three:
- `InProcessSource`: a JAX model + tokenizer + `coda_trainer.sampling` in this process;
- `OpenAISource`: any OpenAI-compatible endpoint (our server or another model's), via
  /v1/completions (rendered chat template + generation prefix, stop at "```") or /v1/chat/completions;
- `ReferenceSource`: the benchmark's reference solutions (or deliberately broken ones) shaped like
  model responses, to check the harness itself end to end.

A sample that cannot be generated (the server answers 4xx/5xx, the prompt does not fit the model)
is a `GenerationFailure`: it is recorded as a failed sample with the reason (status
`generation_error`) and the evaluation goes on; it never aborts the run.
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
    "DEFAULT_LIMITS",
    "CompletionSource",
    "EvalReport",
    "GenerationFailure",
    "InProcessSource",
    "OpenAISource",
    "ReferenceSource",
    "SharedGenerations",
    "format_table",
    "run_eval",
]


@dataclasses.dataclass(frozen=True)
class GenerationFailure:
    """A sample that could not be generated, and why (the server's own message where there is one)."""

    reason: str


Response = str | GenerationFailure


class CompletionSource(Protocol):
    """Produces `n` responses per problem. `prefixed`: responses continue the generation prefix."""

    name: str
    prefixed: bool

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[Response]]: ...


# Sandbox limits per benchmark when the caller gives none. HumanEval+ runs the canonical solution
# and the candidate on up to ~1,000 inputs per problem: its slowest canonical solutions need
# 10-25 s of CPU for that on a loaded 2-core machine, so 10 s would fail correct answers.
DEFAULT_LIMITS: dict[str, SandboxLimits] = {
    "humaneval-plus": SandboxLimits(timeout_s=120.0, cpu_s=60),
}


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

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[Response]]:
        out: list[list[Response]] = []
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

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[Response]]:
        import jax

        from coda_trainer import sampling

        texts: list[list[Response]] = [[None] * n for _ in problems]  # type: ignore[list-item]
        rows: list[tuple[int, int, list[int]]] = []
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        for i, p in enumerate(problems):
            ids = prompts.prompt_ids(p, self.tokenizer)
            # The sampler pads prompts to a multiple of 16; a prompt that cannot fit with the new
            # tokens is a failed sample with the numbers, not an error that ends the evaluation.
            need = -(-len(ids) // 16) * 16 + self.config.max_new_tokens
            for j in range(n):
                if limit is not None and need > limit:
                    texts[i][j] = GenerationFailure(
                        f"prompt of {len(ids)} tokens + {self.config.max_new_tokens} new tokens "
                        f"does not fit the model's max_position_embeddings ({limit})"
                    )
                else:
                    rows.append((i, j, ids))
        rng = jax.random.key(self.seed)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            rng, key = jax.random.split(rng)
            try:
                out = sampling.generate(self.model, [ids for _, _, ids in chunk], self.config, key)
            except Exception as e:  # one bad batch costs its samples, not the evaluation
                for i, j, _ in chunk:
                    texts[i][j] = GenerationFailure(f"{type(e).__name__}: {e}"[:500])
                continue
            for (i, j, _), ids in zip(chunk, generated_rows(out), strict=True):
                texts[i][j] = decode_until_eos(self.tokenizer, ids)
        return texts


def model_input_key(problem: Problem) -> str:
    """What a model is shown for `problem` (the user turn and the generation prefix): two problems
    with the same key get the same responses from the same model and sampler settings."""
    return json.dumps([prompts.chat_messages(problem), prompts.gen_prefix(problem)])


@dataclasses.dataclass
class SharedGenerations:
    """Wraps a source so a prompt already answered is not generated again: HumanEval+ asks exactly
    HumanEval's questions (163 of 164 prompts are identical; HumanEval/115's docstring differs), so
    when both are evaluated HE+ is scored from HE's responses and only the differing prompts are
    generated. Scores are those of separate runs with a deterministic sampler; with temperature > 0
    both benchmarks then score the same draw of samples, which is what a paired comparison wants.
    `reused` counts the problems of the last `complete` call answered from the cache."""

    inner: CompletionSource
    _cache: dict[tuple[str, int], list[Response]] = dataclasses.field(default_factory=dict)
    reused: int = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def prefixed(self) -> bool:  # type: ignore[override]
        return self.inner.prefixed

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[Response]]:
        keys = [(model_input_key(p), n) for p in problems]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        # Distinct prompts only, once each, in the order first asked.
        todo = list(dict.fromkeys(keys[i] for i in missing))
        first = {k: next(problems[i] for i in missing if keys[i] == k) for k in todo}
        if todo:
            fresh = self.inner.complete([first[k] for k in todo], n)
            # A failed generation (a server that was down) is not remembered: a later ask retries.
            for k, responses in zip(todo, fresh, strict=True):
                self._cache[k] = responses
        self.reused = len(problems) - len(missing)
        out = [list(self._cache[k]) for k in keys]
        for k in todo:
            if any(isinstance(r, GenerationFailure) for r in self._cache[k]):
                del self._cache[k]
        return out


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
    # Attempts per sample for answers that may succeed later (429, 502-504, connection errors).
    attempts: int = 3
    retry_backoff_s: float = 1.0
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
        import httpx

        failure = ""
        for attempt in range(max(1, self.attempts)):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                r = client.post(path, json=body)
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in _RETRY_STATUS:
                failure = server_error_message(r)
                continue
            if r.status_code >= 400:
                return GenerationFailure(server_error_message(r))
            try:
                choice = r.json()["choices"][0]
                return choice["text"] if self.api == "completions" else choice["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return GenerationFailure(f"malformed response ({type(e).__name__}: {e}): "
                                         f"{r.text[:200]}")  # fmt: skip
        return GenerationFailure(f"{failure} (after {self.attempts} attempts)")

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[Response]]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        base = self.base_url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        with httpx.Client(base_url=base, headers=headers, timeout=self.timeout_s) as client:
            pool = ThreadPoolExecutor(self.concurrency)
            jobs = [pool.submit(self._guarded, client, p) for p in problems for _ in range(n)]
            try:
                flat = [j.result() for j in jobs]
            finally:
                # On an error or Ctrl-C the requests not yet sent are dropped, not sent one by one
                # while the executor waits for them; those in flight end with their responses.
                pool.shutdown(wait=True, cancel_futures=True)
        return [flat[i * n : (i + 1) * n] for i in range(len(problems))]

    def _guarded(self, client: Any, problem: Problem) -> Response:
        try:
            return self._one(client, problem)
        except (
            Exception
        ) as e:  # e.g. a prompt the tokenizer rejects: this sample fails, not the run
            return GenerationFailure(f"{type(e).__name__}: {e}"[:500])


_RETRY_STATUS = frozenset({429, 502, 503, 504})


def server_error_message(response: Any) -> str:
    """`HTTP 400: <the server's message>`: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}
    (a string or a list of validation errors), else the start of the body."""
    head = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return f"{head}: {text[:300]}" if text else f"{head} {response.reason_phrase}"
    detail: Any = body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            detail = err["message"]
        elif isinstance(err, str):
            detail = err
        elif "detail" in body:
            detail = body["detail"]
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', d)}" if isinstance(d, dict)
            else str(d)
            for d in detail
        )  # fmt: skip
    elif not isinstance(detail, str):
        detail = json.dumps(detail)
    return f"{head}: {detail[:300]}"


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
    reused_generations: int = Field(
        default=0,
        description="Problems answered with another benchmark's responses to the same prompt "
        "(HumanEval+ after HumanEval); generation_s counts only the rest.",
    )
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


def _problems(
    benchmark: str | Sequence[Problem], limit: int | None, task_ids: list[str] | None
) -> tuple[str, list[Problem]]:
    """The benchmark's name and its problems (a named benchmark is loaded, a list is cut)."""
    if isinstance(benchmark, str):
        problems = load_benchmark(benchmark, limit=limit, task_ids=task_ids)
        name = benchmark
    else:
        problems = list(benchmark)[:limit]
        name = problems[0].benchmark if problems else "empty"
    if not problems:
        raise ValueError("no problems to evaluate")
    return name, problems


def _execute(
    problems: list[Problem],
    responses: list[list[Response]],
    codes: list[list[str]],
    n_samples: int,
    limits: SandboxLimits,
    workers: int | None,
) -> list[ExecResult]:
    """Run every generated sample in the sandbox; flat, problem-major (n_samples per problem)."""
    # Only generated samples run; a failed generation is a failed sample with its reason.
    to_run = [
        (i, j, p.program(c))
        for i, (p, cs) in enumerate(zip(problems, codes, strict=True))
        for j, c in enumerate(cs)
        if not isinstance(responses[i][j], GenerationFailure)
    ]
    executed = run_many([prog for _, _, prog in to_run], limits, workers=workers)
    by_sample = {(i, j): r for (i, j, _), r in zip(to_run, executed, strict=True)}
    return [
        by_sample.get((i, j)) or _generation_failed(responses[i][j])
        for i in range(len(problems))
        for j in range(n_samples)
    ]


def _problem_results(
    problems: list[Problem],
    responses: list[list[Response]],
    codes: list[list[str]],
    results: list[ExecResult],
    n_samples: int,
    keep_text: bool,
) -> list[ProblemResult]:
    per_problem: list[ProblemResult] = []
    for i, p in enumerate(problems):
        rs: list[ExecResult] = results[i * n_samples : (i + 1) * n_samples]
        samples = [
            SampleResult(
                status=r.status, reason=r.reason, duration_s=round(r.duration_s, 4),
                response=_text(responses[i][j]) if keep_text else None,
                code=codes[i][j] if keep_text else None,
            )
            for j, r in enumerate(rs)
        ]  # fmt: skip
        per_problem.append(
            ProblemResult(
                task_id=p.task_id, n=n_samples, passed=sum(r.passed for r in rs), samples=samples
            )
        )
    return per_problem


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
    name, problems = _problems(benchmark, limit, task_ids)
    if any(k > n_samples for k in ks):
        raise ValueError(f"pass@k needs k <= n_samples; got ks={list(ks)}, n_samples={n_samples}")
    limits = limits or DEFAULT_LIMITS.get(name) or SandboxLimits()

    t0 = time.monotonic()
    responses = source.complete(problems, n_samples)
    t1 = time.monotonic()
    codes = [
        ["" if isinstance(r, GenerationFailure) else extract_code(p, r, prefixed=source.prefixed)
         for r in rs]
        for p, rs in zip(problems, responses, strict=True)
    ]  # fmt: skip
    results = _execute(problems, responses, codes, n_samples, limits, workers)
    t2 = time.monotonic()

    per_problem = _problem_results(problems, responses, codes, results, n_samples, keep_text)
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
        sandbox={**dataclasses.asdict(limits), **dataclasses.asdict(info)},
        settings=settings or {},
        reused_generations=getattr(source, "reused", 0),
        problems=per_problem,
    )
    if out is not None:
        report.write(out)
    return report


def _generation_failed(response: Response) -> ExecResult:
    assert isinstance(response, GenerationFailure)
    return ExecResult(
        status="generation_error", reason=response.reason, returncode=None, duration_s=0.0,
        stdout="", stderr="", network_isolated=False, uid_isolated=False,
    )  # fmt: skip


def _text(response: Response) -> str | None:
    return None if isinstance(response, GenerationFailure) else response


def report_json(report: EvalReport) -> str:
    return json.dumps(report.model_dump(), indent=2)
