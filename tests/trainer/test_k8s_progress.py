"""The trainer's status.progress reporter against a loopback HTTP server (no JAX, fast)."""

from __future__ import annotations

import http.server
import json
import logging
import sys
import threading
import time

import pytest
from coda_trainer.k8s_progress import BackgroundProgress, ProgressReporter

POD_ENV = {
    "CODA_PROGRESS": "status",
    "CODA_RUN_NAME": "demo",
    "CODA_RUN_NAMESPACE": "ml",
    "CODA_STAGE": "midtrain",
}


class Recorder:
    """Records PATCHes; answers `status` (and sleeps `delay` seconds first)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status, self.delay = 200, 0.0
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(recorder.delay)
                recorder.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "progress": json.loads(body)["status"]["progress"],
                    }
                )
                self.send_response(recorder.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def test_from_env_is_none_outside_the_operator():
    assert ProgressReporter.from_env({}) is None
    assert ProgressReporter.from_env({**POD_ENV, "CODA_PROGRESS": "off"}) is None
    # the operator's env but no API server to reach (no in-cluster ServiceAccount here)
    assert ProgressReporter.from_env({**POD_ENV, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None


def test_from_env_with_an_explicit_server(recorder):
    env = {**POD_ENV, "CODA_PROGRESS_SERVER": recorder.url, "CODA_PROGRESS_INTERVAL": "7"}
    rep = ProgressReporter.from_env(env)
    assert rep is not None and (rep.run, rep.namespace, rep.stage) == ("demo", "ml", "midtrain")
    assert rep.min_interval == 7.0
    assert rep.report(step=3, total_steps=10, loss=1.25, tokens_per_second=99.96)
    (req,) = recorder.requests
    assert req["path"] == "/apis/coda.dev/v1alpha1/namespaces/ml/codatrainingruns/demo/status"
    assert req["auth"] is None  # an explicit server (kubectl proxy) gets no credentials
    p = req["progress"]
    assert (p["stage"], p["step"], p["totalSteps"], p["loss"], p["tokensPerSecond"]) == (
        "midtrain",
        3,
        10,
        1.25,
        100.0,
    )
    assert p["updateTime"].endswith("Z")


def test_token_file_is_read_per_request(recorder, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    rep = ProgressReporter(
        "demo", "ml", "sft", server=recorder.url, token_file=str(token), min_interval=0
    )
    assert rep.report(step=1)
    token.write_text("rotated")  # the kubelet rotates projected tokens
    assert rep.report(step=2)
    assert [r["auth"] for r in recorder.requests] == ["Bearer first", "Bearer rotated"]


def test_rate_limit_failures_and_a_single_warning(recorder, caplog):
    recorder.status = 403
    rep = ProgressReporter("demo", "ml", "sft", server=recorder.url, min_interval=3600)
    with caplog.at_level(logging.WARNING, logger="coda_trainer.k8s_progress"):
        assert rep.report(step=1) is False  # refused: never raises
        assert rep.report(step=2) is False  # a failed attempt waits out the interval too
        assert len(recorder.requests) == 1
        assert rep.report(step=3, force=True) is False  # forced: tried, still refused
    assert len(recorder.requests) == 2
    assert sum("could not report progress" in r.getMessage() for r in caplog.records) == 1
    recorder.status = 200
    assert rep.report(step=4, checkpoint="gs://b/run/sft/4", force=True)
    assert not rep.report(step=5)  # rate-limited after a success


def test_background_never_blocks_and_keeps_the_checkpoint(recorder):
    recorder.delay = 0.3  # a slow API server
    rep = ProgressReporter("demo", "ml", "pretrain", server=recorder.url, min_interval=0)
    bg = BackgroundProgress(rep)
    try:
        t0 = time.perf_counter()
        bg.submit(step=1, loss=3.0)
        time.sleep(0.05)  # the worker is now sending step 1
        bg.submit(step=2, checkpoint="/ckpt/pretrain/2", force=True)
        bg.submit(step=3, loss=2.0)  # replaces the pending step 2, keeping its checkpoint
        assert time.perf_counter() - t0 < 0.2  # submit never waits for the network
        assert bg.flush(timeout=5)
    finally:
        bg.close()
    got = [r["progress"] for r in recorder.requests]
    assert [p["step"] for p in got] == [1, 3]
    assert got[1]["checkpoint"] == "/ckpt/pretrain/2" and got[1]["loss"] == 2.0
    bg.submit(step=4)  # after close: ignored, no error
    assert len(recorder.requests) == 2


def test_background_swallows_reporter_bugs(caplog):
    class Broken(ProgressReporter):
        def report(self, **kwargs):
            raise RuntimeError("boom")

    bg = BackgroundProgress(Broken("demo", "ml", "sft", server="http://127.0.0.1:9"))
    with caplog.at_level(logging.WARNING, logger="coda_trainer.k8s_progress"):
        bg.submit(step=1, force=True)
        assert bg.flush(timeout=5)
        bg.close()
    assert "boom" in caplog.text


def test_the_module_imports_no_jax_or_kopf():
    import subprocess

    code = (
        "import sys, coda_trainer.k8s_progress; "
        "bad = sorted(m for m in ('jax', 'flax', 'numpy', 'kopf') if m in sys.modules); "
        "assert not bad, bad"
    )
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{repo / 'trainer'}:{repo / 'operator'}", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
