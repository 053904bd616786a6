"""The pre-flight Job before a TPU stage's JobSet (issue 10, item 4): created before the JobSet; a
fitting report lets the JobSet be created and sets `Preflight` True with the numbers; a report that
does not fit (or exit 78) fails the stage with the report's message and never creates the JobSet;
exit 75 / an eviction is retried as a new Job; the report is cached per (stage spec, image), so a
stage retry compiles nothing; `spec.preflight: false` and GPU stages go straight to the JobSet.

The planner is stepped as a pure function (EvalSim plays the Job controller); the same paths then
run through the real kopf operator against the Kubernetes emulator, where the test plays the Job
controller and the pre-flight pod's status patch."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes_validate
import pytest
from coda_operator import api, render
from operator_testkit import run_spec
from test_evaluation import EvalSim
from test_render import K8S_VERSIONS

GIB = 1 << 30
FITS = {"fits": True, "peakBytesPerDevice": 12 * GIB, "hbmBytesPerDevice": 95 * GIB,
        "compileSeconds": 41.5, "problems": []}  # fmt: skip
OOM_LINE = (
    "train step out of HBM: RESOURCE_EXHAUSTED: Ran out of memory on HBM (remat none, gradAccum 1)"
)
DOES_NOT_FIT = {"fits": False, "peakBytesPerDevice": 140 * GIB, "hbmBytesPerDevice": 95 * GIB,
                "problems": [OOM_LINE]}  # fmt: skip


def spec(**overrides: Any) -> dict[str, Any]:
    return run_spec(preflight=True, **overrides)


def preflight_jobs(sim: EvalSim) -> list[str]:
    return sorted(n for n, j in sim.jobs.items() if "preflight" in n)


def report(sim: EvalSim, stage: str, body: dict[str, Any], key: str | None = None) -> None:
    """What the pre-flight pod merge-patches into status.preflight.<stage>."""
    entry = sim.status["preflight"][stage]
    entry["reportKey"] = key or entry["key"]
    entry["report"] = body


def test_the_preflight_job_comes_first_and_a_fitting_report_starts_the_jobset() -> None:
    sim = EvalSim(spec())
    sim.step()
    assert preflight_jobs(sim) == ["demo-pretrain-preflight"] and sim.jobsets == {}
    assert "PreflightStarted" in sim.reasons()
    assert sim.cond("Preflight")["status"] == "False"
    assert sim.cond("Preflight")["reason"] == "Compiling"
    assert sim.status["stages"][0]["phase"] == "Pending"
    sim.step()  # still compiling: no JobSet, no second Job
    assert sim.jobsets == {} and preflight_jobs(sim) == ["demo-pretrain-preflight"]
    report(sim, "pretrain", FITS)
    sim.job_done("demo-pretrain-preflight")
    sim.step()
    assert list(sim.jobsets) == ["demo-pretrain"]
    cond = sim.cond("Preflight")
    assert cond["status"] == "True" and cond["reason"] == "Fits"
    assert "peak 12.00 GiB of 95.00 GiB HBM per chip" in cond["message"]
    assert "1 x v5p 2x2x2" in cond["message"]
    assert sim.status["preflight"]["pretrain"]["phase"] == "Succeeded"


def test_a_report_that_does_not_fit_fails_the_stage_and_never_asks_for_tpus() -> None:
    sim = EvalSim(spec())
    sim.step()
    report(sim, "pretrain", DOES_NOT_FIT)
    sim.job_done("demo-pretrain-preflight", "Failed", "PodFailurePolicy")
    for _ in range(3):
        sim.step()
    assert sim.jobsets == {}
    assert sim.status["phase"] == "Failed"
    failed = sim.cond("Failed")
    assert failed["reason"] == "PreflightFailed" and OOM_LINE in failed["message"]
    assert sim.status["stages"][0]["phase"] == "Failed"
    assert sim.cond("Preflight")["reason"] == "DoesNotFit"


def test_exit_78_without_a_report_fails_at_once_and_exit_75_is_retried() -> None:
    sim = EvalSim(spec())
    sim.step()
    sim.job_done("demo-pretrain-preflight", "Failed", "BackoffLimitExceeded")  # exit 75, evicted
    sim.step()
    assert preflight_jobs(sim) == ["demo-pretrain-preflight", "demo-pretrain-preflight-r1"]
    assert "PreflightRetrying" in sim.reasons() and sim.jobsets == {}
    sim.job_done("demo-pretrain-preflight-r1", "Failed", "PodFailurePolicy")  # exit 78
    sim.step()
    assert sim.status["phase"] == "Failed" and sim.jobsets == {}
    assert "not retried" in sim.cond("Failed")["message"]
    assert len(preflight_jobs(sim)) == 2


def test_infrastructure_failures_stop_at_stage_retries() -> None:
    sim = EvalSim(spec())  # stageRetries: 1
    sim.step()
    sim.job_done("demo-pretrain-preflight", "Failed", "BackoffLimitExceeded")
    sim.step()
    sim.job_done("demo-pretrain-preflight-r1", "Failed", "BackoffLimitExceeded")
    sim.step()
    assert sim.status["phase"] == "Failed" and sim.jobsets == {}
    assert sim.cond("Failed")["reason"] == "StageFailed"  # `coda-ctl retry` may try again


def test_a_completed_job_without_its_report_waits_then_retries() -> None:
    sim = EvalSim(spec())
    sim.step()
    sim.job_done("demo-pretrain-preflight")
    sim.step()
    assert sim.last.requeue_after is not None and len(preflight_jobs(sim)) == 1
    sim.step(dt=61)
    assert preflight_jobs(sim) == ["demo-pretrain-preflight", "demo-pretrain-preflight-r1"]


def test_the_cached_report_serves_a_stage_retry_and_a_spec_change_compiles_again() -> None:
    sim = EvalSim(spec())
    sim.step()
    report(sim, "pretrain", FITS)
    sim.job_done("demo-pretrain-preflight")
    sim.step()
    sim.finish("demo-pretrain", "Failed", "node lost")  # a retryable JobSet failure
    sim.step()
    assert "demo-pretrain-r1" in sim.jobsets
    assert preflight_jobs(sim) == ["demo-pretrain-preflight"]  # no second compile
    # The stale report of another spec is never taken for this one.
    sim = EvalSim(spec())
    sim.step()
    report(sim, "pretrain", FITS, key="0123456789ab")
    sim.step()
    assert sim.jobsets == {}
    # A changed stage (before its JobSet exists) gets a new key and a new Job.
    sim.run["spec"]["stages"][0]["steps"] = 200
    sim.step()
    assert preflight_jobs(sim) == ["demo-pretrain-preflight", "demo-pretrain-preflight-r1"]


def test_the_key_ignores_what_the_compile_does_not_depend_on() -> None:
    base = api.parse_spec(spec())
    queued = api.parse_spec(spec(queueName="tpu-team"))
    other_image = api.parse_spec(spec(image="us-docker.pkg.dev/acme/coda/trainer:0.2.0"))
    key = render.preflight_key("demo", base, 0)
    assert render.preflight_key("demo", queued, 0) == key
    assert render.preflight_key("demo", other_image, 0) != key
    assert render.preflight_key("demo", base, 1) != key


def test_opt_out_and_gpu_stages_go_straight_to_the_jobset() -> None:
    sim = EvalSim(run_spec())  # the kit's spec has preflight: false
    sim.step()
    assert list(sim.jobsets) == ["demo-pretrain"] and sim.jobs == {}
    assert sim.cond("Preflight") is None and "preflight" not in sim.status
    gpu = {"gpu": {"type": "nvidia-h100-80gb", "gpusPerNode": 8}}
    s = spec(accelerator=gpu, sampler={"enabled": False})
    for st in s["stages"]:
        st.pop("accelerator", None)
        st.pop("mesh", None)
    assert render.preflights(api.parse_spec(s)) == []
    sim = EvalSim(s)
    sim.step()
    assert list(sim.jobsets) == ["demo-pretrain"] and sim.jobs == {}


def test_the_rendered_job_is_a_valid_cpu_job_running_the_trainers_preflight() -> None:
    parsed = api.parse_spec(spec())
    key = render.preflight_key("demo", parsed, 1)
    job = render.render_preflight_job("demo", "ml", parsed, 1, key, attempt=2)
    for v in K8S_VERSIONS:
        kubernetes_validate.validate(job, v, strict=True)
    assert job["metadata"]["name"] == "demo-midtrain-preflight-r2"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "coda_trainer.preflight", "--config-env", "CODA_PREFLIGHT_CONFIG",
        "--tpu", "v6e:4x4", "--slices", "2", "--report-key", key,
    ]  # fmt: skip
    assert "nodeSelector" not in pod and "tolerations" not in pod  # no TPU node
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert render.TPU_RESOURCE not in str(container["resources"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == parsed.service_account_name
    env = {e["name"]: e.get("value") for e in container["env"]}
    config = env["CODA_PREFLIGHT_CONFIG"]
    assert "midtrain" in config and env["JAX_PLATFORMS"] == "cpu"
    assert env["CODA_PROGRESS"] == "status"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [78] and rules[1]["action"] == "Ignore"
    # `coda-ctl render` lists it before its stage's ConfigMap and JobSet
    objs = render.render_all({"metadata": {"name": "demo", "namespace": "ml"}, "spec": spec()})
    assert [o["kind"] for o in objs][:3] == ["Job", "ConfigMap", "JobSet"]


# --------------------------------------------------------------------------------------------------
# The real kopf operator against the Kubernetes emulator
# --------------------------------------------------------------------------------------------------


async def _finish_job(cluster: Any, name: str, state: str = "Complete", reason: str = "") -> None:
    cond = {"type": state, "status": "True", "reason": reason or state, "message": reason}
    await cluster.patch("jobs", name, {"status": {"conditions": [cond]}}, sub="status")


async def _wait_job(cluster: Any, name: str) -> dict[str, Any]:
    return await cluster.wait_for(f"Job {name}", lambda: cluster.get("jobs", name))


async def _report(cluster: Any, run: str, stage: str, body: dict[str, Any]) -> None:
    """The pre-flight pod's merge patch (coda_trainer.preflight --report-key KEY)."""
    job = await _wait_job(cluster, f"{run}-{stage}-preflight")
    key = job["metadata"]["annotations"]["coda.dev/preflight-key"]
    entry = {"reportKey": key, "report": body}
    await cluster.patch(
        "codatrainingruns", run, {"status": {"preflight": {stage: entry}}}, sub="status"
    )


@pytest.mark.asyncio
async def test_operator_runs_the_preflight_then_the_jobset_and_caches_it(
    cluster: Any, operator: Any
) -> None:
    await cluster.create_run("pf", spec())
    job = await _wait_job(cluster, "pf-pretrain-preflight")
    assert job["metadata"]["ownerReferences"][0]["name"] == "pf"
    await asyncio.sleep(0.3)
    assert cluster.objects("jobsets") == {}  # no TPU asked for while compiling
    # exit 75 (or an eviction past the Job's own Ignore rule): a new Job
    await _finish_job(cluster, "pf-pretrain-preflight", "Failed", "BackoffLimitExceeded")
    await _wait_job(cluster, "pf-pretrain-preflight-r1")
    job = await _wait_job(cluster, "pf-pretrain-preflight-r1")
    key = job["metadata"]["annotations"]["coda.dev/preflight-key"]
    await cluster.patch(
        "codatrainingruns", "pf",
        {"status": {"preflight": {"pretrain": {"reportKey": key, "report": FITS}}}}, sub="status",
    )  # fmt: skip
    await _finish_job(cluster, "pf-pretrain-preflight-r1")
    await cluster.wait_jobset("pf-pretrain")
    run = await cluster.run("pf")
    cond = next(c for c in run["status"]["conditions"] if c["type"] == "Preflight")
    assert cond["status"] == "True" and "12.00 GiB of 95.00 GiB" in cond["message"]
    # A retryable JobSet failure: the retry reuses the cached report, no third pre-flight Job.
    await cluster.finish_jobset("pf-pretrain", failed=True, message="node lost")
    await cluster.wait_jobset("pf-pretrain-r1")
    await asyncio.sleep(0.3)
    assert sorted(cluster.objects("jobs")) == ["pf-pretrain-preflight", "pf-pretrain-preflight-r1"]
    await cluster.wait_events("pf", "PreflightStarted", "PreflightRetrying", "Fits")


@pytest.mark.asyncio
async def test_operator_fails_a_stage_that_does_not_fit_without_a_jobset(
    cluster: Any, operator: Any
) -> None:
    await cluster.create_run("oom", spec())
    await _report(cluster, "oom", "pretrain", DOES_NOT_FIT)
    await _finish_job(cluster, "oom-pretrain-preflight", "Failed", "PodFailurePolicy")
    run = await cluster.wait_run("oom", lambda r: r["status"].get("phase") == "Failed", "Failed")
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed" and OOM_LINE in failed["message"]
    await asyncio.sleep(0.3)
    assert cluster.objects("jobsets") == {} and cluster.objects("configmaps") == {}
    assert sorted(cluster.objects("jobs")) == ["oom-pretrain-preflight"]


@pytest.mark.asyncio
async def test_operator_opt_out_creates_the_jobset_at_once(cluster: Any, operator: Any) -> None:
    await cluster.create_run("nopf", run_spec(preflight=False))
    await cluster.wait_jobset("nopf-pretrain")
    assert cluster.objects("jobs") == {}
