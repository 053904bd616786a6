"""`coda-ctl local run` end to end with the real trainer and sampler, as subprocesses:

1. the 4-stage run is killed (runner + trainer, the whole process group, SIGKILL) in the middle of
   stage 3 (midtrain);
2. the rerun skips stages 1–2 (their finals exist), resumes stage 3 from its newest checkpoint,
   runs stage 4, starts the sampler on loopback and keeps it serving (`--serve`);
3. the test itself sends completion and infill requests, then Ctrl-C stops runner and server.

The run is the embedded default (`make run`: coda-tiny on the standard-library corpus) with every
stage's steps scaled down by CODA_STEPS_SCALE, as in CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow


def _ctl(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("coda-ctl")), *args]


def _wait_for(pred: Any, timeout: float, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"runner exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_resume_serve(
    run_args: list[str],
    workdir: Path,
    name: str,
    stages: list[str],
    kill_stage: str,
    env: dict[str, str],
) -> None:
    """The scenario of this module's docstring for `coda-ctl local run <run_args>`."""
    root = workdir / name
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **env}
    before = stages[: stages.index(kill_stage)]

    # ---- 1. first attempt, killed with its trainer in the middle of `kill_stage`
    log1 = workdir.parent / f"{name}-first.log"
    log1.parent.mkdir(parents=True, exist_ok=True)
    with log1.open("wb") as out:  # a file, not a pipe: nobody reads while it trains
        first = subprocess.Popen(
            _ctl("local", "run", *run_args, "--workdir", str(workdir), "--no-sample"),
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    stage_dir = root / kill_stage
    try:
        _wait_for(lambda: stage_dir.is_dir() and any(p.name.isdigit() for p in stage_dir.iterdir()),
                  480, first, f"a {kill_stage} checkpoint")  # fmt: skip
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
    out1 = log1.read_text(errors="replace")
    assert all((root / s / "final").is_dir() for s in before), out1
    assert not (stage_dir / "final").exists(), (
        f"{kill_stage} finished before the kill: the test proves nothing"
    )
    saved = sorted(int(p.name) for p in stage_dir.iterdir() if p.name.isdigit())
    assert saved, out1

    # ---- 2. rerun: skip, resume, finish, serve
    port = _free_port()
    log2 = workdir.parent / f"{name}-second.log"
    with log2.open("wb") as out:
        second = subprocess.Popen(
            _ctl("local", "run", *run_args, "--workdir", str(workdir), "--serve",
                 "--port", str(port)),
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_output(second, log2, f"serving at http://127.0.0.1:{port}", timeout=420)
        text = log2.read_text(errors="replace")
        for s in before:
            assert f"[{s}] skipped" in text, text
        assert f"[{kill_stage}] resuming from its newest checkpoint" in text, text
        assert "sample:" in text, text
        log = (root / ".coda" / f"{kill_stage}.log").read_text()
        assert any(f"from step {s}" in log for s in saved), log[-2000:]
        assert (root / "sft" / "final").is_dir()

        # ---- 3. the sampler answers this test's own requests
        base = f"http://127.0.0.1:{port}"
        r = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": "def add(a, b):\n", "max_tokens": 16},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["text"], str)
        r = httpx.post(
            f"{base}/v1/infill",
            json={"prefix": "x = ", "suffix": "\n", "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"].startswith("x = ") and choice["text"].endswith("\n")
        # Ctrl-C: the runner stops the sampler and exits cleanly.
        os.killpg(second.pid, signal.SIGINT)
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)

    # ---- 4. a third run has nothing left to train
    third = subprocess.run(_ctl("local", "run", *run_args, "--workdir", str(workdir), "--no-sample"),
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count("skipped") == len(stages)


def test_local_run_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "coda.dev/v1alpha1",
                "kind": "CodaTrainingRun",
                "metadata": {"name": "x"},
                "spec": {"image": "i", "stages": []},
            }
        )
    )
    res = subprocess.run(
        _ctl("local", "run", str(bad), "--workdir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 4 and "invalid CodaTrainingRun" in res.stderr
    res = subprocess.run(
        _ctl("local", "run", str(tmp_path / "none.yaml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3 and "no such file" in res.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_output(proc: subprocess.Popen[bytes], log: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"never saw {needle!r}; output:\n{log.read_text(errors='replace')}")


def test_embedded_default_killed_in_midtrain_resumes_and_serves(tmp_path: Path) -> None:
    """The README's main job (`make run`, no file) with every stage's steps scaled down."""
    kill_resume_serve(
        [], tmp_path / "runs", "embedded-default", ["base", "pretrain", "midtrain", "sft"],
        "midtrain", {"CODA_STEPS_SCALE": "0.08"},
    )  # fmt: skip
