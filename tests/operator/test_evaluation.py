"""spec.evaluation in the planner: an evaluation Job after the right stages, status.evaluation
filled from what the Job reports, the minPassAt1 gate (blocks the sampler, fails the run and says
why), retries on a retryable failure (exit 75 → BackoffLimitExceeded), none on exit 78
(PodFailurePolicy), and a run without `evaluation` exactly as before."""

from __future__ import annotations

import asyncio
import copy
from datetime import timedelta
from typing import Any

import pytest
from coda_operator import api, planner, render
from coda_operator.planner import Create, JobObs, JobSetObs, Observed, PatchChild, plan
from operator_testkit import run_spec
from test_planner import Sim, kinds


def spec_with(**evaluation: Any) -> dict[str, Any]:
    return run_spec(evaluation={"benchmarks": ["humaneval", "mbpp"], "limit": 5, **evaluation})


class EvalSim(Sim):
    """Sim plus the batch/v1 Jobs the planner creates."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.jobs: dict[str, dict[str, Any]] = {}

    def step(self, dt: float = 1.0) -> planner.Reconciliation:
        self.now += timedelta(seconds=dt)
        obs = Observed(
            {n: JobSetObs.from_body(b) for n, b in self.jobsets.items()},
            self.sampler,
            jobs={n: JobObs.from_body(b) for n, b in self.jobs.items()},
        )
        p = plan(copy.deepcopy(self.run), obs, self.now)
        again = plan(copy.deepcopy(self.run), obs, self.now)
        assert again.actions == p.actions and again.status_dict() == p.status_dict()
        for a in p.actions:
            if isinstance(a, Create) and a.obj["kind"] == "JobSet":
                self.jobsets.setdefault(a.obj["metadata"]["name"], copy.deepcopy(a.obj))
            elif isinstance(a, Create) and a.obj["kind"] == "Job":
                self.jobs.setdefault(a.obj["metadata"]["name"], copy.deepcopy(a.obj))
            elif isinstance(a, PatchChild):
                self.jobsets[a.name]["spec"].update(a.patch["spec"])
        self.run["status"] = p.status_dict()
        self.last = p
        return p

    def train_until(self, stage: str) -> None:
        """Step until `stage`'s JobSet has completed (and the planner has seen it)."""
        for _ in range(20):
            self.step()
            stages = {s["name"]: s for s in self.status["stages"]}
            if stages[stage]["phase"] == "Succeeded":
                return
            current = self.status["stages"][self.status["stageIndex"]]
            if current.get("jobSet") in self.jobsets and current["phase"] == "Running":
                self.finish(current["jobSet"])
        raise AssertionError(f"stage {stage} never succeeded: {self.status}")

    def job_done(self, name: str, state: str = "Complete", reason: str = "") -> None:
        cond = {"type": state, "status": "True", "reason": reason, "message": reason or state}
        self.jobs[name]["status"] = {"conditions": [cond]}

    def report(self, stage: str, **pass_at1: float) -> None:
        """What the evaluation Job merge-patches into status.evaluation.<stage>."""
        ev = self.run["status"]["evaluation"][stage]
        ev["report"] = f"gs://coda-test/runs/demo/{stage}/eval"
        ev["results"] = {
            b: {"passAt1": v, "problems": 5, "samples": 1, "failures": 5 - round(5 * v),
                "reasons": {"passed": round(5 * v), "failed": 5 - round(5 * v)}}
            for b, v in pass_at1.items()
        }  # fmt: skip


def test_the_api_validates_evaluation_offline_with_field_names() -> None:
    with pytest.raises(api.InvalidSpec, match=r"spec.evaluation.after\[0\]: 'nope' is not a stage"):
        api.parse_spec(spec_with(after=["nope"]))
    with pytest.raises(api.InvalidSpec, match=r"minPassAt1.mbpp-sanitized: not one of"):
        api.parse_spec(spec_with(minPassAt1={"mbpp-sanitized": 0.2}))
    with pytest.raises(api.InvalidSpec, match=r"is not a fraction"):
        api.parse_spec(spec_with(minPassAt1={"mbpp": 30}))
    with pytest.raises(api.InvalidSpec, match="benchmarks"):
        api.parse_spec(spec_with(benchmarks=["apps"]))
    spec = api.parse_spec(spec_with())
    assert spec.evaluated_stages() == ["sft"]  # default: the last stage
    assert api.parse_spec(spec_with(after=["sft", "pretrain"])).evaluated_stages() == [
        "pretrain",
        "sft",
    ]


def test_the_eval_job_renders_the_harness_against_the_stage_final_checkpoint() -> None:
    spec = api.parse_spec(
        spec_with(sampler={"steps": 32, "maxNewTokens": 64, "temperature": 0.1}, nSamples=2)
    )
    job = render.render_eval_job("demo", "ml", spec, "sft", attempt=1)
    assert job["kind"] == "Job" and job["metadata"]["name"] == "demo-sft-eval-r1"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cmd = c["command"]
    assert cmd[:5] == [
        "python", "-m", "coda_trainer.evaluate", "--checkpoint", "gs://coda-test/runs/demo/sft/final"
    ]  # fmt: skip
    assert " ".join(cmd).count("--benchmark") == 2 and "--limit 5" in " ".join(cmd)
    assert "--n-samples 2" in " ".join(cmd) and "--steps 32" in " ".join(cmd)
    assert "--max-new-tokens 64" in " ".join(cmd) and "--temperature 0.1" in " ".join(cmd)
    assert cmd[-2:] == ["--report-dir", "gs://coda-test/runs/demo/sft/eval"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [78]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The sampler's accelerator (a v6e 1x1 in run_spec): one host.
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "1x1"
    assert {"name": "CODA_STAGE", "value": "sft"} in c["env"]


def test_eval_job_after_the_right_stage_scores_in_status_then_sampler() -> None:
    sim = EvalSim(spec_with(after=["midtrain", "sft"]))
    sim.train_until("pretrain")
    assert sim.jobs == {}  # pretrain is not evaluated
    sim.train_until("midtrain")
    # midtrain's evaluation starts while sft trains
    assert "demo-midtrain-eval" in sim.jobs and "EvaluationStarted" in sim.reasons()
    ev = sim.status["evaluation"]["midtrain"]
    assert ev["phase"] == "Running" and ev["checkpoint"].endswith("/midtrain/final")
    assert sim.status["stage"] == "sft"
    sim.report("midtrain", humaneval=0.2, mbpp=0.4)
    sim.job_done("demo-midtrain-eval")
    sim.step()
    assert sim.status["evaluation"]["midtrain"]["phase"] == "Succeeded"
    assert "EvaluationSucceeded" in sim.reasons()
    assert any("humaneval 20.0, mbpp 40.0" in e.message for e in sim.last.events)
    sim.train_until("sft")
    # training done, sft evaluating: not Complete, no sampler yet
    assert sim.status["phase"] == "Running" and sim.cond("Running")["reason"] == "Evaluating"
    assert sim.cond("Complete")["reason"] == "EvaluationRunning"
    assert "demo-sft-eval" in sim.jobs
    sim.step()
    assert not any(a.obj["kind"] == "Deployment" for a in sim.last.actions if isinstance(a, Create))
    sim.report("sft", humaneval=0.0, mbpp=0.2)
    sim.job_done("demo-sft-eval")
    p = sim.step()
    assert sim.status["phase"] == "Succeeded"
    assert kinds(p) == ["Create:Secret", "Create:Deployment", "Create:Service"]
    assert sim.status["evaluation"]["sft"]["results"]["mbpp"]["passAt1"] == 0.2
    assert sim.status["score"] == "sft: humaneval 0.0, mbpp 20.0"  # the Pass@1 printer column
    assert sim.cond("QualityGate") is None  # no minPassAt1: no gate condition


def test_the_gate_blocks_the_sampler_and_names_the_benchmark_and_the_miss() -> None:
    sim = EvalSim(spec_with(minPassAt1={"humaneval": 0.3, "mbpp": 0.1}))
    sim.train_until("sft")
    sim.step()
    sim.report("sft", humaneval=0.2, mbpp=0.4)
    sim.job_done("demo-sft-eval")
    p = sim.step()
    assert sim.status["phase"] == "Failed"
    failed = sim.cond("Failed")
    assert failed["reason"] == "QualityGateFailed"
    assert "humaneval pass@1 20.0% < minPassAt1 30.0% (missed by 10.0 points)" in failed["message"]
    assert "mbpp" not in failed["message"].split("after stage sft: ")[1].split(";")[0]
    assert "no sampler deployed" in failed["message"]
    assert sim.cond("QualityGate")["status"] == "False"
    assert not any(isinstance(a, Create) and a.obj["kind"] == "Deployment" for a in p.actions)
    assert "QualityGateFailed" in sim.reasons()
    for _ in range(3):
        assert sim.step().actions == []  # terminal: no sampler, ever


def test_the_gate_passes_and_says_so() -> None:
    sim = EvalSim(spec_with(minPassAt1={"humaneval": 0.1}))
    sim.train_until("sft")
    sim.step()
    sim.report("sft", humaneval=0.1, mbpp=0.0)
    sim.job_done("demo-sft-eval")
    p = sim.step()
    assert sim.status["phase"] == "Succeeded" and "Create:Deployment" in kinds(p)
    gate = sim.cond("QualityGate")
    assert gate["status"] == "True" and "humaneval 10.0% >= 10.0%" in gate["message"]


def test_a_retryable_eval_failure_is_retried_then_exhausted() -> None:
    """Exit 75 (or a crash) fails the pod; backoffLimit 0 ends the Job with BackoffLimitExceeded:
    the operator starts a new Job, up to failurePolicy.stageRetries (1 in run_spec)."""
    sim = EvalSim(spec_with())
    sim.train_until("sft")
    sim.step()
    sim.job_done("demo-sft-eval", "Failed", "BackoffLimitExceeded")
    p = sim.step()
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == [
        "demo-sft-eval-r1"
    ]
    assert "EvaluationRetrying" in sim.reasons() and sim.status["phase"] == "Running"
    assert sim.status["evaluation"]["sft"]["retries"] == 1
    sim.job_done("demo-sft-eval-r1", "Failed", "BackoffLimitExceeded")
    sim.step()
    assert sim.status["phase"] == "Failed"
    assert sim.cond("Failed")["reason"] == "EvaluationFailed"
    assert "evaluation of stage sft failed after 2 attempts" in sim.cond("Failed")["message"]


def test_exit_78_is_permanent_not_retried() -> None:
    sim = EvalSim(spec_with())
    sim.train_until("sft")
    sim.step()
    sim.job_done("demo-sft-eval", "Failed", "PodFailurePolicy")
    p = sim.step()
    assert not any(isinstance(a, Create) for a in p.actions)
    assert sim.status["phase"] == "Failed"
    msg = sim.cond("Failed")["message"]
    assert "after 1 attempt:" in msg and "permanent failure, not retried (evaluation exit 78" in msg


def test_a_completed_job_without_scores_waits_then_fails() -> None:
    sim = EvalSim(spec_with())
    sim.train_until("sft")
    sim.step()
    sim.job_done("demo-sft-eval")
    p = sim.step()
    assert sim.status["phase"] == "Running" and p.requeue_after is not None
    assert "waiting for its scores" in sim.status["evaluation"]["sft"]["message"]
    sim.step(dt=planner.EVAL_SCORES_GRACE_S + 1)
    assert sim.status["phase"] == "Failed"
    assert "reported no scores for humaneval, mbpp" in sim.cond("Failed")["message"]


def test_a_run_without_evaluation_has_no_eval_jobs_and_no_evaluation_status() -> None:
    sim = EvalSim(run_spec())
    sim.train_until("sft")
    assert sim.status["phase"] == "Succeeded" and sim.jobs == {}
    assert "evaluation" not in sim.status and "score" not in sim.status


# --------------------------------------------------------------------------------------------------
# The real kopf operator against the Kubernetes emulator (the test plays the JobSet and Job
# controllers and the evaluation Job's status patch)
# --------------------------------------------------------------------------------------------------


async def _train_all(cluster: Any, run: str) -> None:
    for stage in ("pretrain", "midtrain", "sft"):
        await cluster.wait_jobset(f"{run}-{stage}")
        await cluster.finish_jobset(f"{run}-{stage}")


async def _finish_job(cluster: Any, name: str, state: str = "Complete", reason: str = "") -> None:
    cond = {"type": state, "status": "True", "reason": reason or state, "message": reason}
    await cluster.patch("jobs", name, {"status": {"conditions": [cond]}}, sub="status")


async def _wait_job(cluster: Any, name: str) -> dict[str, Any]:
    return await cluster.wait_for(f"Job {name}", lambda: cluster.get("jobs", name))


@pytest.mark.asyncio
async def test_operator_gate_blocks_the_sampler(cluster: Any, operator: Any) -> None:
    await cluster.create_run("gated", spec_with(minPassAt1={"humaneval": 0.5}))
    await _train_all(cluster, "gated")
    job = await _wait_job(cluster, "gated-sft-eval")
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"
    assert job["metadata"]["ownerReferences"][0]["name"] == "gated"
    run = await cluster.wait_run(
        "gated", lambda r: r["status"].get("evaluation", {}).get("sft", {}).get("phase") == "Running",
        "evaluation running",
    )  # fmt: skip
    assert run["status"]["phase"] == "Running"
    # What the evaluation Job's harness merge-patches when it finishes:
    await cluster.patch(
        "codatrainingruns", "gated",
        {"status": {"evaluation": {"sft": {"report": "gs://coda-test/runs/demo/sft/eval",
         "results": {"humaneval": {"passAt1": 0.25, "problems": 4, "failures": 3},
                     "mbpp": {"passAt1": 0.0, "problems": 4, "failures": 4}}}}}},
        sub="status",
    )  # fmt: skip
    await _finish_job(cluster, "gated-sft-eval")
    run = await cluster.wait_run("gated", lambda r: r["status"].get("phase") == "Failed", "Failed")
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "QualityGateFailed"
    assert "humaneval pass@1 25.0% < minPassAt1 50.0% (missed by 25.0 points)" in failed["message"]
    assert run["status"]["score"] == "sft: humaneval 25.0, mbpp 0.0"
    assert run["status"]["evaluation"]["sft"]["results"]["humaneval"]["passAt1"] == 0.25
    await asyncio.sleep(0.3)
    assert cluster.objects("deployments") == {}  # no sampler
    await cluster.wait_events(
        "gated", "EvaluationStarted", "EvaluationSucceeded", "QualityGateFailed"
    )


@pytest.mark.asyncio
async def test_operator_retries_a_failed_eval_job_then_stops_on_exit_78(
    cluster: Any, operator: Any
) -> None:
    await cluster.create_run("evr", spec_with())
    await _train_all(cluster, "evr")
    await _wait_job(cluster, "evr-sft-eval")
    await _finish_job(cluster, "evr-sft-eval", "Failed", "BackoffLimitExceeded")
    await _wait_job(cluster, "evr-sft-eval-r1")  # retried as a new Job
    await _finish_job(cluster, "evr-sft-eval-r1", "Failed", "PodFailurePolicy")
    run = await cluster.wait_run("evr", lambda r: r["status"].get("phase") == "Failed", "Failed")
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "EvaluationFailed" and "evaluation exit 78" in failed["message"]
    await asyncio.sleep(0.3)
    assert sorted(cluster.objects("jobs")) == ["evr-sft-eval", "evr-sft-eval-r1"]
    assert cluster.objects("deployments") == {}


# --------------------------------------------------------------------------------------------------
# `coda-ctl retry` (a new coda.dev/retry annotation value) after an evaluation failure
# --------------------------------------------------------------------------------------------------


def _retry(sim: EvalSim, value: str) -> planner.Reconciliation:
    from coda_trainer.contract import RETRY_ANNOTATION

    sim.run["metadata"].setdefault("annotations", {})[RETRY_ANNOTATION] = value
    return sim.step()


def test_retry_after_evaluation_failed_runs_only_the_evaluation_again() -> None:
    sim = EvalSim(spec_with())
    sim.train_until("sft")
    sim.step()
    sim.job_done("demo-sft-eval", "Failed", "BackoffLimitExceeded")
    sim.step()
    sim.job_done("demo-sft-eval-r1", "Failed", "BackoffLimitExceeded")
    sim.step()
    assert sim.cond("Failed")["reason"] == "EvaluationFailed"
    jobsets = sorted(sim.jobsets)

    p = _retry(sim, "2026-01-01T01:00:00Z")
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == [
        "demo-sft-eval-r2"
    ]
    assert sorted(sim.jobsets) == jobsets  # no stage trains again
    assert sim.status["phase"] == "Running" and sim.status["retryHandled"] == "2026-01-01T01:00:00Z"
    assert sim.cond("Failed")["status"] == "False"
    ev = sim.status["evaluation"]["sft"]
    assert ev["phase"] == "Running" and ev["job"] == "demo-sft-eval-r2" and ev["retries"] == 2
    assert (
        "creating Job demo-sft-eval-r2 (attempt 3) after: evaluation of stage sft failed"
        in next(e.message for e in p.events if e.reason == "RetryRequested")
    )
    # The new Job reports and completes: the run completes and serves.
    sim.report("sft", humaneval=0.2, mbpp=0.0)
    sim.job_done("demo-sft-eval-r2")
    p = sim.step()
    assert sim.status["phase"] == "Succeeded" and "Create:Deployment" in kinds(p)


def test_retry_after_exit_78_also_retries_the_evaluation_once() -> None:
    """A permanent evaluation failure is not retried by the operator, but a user who fixed what
    was wrong (a checkpoint written again, an image) may ask for one more attempt."""
    sim = EvalSim(spec_with())
    sim.train_until("sft")
    sim.step()
    sim.job_done("demo-sft-eval", "Failed", "PodFailurePolicy")
    sim.step()
    p = _retry(sim, "r1")
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == [
        "demo-sft-eval-r1"
    ]
    sim.job_done("demo-sft-eval-r1", "Failed", "PodFailurePolicy")
    sim.step()
    assert sim.status["phase"] == "Failed" and sim.cond("Failed")["reason"] == "EvaluationFailed"


def test_retry_after_the_gate_failed_does_not_evaluate_again() -> None:
    """QualityGateFailed: a retry is refused (with what would help) while the current spec's gate
    still misses; after minPassAt1 is lowered, a retry completes the run on the scores it has."""
    sim = EvalSim(spec_with(minPassAt1={"humaneval": 0.3}))
    sim.train_until("sft")
    sim.step()
    sim.report("sft", humaneval=0.2, mbpp=0.4)
    sim.job_done("demo-sft-eval")
    sim.step()
    assert sim.cond("Failed")["reason"] == "QualityGateFailed"

    p = _retry(sim, "first")
    assert p.actions == [] and sim.status["phase"] == "Failed"
    assert sim.status["retryHandled"] == "first"
    ignored = [e for e in p.events if e.reason == "RetryIgnored"]
    assert len(ignored) == 1 and "humaneval pass@1 20.0% < minPassAt1 30.0%" in ignored[0].message
    assert "same score" in ignored[0].message and "lower spec.evaluation.minPassAt1" in (
        ignored[0].message
    )

    sim.run["spec"]["evaluation"]["minPassAt1"] = {"humaneval": 0.2}
    sim.step()
    assert sim.status["phase"] == "Failed"  # a spec edit alone does not reopen a finished run
    p = _retry(sim, "second")
    assert sim.status["phase"] == "Succeeded" and "Create:Deployment" in kinds(p)
    assert not any(isinstance(a, Create) and a.obj["kind"] == "Job" for a in p.actions)
    assert sorted(sim.jobs) == ["demo-sft-eval"]  # never evaluated again
    assert sim.cond("QualityGate")["status"] == "True"


@pytest.mark.asyncio
async def test_operator_retry_annotation_reruns_a_failed_evaluation(
    cluster: Any, operator: Any
) -> None:
    """What `coda-ctl retry` does, against the real operator: a new Job for the evaluation only."""
    from coda_trainer.contract import RETRY_ANNOTATION

    spec = spec_with()
    spec["failurePolicy"] = {**spec.get("failurePolicy", {}), "stageRetries": 0}
    await cluster.create_run("evagain", spec)
    await _train_all(cluster, "evagain")
    await _wait_job(cluster, "evagain-sft-eval")
    await _finish_job(cluster, "evagain-sft-eval", "Failed", "BackoffLimitExceeded")
    run = await cluster.wait_run(
        "evagain", lambda r: r["status"].get("phase") == "Failed", "Failed"
    )
    assert next(c for c in run["status"]["conditions"] if c["type"] == "Failed")["reason"] == (
        "EvaluationFailed"
    )
    await cluster.patch(
        "codatrainingruns", "evagain",
        {"metadata": {"annotations": {RETRY_ANNOTATION: "2026-01-01T00:00:00Z"}}},
    )  # fmt: skip
    await _wait_job(cluster, "evagain-sft-eval-r1")
    await cluster.patch(
        "codatrainingruns", "evagain",
        {"status": {"evaluation": {"sft": {"results": {
            "humaneval": {"passAt1": 0.5, "problems": 2}, "mbpp": {"passAt1": 0.0, "problems": 2},
        }}}}},
        sub="status",
    )  # fmt: skip
    await _finish_job(cluster, "evagain-sft-eval-r1")
    run = await cluster.wait_run(
        "evagain", lambda r: r["status"].get("phase") == "Succeeded", "Succeeded"
    )
    assert run["status"]["retryHandled"] == "2026-01-01T00:00:00Z"
    assert sorted(cluster.objects("jobs")) == ["evagain-sft-eval", "evagain-sft-eval-r1"]
    assert sorted(cluster.objects("jobsets")) == [
        f"evagain-{s}" for s in ("midtrain", "pretrain", "sft")
    ]
