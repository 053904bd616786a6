"""`coda-ctl local run` with spec.evaluation: the evaluation Job's command with local paths, run
as a real subprocess, its table beside the paper's numbers, and the minPassAt1 gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from coda_ctl import localplan, localrun
from coda_ctl.localplan import LocalPlan

REPO = Path(__file__).resolve().parents[2]


def test_the_plan_carries_the_operators_eval_command_with_local_paths(tmp_path: Path) -> None:
    run = localplan.default_run()
    run["spec"]["evaluation"] = {
        "benchmarks": ["humaneval", "mbpp"], "limit": 3, "after": ["pretrain", "sft"],
        "sampler": {"maxNewTokens": 32}, "minPassAt1": {"mbpp": 0.1},
    }  # fmt: skip
    plan = localplan.plan_local_run(run, tmp_path)
    assert [s for s, _ in plan.evaluations] == ["pretrain", "sft"]
    _, command = plan.evaluations[1]
    root = tmp_path.resolve() / run["metadata"]["name"]
    assert command[:5] == ("python", "-m", "coda_trainer.evaluate", "--checkpoint",
                           str(root / "sft" / "final"))  # fmt: skip
    assert command[-2:] == ("--report-dir", str(root / "sft" / "eval"))
    assert "--max-new-tokens" in command and plan.min_pass_at1 == (("mbpp", 0.1),)
    default = localplan.plan_local_run(localplan.default_run(), tmp_path)
    assert [s for s, _ in default.evaluations] == ["sft"] and default.min_pass_at1 == ()


def _plan(tmp_path: Path, reference: str, gate: float) -> LocalPlan:
    report_dir = tmp_path / "run" / "sft" / "eval"
    command = ("python", "-m", "coda_trainer.evaluate", "--reference", reference,
               "--benchmark", "humaneval", "--benchmark", "mbpp", "--limit", "2",
               "--report-dir", str(report_dir))  # fmt: skip
    (tmp_path / "run" / localplan.META_DIR).mkdir(parents=True)
    return LocalPlan(
        run="run", root=tmp_path / "run", stages=(), evaluations=(("sft", command),),
        min_pass_at1=(("humaneval", gate),),
    )  # fmt: skip


@pytest.mark.parametrize(("reference", "gate", "missed"), [("canonical", 1.0, False),
                                                           ("wrong", 0.25, True)])  # fmt: skip
def test_evaluate_all_prints_the_table_beside_the_paper_and_applies_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch, reference: str, gate: float,
    missed: bool,
) -> None:  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(REPO / "trainer"))
    misses = localrun.evaluate_all(_plan(tmp_path, reference, gate))
    out = capsys.readouterr().out
    score = "100.0" if reference == "canonical" else "0.0"
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("humaneval ", "mbpp "))] == [
        ["humaneval", score], ["mbpp", score]
    ]  # fmt: skip
    assert "54.3" in out and "47.2" in out and "63.2" in out  # the paper's column, MBPP+ included
    assert "CoDA-1.7B-Instruct" in out and "~200B tokens" in out
    if missed:
        assert misses == ["humaneval pass@1 0.0% < minPassAt1 25.0% (missed by 25.0 points)"]
    else:
        assert misses == []


def test_describe_and_get_wide_show_the_evaluation() -> None:
    import datetime as dt

    from coda_ctl import describe, views
    from coda_operator.api import CodaTrainingRunStatus

    spec = {"benchmarks": ["humaneval", "mbpp"], "minPassAt1": {"humaneval": 0.3}}
    status = {
        "sft": {"phase": "Succeeded", "job": "demo-sft-eval", "report": "gs://b/demo/sft/eval",
                "results": {"humaneval": {"passAt1": 0.25, "problems": 164, "failures": 123},
                            "mbpp": {"passAt1": 0.5, "problems": 500, "failures": 250}}},
    }  # fmt: skip
    evaluations = CodaTrainingRunStatus.model_validate({"evaluation": status}).evaluation
    text = "\n".join(describe.evaluation_lines(spec, evaluations))
    assert "Gate:        humaneval >= 30.0%" in text
    assert "sft: Succeeded (Job demo-sft-eval)  report: gs://b/demo/sft/eval" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[4:]}
    assert rows["humaneval"] == ["25.0", "164", "123", "30.0"] and rows["mbpp"][-1] == "-"
    assert describe.evaluation_lines(None, None) == []  # a run without evaluation: no section
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    run = {"metadata": {"name": "demo"}, "status": {"score": "sft: humaneval 25.0, mbpp 50.0"}}
    assert views.run_row(run, now, wide=True)[-1] == "sft: humaneval 25.0, mbpp 50.0"
    headers, _ = views.get_table([run], now, wide=True)
    assert headers[-1] == "PASS@1"


def test_a_rerun_reads_back_the_reports_of_the_same_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """`local run` again (nothing left to train) does not evaluate again; another command does."""
    monkeypatch.setenv("PYTHONPATH", str(REPO / "trainer"))
    plan = _plan(tmp_path, "canonical", 1.0)
    assert localrun.evaluate_all(plan) == []
    first = capsys.readouterr().out
    assert "evaluating sft" in first and "up to date" not in first
    assert localrun.evaluate_all(plan) == []
    second = capsys.readouterr().out
    assert "evaluation of sft is up to date" in second and "evaluating sft" not in second
    assert [line.split()[:2] for line in second.splitlines() if line.startswith("humaneval ")] == [
        ["humaneval", "100.0"]
    ]
    stage, command = plan.evaluations[0]
    other = LocalPlan(
        run=plan.run, root=plan.root, stages=(), min_pass_at1=plan.min_pass_at1,
        evaluations=((stage, tuple(c if c != "2" else "1" for c in command)),),
    )  # fmt: skip
    localrun.evaluate_all(other)
    assert "evaluating sft" in capsys.readouterr().out
