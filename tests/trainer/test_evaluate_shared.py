"""HumanEval+ scored from HumanEval's generations: the same scores as generating for it separately,
with only the prompts HE+ changed (HumanEval/115) generated again."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from coda_trainer.evaluate.__main__ import main as eval_main
from coda_trainer.evaluate.datasets import Problem, load_benchmark
from coda_trainer.evaluate.runner import SharedGenerations, model_input_key, run_eval
from coda_trainer.evaluate.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=60, cpu_s=30)
# Cheap HE+ problems, HumanEval/115 (whose HE+ docstring differs from HE's) among them.
TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/7", "HumanEval/115"]


class PromptModel:
    """A stand-in model whose answer depends only on what it is shown (as a real one's does):
    HE's canonical body for some prompts, a wrong one for others, and a non-answer for prompts it
    has never seen. Records every prompt it was asked."""

    name = "prompt-model"
    prefixed = True

    def __init__(self) -> None:
        he = {p.task_id: p for p in load_benchmark("humaneval")}
        self.answers: dict[str, str] = {}
        for k, task in enumerate(TASKS):
            p = he[task]
            body = p.reference if k % 2 == 0 else "    return None\n"
            self.answers[model_input_key(p)] = f"{body}\n```\n"
        self.asked: list[str] = []

    def complete(self, problems: Sequence[Problem], n: int) -> list[list[str]]:
        self.asked += [p.task_id for p in problems]
        return [[self.answers.get(model_input_key(p), "    pass\n```\n")] * n for p in problems]


def _passed(report) -> dict[str, int]:
    return {p.task_id: p.passed for p in report.problems}


def test_plus_scored_from_humaneval_generations_equals_scoring_it_separately() -> None:
    separate_model = PromptModel()
    separate = run_eval("humaneval-plus", separate_model, task_ids=TASKS, limits=LIMITS)
    assert sorted(separate_model.asked) == sorted(TASKS)

    model = PromptModel()
    shared = SharedGenerations(model)
    he = run_eval("humaneval", shared, task_ids=TASKS, limits=LIMITS)
    plus = run_eval("humaneval-plus", shared, task_ids=TASKS, limits=LIMITS)

    assert _passed(plus) == _passed(separate) and plus.pass_at_k == separate.pass_at_k
    assert [p.samples[0].response for p in plus.problems] == [
        p.samples[0].response for p in separate.problems
    ]
    # HE asked every prompt once; HE+ asked only the one prompt it changed.
    assert model.asked == [*TASKS, "HumanEval/115"]
    assert he.reused_generations == 0 and plus.reused_generations == len(TASKS) - 1
    # The stand-in answers HE's 115 right but has never seen HE+'s 115 docstring.
    assert _passed(he)["HumanEval/115"] == 1 and _passed(plus)["HumanEval/115"] == 0
    assert _passed(plus)["HumanEval/0"] == 1 and _passed(plus)["HumanEval/2"] == 0


def test_a_failed_generation_is_not_remembered() -> None:
    from coda_trainer.evaluate.runner import GenerationFailure

    calls: list[int] = []

    class Flaky:
        name, prefixed = "flaky", True

        def complete(self, problems, n):
            calls.append(len(problems))
            if len(calls) == 1:
                return [[GenerationFailure("HTTP 503: busy")] * n for _ in problems]
            return [["    pass\n```\n"] * n for _ in problems]

    shared = SharedGenerations(Flaky())
    problems = load_benchmark("humaneval", limit=2)
    assert all(isinstance(r[0], GenerationFailure) for r in shared.complete(problems, 1))
    assert shared.complete(problems, 1) == [["    pass\n```\n"]] * 2
    assert shared.complete(problems, 1) == [["    pass\n```\n"]] * 2 and shared.reused == 2
    assert calls == [2, 2]


def test_eval_job_generates_once_for_humaneval_and_plus(tmp_path: Path, monkeypatch) -> None:
    """The harness's CLI (the evaluation Job's command) shares the generations: HE+'s report says
    how many problems it took from HE's."""
    import coda_trainer.evaluate.__main__ as cli

    model = PromptModel()
    monkeypatch.setattr(cli, "_source", lambda args: (model, {"max_new_tokens": 8}))
    out = tmp_path / "r.json"
    argv = ["--url", "http://unused", "--benchmark", "humaneval", "--benchmark", "humaneval-plus",
            "--limit", "3", "--out", str(out)]  # fmt: skip
    assert eval_main(argv) == 0
    plus = json.loads((tmp_path / "r.humaneval-plus.json").read_text())
    assert plus["reused_generations"] == 3
    assert model.asked == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
