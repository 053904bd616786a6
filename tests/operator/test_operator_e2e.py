"""A real kopf operator against the Kubernetes emulator: the test plays the JobSet controller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml
from coda_operator import render
from operator_testkit import NS, Cluster, OperatorTask, run_spec

pytestmark = pytest.mark.asyncio


def cond(run: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in run.get("status", {}).get("conditions", []) if c["type"] == type_), None
    )


def is_true(run: dict[str, Any], type_: str) -> bool:
    c = cond(run, type_)
    return c is not None and c["status"] == "True"


def phase(run: dict[str, Any]) -> str | None:
    return run.get("status", {}).get("phase")


def printer(run: dict[str, Any]) -> dict[str, Any]:
    """What `kubectl get ctr` prints: evaluate the CRD's printer-column JSONPaths."""
    from coda_operator.crd import PRINTER_COLUMNS

    out = {}
    for col in PRINTER_COLUMNS:
        node: Any = run
        for part in col["jsonPath"].strip(".").split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[col["name"]] = node
    return out


async def test_three_stages_to_succeeded_with_sampler(
    cluster: Cluster, operator: OperatorTask
) -> None:
    await cluster.create_run("demo", run_spec())
    order = []
    for i, stage in enumerate(["pretrain", "midtrain", "sft"]):
        js = await cluster.wait_jobset(f"demo-{stage}")
        order.append(stage)
        # only this stage's JobSet exists: stage i+1 never starts before stage i completed
        assert sorted(cluster.objects("jobsets")) == sorted(f"demo-{s}" for s in order)
        assert js["metadata"]["labels"][render.LABEL_RUN] == "demo"
        assert js["metadata"]["labels"][render.LABEL_STAGE] == stage
        owner = js["metadata"]["ownerReferences"][0]
        assert (
            owner["kind"] == "CodaTrainingRun"
            and owner["name"] == "demo"
            and owner["controller"] is True
        )
        run = await cluster.wait_run(
            "demo",
            lambda r, s=stage: r.get("status", {}).get("stage") == s and phase(r) == "Running",
            f"{stage} running",
        )
        cols = printer(run)
        assert cols["Phase"] == "Running" and cols["Stage"] == stage and cols["Step"] == 0
        # the handoff: stage i starts from stage i-1's final checkpoint, written in its ConfigMap
        job = yaml.safe_load(
            cluster.objects("configmaps")[f"demo-{stage}-config"]["data"]["job.yaml"]
        )
        expected = None if i == 0 else f"gs://coda-test/runs/demo/{order[i - 1]}/final"
        assert job["stage"].get("init_from") == expected
        assert job["stage"]["name"] == stage and job["run"] == "demo"
        if stage == "pretrain":
            # the trainer's process 0 reports progress into status (coda_trainer.k8s_progress does this)
            await cluster.patch(
                "codatrainingruns",
                "demo",
                {
                    "status": {
                        "progress": {
                            "stage": "pretrain",
                            "step": 40,
                            "totalSteps": 100,
                            "loss": 2.5,
                            "tokensPerSecond": 1000.0,
                        }
                    }
                },
                sub="status",
            )
            run = await cluster.run("demo")
            assert printer(run)["Step"] == 40 and printer(run)["Loss"] == 2.5
        assert "demo-sampler" not in cluster.objects("deployments")
        await cluster.finish_jobset(f"demo-{stage}")

    run = await cluster.wait_run("demo", lambda r: phase(r) == "Succeeded", "Succeeded")
    assert is_true(run, "Complete") and not is_true(run, "Running") and not is_true(run, "Failed")
    st = run["status"]
    assert [s["phase"] for s in st["stages"]] == ["Succeeded"] * 3
    assert st["stages"][2]["final"] == "gs://coda-test/runs/demo/sft/final"
    assert st["sampler"]["endpoint"] == f"http://demo-sampler.{NS}.svc:8000"

    deployment = await cluster.wait_for(
        "sampler Deployment", lambda: cluster.get("deployments", "demo-sampler")
    )
    assert "demo-sampler" in cluster.objects("services")
    cmd = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "coda_trainer.serve"]
    assert cmd[cmd.index("--checkpoint") + 1] == "gs://coda-test/runs/demo/sft/final"

    # play the Deployment controller: the sampler becomes ready → SamplerReady
    await cluster.patch(
        "deployments", "demo-sampler", {"status": {"readyReplicas": 1, "replicas": 1}}, sub="status"
    )
    run = await cluster.wait_run("demo", lambda r: is_true(r, "SamplerReady"), "SamplerReady")
    assert run["status"]["sampler"]["ready"] is True and phase(run) == "Succeeded"

    # each JobSet was created exactly once (no duplicates even with several triggers per change)
    assert cluster.creates("jobsets").count("demo-pretrain") == 1

    # one Kubernetes Event per transition, in order (events follow the status write they describe)
    async def all_events() -> list[str] | None:
        reasons = [e["reason"] for e in cluster.events("demo")]
        return reasons if "ReplicasReady" in reasons else None

    reasons = await cluster.wait_for("the SamplerReady event", all_events)
    assert reasons == [
        "StageStarted",
        "StageRunning",
        "StageSucceeded",
        "StageStarted",
        "StageRunning",
        "StageSucceeded",
        "StageStarted",
        "StageRunning",
        "StageSucceeded",
        "SamplerCreated",
        "AllStagesSucceeded",
        "ReplicasReady",
    ]
    ev = cluster.events("demo")[0]
    assert ev["involvedObject"]["kind"] == "CodaTrainingRun" and ev["type"] == "Normal"
    assert "demo-pretrain" in ev["message"] and "2 x v5p 2x2x2" not in ev["message"]


async def test_failure_retry_then_exhaustion(cluster: Cluster, operator: OperatorTask) -> None:
    await cluster.create_run("flaky", run_spec(failurePolicy={"maxRestarts": 1, "stageRetries": 1}))
    await cluster.wait_jobset("flaky-pretrain")
    await cluster.finish_jobset(
        "flaky-pretrain", failed=True, message="jobset failed: slice crashed (exit code 1)"
    )
    # retry: a new JobSet -r1 (the trainer resumes from the stage's newest checkpoint)
    await cluster.wait_jobset("flaky-pretrain-r1")
    run = await cluster.wait_run(
        "flaky", lambda r: r["status"]["stages"][0]["retries"] == 1, "retry recorded"
    )
    assert phase(run) in ("Pending", "Running")
    await cluster.finish_jobset(
        "flaky-pretrain-r1", failed=True, message="Container trainer exited with exit code 78"
    )
    run = await cluster.wait_run("flaky", lambda r: phase(r) == "Failed", "Failed")
    c = cond(run, "Failed")
    assert c["reason"] == "StageFailed"
    assert "pretrain failed after 2 attempts" in c["message"] and "exit code 78" in c["message"]
    assert run["status"]["stages"][0]["phase"] == "Failed"
    # terminal: nothing new is ever created, even when an old child changes again
    await cluster.patch("jobsets", "flaky-pretrain-r1", {"metadata": {"labels": {"poke": "1"}}})
    await asyncio.sleep(0.3)
    assert sorted(cluster.objects("jobsets")) == ["flaky-pretrain", "flaky-pretrain-r1"]
    assert "StageRetrying" in [e["reason"] for e in cluster.events("flaky")]


async def test_progress_reported_by_the_trainer_reaches_printer_columns(
    cluster: Cluster, operator: OperatorTask
) -> None:
    from coda_trainer.k8s_progress import ProgressReporter

    await cluster.create_run("prog", run_spec())
    await cluster.wait_run(
        "prog", lambda r: phase(r) == "Running" if "status" in r else False, "Running"
    )
    reporter = ProgressReporter(
        "prog", NS, "pretrain", server=cluster.url, token="t0ken", min_interval=3600
    )
    sent = await asyncio.to_thread(
        reporter.report,
        step=40,
        total_steps=100,
        loss=2.5,
        tokens_per_second=1234.5,
        checkpoint="gs://coda-test/runs/demo/pretrain/40",
    )
    assert sent
    assert not await asyncio.to_thread(reporter.report, step=41)  # rate-limited
    run = await cluster.run("prog")
    assert printer(run) | {"Age": None} == {
        "Phase": "Running",
        "Stage": "pretrain",
        "Step": 40,
        "Loss": 2.5,
        "Age": None,
        "Total": 100,
        "Message": "stage pretrain running (JobSet prog-pretrain)",
    }
    assert run["status"]["progress"]["checkpoint"].endswith("/pretrain/40")
    # the operator leaves trainer-owned progress alone, then resets it when the next stage starts
    await cluster.finish_jobset("prog-pretrain")
    run = await cluster.wait_run(
        "prog", lambda r: r["status"].get("stage") == "midtrain", "midtrain"
    )
    assert run["status"]["progress"] == {"stage": "midtrain", "step": 0, "totalSteps": 50}
    # a reporter that cannot reach the API never raises (training must go on)
    dead = ProgressReporter("prog", NS, "midtrain", server="http://127.0.0.1:9", timeout=0.5)
    assert await asyncio.to_thread(dead.report, step=1) is False


async def test_suspend_and_resume_keep_the_jobset(cluster: Cluster, operator: OperatorTask) -> None:
    await cluster.create_run("sus", run_spec())
    await cluster.wait_jobset("sus-pretrain")
    await cluster.wait_run("sus", lambda r: phase(r) == "Running", "Running")
    await cluster.patch("codatrainingruns", "sus", {"spec": {"suspend": True}})
    run = await cluster.wait_run("sus", lambda r: phase(r) == "Suspended", "Suspended")
    assert is_true(run, "Suspended") and not is_true(run, "Running")
    js = await cluster.get("jobsets", "sus-pretrain")
    assert js is not None and js["spec"]["suspend"] is True  # suspended, not deleted
    assert run["status"]["stages"][0]["phase"] == "Suspended"

    await cluster.patch("codatrainingruns", "sus", {"spec": {"suspend": False}})
    run = await cluster.wait_run("sus", lambda r: phase(r) == "Running", "Running again")
    # the printed phase is right after resume (Kubeflow #3666): it derives from True conditions only
    assert cond(run, "Suspended")["status"] == "False" and is_true(run, "Running")
    assert (await cluster.get("jobsets", "sus-pretrain"))["spec"]["suspend"] is False
    await cluster.finish_jobset("sus-pretrain")
    js = await cluster.wait_jobset("sus-midtrain")
    assert js["spec"]["suspend"] is False
    reasons = [e["reason"] for e in cluster.events("sus")]
    assert "SuspendedByUser" in reasons and "Resumed" in reasons
    assert cluster.creates("jobsets").count("sus-pretrain") == 1


async def test_kueue_queue_is_queued_not_suspended(
    cluster: Cluster, operator: OperatorTask
) -> None:
    await cluster.create_run("q", run_spec(queueName="tpu-team"))
    js = await cluster.wait_jobset("q-pretrain")
    assert (
        js["spec"]["suspend"] is True
        and js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-team"
    )
    run = await cluster.wait_run("q", lambda r: phase(r) == "Queued", "Queued")
    assert is_true(run, "Queued") and not is_true(run, "Suspended")
    assert cond(run, "Queued")["reason"] == "WaitingForAdmission"
    # Kueue admits the workload by unsuspending the JobSet
    await cluster.patch("jobsets", "q-pretrain", {"spec": {"suspend": False}})
    run = await cluster.wait_run("q", lambda r: phase(r) == "Running", "admitted")
    assert cond(run, "Queued")["status"] == "False" and cond(run, "Queued")["reason"] == "Admitted"
    # preemption by Kueue re-suspends it: back to Queued, never mistaken for a user suspend
    await cluster.patch("jobsets", "q-pretrain", {"spec": {"suspend": True}})
    run = await cluster.wait_run("q", lambda r: phase(r) == "Queued", "re-queued")
    assert (await cluster.get("jobsets", "q-pretrain"))["spec"]["suspend"] is True


async def test_invalid_spec_is_reported_by_the_operator(
    cluster: Cluster, operator: OperatorTask
) -> None:
    # the emulator has no schema validation, like an API server without the CRD's CEL rules
    spec = run_spec(accelerator={"tpu": {"type": "v5p", "topology": "4x4"}})
    await cluster.create_run("bad", spec)
    run = await cluster.wait_run("bad", lambda r: phase(r) == "Failed", "Failed")
    assert cond(run, "Invalid")["status"] == "True"
    assert cond(run, "Failed")["reason"] == "InvalidSpec"
    assert (
        "spec.accelerator.tpu" in cond(run, "Invalid")["message"]
        and "3-D" in cond(run, "Invalid")["message"]
    )
    await asyncio.sleep(0.2)
    assert cluster.objects("jobsets") == {}


async def test_spec_change_to_running_stage_is_refused(
    cluster: Cluster, operator: OperatorTask
) -> None:
    await cluster.create_run("chg", run_spec())
    await cluster.wait_jobset("chg-pretrain")
    await cluster.patch(
        "codatrainingruns", "chg", {"spec": {"image": "us-docker.pkg.dev/acme/coda/trainer:0.2.0"}}
    )
    run = await cluster.wait_run(
        "chg", lambda r: is_true(r, "SpecChangeRejected"), "SpecChangeRejected"
    )
    c = cond(run, "SpecChangeRejected")
    assert (
        c["reason"] == "RunningStageImmutable"
        and "spec.image" in c["message"]
        and "pretrain" in c["message"]
    )
    js = await cluster.get("jobsets", "chg-pretrain")
    assert js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ].endswith(":0.1.0")
    assert phase(run) == "Running"  # a refused change does not stop the run
    await cluster.finish_jobset("chg-pretrain")
    js = await cluster.wait_jobset("chg-midtrain")  # later stages get the new spec
    assert js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ].endswith(":0.2.0")
    run = await cluster.wait_run(
        "chg", lambda r: cond(r, "SpecChangeRejected")["status"] == "False", "cleared"
    )


async def test_status_is_written_when_a_child_cannot_be_created(
    cluster: Cluster, operator: OperatorTask
) -> None:
    cluster.k.reject[("jobsets", "quota-pretrain")] = (403, "exceeded quota: tpu-v5p-slice")
    await cluster.create_run("quota", run_spec())
    run = await cluster.wait_run(
        "quota",
        lambda r: (cond(r, "Created") or {}).get("reason") == "CreateFailed",
        "CreateFailed",
    )
    assert phase(run) == "Pending" and "exceeded quota" in run["status"]["message"]
    assert run["status"]["stages"][0]["jobSet"] == "quota-pretrain"
    del cluster.k.reject[("jobsets", "quota-pretrain")]  # quota freed: the back-off retry succeeds
    await cluster.wait_jobset("quota-pretrain")
    run = await cluster.wait_run("quota", lambda r: phase(r) == "Running", "Running")
    assert is_true(run, "Created")
    assert "CreateFailed" in [e["reason"] for e in cluster.events("quota")]


async def test_deadline_then_ttl(cluster: Cluster, operator: OperatorTask) -> None:
    await cluster.create_run("late", run_spec(activeDeadlineSeconds=1, ttlSecondsAfterFinished=1))
    await cluster.wait_jobset("late-pretrain")
    run = await cluster.wait_run(
        "late", lambda r: phase(r) == "Failed", "DeadlineExceeded", timeout=10
    )
    assert cond(run, "Failed")["reason"] == "DeadlineExceeded"
    await cluster.wait_for(
        "the JobSet deleted", lambda: _absent(cluster, "jobsets", "late-pretrain")
    )
    # ttlSecondsAfterFinished: the finished run deletes itself (children follow by ownership)
    await cluster.wait_for(
        "the run deleted", lambda: _absent(cluster, "codatrainingruns", "late"), timeout=10
    )
    assert cluster.objects("jobsets") == {}


async def _absent(cluster: Cluster, plural: str, name: str) -> bool:
    return await cluster.get(plural, name) is None


async def test_deleting_a_run_never_resurrects_children(
    cluster: Cluster, operator: OperatorTask
) -> None:
    from prometheus_client import REGISTRY

    def running() -> float:
        return REGISTRY.get_sample_value("coda_operator_runs", {"phase": "Running"}) or 0.0

    before = running()
    created = await cluster.create_run("gone", run_spec())
    js = await cluster.wait_jobset("gone-pretrain")
    await cluster.wait_run("gone", lambda r: phase(r) == "Running", "Running")
    await cluster.wait_for("runs gauge", lambda: _value(running() == before + 1))
    owner = js["metadata"]["ownerReferences"][0]
    cm = cluster.objects("configmaps")["gone-pretrain-config"]
    assert owner["uid"] == created["metadata"]["uid"] == cm["metadata"]["ownerReferences"][0]["uid"]
    assert owner["blockOwnerDeletion"] is True  # the garbage collector deletes them with the run
    await cluster.delete("codatrainingruns", "gone")
    await cluster.wait_for("runs gauge", lambda: _value(running() == before))
    # the emulator has no GC: the orphan JobSet finishing must not make the operator start stage 2
    await cluster.finish_jobset("gone-pretrain")
    await asyncio.sleep(0.3)
    assert sorted(cluster.objects("jobsets")) == ["gone-pretrain"]
    assert await cluster.get("codatrainingruns", "gone") is None


async def _value(x: Any) -> Any:
    return x


async def test_coda_ctl_retry_annotation_restarts_the_failed_stage(
    cluster: Cluster, operator: OperatorTask
) -> None:
    from coda_trainer.contract import RETRY_ANNOTATION

    await cluster.create_run("again", run_spec(failurePolicy={"maxRestarts": 1, "stageRetries": 0}))
    await cluster.wait_jobset("again-pretrain")
    await cluster.finish_jobset("again-pretrain", failed=True, message="slice crashed")
    run = await cluster.wait_run("again", lambda r: phase(r) == "Failed", "Failed")
    assert cond(run, "Failed")["reason"] == "StageFailed"
    # what `coda-ctl retry again` does: a new annotation value on the run (not a spec change)
    await cluster.patch(
        "codatrainingruns",
        "again",
        {"metadata": {"annotations": {RETRY_ANNOTATION: "2026-01-01T00:00:00Z"}}},
    )
    js = await cluster.wait_jobset("again-pretrain-r1")
    assert js["metadata"]["labels"][render.LABEL_STAGE] == "pretrain"
    run = await cluster.wait_run(
        "again",
        lambda r: (
            r["status"].get("retryHandled") == "2026-01-01T00:00:00Z" and phase(r) == "Running"
        ),
        "retry handled and running",
    )
    c = cond(run, "Failed")
    assert c["status"] == "False" and c["reason"] == "RetryRequested"
    assert run["status"]["stages"][0]["retries"] == 1
    assert "RetryRequested" in [e["reason"] for e in cluster.events("again")]
    await cluster.finish_jobset("again-pretrain-r1")
    await cluster.wait_jobset("again-midtrain")
    assert sorted(cluster.objects("jobsets")) == [
        "again-midtrain",
        "again-pretrain",
        "again-pretrain-r1",
    ]
