"""`python -m coda_operator` as a real process: SIGKILL it mid-stage, start another, no duplicates."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from operator_testkit import NS, ROOT, Cluster, run_spec

pytestmark = pytest.mark.asyncio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kubeconfig(tmp: Path, server: str) -> Path:
    """The ordinary login path: kopf and the handlers read a kubeconfig, as with `kubectl`."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emu", "cluster": {"server": server}}],
        "users": [{"name": "op", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "op", "namespace": NS}}],
        "current-context": "emu",
    }
    path = tmp / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return path


class OperatorProcess:
    def __init__(self, kubeconfig: Path, tmp: Path, name: str, *, verbose: bool = True):
        self.log_path = tmp / f"{name}.log"
        self.health, self.metrics = _free_port(), _free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("trainer", "operator")),
        }
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coda_operator",
                "--namespace",
                NS,
                "--standalone",
                *(["--verbose"] if verbose else []),
                "--liveness",
                f"http://127.0.0.1:{self.health}/healthz",
                "--metrics-port",
                str(self.metrics),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )

    async def wait_healthy(self, timeout: float = 30) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as s:
            while loop.time() < deadline:
                assert self.proc.poll() is None, f"operator exited with {self.proc.returncode}"
                try:
                    async with s.get(f"http://127.0.0.1:{self.health}/healthz") as rsp:
                        if rsp.status == 200:
                            return await rsp.json()
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("operator never became healthy")

    async def metrics_text(self) -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{self.metrics}/metrics") as rsp,
        ):
            return await rsp.text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def test_operator_killed_mid_stage_resumes_without_duplicates(
    cluster: Cluster, tmp_path: Path
) -> None:
    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    first = OperatorProcess(kubeconfig, tmp_path, "first")
    try:
        health = await first.wait_healthy()
        assert "runs" in health  # our probe is part of kopf's liveness endpoint
        await cluster.create_run("kill", run_spec())
        await cluster.wait_jobset("kill-pretrain")
        await cluster.finish_jobset("kill-pretrain")
        await cluster.wait_jobset("kill-midtrain")
        await cluster.wait_run(
            "kill",
            lambda r: (
                r.get("status", {}).get("phase") == "Running" and r["status"]["stage"] == "midtrain"
            ),
            "midtrain running",
        )
        metrics = await first.metrics_text()
        assert 'coda_operator_runs{phase="Running"} 1.0' in metrics
        assert "coda_operator_stage_duration_seconds_count" in metrics
        first.kill()  # SIGKILL mid-stage: no cleanup at all
    finally:
        first.stop()

    second = OperatorProcess(kubeconfig, tmp_path, "second", verbose=False)
    try:
        await second.wait_healthy()
        # the restarted operator picks up the running stage: it must not create midtrain again
        await asyncio.sleep(0.5)
        assert cluster.creates("jobsets") == ["kill-pretrain", "kill-midtrain"]
        await cluster.finish_jobset("kill-midtrain")
        await cluster.wait_jobset("kill-sft")
        await cluster.finish_jobset("kill-sft")
        run = await cluster.wait_run(
            "kill", lambda r: r["status"].get("phase") == "Succeeded", "Succeeded"
        )
        assert [s["phase"] for s in run["status"]["stages"]] == ["Succeeded"] * 3
        assert cluster.creates("jobsets") == ["kill-pretrain", "kill-midtrain", "kill-sft"]
        assert sorted(cluster.objects("deployments")) == ["kill-sampler"]
    finally:
        second.stop()
    # kopf's line per handled watch event: with --verbose only (12 per run, noise at scale)
    handled = "Handler 'jobset_event' succeeded"
    assert handled in first.log_path.read_text()
    quiet = second.log_path.read_text()
    assert handled not in quiet and "Activity 'startup' succeeded" in quiet


async def test_operator_killed_mid_preflight_neither_repeats_the_compile_nor_loses_the_report(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The pre-flight's state lives in the run's status, not the process: a report and the Job's
    end that arrive while no operator runs are acted on by the next one, exactly once."""
    from test_preflight_job import FITS, _finish_job, _report, _wait_job

    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    first = OperatorProcess(kubeconfig, tmp_path, "first")
    try:
        await first.wait_healthy()
        await cluster.create_run("pfk", run_spec(preflight=True))
        await _wait_job(cluster, "pfk-pretrain-preflight")
        first.kill()  # SIGKILL while the stage compiles
    finally:
        first.stop()
    # Meanwhile the pre-flight pod reports and its Job completes; nobody is watching.
    await _report(cluster, "pfk", "pretrain", FITS)
    await _finish_job(cluster, "pfk-pretrain-preflight")

    second = OperatorProcess(kubeconfig, tmp_path, "second")
    try:
        await second.wait_healthy()
        await cluster.wait_jobset("pfk-pretrain")
        run = await cluster.wait_run(
            "pfk",
            lambda r: any(
                c["type"] == "Preflight" and c["status"] == "True"
                for c in r.get("status", {}).get("conditions", [])
            ),
            "Preflight True",
        )
        assert run["status"]["preflight"]["pretrain"]["phase"] == "Succeeded"
        await asyncio.sleep(0.5)
        assert cluster.creates("jobs") == ["pfk-pretrain-preflight"]  # no second compile
        assert cluster.creates("jobsets") == ["pfk-pretrain"]
    finally:
        second.stop()
