"""`coda-ctl local run` stopped by a signal to the runner alone (`kill PID`, a CI timeout): it
stops its trainer and sampler and exits within a bound, and no child outlives it, even when the
runner itself is SIGKILLed. (Ctrl-C, which reaches the whole process group, is in
test_local_run.py.)"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_proctree", REPO / "tests/trainer/proctree.py")
proctree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proctree)

# A one-stage run far too long to finish during a test; checkpoints only on a stop.
STAGE = "pre"
pytestmark = pytest.mark.slow  # each test runs a real trainer or sampler: 20-70 s on 2 cores


def _run_file(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(json.__file__).read_text() * 4)  # any text will do
    run = {
        "apiVersion": "coda.dev/v1alpha1",
        "kind": "CodaTrainingRun",
        "metadata": {"name": "stopme"},
        "spec": {
            "image": "local",
            "model": {"preset": "coda-tiny"},
            "tokenizer": "project",
            "checkpoints": {"everySteps": 100000},
            "accelerator": {"tpu": {"type": "v5e", "topology": "1x1"}},
            "stages": [
                {"name": STAGE, "kind": "pretrain", "steps": 100000, "logEvery": 1,
                 "batch": {"sequences": 2, "seqLen": 32},
                 "data": [{"uri": str(corpus), "format": "text"}]},
            ],
        },
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


class Runner:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log = tmp_path / "runner.log"
        self._out = self.log.open("wb")
        env = {
            **os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("trainer", "operator", "cli")),
        }  # fmt: skip
        cmd = [str(Path(sys.executable).with_name("coda-ctl")), "local", "run", *args]
        # Its own session: the test signals the runner alone, and can clean up the whole group.
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_until(self, predicate: Any, what: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            assert self.proc.poll() is None, f"runner exited {self.proc.returncode}: {self.text()}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()


def _wait_gone(pids: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if proctree.alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if proctree.alive(p)]


def _training(tmp_path: Path) -> tuple[Runner, Path]:
    runner = Runner(
        tmp_path, str(_run_file(tmp_path)), "--workdir", str(tmp_path / "w"), "--no-sample"
    )
    stage_dir = tmp_path / "w" / "stopme" / STAGE

    def stepping() -> bool:
        try:
            return json.loads((stage_dir / "status.json").read_text()).get("step", 0) >= 2
        except (OSError, ValueError):
            return False

    runner.wait_until(stepping, "the trainer's second step")
    return runner, stage_dir


# The trainer finishes its step and writes a checkpoint: seconds for coda-tiny, under load too.
TRAINER_STOP_BOUND_S = 60.0


def test_sigterm_to_the_runner_during_training_stops_the_trainer_after_a_checkpoint(
    tmp_path: Path,
) -> None:
    runner, stage_dir = _training(tmp_path)
    try:
        children = proctree.descendants(runner.proc.pid)
        assert children, "no trainer process"
        start = time.monotonic()
        os.kill(runner.proc.pid, signal.SIGTERM)
        rc = runner.proc.wait(timeout=TRAINER_STOP_BOUND_S + 30)
        seconds = time.monotonic() - start
        left = _wait_gone(children, 5)
    finally:
        runner.cleanup()
    assert rc == 128 + signal.SIGTERM, runner.text()
    assert seconds < TRAINER_STOP_BOUND_S, f"{seconds:.1f}s"
    assert not left, f"outlived the runner: {[proctree.cmdline(p) for p in left]}"
    assert any(p.name.isdigit() for p in stage_dir.iterdir()), "no checkpoint saved on the stop"
    assert "interrupted: saving a checkpoint" in runner.text()


def test_sigkill_to_the_runner_still_stops_the_trainer(tmp_path: Path) -> None:
    runner, stage_dir = _training(tmp_path)
    try:
        children = proctree.descendants(runner.proc.pid)
        os.kill(runner.proc.pid, signal.SIGKILL)
        runner.proc.wait(timeout=10)
        # The kernel sends the orphaned trainer SIGTERM (PR_SET_PDEATHSIG): it checkpoints, exits.
        left = _wait_gone(children, TRAINER_STOP_BOUND_S)
    finally:
        runner.cleanup()
    assert not left, f"outlived the runner: {[proctree.cmdline(p) for p in left]}"
    assert any(p.name.isdigit() for p in stage_dir.iterdir()), "no checkpoint saved on the stop"


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A run whose only stage is done: `final/` holds a tiny random model, so the runner goes
    straight to the sampler."""
    from coda_trainer import hf
    from coda_trainer.config import PROJECT_TOKENIZER_IDS, PROJECT_VOCAB_SIZE, ModelConfig
    from coda_trainer.model import Transformer
    from flax import nnx

    config = ModelConfig.preset(
        "test-micro", vocab_size=PROJECT_VOCAB_SIZE, **PROJECT_TOKENIZER_IDS, attention="xla"
    )
    final = tmp_path / "w" / "stopme" / STAGE / "final"
    hf.save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), str(final))
    return _run_file(tmp_path)


SAMPLER_STOP_BOUND_S = 10.0  # measured: the sampler stops in ~0.2 s during warm-up


def test_sigterm_to_the_runner_while_the_sampler_warms_up(tmp_path: Path, trained: Path) -> None:
    runner = Runner(tmp_path, str(trained), "--workdir", str(tmp_path / "w"))
    sampler_log = tmp_path / "w" / "stopme" / ".coda" / "sampler.log"
    try:
        runner.wait_until(
            lambda: sampler_log.is_file() and "Uvicorn running" in sampler_log.read_text(),
            "the sampler's HTTP server",
        )
        children = proctree.descendants(runner.proc.pid)
        start = time.monotonic()
        os.kill(runner.proc.pid, signal.SIGTERM)
        rc = runner.proc.wait(timeout=SAMPLER_STOP_BOUND_S + 30)
        seconds = time.monotonic() - start
        left = _wait_gone(children, 5)
    finally:
        runner.cleanup()
    log = sampler_log.read_text()
    assert "sampler ready" not in runner.text(), "warm-up was over: nothing was tested"
    assert rc == 128 + signal.SIGTERM, runner.text()
    assert seconds < SAMPLER_STOP_BOUND_S, f"{seconds:.1f}s"
    assert not left, f"outlived the runner: {[proctree.cmdline(p) for p in left]}"
    assert "stopping: new requests get 503" in log, log


def test_sigterm_to_the_runner_while_serving_under_load(tmp_path: Path, trained: Path) -> None:
    """`--serve` with requests in flight: the runner stops the sampler (which drains for at most
    LOCAL_GRACEFUL_S seconds) and exits 0, as a stop is how serving ends."""
    import re
    import threading
    import urllib.request

    runner = Runner(tmp_path, str(trained), "--workdir", str(tmp_path / "w"), "--serve")
    answers: list[str] = []

    def client(url: str) -> None:
        body = json.dumps({"prompt": "def f(x):", "max_tokens": 64, "temperature": 1.0}).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                answers.append(str(r.status))
        except Exception as e:  # 503 shutting_down or a dropped connection: both fine here
            answers.append(type(e).__name__)

    try:
        runner.wait_until(lambda: "serving at" in runner.text(), "the runner serving")
        url = re.search(r"serving at (http://\S+);", runner.text()).group(1)
        clients = [threading.Thread(target=client, args=(url,), daemon=True) for _ in range(16)]
        for c in clients:
            c.start()
        time.sleep(1.0)  # requests queued and a batch on the model
        children = proctree.descendants(runner.proc.pid)
        assert children, "no sampler process"
        start = time.monotonic()
        os.kill(runner.proc.pid, signal.SIGTERM)
        rc = runner.proc.wait(timeout=SAMPLER_STOP_BOUND_S + 30)
        seconds = time.monotonic() - start
        left = _wait_gone(children, 5)
        for c in clients:
            c.join(timeout=30)
    finally:
        runner.cleanup()
    assert rc == 0, runner.text()
    assert seconds < SAMPLER_STOP_BOUND_S, f"{seconds:.1f}s"
    assert not left, f"outlived the runner: {[proctree.cmdline(p) for p in left]}"
    assert len(answers) == 16, answers  # every client got an answer or an error, none hangs
