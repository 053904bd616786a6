"""Code evaluation: HumanEval and MBPP pass@k in a sandbox, for a checkpoint or any OpenAI endpoint.

    from coda_trainer.evaluate import run_eval, OpenAISource
    report = run_eval("humaneval", OpenAISource("http://127.0.0.1:8000"), n_samples=1, ks=[1])

Modules: datasets (problems), prompts (CoDA instruct format), extract (code from responses),
sandbox (isolated execution), passk (unbiased estimator), runner (the pipeline and report).
"""

from coda_trainer.evaluate.datasets import BENCHMARKS, Problem, load_benchmark
from coda_trainer.evaluate.passk import mean_pass_at_k, pass_at_k
from coda_trainer.evaluate.runner import (
    EvalReport,
    InProcessSource,
    OpenAISource,
    ReferenceSource,
    format_table,
    run_eval,
)
from coda_trainer.evaluate.sandbox import ExecResult, SandboxLimits, run_many, run_program

__all__ = [
    "BENCHMARKS",
    "EvalReport",
    "ExecResult",
    "InProcessSource",
    "OpenAISource",
    "Problem",
    "ReferenceSource",
    "SandboxLimits",
    "format_table",
    "load_benchmark",
    "mean_pass_at_k",
    "pass_at_k",
    "run_eval",
    "run_many",
    "run_program",
]
