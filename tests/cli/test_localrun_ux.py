"""What `coda-ctl local run` tells its user while it works (issue 14): that a stage is compiling
and for how long, tokens/s and an ETA, a summary line per finished stage, a visible marker for an
empty sample, where the TensorBoard files are, and missing inputs of any stage before stage 1 trains.

No JAX: real child processes stand in for the trainer (they write the trainer's status.json), a
real HTTP server for the sampler, and the CLI itself runs as a subprocess for the exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from coda_ctl import localplan, localrun
from coda_ctl.errors import Exit

# ------------------------------------------------------------------------------ progress text


def test_plain_progress_says_compiling_then_rate_eta_and_leaves_a_summary(
    tmp_path: Path,
    make_local_run: Callable[..., dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = localplan.plan_local_run(make_local_run([{"name": "pretrain"}]), tmp_path / "w")
    (stage,) = plan.stages
    plain = localrun.PlainProgress(plan)
    P = localplan.Progress
    plain.update(stage, P(total=10), note="starting (10 steps)")
    plain.update(stage, P(total=10))  # no status yet: nothing to say
    plain.update(stage, P(total=10, compiling=True))
    plain.update(stage, P(total=10, compiling=True))  # said once
    plain.update(stage, P(step=1, total=10, compile_seconds=41.6))
    plain.update(stage, P(step=5, total=10, loss=2.5, tokens_per_second=32.0, compile_seconds=41.6))
    plain.update(stage, P(step=5, total=10, loss=2.5, tokens_per_second=32.0))  # same step
    done = P(step=10, total=10, loss=2.25, tokens_per_second=40.0, compile_seconds=41.6)
    plain.update(stage, done)
    plain.update(stage, done, note=localrun.stage_summary(stage, done, 75.2))
    final = tmp_path / "w" / "ux" / "pretrain" / "final"
    assert capsys.readouterr().out.splitlines() == [
        "[pretrain] starting (10 steps)",
        "[pretrain] compiling the train step … (the first step; tens of seconds on a CPU)",
        "[pretrain] train step compiled in 42s",
        "[pretrain] step 1/10",
        # 5 steps × 64 tokens left at 32 tok/s
        "[pretrain] step 5/10 loss 2.5000 · 32 tok/s · ETA 10s",
        "[pretrain] step 10/10 loss 2.2500 · 40 tok/s",
        f"[pretrain] done in 1m15s: 10 steps, final loss 2.2500, 40 tok/s, compile 42s → {final}",
    ]


def test_rich_progress_keeps_notes_and_summaries_on_screen(
    tmp_path: Path,
    make_local_run: Callable[..., dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = make_local_run([{"name": "pretrain"}, {"name": "sft", "kind": "sft"}])
    plan = localplan.plan_local_run(run, tmp_path / "w")
    first, second = plan.stages
    P = localplan.Progress
    with localrun.RichProgress(plan) as bars:
        bars.update(first, P(total=10), note="starting (10 steps)")
        bars.update(first, P(total=10, compiling=True))
        bars.update(first, P(step=5, total=10, loss=2.5, tokens_per_second=32.0))
        done = P(step=10, total=10, loss=2.25, tokens_per_second=40.0, compile_seconds=3.0)
        bars.update(first, done, note=localrun.stage_summary(first, done, 9.0))
        bars.update(second, P(total=10), note="starting (10 steps)")
    out = capsys.readouterr().out
    # the first stage's final loss is still there after the second started
    assert "[pretrain] done in 9s: 10 steps, final loss 2.2500, 40 tok/s, compile 3s" in out
    assert "[sft] starting (10 steps)" in out


def test_eta_and_durations(tmp_path: Path, make_local_run: Callable[..., dict[str, Any]]) -> None:
    plan = localplan.plan_local_run(make_local_run([{"name": "pretrain"}]), tmp_path / "w")
    (stage,) = plan.stages
    P = localplan.Progress
    assert localrun.eta_seconds(stage, P(step=2, total=10, tokens_per_second=64.0)) == 8.0
    assert localrun.eta_seconds(stage, P(step=2, total=10)) is None  # no rate yet
    assert localrun.eta_seconds(stage, P(step=10, total=10, tokens_per_second=64.0)) is None
    assert [localrun.duration(s) for s in (0.4, 59.6, 61, 3599, 3725)] == [
        "0s", "1m00s", "1m01s", "59m59s", "1h02m",
    ]  # fmt: skip


def test_trainer_status_fields_reach_the_progress() -> None:
    compiling = localplan.parse_status(
        {"state": "running", "step": 0, "total_steps": 10, "compiling": True}, 10
    )
    assert compiling.compiling and compiling.compile_seconds is None
    compiled = localplan.parse_status({"step": 3, "compiling": False, "compile_seconds": 12.5}, 10)
    assert not compiled.compiling and compiled.compile_seconds == 12.5 and compiled.total == 10


def test_a_stage_run_reports_the_trainers_compile_phase(
    tmp_path: Path,
    make_local_run: Callable[..., dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real child writes status.json as the trainer does: compiling, then steps."""
    monkeypatch.setattr(localrun, "POLL_S", 0.05)
    plan = localplan.plan_local_run(make_local_run([{"name": "pretrain"}]), tmp_path / "w")
    (stage,) = plan.stages
    script = (
        "import json, pathlib, time\n"
        f"d = pathlib.Path({str(stage.stage_dir)!r}); d.mkdir(parents=True, exist_ok=True)\n"
        "def status(**kw):\n"
        "    (d / 'tmp').write_text(json.dumps({'total_steps': 10, **kw}))\n"
        "    (d / 'tmp').rename(d / 'status.json')\n"
        "status(state='running', step=0, compiling=True); time.sleep(0.6)\n"
        "status(state='running', step=1, compiling=False, compile_seconds=0.6); time.sleep(0.3)\n"
        "status(state='done', step=10, loss=1.5, compiling=False, compile_seconds=0.6,\n"
        "       tokens_per_second=640.0)\n"
        "(d / 'final').mkdir()\n"
    )

    def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", script], **kwargs)

    localrun.run_stage(stage, localrun.PlainProgress(plan), popen=popen)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[pretrain] {localrun.COMPILING_NOTE}"
    assert "[pretrain] train step compiled in 1s" in lines
    assert lines[-1] == "[pretrain] step 10/10 loss 1.5000 · 640 tok/s"


# ------------------------------------------------------------------------------ sample, TensorBoard


class _Sampler(BaseHTTPRequestHandler):
    """A sampler that answers every completion with nothing but whitespace."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/chat/completions":
            body = {"choices": [{"message": {"role": "assistant", "content": " \n"}}]}
        else:
            body = {"choices": [{"text": ""}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("chat", [False, True])
def test_an_empty_sample_is_shown_as_such(chat: bool, capsys: pytest.CaptureFixture[str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sampler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        localrun.print_sample(f"http://127.0.0.1:{server.server_address[1]}", chat=chat)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    out = capsys.readouterr().out
    assert out.startswith("sample:\n") and out.rstrip("\n").endswith("(empty completion)")
    assert localrun.shown_completion("    return 1\n") == "    return 1\n"


def test_tensorboard_files_are_named(
    tmp_path: Path, make_local_run: Callable[..., dict[str, Any]]
) -> None:
    one = localplan.plan_local_run(make_local_run([{"name": "pretrain"}]), tmp_path / "w")
    root = tmp_path / "w" / "ux"
    assert localrun.tensorboard_line(one) == (
        f"TensorBoard event files: {root}/pretrain/metrics/  (tensorboard --logdir {root})"
    )
    two = localplan.plan_local_run(
        make_local_run([{"name": "pretrain"}, {"name": "sft", "kind": "sft"}]), tmp_path / "w"
    )
    assert localrun.tensorboard_line(two).startswith(
        f"TensorBoard event files: {root}/<stage>/metrics/"
    )
    assert all(s.job.metrics_dir == str(s.stage_dir / "metrics") for s in two.stages)


# ------------------------------------------------------------------------------ inputs up front


def test_missing_inputs_of_every_stage_are_listed_before_training(
    tmp_path: Path, make_local_run: Callable[..., dict[str, Any]]
) -> None:
    run = make_local_run(
        [
            {"name": "base"},
            {"name": "pretrain"},  # starts from base's final, which does not exist yet: fine
            {"name": "midtrain", "initFrom": str(tmp_path / "no-such-model")},
            {"name": "sft", "kind": "sft", "data": [{"uri": str(tmp_path / "sft-typo/*.jsonl")}],
             "eval": {"data": [{"uri": str(tmp_path / "held-out.jsonl")}]}},
        ],
    )  # fmt: skip
    plan = localplan.plan_local_run(run, tmp_path / "w")
    assert localplan.input_problems(plan) == [
        f"stage midtrain (3/4): spec.stages[2].initFrom '{tmp_path}/no-such-model' does not exist",
        f"stage sft (4/4): spec.stages[3].data[0].uri '{tmp_path}/sft-typo/*.jsonl': matches no files",
        f"stage sft (4/4): spec.stages[3].eval.data[0].uri '{tmp_path}/held-out.jsonl': matches no files",
    ]
    # a stage that is already done is skipped by the run, so its inputs no longer matter
    (plan.stages[3].final_dir).mkdir(parents=True)
    assert len(localplan.input_problems(plan)) == 1
    good = localplan.plan_local_run(make_local_run([{"name": "a"}, {"name": "b"}]), tmp_path / "w")
    assert localplan.input_problems(good) == []


def test_model_init_from_is_checked_for_the_first_stage(
    tmp_path: Path, make_local_run: Callable[..., dict[str, Any]]
) -> None:
    run = make_local_run([{"name": "a"}, {"name": "b"}])
    run["spec"]["model"]["initFrom"] = str(tmp_path / "hf-folder")
    plan = localplan.plan_local_run(run, tmp_path / "w")
    assert localplan.input_problems(plan) == [
        f"stage a (1/2): spec.model.initFrom '{tmp_path}/hf-folder' does not exist"
    ]
    (tmp_path / "hf-folder").mkdir()
    assert localplan.input_problems(plan) == []


def test_cli_fails_in_seconds_on_a_bad_path_in_the_last_stage(
    tmp_path: Path, make_local_run: Callable[..., dict[str, Any]]
) -> None:
    run = make_local_run(
        [{"name": "base"}, {"name": "pretrain"}, {"name": "midtrain"},
         {"name": "sft", "kind": "sft", "data": [{"uri": str(tmp_path / "typo.jsonl")}]}],
    )  # fmt: skip
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(run))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    ctl = str(Path(sys.executable).with_name("coda-ctl"))
    t0 = time.monotonic()
    with out.open("wb") as o, err.open("wb") as e:
        code = subprocess.run(
            [ctl, "local", "run", str(spec), "--workdir", str(tmp_path / "w"), "--no-sample"],
            stdout=o, stderr=e, timeout=60,
        ).returncode  # fmt: skip
    elapsed = time.monotonic() - t0
    stderr = err.read_text()
    assert code == Exit.INVALID == 4, stderr
    assert f"stage sft (4/4): spec.stages[3].data[0].uri '{tmp_path}/typo.jsonl'" in stderr
    assert "no stage was started" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "w" / "ux" / "base").exists()  # stage 1 never trained
    assert elapsed < 30, elapsed
