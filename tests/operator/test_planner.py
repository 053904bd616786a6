"""The stage machine without Kubernetes: every row of the transition table in operator/README.md."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from coda_operator import planner
from coda_operator.planner import (
    Create,
    DeleteChild,
    DeleteRun,
    JobSetObs,
    Observed,
    PatchChild,
    plan,
)
from coda_trainer.contract import RETRY_ANNOTATION
from operator_testkit import run_spec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Sim:
    """A run plus the JobSets the planner created, stepped through time."""

    def __init__(self, spec: dict[str, Any] | None = None, name: str = "demo"):
        self.run: dict[str, Any] = {
            "metadata": {"name": name, "namespace": "ml", "generation": 1},
            "spec": spec or run_spec(),
            "status": {},
        }
        self.jobsets: dict[str, dict[str, Any]] = {}
        self.sampler: planner.DeploymentObs | None = None
        self.now = T0
        self.last: planner.Reconciliation | None = None

    def step(self, dt: float = 1.0) -> planner.Reconciliation:
        self.now += timedelta(seconds=dt)
        obs = Observed({n: JobSetObs.from_body(b) for n, b in self.jobsets.items()}, self.sampler)
        p = plan(copy.deepcopy(self.run), obs, self.now)
        again = plan(copy.deepcopy(self.run), obs, self.now)
        assert (
            again.actions == p.actions and again.status_dict() == p.status_dict()
        )  # pure & deterministic
        for a in p.actions:
            if isinstance(a, Create) and a.obj["kind"] == "JobSet":
                self.jobsets.setdefault(a.obj["metadata"]["name"], copy.deepcopy(a.obj))
            elif isinstance(a, PatchChild):
                self.jobsets[a.name]["spec"].update(a.patch["spec"])
            elif isinstance(a, DeleteChild):
                self.jobsets.pop(a.name)
        self.run["status"] = p.status_dict()
        self.last = p
        return p

    def finish(
        self, name: str, state: str = "Completed", message: str = "", reason: str = ""
    ) -> None:
        cond = {"type": state, "status": "True", "message": message or state}
        if reason:
            cond["reason"] = reason
        self.jobsets[name]["status"] = {"terminalState": state, "conditions": [cond]}

    @property
    def status(self) -> dict[str, Any]:
        return self.run["status"]

    def cond(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == type_), None)

    def reasons(self) -> list[str]:
        assert self.last is not None
        return [e.reason for e in self.last.events]


def kinds(p: planner.Reconciliation) -> list[str]:
    return [
        type(a).__name__ + (":" + a.obj["kind"] if isinstance(a, Create) else "") for a in p.actions
    ]


def test_happy_path_rows_2_4_10_11_12() -> None:
    sim = Sim()
    p = sim.step()
    assert kinds(p) == ["Create:ConfigMap", "Create:JobSet"] and sim.status["phase"] == "Pending"
    assert sim.cond("Created")["status"] == "False"
    for i, stage in enumerate(["pretrain", "midtrain", "sft"]):
        p = sim.step()
        assert kinds(p) == [] and sim.status["phase"] == "Running" and sim.status["stage"] == stage
        assert sim.cond("Created")["status"] == "True"
        sim.finish(sim.status["stages"][i]["jobSet"])
        p = sim.step()
        if stage != "sft":
            assert kinds(p) == ["Create:ConfigMap", "Create:JobSet"]
            cm = p.actions[0].obj
            assert f"init_from: gs://coda-test/runs/demo/{stage}/final" in cm["data"]["job.yaml"]
            assert (
                sim.status["stages"][i + 1]["initFrom"] == f"gs://coda-test/runs/demo/{stage}/final"
            )
            assert p.finished_stages and p.finished_stages[0][0] == ["pretrain", "midtrain"][i]
    assert sim.status["phase"] == "Succeeded"
    assert kinds(p) == ["Create:Secret", "Create:Deployment", "Create:Service"]
    assert (
        sim.cond("Complete")["status"] == "True" and sim.cond("SamplerReady")["status"] == "False"
    )
    assert "AllStagesSucceeded" in sim.reasons() and "SamplerCreated" in sim.reasons()
    sim.sampler = planner.DeploymentObs("demo-sampler", replicas=1, ready_replicas=1)
    sim.step()
    assert sim.cond("SamplerReady")["status"] == "True" and sim.status["sampler"]["ready"] is True
    # row 19: terminal runs never get new children
    for _ in range(3):
        assert sim.step().actions == []


def test_phase_derives_only_from_true_conditions() -> None:
    c = lambda t, s: planner.Condition(type=t, status=s, reason="R", last_transition_time="x")  # noqa: E731
    assert planner.phase_from_conditions([]) == "Pending"
    assert (
        planner.phase_from_conditions([c("Suspended", "False"), c("Running", "True")]) == "Running"
    )
    assert (
        planner.phase_from_conditions([c("Running", "True"), c("Suspended", "True")]) == "Suspended"
    )
    assert (
        planner.phase_from_conditions([c("Complete", "True"), c("SamplerReady", "False")])
        == "Succeeded"
    )
    assert planner.phase_from_conditions([c("Failed", "True"), c("Running", "True")]) == "Failed"


def test_retry_then_exhaustion_rows_13_14() -> None:
    sim = Sim(run_spec(failurePolicy={"maxRestarts": 1, "stageRetries": 2}))
    sim.step(), sim.step()
    for attempt in (1, 2):
        current = sim.status["stages"][0]["jobSet"]
        sim.finish(current, "Failed", f"boom {attempt}")
        p = sim.step()
        assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == [
            f"demo-pretrain-r{attempt}-config",
            f"demo-pretrain-r{attempt}",
        ]
        assert sim.status["stages"][0]["retries"] == attempt and "StageRetrying" in sim.reasons()
        sim.step()
        assert sim.status["phase"] == "Running"
    sim.finish("demo-pretrain-r2", "Failed", "Container trainer failed with exit code 78")
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert sim.cond("Failed")["reason"] == "StageFailed"
    assert (
        sim.cond("Failed")["message"]
        == "stage pretrain failed after 3 attempts: Container trainer failed with exit code 78"
    )
    assert sim.step().actions == []


def test_a_permanent_failure_is_not_retried() -> None:
    """JobSet's FailJobSet rule fires only on the trainer's EXIT_PERMANENT: no stage retry then,
    whatever stageRetries allows (the same config, data or init_from would fail again)."""
    sim = Sim(run_spec(failurePolicy={"maxRestarts": 3, "stageRetries": 2}))
    sim.step(), sim.step()
    sim.finish(
        "demo-pretrain",
        "Failed",
        "applying FailJobSet failure policy action (first failed job: demo-pretrain-slice-0)",
        reason=planner.JOBSET_FAIL_ACTION_REASON,
    )
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert sim.status["stages"][0]["retries"] == 0 and "StageRetrying" not in sim.reasons()
    message = sim.cond("Failed")["message"]
    assert message.startswith(
        "stage pretrain failed after 1 attempt: permanent failure, not retried"
    )
    assert "exit 78" in message


def test_suspend_resume_and_kueue_rows_5_to_9() -> None:
    sim = Sim()
    sim.step(), sim.step()
    sim.run["spec"]["suspend"] = True
    p = sim.step()
    assert p.actions == [
        PatchChild(
            "jobset.x-k8s.io/v1alpha2", "JobSet", "demo-pretrain", {"spec": {"suspend": True}}
        )
    ]
    assert (
        sim.status["phase"] == "Suspended" and "demo-pretrain" in sim.jobsets
    )  # kept, not deleted
    assert sim.step().actions == []  # already suspended
    sim.run["spec"]["suspend"] = False
    p = sim.step()
    assert p.actions == [
        PatchChild(
            "jobset.x-k8s.io/v1alpha2", "JobSet", "demo-pretrain", {"spec": {"suspend": False}}
        )
    ]
    assert sim.status["phase"] == "Running" and "Resumed" in sim.reasons()

    q = Sim(run_spec(queueName="tpu-team"))
    q.step()
    assert q.jobsets["demo-pretrain"]["spec"]["suspend"] is True
    q.step()
    assert q.status["phase"] == "Queued" and q.cond("Suspended")["status"] == "False"
    q.run["spec"]["suspend"] = True  # a user suspend of a queued run is Suspended, not Queued
    q.step()
    assert q.status["phase"] == "Suspended" and q.cond("Queued")["status"] == "False"
    q.run["spec"]["suspend"] = False  # resumed: Kueue decides when it runs again
    assert q.step().actions == [] and q.status["phase"] == "Queued"
    q.jobsets["demo-pretrain"]["spec"]["suspend"] = False  # admitted
    q.step()
    assert q.status["phase"] == "Running" and "Admitted" in q.reasons()


def test_spec_change_to_running_stage_is_refused_row_15() -> None:
    sim = Sim()
    sim.step(), sim.step()
    sim.run["spec"]["stages"][0]["steps"] = 999
    sim.run["spec"]["image"] = "trainer:new"
    sim.run["spec"]["stages"][2]["steps"] = 7  # not started yet: allowed
    p = sim.step()
    assert p.actions == []
    c = sim.cond("SpecChangeRejected")
    assert c["status"] == "True" and c["reason"] == "RunningStageImmutable"
    assert (
        "spec.stages[0]" in c["message"]
        and "spec.image" in c["message"]
        and "spec.stages[2]" not in c["message"]
    )
    assert "RunningStageImmutable" in sim.reasons() and sim.status["phase"] == "Running"
    sim.finish("demo-pretrain")
    p = sim.step()
    assert sim.cond("SpecChangeRejected")["status"] == "False"
    js = next(a.obj for a in p.actions if isinstance(a, Create) and a.obj["kind"] == "JobSet")
    assert (
        js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "trainer:new"
    )


def test_started_stages_cannot_be_reordered_row_16() -> None:
    sim = Sim()
    sim.step(), sim.step()
    stages = sim.run["spec"]["stages"]
    sim.run["spec"]["stages"] = [stages[1], stages[0], stages[2]]
    p = sim.step()
    assert p.actions == [] and sim.cond("SpecChangeRejected")["reason"] == "StagesReordered"


@pytest.mark.parametrize("queued", [False, True])
def test_deadline_row_17(queued: bool) -> None:
    sim = Sim(run_spec(activeDeadlineSeconds=100, **({"queueName": "q"} if queued else {})))
    p = sim.step()
    assert p.requeue_after == pytest.approx(100)  # a precise wake-up, not a poll
    sim.step(50)
    p = sim.step(60)
    assert p.actions == [DeleteChild("jobset.x-k8s.io/v1alpha2", "JobSet", "demo-pretrain")]
    assert sim.status["phase"] == "Failed" and sim.cond("Failed")["reason"] == "DeadlineExceeded"
    assert sim.step().actions == []


def test_ttl_after_finished_row_18() -> None:
    sim = Sim(run_spec(ttlSecondsAfterFinished=30, sampler={"enabled": False}))
    sim.step(), sim.step()
    for i in range(3):
        sim.finish(sim.status["stages"][i]["jobSet"])
        sim.step(), sim.step()
    assert sim.status["phase"] == "Succeeded" and sim.status.get("sampler") is None
    p = sim.step(10)
    assert p.actions == [] and p.requeue_after == pytest.approx(19, abs=1.5)
    p = sim.step(25)
    assert (
        p.actions == [DeleteRun("ttlSecondsAfterFinished=30 expired")]
        and "TTLExpired" in sim.reasons()
    )


def test_invalid_spec_rows_1_and_21() -> None:
    sim = Sim(run_spec(accelerator={"tpu": {"type": "v5p", "topology": "3x3x3"}}))
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert (
        sim.cond("Invalid")["status"] == "True"
        and "spec.accelerator.tpu" in sim.cond("Invalid")["message"]
    )
    assert [e.type for e in p.events] == ["Warning", "Warning"]

    ok = Sim()
    ok.step(), ok.step()
    ok.run["spec"]["stages"][1][
        "steps"
    ] = -1  # broken while stage 0 runs: keep running, say why, wait
    p = ok.step()
    assert (
        p.actions == []
        and ok.status["phase"] == "Running"
        and ok.cond("Invalid")["status"] == "True"
    )
    ok.run["spec"]["stages"][1]["steps"] = 50
    ok.step()
    assert ok.cond("Invalid")["status"] == "False"


def test_lost_status_write_does_not_duplicate_or_stall() -> None:
    """The operator died between creating a JobSet and writing status: the next plan adopts it."""
    sim = Sim()
    sim.step()
    sim.run["status"] = {}  # the status patch never happened
    p = sim.step()
    assert [a.obj["metadata"]["name"] for a in p.actions] == []
    assert sim.status["stages"][0]["jobSet"] == "demo-pretrain" and sim.status["phase"] == "Running"


def test_conditions_follow_metav1() -> None:
    sim = Sim()
    sim.step(), sim.step()
    first = copy.deepcopy(sim.cond("Running"))
    sim.step(5)
    assert (
        sim.cond("Running")["lastTransitionTime"] == first["lastTransitionTime"]
    )  # no flapping timestamps
    for c in sim.status["conditions"]:
        assert set(c) >= {
            "type",
            "status",
            "reason",
            "message",
            "lastTransitionTime",
            "observedGeneration",
        }
        assert c["status"] in ("True", "False")


def _annotate_retry(sim: Sim, value: str) -> None:
    sim.run["metadata"].setdefault("annotations", {})[RETRY_ANNOTATION] = value


def _failed_sim(**spec: Any) -> Sim:
    """pretrain succeeded, midtrain failed with its retries exhausted (stageRetries=1)."""
    sim = Sim(run_spec(failurePolicy={"maxRestarts": 1, "stageRetries": 1}, **spec))
    sim.step(), sim.step()
    sim.finish("demo-pretrain")
    sim.step(), sim.step()
    sim.finish("demo-midtrain", "Failed", "slice crashed")
    sim.step(), sim.step()
    sim.finish("demo-midtrain-r1", "Failed", "exit code 1")
    sim.step()
    assert sim.status["phase"] == "Failed" and sim.cond("Failed")["reason"] == "StageFailed"
    return sim


def test_manual_retry_of_a_failed_run_row_22() -> None:
    sim = _failed_sim(ttlSecondsAfterFinished=3600)
    assert not planner.retry_requested(sim.run)
    _annotate_retry(sim, "2026-01-01T00:10:00Z")
    assert planner.retry_requested(sim.run)
    p = sim.step()
    # one more attempt of the failed stage only: the next -r<N> JobSet; pretrain is not rerun
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == [
        "demo-midtrain-r2-config",
        "demo-midtrain-r2",
    ]
    cm = p.actions[0].obj
    # same stage dir (the trainer resumes from its newest checkpoint), same handoff from pretrain
    assert "init_from: gs://coda-test/runs/demo/pretrain/final" in cm["data"]["job.yaml"]
    assert sim.status["retryHandled"] == "2026-01-01T00:10:00Z"
    assert not planner.retry_requested(sim.run)
    failed = sim.cond("Failed")
    assert failed["status"] == "False" and failed["reason"] == "RetryRequested"
    assert "demo-midtrain-r2" in failed["message"]
    assert sim.status["phase"] == "Pending" and sim.status.get("completionTime") is None
    assert [(e.type, e.reason) for e in p.events] == [("Normal", "RetryRequested")]
    mid = sim.status["stages"][1]
    assert (mid["phase"], mid["retries"], mid["jobSet"]) == ("Pending", 2, "demo-midtrain-r2")
    assert sim.status["stages"][0]["phase"] == "Succeeded"
    # the new attempt runs, and the run goes on to the next stage
    p = sim.step()
    assert (
        p.actions == [] and sim.status["phase"] == "Running" and sim.status["stage"] == "midtrain"
    )
    sim.finish("demo-midtrain-r2")
    p = sim.step()
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == [
        "demo-sft-config",
        "demo-sft",
    ]
    # the same annotation value again is not a new request
    assert sim.step().actions == [] and "RetryRequested" not in sim.reasons()


def test_manual_retry_that_fails_again_is_failed_again() -> None:
    sim = _failed_sim()
    _annotate_retry(sim, "a")
    sim.step(), sim.step()
    sim.finish("demo-midtrain-r2", "Failed", "still broken")
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert sim.cond("Failed")["message"] == "stage midtrain failed after 3 attempts: still broken"
    assert sim.step().actions == []  # terminal again: nothing until the next new value
    _annotate_retry(sim, "b")
    p = sim.step()
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)][-1] == (
        "demo-midtrain-r3"
    )


def test_retry_of_a_run_that_is_not_failed_does_nothing() -> None:
    sim = Sim()
    sim.step(), sim.step()
    _annotate_retry(sim, "early")
    before = copy.deepcopy(sim.status)
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Running"
    assert [(e.type, e.reason) for e in p.events] == [("Normal", "RetryIgnored")]
    assert sim.status["retryHandled"] == "early"  # consumed: it cannot resurrect a later failure
    assert {k: v for k, v in sim.status.items() if k != "retryHandled"} == before
    sim.finish("demo-pretrain", "Failed", "boom")
    sim.step(), sim.step()
    sim.finish("demo-pretrain-r1", "Failed", "boom")
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert sim.step().actions == []


@pytest.mark.parametrize("cause", ["deadline", "invalid"])
def test_retry_only_reopens_a_stage_failure(cause: str) -> None:
    if cause == "deadline":
        sim = Sim(run_spec(activeDeadlineSeconds=10))
        sim.step(), sim.step(20)
        reason = "DeadlineExceeded"
    else:
        sim = Sim(run_spec(accelerator={"tpu": {"type": "v5p", "topology": "3x3x3"}}))
        sim.step()
        reason = "InvalidSpec"
    assert sim.status["phase"] == "Failed" and sim.cond("Failed")["reason"] == reason
    _annotate_retry(sim, "x")
    p = sim.step()
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "RetryIgnored")]
    assert sim.status["retryHandled"] == "x"
