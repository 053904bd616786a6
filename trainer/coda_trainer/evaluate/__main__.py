"""`python -m coda_trainer.evaluate`: score a checkpoint or an OpenAI-compatible endpoint.

    python -m coda_trainer.evaluate --benchmark humaneval --checkpoint runs/sft/final \\
        --max-new-tokens 768 --steps 768 --temperature 0.1 --top-p 0.9 --alg entropy
    python -m coda_trainer.evaluate --benchmark mbpp --url http://127.0.0.1:8000 --api completions
    python -m coda_trainer.evaluate --benchmark humaneval --reference          # harness self-check

Writes a JSON report (`--out`) and prints a table. A sample that cannot be generated (the server's
4xx/5xx message, a prompt too long for the model) is recorded as failed with its reason and the
run goes on. Exit status 0 when the run completed (whatever the score), 1 when not one sample of a
benchmark could be generated (the report is still written; the first reason is printed), 2 for bad
arguments, 128 + the signal number (143 SIGTERM, 130 SIGINT) when stopped.

As a step of a CodaTrainingRun (the operator's evaluation Job): `--report-dir <uri>/<stage>/eval`
writes `<benchmark>.json` there (any fsspec URI, gs:// included) and, when the pod env asks for
status reports (CODA_PROGRESS=status, CODA_RUN_NAME, CODA_STAGE), merge-patches
`status.evaluation.<stage>` with the scores. Exit codes follow the trainer's contract: 78 when
retrying cannot help (no checkpoint, a checkpoint of the wrong shape), 75 when it may (I/O errors,
the scores could not be reported).

Stopping: SIGTERM or SIGINT stops the harness in every state (importing JAX and loading a
checkpoint, generating, waiting on a server, executing candidates) within about a second. The work
runs on a worker thread that is abandoned (an XLA compile or an HTTP request cannot be cut short);
candidate programs, which run in sessions of their own that no signal to the harness reaches, are
killed first, so none outlives it. No report is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from coda_trainer import storage
from coda_trainer.config import (
    SamplerSettings,
    add_sampler_flags,
    resolve_sampler_settings,
    sampler_settings_from_args,
)
from coda_trainer.contract import ENV_API_KEY, EXIT_PERMANENT, EXIT_RETRYABLE, PermanentError
from coda_trainer.evaluate import sandbox
from coda_trainer.evaluate.datasets import BENCHMARKS
from coda_trainer.evaluate.runner import (
    DEFAULT_LIMITS,
    InProcessSource,
    OpenAISource,
    ReferenceSource,
    SharedGenerations,
    format_table,
    run_eval,
)
from coda_trainer.evaluate.sandbox import SandboxLimits
from coda_trainer.k8s_progress import ProgressReporter
from coda_trainer.serve.__main__ import resolve_tokenizer_path
from coda_trainer.stopping import Stopped, StopRequest, call_until_stopped, exit_now
from coda_trainer.tokenizer import load_tokenizer

# The harness's own defaults under the flags (the built-in values under those).
HARNESS_DEFAULTS = SamplerSettings(max_new_tokens=512)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m coda_trainer.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--benchmark", action="append", choices=BENCHMARKS, required=True, help="repeatable"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF folder to load in-process")
    src.add_argument("--url", help="OpenAI-compatible base URL (…/v1 optional)")
    src.add_argument("--reference", choices=["canonical", "wrong"], nargs="?", const="canonical",
                     help="score the reference (or deliberately wrong) solutions: checks the harness")  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None, help="in-process: tokenizer folder (default: as the server)"
    )
    p.add_argument("--model", default="coda", help="--url: model name to request")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get(ENV_API_KEY)
    )
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--n-samples", type=int, default=1)
    p.add_argument(
        "--k", type=int, action="append", default=None, help="pass@k to report (repeatable)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxes")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="per-program wall timeout (s); default 10, 120 for humaneval-plus",
    )
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument(
        "--report-dir",
        default=None,
        help="write <dir>/<benchmark>.json (local or fsspec URI) and report scores into the "
        "run's status when the pod env asks for it",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON report path (one file per benchmark: <out>.<bench>.json if several)",
    )
    s = p.add_argument_group(
        "sampling (default: 512 new tokens, one step each, greedy, entropy; the release's eval: "
        "768 tokens, 768 steps, temperature 0.1, top-p 0.9)"
    )
    # One flag per knob of coda_trainer.config.SamplerSettings (--preset, --steps, ..., --cache);
    # unset ones take HARNESS_DEFAULTS, then the built-in values (steps: one per new token).
    add_sampler_flags(s)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _source(args: argparse.Namespace):
    requested = sampler_settings_from_args(args)
    resolved = resolve_sampler_settings(HARNESS_DEFAULTS, requested)
    max_new_tokens = resolved.max_new_tokens
    assert max_new_tokens is not None
    sampling = dict(
        steps=resolved.steps or max_new_tokens, temperature=resolved.temperature,
        top_p=resolved.top_p, top_k=resolved.top_k, alg=resolved.alg, alg_temp=resolved.alg_temp,
        block_length=resolved.block_length, threshold=resolved.threshold, cache=resolved.cache,
    )  # fmt: skip
    if args.reference:
        return ReferenceSource(
            wrong=args.reference == "wrong", name=f"reference-{args.reference}"
        ), {}
    if args.url:
        # The resolved knobs, preset expanded here, so the server's own defaults do not leak in
        # (except where a knob resolves to None, "off": the request then leaves it to the server).
        extra = {
            k: v for k, v in sampling.items() if v is not None and k not in ("temperature", "top_p")
        }
        src = OpenAISource(
            base_url=args.url, model=args.model, api_key=args.api_key, api=args.api,
            max_tokens=max_new_tokens, temperature=resolved.temperature or 0.0,
            top_p=resolved.top_p or 1.0, extra_body=extra, concurrency=args.concurrency,
            name=f"{args.url} ({args.api})",
        )  # fmt: skip
        return src, {"max_tokens": max_new_tokens, **sampling}
    # lazy: hf, sampling import JAX (+9-11 s measured); --help, argparse errors, --url stay ~1 s
    from coda_trainer import hf
    from coda_trainer.sampling import SamplingConfig

    print(f"loading {args.checkpoint}", file=sys.stderr, flush=True)
    model_config, model = hf.load_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(resolve_tokenizer_path(args.checkpoint, args.tokenizer))
    tokenizer.check_model(model_config)
    config = SamplingConfig(
        max_new_tokens=max_new_tokens, stop_at_eos=True,
        **{k: v for k, v in sampling.items() if v is not None},
    )  # fmt: skip
    src = InProcessSource(
        model, tokenizer, config, batch_size=args.batch_size, seed=args.seed, name=args.checkpoint
    )
    return src, config.model_dump()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ks = sorted(set(args.k or [1]))
    if max(ks) > args.n_samples:
        print(f"error: pass@{max(ks)} needs --n-samples >= {max(ks)}", file=sys.stderr)
        return 2
    source, settings = _source(args)
    # HumanEval and HumanEval+ share their prompts: with both asked for, generate once, score both.
    # Not for --reference: its "responses" are each benchmark's own reference solution (EvalPlus
    # rewrote HumanEval's canonical solutions), not a model's answer to the prompt.
    if not args.reference:
        source = SharedGenerations(source)

    reports = []
    failed = 0
    for bench in args.benchmark:
        out = args.out
        if out and len(args.benchmark) > 1:
            out = f"{out.removesuffix('.json')}.{bench}.json"
        base = DEFAULT_LIMITS.get(bench, SandboxLimits())
        timeout = args.timeout or base.timeout_s
        cpu = max(1, int(args.timeout)) if args.timeout else base.cpu_s
        limits = SandboxLimits(timeout_s=timeout, cpu_s=cpu, memory_mb=args.memory_mb)
        report = run_eval(
            bench, source, n_samples=args.n_samples, ks=ks, limit=args.limit, limits=limits,
            workers=args.workers, out=out, settings=settings,
        )  # fmt: skip
        reports.append(report)
        if out:
            print(f"wrote {out}", file=sys.stderr)
        generation = [s for p in report.problems for s in p.samples]
        if all(s.status == "generation_error" for s in generation):
            failed += 1
            print(
                f"error: {bench}: no sample could be generated; first reason: "
                f"{generation[0].reason}",
                file=sys.stderr,
            )
    print(format_table(reports))
    if args.report_dir:
        code = publish(reports, args.report_dir, settings)
        if code:
            return code
    return 1 if failed else 0


def stage_scores(reports: list, report_dir: str, settings: dict) -> dict:
    """`status.evaluation.<stage>` as the evaluation Job reports it (the operator's
    `EvaluationStatus` fields that the Job owns: report, settings, results)."""
    results = {}
    for r in reports:
        samples = [s for p in r.problems for s in p.samples]
        results[r.benchmark] = {
            "passAt1": round(r.pass_at_k.get("pass@1", 0.0), 6),
            "problems": r.n_problems,
            "samples": r.n_samples,
            "failures": sum(s.status != "passed" for s in samples),
            "reasons": dict(r.status_counts),
            "durationS": round(r.generation_s + r.execution_s, 3),
        }
    return {"report": report_dir, "settings": settings, "results": results}


def publish(reports: list, report_dir: str, settings: dict) -> int:
    """Write each report to `<report_dir>/<benchmark>.json` and the scores into the run's status
    (in a pod whose env asks for it). Returns an exit code: 0, or 75 when either failed."""
    try:
        for r in reports:
            storage.write_text(
                storage.join(report_dir, f"{r.benchmark}.json"), r.model_dump_json(indent=2)
            )
    except OSError as e:
        print(f"error: could not write the reports to {report_dir}: {e}", file=sys.stderr)
        return EXIT_RETRYABLE
    print(f"wrote {len(reports)} report(s) to {report_dir}", file=sys.stderr)
    reporter = ProgressReporter.from_env()
    if reporter is None:
        return 0
    scores = stage_scores(reports, report_dir, settings)
    if not reporter.patch_status({"evaluation": {reporter.stage: scores}}):
        print(f"error: could not report the scores to {reporter.url}", file=sys.stderr)
        return EXIT_RETRYABLE
    print(f"reported scores into status.evaluation.{reporter.stage}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`main` as a process: stops promptly on SIGTERM/SIGINT (see the module docstring). Embedding
    callers (`coda-ctl eval`) call `main` and handle their own signals."""
    stop = StopRequest().install()
    try:
        return call_until_stopped(lambda: main(argv), stop, name="coda-eval")
    except (PermanentError, FileNotFoundError) as e:
        # No checkpoint, one of the wrong shape, bad data: another attempt fails the same way.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    except OSError as e:  # storage or network trouble: may work on the next attempt
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RETRYABLE
    except Stopped:
        killed = sandbox.abort_all()
        print(
            f"stopped by {stop.name}: killed {killed} running candidate program(s); "
            "no report written",
            file=sys.stderr,
        )
        assert stop.signum is not None
        exit_now(128 + stop.signum)


if __name__ == "__main__":
    sys.exit(cli())
