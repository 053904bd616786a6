"""A whole CodaTrainingRun executed from the objects the operator renders (see box.py for what
plays the cluster): the real operator, the real trainer and sampler as processes, the real
`coda-ctl` talking to the API.

Scenario, on a tiny model: three stages (pretrain → midtrain → sft) hand their checkpoints on
through `initFrom` in gs:// (the GCS emulator); before each stage's JobSet a pre-flight Job
compiles the stage for its TPU slice on the pod's CPU (compile-only devices) and reports that it
fits; midtrain runs on a two-host slice (v5p 2x2x2: two pods, one JAX process each, joined through
the coordinator the JobSet's DNS names point at) and one of its hosts is preempted after the first
checkpoint (DisruptionTarget, SIGTERM: the hosts agree on a step, save and exit, the JobSet
restarts without spending `maxRestarts`, the new pods resume from that checkpoint); the evaluation
Job scores the final checkpoint on two HumanEval / HumanEval+ problems into `status.evaluation`
(gate at 0); the sampler Deployment becomes Ready through its readiness probe on the pod's own
address; `coda-ctl sample` and `coda-ctl infill` get text through the Service with the generated
API key; `spec.sampler.defaults` visibly apply. A second run with a bad `initFrom` fails
permanently (exit 78) without a single retry.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from box import Box, node_env
from coda_trainer.corpus import build_default_corpora
from operator_testkit import NS, TRAINER_SERVICE_ACCOUNT, Cluster, OperatorTask, emulated_cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
        "num_kv_heads": 1, "head_dim": 16}  # fmt: skip
ONE_HOST = {"tpu": {"type": "v5p", "topology": "2x2x1"}}  # 4 chips, one host
TWO_HOSTS = {"tpu": {"type": "v5p", "topology": "2x2x2"}}  # 8 chips, two hosts of 4


def _stage(name: str, kind: str, steps: int, data: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "steps": steps,
        "batch": {"sequences": 4, "seqLen": 32},
        "optimizer": {"name": "adamw", "peakLr": 3e-3, "warmupSteps": 1},
        "data": [{"uri": str(data / "train-*.jsonl")}],
        "logEvery": 1,
        **extra,
    }


def run_spec(bucket: str, corpus: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": "coda-trainer:box",
        "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
        "model": {"preset": "coda-tiny", "overrides": TINY},
        "tokenizer": "project",
        # few saves: each is hundreds of requests to the (pure Python) GCS emulator
        "checkpoints": {"uri": f"{bucket}/runs", "everySteps": 8, "keep": 2},
        "accelerator": ONE_HOST,
        "failurePolicy": {"maxRestarts": 0, "stageRetries": 1},
        "stages": [
            _stage("pretrain", "pretrain", 4, corpus["pretrain"]),
            # 8 sequences: one per chip of the two-host slice
            _stage(
                "midtrain",
                "midtrain",
                16,
                corpus["midtrain"],
                accelerator=TWO_HOSTS,
                batch={"sequences": 8, "seqLen": 32},
            ),
            # chat rows are longer than 32 tokens: keep their first 64 rather than drop them all
            _stage(
                "sft",
                "sft",
                4,
                corpus["sft"],
                sft={"overLength": "truncate"},
                batch={"sequences": 4, "seqLen": 64},
            ),
        ],
        # HumanEval and HumanEval+ of the final checkpoint, two problems, short answers: the
        # score of a model this small is ~0; the gate at 0 passes and lets the sampler start
        "evaluation": {
            "benchmarks": ["humaneval", "humaneval-plus"],
            "limit": 2,
            "sampler": {"maxNewTokens": 16, "steps": 8, "blockLength": 8},
            "minPassAt1": {"humaneval": 0.0},
        },
        "sampler": {"replicas": 1, "defaults": {"maxNewTokens": 8, "steps": 8}},
    }
    spec.update(overrides)
    return spec


@pytest_asyncio.fixture
async def box(tmp_path: Path, gcs_emulator: Any) -> AsyncIterator[tuple[Cluster, Box]]:
    async with emulated_cluster() as cluster:
        op = OperatorTask(cluster.url)
        await op.start()
        env = node_env(
            {
                "STORAGE_EMULATOR_HOST": gcs_emulator.url,
                "TENSORSTORE_GCS_HTTP_URL": gcs_emulator.url,
                "GOOGLE_CLOUD_PROJECT": "test",
                # in place of the in-cluster ServiceAccount token the trainer would use
                "CODA_PROGRESS_SERVER": cluster.url,
                "CODA_PROGRESS_INTERVAL": "0",
            }
        )
        b = Box(cluster, tmp_path / "box", env)
        stop = asyncio.Event()

        async def drive() -> None:
            while not stop.is_set():
                await b.step()
                await asyncio.sleep(0.2)

        driver = asyncio.create_task(drive())
        try:
            yield cluster, b
        finally:
            stop.set()
            await asyncio.wait_for(driver, 60)
            b.close()
            await op.stop_gracefully()


async def _until(what: str, check: Any, box: Box, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{box.logs()}")


def _ctl(cluster: Cluster, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    kubeconfig = tmp / "kubeconfig"
    if not kubeconfig.exists():
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "box", "cluster": {"server": cluster.url}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [{"name": "box", "context": {"cluster": "box", "user": "me", "namespace": NS}}],
            "current-context": "box",
        }))  # fmt: skip
    exe = Path(sys.executable).with_name("coda-ctl")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip


# Under a load average of 11 (other test suites beside it) the three stages alone took ~12 min: each
# gs:// save is hundreds of requests to the single-threaded emulator. Hence the generous bounds.
@pytest.mark.timeout(2400)
async def test_a_run_executed_from_its_rendered_objects(
    box: tuple[Cluster, Box], gcs_bucket: str, tmp_path: Path
) -> None:
    cluster, b = box
    corpus = await asyncio.to_thread(build_default_corpora, tmp_path / "data", limit=25, shards=2)
    await cluster.create_run("box", run_spec(gcs_bucket, corpus))

    # ---- midtrain: two hosts; one is preempted once there is a checkpoint; restarted, resumed
    async def midtrain_checkpointed() -> Any:
        run = await cluster.run("box")
        progress = (run.get("status") or {}).get("progress") or {}
        pods = b.running_pods("box-midtrain")
        return pods if progress.get("stage") == "midtrain" and progress.get("checkpoint") else None

    pods = await _until("a midtrain checkpoint", midtrain_checkpointed, b, timeout=400)
    assert len(b.jobsets["box-midtrain"].pods) == 2
    b.preempt(pods[-1])

    async def succeeded() -> Any:
        run = await cluster.run("box")
        return run if (run.get("status") or {}).get("phase") == "Succeeded" else None

    run = await _until("the run to succeed", succeeded, b, timeout=1500)
    stages = run["status"]["stages"]
    assert [s["phase"] for s in stages] == ["Succeeded"] * 3
    assert [s.get("retries", 0) for s in stages] == [0, 0, 0]  # preemption is not a retry
    assert stages[1]["jobSetRestarts"] == 1 and stages[0]["jobSetRestarts"] == 0
    midtrain_exits = [code for js, _, code in b.history if js == "box-midtrain"]
    # both hosts stopped at the agreed step and saved (75), then both finished
    assert midtrain_exits == [75, 75, 0, 0], b.history
    resumed = b.jobsets["box-midtrain"].pods
    assert [p.name.endswith("-r1") for p in resumed] == [True, True]
    for pod in resumed:
        log = pod.log.read_text()
        assert "resumed" in log and "2 process(es)" in log, log[-3000:]
    # hand-off: each stage's ConfigMap starts it from the previous stage's final
    for prev, stage in [("pretrain", "midtrain"), ("midtrain", "sft")]:
        job = yaml.safe_load(
            cluster.objects("configmaps")[f"box-{stage}-config"]["data"]["job.yaml"]
        )
        assert job["stage"]["init_from"] == f"{gcs_bucket}/runs/{prev}/final"

    # ---- before each JobSet, its pre-flight Job compiled the stage for its slice (deviceless)
    preflight = run["status"]["preflight"]
    for stage in ("pretrain", "midtrain", "sft"):
        assert preflight[stage]["phase"] == "Succeeded" and preflight[stage]["report"]["fits"], (
            preflight
        )
    assert [(js, code) for js, _, code in b.history if "-preflight" in js] == [
        ("box-pretrain-preflight", 0), ("box-midtrain-preflight", 0), ("box-sft-preflight", 0)
    ]  # fmt: skip

    # ---- the evaluation Job ran the harness on the final checkpoint and filled status.evaluation
    evaluation = run["status"]["evaluation"]["sft"]
    assert evaluation["phase"] == "Succeeded", evaluation
    assert evaluation["report"].startswith(f"{gcs_bucket}/runs/sft/eval"), evaluation
    for bench in ("humaneval", "humaneval-plus"):
        score = evaluation["results"][bench]
        assert score["problems"] == 2 and 0.0 <= score["passAt1"] <= 1.0, evaluation
    assert [(js, code) for js, _, code in b.history if "-eval" in js] == [("box-sft-eval", 0)]

    # ---- the sampler: ready through its probe on the pod's address, reached through the Service
    async def sampler_ready() -> Any:
        run = await cluster.run("box")
        return run if (run["status"].get("sampler") or {}).get("ready") else None

    await _until("the sampler to be ready", sampler_ready, b, timeout=400)
    pod = b.deployments["box-sampler"][0]
    assert pod.ip != "127.0.0.1"
    sample = await asyncio.to_thread(
        _ctl, cluster, tmp_path, "sample", "box", "--prompt", "def add(a, b):", "-o", "json"
    )
    assert sample.returncode == 0, sample.stderr + b.logs()
    reply = json.loads(sample.stdout)
    assert isinstance(reply["choices"][0]["text"], str)
    # coda-ctl sent no max_tokens: spec.sampler.defaults.maxNewTokens = 8 applies, not the
    # server's built-in default
    assert 0 < reply["usage"]["completion_tokens"] <= 8, reply
    infill = await asyncio.to_thread(
        _ctl, cluster, tmp_path, "infill", "box", "--prefix", "x = ", "--suffix", "\n",
        "--max-tokens", "4",
    )  # fmt: skip
    assert infill.returncode == 0, infill.stderr + b.logs()
    assert infill.stdout.startswith("x = ")


async def test_a_bad_init_from_fails_the_stage_at_once(
    box: tuple[Cluster, Box], gcs_bucket: str, tmp_path: Path
) -> None:
    cluster, b = box
    corpus = await asyncio.to_thread(build_default_corpora, tmp_path / "data", limit=25, shards=2)
    spec = run_spec(gcs_bucket, corpus, failurePolicy={"maxRestarts": 3, "stageRetries": 2})
    spec["stages"] = [{**spec["stages"][0], "initFrom": f"{gcs_bucket}/nowhere/final"}]
    spec["sampler"] = {"enabled": False}
    await cluster.create_run("bad", spec)

    async def failed() -> Any:
        run = await cluster.run("bad")
        return run if (run.get("status") or {}).get("phase") == "Failed" else None

    run = await _until("the run to fail", failed, b, timeout=300)
    # the stage's one pod, once: no restart, no retry (its pre-flight Job passed before it)
    assert [code for js, _, code in b.history if js in b.jobsets] == [78]
    assert cluster.creates("jobsets") == ["bad-pretrain"]
    message = run["status"]["stages"][0]["message"]
    assert "permanent failure, not retried" in message, message
