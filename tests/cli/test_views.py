"""Pure formatting helpers of coda-ctl (the golden files cover whole outputs)."""

from __future__ import annotations

import datetime as dt

import pytest
from coda_ctl import views
from coda_ctl.errors import CtlError

NOW = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (119, "119s"),
        (120, "2m"),
        (3 * 3600 - 1, "179m"),
        (3 * 3600, "3h"),
        (47 * 3600, "47h"),
        (3 * 86400, "3d"),
    ],
)
def test_human_age(seconds: int, text: str) -> None:
    assert views.human_age(NOW - dt.timedelta(seconds=seconds), NOW) == text
    assert views.human_age(None, NOW) == "<unknown>"


def _run(status: dict | None = None) -> dict:
    return {
        "metadata": {"name": "r", "creationTimestamp": "2026-01-02T11:00:00Z"},
        "spec": {"stages": [{"name": "a", "steps": 10}, {"name": "b", "steps": 20}]},
        **({"status": status} if status is not None else {}),
    }


def test_stale_progress_of_an_earlier_stage_is_not_shown() -> None:
    fresh = _run(
        {
            "phase": "Running",
            "stage": "b",
            "progress": {"stage": "b", "step": 5, "totalSteps": 20, "loss": 2.0},
        }
    )
    stale = _run(
        {
            "phase": "Running",
            "stage": "b",
            "progress": {"stage": "a", "step": 10, "totalSteps": 10, "loss": 3.0},
        }
    )
    assert views.run_row(fresh, NOW)[2:5] == ["b", "5/20", "2.0000"]
    assert views.run_row(stale, NOW)[2:5] == ["b", "-", "-"]
    assert views.stage_progress(stale) == [("a", 0, 10, "Pending"), ("b", 0, 20, "Pending")]


def test_stage_jobset_resolution() -> None:
    run = _run(
        {
            "stage": "b",
            "stages": [
                {"name": "a", "phase": "Succeeded", "jobSet": "r-a"},
                {"name": "b", "phase": "Running", "jobSet": "r-b-r2"},
            ],
        }
    )
    assert views.stage_jobset(run, None) == ("b", "r-b-r2")  # current stage, retried JobSet
    assert views.stage_jobset(run, "a") == ("a", "r-a")
    assert views.stage_jobset(_run(), None) == ("a", "r-a")  # nothing started yet: first stage
    with pytest.raises(CtlError):
        views.stage_jobset(run, "zzz")
    assert views.leader_labels("r-b-r2") == {
        "jobset.sigs.k8s.io/jobset-name": "r-b-r2",
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-completion-index": "0",
    }


def test_plain_table_alignment() -> None:
    out = views.plain_table(["A", "BB"], [["xxx", "y"], ["z", ""]])
    assert out.splitlines() == ["A     BB", "xxx   y", "z"]


def test_evaluation_progress() -> None:
    """`watch`'s evaluation line (the plain and terminal output are checked in test_cluster_verbs)."""
    assert views.evaluation_progress({"spec": {}, "status": {}}) is None
    assert views.evaluation_progress({"spec": {"evaluation": {"benchmarks": ["mbpp"]}}}) == (
        "eval: pending"
    )
    # statuses as the CRD admits them (a score needs passAt1 and problems, a condition its
    # reason and lastTransitionTime): the views read them through the typed model
    run = {"status": {"evaluation": {
        "midtrain": {"phase": "Succeeded", "results": {"mbpp": {"passAt1": 0.05, "problems": 500}}},
        "sft": {"phase": "Running"},
    }}}  # fmt: skip
    assert views.evaluation_progress(run) == "eval: midtrain Succeeded mbpp 5.0%; sft Running"
    run["spec"] = {"evaluation": {"benchmarks": ["mbpp"], "minPassAt1": {"mbpp": 0.01}}}
    assert views.evaluation_progress(run).endswith("  gate: pending")
    gate = {"type": "QualityGate", "status": "True", "reason": "Passed", "message": "ok",
            "lastTransitionTime": "2026-01-02T11:00:00Z"}  # fmt: skip
    run["status"]["conditions"] = [gate]
    assert views.evaluation_progress(run).endswith("  gate: passed")


def test_describe_leaves_out_and_names_status_entries_that_do_not_validate() -> None:
    """`describe` reads the status through the operator's typed model; what does not validate (a
    hand-edited status) is left out and named, the rest still shown."""
    from coda_ctl import describe

    ok = {"type": "Running", "status": "True", "reason": "StageRunning", "message": "b runs",
          "lastTransitionTime": "2026-01-02T11:30:00Z"}  # fmt: skip
    run = _run(
        {
            "phase": "Running",
            "stage": "b",
            "progress": {"stage": "b", "step": "five", "totalSteps": 20, "loss": 2.0},
            "conditions": [{"type": "Broken", "status": "Maybe"}, ok],
        }
    )
    status, left_out = describe.read_status(run)
    assert left_out == ["progress.step", "conditions[0]"]
    assert [c.type for c in status.conditions] == ["Running"] and status.progress.loss == 2.0
    text = describe.describe_text(run, [], NOW)
    assert "Progress:    step -/20, loss 2.0000" in text
    assert "Not shown:   status entries that are not valid: progress.step, conditions[0]" in text
    assert "  Running   True     StageRunning   b runs" in text
    assert describe.read_status(_run({"phase": 7, "stages": "x"}))[1] == ["phase", "stages"]
