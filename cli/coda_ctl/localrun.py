"""The I/O half of `coda-ctl local run`: trainer subprocesses, progress display, the sampler server.

Decisions (which stages to run, with which configs, where) come from `localplan`; this module only
carries them out. Each stage is `python -m coda_trainer.train --config <job.yaml>` in the runner's
own process group, so Ctrl-C (or a kill of the group) reaches both; the trainer checkpoints on
SIGINT/SIGTERM and a rerun resumes there.

No child outlives the runner. A SIGTERM or SIGINT sent to the runner alone (`kill`, a CI timeout)
is forwarded as SIGTERM to its live children (trainer, sampler) and then handled like Ctrl-C: the
runner waits for the trainer's checkpoint (at most `TRAINER_STOP_S`) and the sampler's stop (at
most `SAMPLER_STOP_S`), then exits 128 + the signal (0 when it was only serving, `--serve`). A
runner that dies without a word (SIGKILL, a crash) takes them along too: on Linux each child asks
the kernel for a SIGTERM when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coda_trainer import contract
from coda_trainer.contract import EXIT_PERMANENT, EXIT_RETRYABLE

from coda_ctl import localplan, runspec, samplerclient
from coda_ctl.errors import CtlError, Exit
from coda_ctl.localplan import LocalPlan, StagePlan, StageState

# A docstring prompt. A run that ends in SFT is asked in its (docstring → function) question format
# (coda_trainer.corpus.sft_instruction) through /v1/chat/completions; any other run continues the
# raw prompt through /v1/completions.
SAMPLE_SIGNATURE, SAMPLE_DOCSTRING = "def fibonacci(n)", "Return the n-th Fibonacci number."


def raw_prompt(signature: str, docstring: str) -> str:
    """A code prompt to continue: the signature and its docstring, the body left to the model."""
    return f'{signature}:\n    """{docstring}"""\n'


SAMPLE_PROMPT = raw_prompt(SAMPLE_SIGNATURE, SAMPLE_DOCSTRING)
READY_TIMEOUT_S = float(os.environ.get("CODA_SAMPLER_READY_TIMEOUT", "300"))
# Compiled shape buckets of the local sampler: few, so it is ready in seconds on a laptop CPU.
SAMPLE_MAX_TOKENS, EVAL_MAX_TOKENS = 64, 128
# How the printed sample is decoded (request fields of /v1/completions and /v1/chat/completions;
# bench/default_quality.py decodes its prompts with the same settings).
# Greedy, decoded in blocks of 8 left to right (Dream/CoDA block decoding): the tiny default model
# fills a whole 64-token canvas at once with repetitive text, while blocks give it the short
# def-and-return answers its SFT pairs have (bench/default_quality.py compares settings).
SAMPLE_SETTINGS: dict[str, Any] = {
    "max_tokens": SAMPLE_MAX_TOKENS,
    "temperature": 0.0,
    "block_length": 8,
}
POLL_S = 0.5
TRAINER_STOP_S = 120.0  # the trainer finishes its step and saves a checkpoint before it exits
# The local sampler drains in-flight requests for LOCAL_GRACEFUL_S seconds (its --graceful-timeout),
# then exits within about a second; SAMPLER_STOP_S leaves room for that before a SIGKILL.
LOCAL_GRACEFUL_S = 5
SAMPLER_STOP_S = 30.0


def sample_settings() -> dict[str, Any]:
    """The sampling fields of the request that produces the printed sample."""
    return dict(SAMPLE_SETTINGS)


EMPTY_COMPLETION = "(empty completion)"


def shown_completion(text: str) -> str:
    """The model's text as printed: a visible marker when it produced nothing but whitespace."""
    return text if text.strip() else EMPTY_COMPLETION


def print_sample(url: str, *, chat: bool) -> None:
    if chat:
        from coda_trainer.api import sft_instruction

        question = sft_instruction(SAMPLE_SIGNATURE, SAMPLE_DOCSTRING)
        body = {"messages": [{"role": "user", "content": question}], **sample_settings()}
        answer = samplerclient.chat_text(samplerclient.post(url, "/v1/chat/completions", body))
        echo("sample:")
        echo("\n".join(f"  user> {line}" for line in question.splitlines()))
        echo(shown_completion(answer))
        return
    reply = samplerclient.post(
        url, "/v1/completions", {"prompt": SAMPLE_PROMPT, **sample_settings()}
    )
    echo("sample:")
    echo(SAMPLE_PROMPT + shown_completion(samplerclient.completion_text(reply)))


def echo(msg: str = "", err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(msg + "\n")
    stream.flush()


def load_run(file: str | None, workdir: Path) -> dict[str, Any]:
    """The run to execute: the file's single CodaTrainingRun, or the embedded default; the
    standard-library corpus is written under `<workdir>/corpus` when the run refers to it."""
    if file is None:
        run = localplan.default_run()
    else:
        runs = runspec.load_runs(file, cluster=False)
        if len(runs) != 1:
            raise CtlError(
                f"{file}: holds {len(runs)} runs; `local run` takes exactly one", Exit.INVALID
            )
        run = runs[0]
    if localplan.uses_corpus(run):
        from coda_trainer.api import build_default_corpora

        corpus_root = (workdir / "corpus").resolve()
        echo(f"corpus: Python standard library → {corpus_root} (cached)")
        build_default_corpora(workdir.resolve())
        run = localplan.expand_corpus(run, corpus_root)
    return run


def steps_scale_from(flag: float | None) -> float:
    if flag is not None:
        value = flag
    else:
        raw = os.environ.get("CODA_STEPS_SCALE", "1")
        try:
            value = float(raw)
        except ValueError:
            raise CtlError(f"CODA_STEPS_SCALE={raw!r} is not a number", Exit.USAGE) from None
    if not value > 0:
        raise CtlError(f"steps scale must be positive, got {value}", Exit.USAGE)
    return value


# ------------------------------------------------------------------------------------- children


class RunnerStopped(KeyboardInterrupt):
    """The runner got SIGTERM/SIGINT: handled like Ctrl-C; `exit_code` = 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


_children: set[subprocess.Popen[bytes]] = set()  # live trainer / sampler processes
_prctl: Any = None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when the runner dies, however it dies (Linux)."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child

    def preexec() -> None:
        if _prctl is not None:
            _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the runner died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def spawn(
    cmd: list[str], popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start a child the runner answers for (see the module docstring)."""
    proc = popen(cmd, preexec_fn=_die_with_parent(os.getpid()), **kwargs)
    _children.add(proc)
    return proc


def _forward_stop(signum: int, frame: Any) -> None:
    for proc in list(_children):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    raise RunnerStopped(signum)


@contextlib.contextmanager
def forwarding_stop_signals() -> Any:
    """While running: SIGTERM/SIGINT reach the children and raise RunnerStopped here."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _forward_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------- progress


COMPILING_NOTE = "compiling the train step … (the first step; tens of seconds on a CPU)"


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(stage: StagePlan, p: localplan.Progress) -> float | None:
    """Time left in the stage at the trainer's last measured throughput (None before it has one)."""
    if not p.tokens_per_second or p.step >= (p.total or stage.total_steps):
        return None
    batch = stage.job.stage.batch
    left = (p.total or stage.total_steps) - p.step
    return left * batch.sequences * batch.seq_len / p.tokens_per_second


def step_info(stage: StagePlan, p: localplan.Progress) -> str:
    """The known parts of "loss 2.5000 · 1,000 tok/s · ETA 1m05s"."""
    parts = []
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.tokens_per_second:
        parts.append(f"{p.tokens_per_second:,.0f} tok/s")
    eta = eta_seconds(stage, p)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return " · ".join(parts)


def stage_summary(stage: StagePlan, p: localplan.Progress, elapsed: float) -> str:
    """The line a finished stage leaves behind: its final loss and speed, and where it went."""
    parts = [f"done in {duration(elapsed)}: {p.step or stage.total_steps} steps"]
    if p.loss is not None:
        parts.append(f"final loss {p.loss:.4f}")
    if p.tokens_per_second:
        parts.append(f"{p.tokens_per_second:,.0f} tok/s")
    if p.compile_seconds is not None:
        parts.append(f"compile {duration(p.compile_seconds)}")
    return ", ".join(parts) + f" → {stage.final_dir}"


class PlainProgress:
    """Non-TTY progress: a line when the trainer starts compiling, when it has compiled, and
    whenever it reports a new step; notes (start, summary) as they come."""

    def __init__(self, plan: LocalPlan) -> None:
        self._last: dict[str, int] = {}
        self._said: set[tuple[str, str]] = set()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _once(self, stage: StagePlan, key: str, text: str) -> None:
        if (stage.name, key) not in self._said:
            self._said.add((stage.name, key))
            echo(f"[{stage.name}] {text}")

    def update(self, stage: StagePlan, p: localplan.Progress, note: str = "") -> None:
        if note:
            echo(f"[{stage.name}] {note}")
            return
        if p.compiling:
            self._once(stage, "compiling", COMPILING_NOTE)
        if p.compile_seconds is not None:
            self._once(stage, "compiled", f"train step compiled in {duration(p.compile_seconds)}")
        if p.step and p.step != self._last.get(stage.name):
            self._last[stage.name] = p.step
            info = step_info(stage, p)
            echo(f"[{stage.name}] step {p.step}/{p.total}" + (f" {info}" if info else ""))


class RichProgress:
    """TTY progress: one bar per stage (compiling, loss, tok/s, ETA); notes and each finished
    stage's summary are printed above the bars, so they stay on screen."""

    def __init__(self, plan: LocalPlan) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bars = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        self._tasks = {
            s.name: self._bars.add_task(s.name, total=s.total_steps, info="", start=False)
            for s in plan.stages
        }

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.__exit__(None, None, None)

    def update(self, stage: StagePlan, p: localplan.Progress, note: str = "") -> None:
        task = self._tasks[stage.name]
        self._bars.start_task(task)
        if note:
            self._bars.console.print(f"[{stage.name}] {note}", markup=False, highlight=False)
        finished = note.startswith(("done", "skipped"))
        if finished:
            info = step_info(stage, dataclasses.replace(p, tokens_per_second=None)) or "done"
        elif p.compiling:
            info = "compiling the train step …"
        else:
            info = step_info(stage, p) or note
        completed = stage.total_steps if finished else p.step
        self._bars.update(task, completed=completed, total=p.total or stage.total_steps, info=info)


# ------------------------------------------------------------------------------------- stages


def trainer_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "coda_trainer.train", "--config", str(config_path)]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def run_stage(
    stage: StagePlan,
    progress: Any,
    popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
) -> None:
    """Run one stage's trainer to completion; raises CtlError with the log's tail on failure."""
    stage.config_path.parent.mkdir(parents=True, exist_ok=True)
    stage.config_path.write_text(localplan.job_yaml(stage))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with stage.log_path.open("ab") as log:
        log.write(
            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(trainer_command(stage.config_path))}\n".encode()
        )
        log.flush()
        proc = spawn(
            trainer_command(stage.config_path), popen, stdout=log, stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        try:
            while proc.poll() is None:
                progress.update(stage, localplan.read_progress(stage))
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            # Ctrl-C reached the trainer too (same process group), a signal to the runner alone
            # was forwarded; SIGTERM again in case neither happened. Let it save its checkpoint.
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            progress.update(
                stage, localplan.read_progress(stage), note="interrupted: saving a checkpoint"
            )
            try:
                proc.wait(timeout=TRAINER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            _children.discard(proc)
    code = proc.returncode
    progress.update(stage, localplan.read_progress(stage))
    if code == 0 and stage.final_dir.is_dir():
        return
    where = f"log: {stage.log_path}\n{_tail(stage.log_path)}"
    if code == 0:
        raise CtlError(
            f"stage {stage.name}: trainer exited 0 but {stage.final_dir} is missing\n{where}"
        )
    if code == EXIT_RETRYABLE:
        raise CtlError(
            f"stage {stage.name}: interrupted after a checkpoint (exit 75); rerun to resume\n{where}"
        )
    if code == EXIT_PERMANENT:
        raise CtlError(
            f"stage {stage.name}: invalid configuration or data (exit 78)\n{where}", Exit.INVALID
        )
    raise CtlError(f"stage {stage.name}: trainer failed with exit code {code}\n{where}")


def train_all(plan: LocalPlan, tty: bool) -> None:
    progress_cls = RichProgress if tty else PlainProgress
    with progress_cls(plan) as progress:
        for stage in plan.stages:
            state = localplan.stage_state(stage)
            if state is StageState.DONE:
                progress.update(
                    stage,
                    localplan.Progress(step=stage.total_steps, total=stage.total_steps),
                    note=f"skipped: {stage.final_dir} exists",
                )
                continue
            verb = (
                "resuming from its newest checkpoint" if state is StageState.RESUME else "starting"
            )
            init = stage.job.stage.init_from or stage.job.model.init_from
            progress.update(
                stage,
                localplan.read_progress(stage),
                note=f"{verb} ({stage.total_steps} steps{', init from ' + init if init else ''})",
            )
            t0 = time.monotonic()
            run_stage(stage, progress)
            done = localplan.read_progress(stage)
            progress.update(stage, done, note=stage_summary(stage, done, time.monotonic() - t0))


def tensorboard_line(plan: LocalPlan) -> str:
    """Where the stages' TensorBoard event files (beside metrics.jsonl) are, and how to look."""
    where = (
        f"{plan.root}/<stage>/{contract.METRICS_DIR}/"
        if len(plan.stages) > 1
        else f"{plan.stages[0].stage_dir / contract.METRICS_DIR}/"
    )
    return f"TensorBoard event files: {where}  (tensorboard --logdir {plan.root})"


# ------------------------------------------------------------------------------------- sampler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(checkpoint: Path, port: int, *, for_eval: bool = False) -> list[str]:
    """The sampler on loopback with a handful of compiled shapes (every bucket costs a compile at
    start-up; the server's defaults suit a TPU, not a laptop)."""
    prompt_buckets = "128,512,1024" if for_eval else "128"
    gen = EVAL_MAX_TOKENS if for_eval else SAMPLE_MAX_TOKENS
    return [
        sys.executable,
        "-m",
        "coda_trainer.serve",
        "--checkpoint",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prompt-buckets",
        prompt_buckets,
        "--gen-buckets",
        str(gen),
        "--max-batch",
        "1",
        "--default-max-tokens",
        str(gen),
        "--graceful-timeout",
        str(LOCAL_GRACEFUL_S),
    ]


def start_sampler(
    plan: LocalPlan, port: int, *, for_eval: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    log_path = plan.root / localplan.META_DIR / "sampler.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)  # absent when every stage was already done
    log = log_path.open("ab")
    proc = spawn(
        serve_command(plan.final, port, for_eval=for_eval),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        samplerclient.wait_ready(url, READY_TIMEOUT_S, is_alive=lambda: proc.poll() is None)
    except BaseException as e:
        stop(proc)
        if isinstance(e, CtlError):
            raise CtlError(f"{e.message}\nlog: {log_path}\n{_tail(log_path)}") from None
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SAMPLER_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _children.discard(proc)


# ---------------------------------------------------------------------------------- the evaluation

# The CoDA paper's Table 4, CoDA-1.7B-Instruct (pass@1, %): for scale only, a 1.7B model trained
# on ~200B tokens. MBPP+ has no vendored data here, so it has no measured column.
PAPER_PASS_AT1 = {"humaneval": 54.3, "humaneval-plus": 47.6, "mbpp": 47.2, "mbpp-plus": 63.2}
EVAL_TIMEOUT_S = float(os.environ.get("CODA_LOCAL_EVAL_TIMEOUT", "1800"))


def evaluate_all(plan: LocalPlan) -> list[str]:
    """spec.evaluation on this machine: the evaluation Job's command per evaluated stage, the
    table with the paper's numbers beside it; returns the gate's misses (last evaluated stage)."""
    import json

    from coda_operator.planner import gate_misses

    scores: dict[str, float] = {}
    for stage, command in plan.evaluations:
        log_path = plan.root / localplan.META_DIR / f"eval-{stage}.log"
        # A rerun does not evaluate again what this very command already scored (the operator
        # evaluates each stage once too): the reports are read back.
        done_path = plan.root / localplan.META_DIR / f"eval-{stage}.done.json"
        report_dir = Path(command[command.index("--report-dir") + 1])
        benchmarks = [command[k + 1] for k, arg in enumerate(command) if arg == "--benchmark"]
        if _evaluated(done_path, command, report_dir, benchmarks):
            echo(f"evaluation of {stage} is up to date (reports in {report_dir})")
        else:
            _evaluate(stage, command, log_path)
            done_path.write_text(json.dumps(_evaluation_record(command)))
        reports = {b: json.loads((report_dir / f"{b}.json").read_text()) for b in benchmarks}
        scores = {b: r["pass_at_k"]["pass@1"] for b, r in reports.items()}
        echo(eval_table(stage, reports))
    return gate_misses(dict(plan.min_pass_at1), scores) if plan.min_pass_at1 else []


def _evaluation_record(command: Sequence[str]) -> dict[str, Any]:
    """What an evaluation's result depends on: its command and when the checkpoint was written
    (a stage trained again after its final was deleted is evaluated again)."""
    record: dict[str, Any] = {"command": list(command), "checkpoint_mtime_ns": None}
    if "--checkpoint" in command:
        checkpoint = Path(command[command.index("--checkpoint") + 1])
        with contextlib.suppress(OSError):
            record["checkpoint_mtime_ns"] = checkpoint.stat().st_mtime_ns
    return record


def _evaluated(
    done_path: Path, command: Sequence[str], report_dir: Path, benchmarks: list[str]
) -> bool:
    import json

    try:
        same = json.loads(done_path.read_text()) == _evaluation_record(command)
    except (OSError, ValueError):
        return False
    return same and all((report_dir / f"{b}.json").is_file() for b in benchmarks)


def _evaluate(stage: str, command: Sequence[str], log_path: Path) -> None:
    echo(f"evaluating {stage} ({' '.join(command[4:])})  log: {log_path}")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *command[1:]], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=EVAL_TIMEOUT_S)
        finally:
            stop(proc)
    if rc != 0:
        raise CtlError(f"evaluation of {stage} failed (exit {rc})\n{_tail(log_path)}")


def eval_table(stage: str, reports: dict[str, dict[str, Any]]) -> str:
    """pass@1 of this run beside the paper's CoDA-1.7B-Instruct, one row per benchmark."""
    header = (
        "benchmark",
        f"{stage} pass@1",
        "problems",
        "failed gen",
        "paper (CoDA-1.7B-Instruct)",
    )
    rows = []
    for bench in [*reports, *(b for b in PAPER_PASS_AT1 if b not in reports)]:
        r = reports.get(bench)
        gen_failed = (r or {}).get("status_counts", {}).get("generation_error", 0)
        rows.append((
            bench,
            f"{100 * r['pass_at_k']['pass@1']:.1f}" if r else "-",
            str(r["n_problems"]) if r else "-",
            str(gen_failed) if r else "-",
            f"{PAPER_PASS_AT1[bench]:.1f}" if bench in PAPER_PASS_AT1 else "-",
        ))  # fmt: skip
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in [header, *rows]]  # fmt: skip
    note = ("paper: CoDA-1.7B-Instruct, Table 4 (a 1.7B model trained on ~200B tokens); "
            "for scale, not a target for this run")  # fmt: skip
    return "\n".join([*lines, note])


# ------------------------------------------------------------------------------------- the command


def run(
    file: str | None,
    *,
    workdir: Path,
    steps_scale: float | None,
    do_eval: bool,
    eval_limit: int,
    serve: bool,
    port: int,
    sample: bool,
    tty: bool,
) -> int:
    with forwarding_stop_signals():
        return _run(
            file, workdir=workdir, steps_scale=steps_scale, do_eval=do_eval, eval_limit=eval_limit,
            serve=serve, port=port, sample=sample, tty=tty,
        )  # fmt: skip


def _run(
    file: str | None,
    *,
    workdir: Path,
    steps_scale: float | None,
    do_eval: bool,
    eval_limit: int,
    serve: bool,
    port: int,
    sample: bool,
    tty: bool,
) -> int:
    scale = steps_scale_from(steps_scale)
    doc = load_run(file, workdir)
    try:
        plan = localplan.plan_local_run(doc, workdir, steps_scale=scale)
    except ValueError as e:
        raise CtlError(f"invalid run: {e}", Exit.INVALID) from e
    missing = localplan.input_problems(plan)
    if missing:  # before any stage trains: a bad path in the last stage must not cost the others
        raise CtlError(
            "invalid run: inputs missing on this machine (no stage was started)\n"
            + "\n".join(f"  {line}" for line in missing),
            Exit.INVALID,
        )
    echo(
        f"run {plan.run}: {len(plan.stages)} stage(s) → {plan.root}"
        + (f" (steps x{scale:g})" if scale != 1 else "")
    )
    train_all(plan, tty)
    echo(f"final checkpoint: {plan.final}")
    echo(tensorboard_line(plan))
    if plan.evaluations:
        misses = evaluate_all(plan)
        if misses:
            echo(f"quality gate failed: {'; '.join(misses)}; not serving")
            return int(Exit.ERROR)
    if not sample:
        return 0
    proc, url = start_sampler(plan, port, for_eval=do_eval)
    try:
        echo(f"sampler ready at {url}  (OpenAI-compatible: {url}/v1/completions, {url}/v1/infill)")
        print_sample(url, chat=plan.stages[-1].job.stage.kind == "sft")
        if do_eval:
            from coda_ctl import evalbridge

            out = plan.root / localplan.META_DIR / "eval-humaneval.json"
            echo(f"HumanEval pass@1 on the first {eval_limit} problems (report: {out}):")
            evalbridge.run_eval(
                "humaneval",
                url=url,
                checkpoint=None,
                limit=eval_limit,
                out=str(out),
                max_new_tokens=EVAL_MAX_TOKENS,
            )
        if serve:
            echo(f"serving at {url}; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                proc.wait()
    finally:
        stop(proc)
    return 0
