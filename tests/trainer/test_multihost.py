"""Multi-host training for real: several trainer processes on this machine, one JAX job.

Each process of a 2-host job runs the container command the operator renders into its JobSet (the
shell step that exports `JAX_PROCESS_ID`, then `python -m coda_trainer.train`) with the pod
environment resolved from the rendered env (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`CODA_SLICE_ID`, `CODA_NUM_SLICES`, `CODA_HOST_ID`, `CODA_HOSTS_PER_SLICE`; the coordinator on a
loopback port) and 2 CPU devices (`--xla_force_host_platform_device_count=2`); `jax.distributed`
connects them over loopback and their collectives run over gloo. What is checked:

- 2 processes × 2 devices train the same losses and final weights as 1 process × 4 devices, with
  the same mesh (fsdp 4) and the same global batch (`batch.readers: 2`);
- each process opens its own files (the data pipeline's log) and checkpoints its own readers'
  positions, which side by side are the one-process run's;
- process 0 alone writes metrics, status and the final export (each once);
- SIGTERM to one process: every process saves the same step (on gs://, the emulator) and exits 75;
  the rerun resumes there and ends bit-identical to an uninterrupted run;
- kill -9 of one process: the other exits non-zero within a bound (the runtime's heartbeat
  timeout) instead of hanging in a collective; the rerun resumes from the newest complete
  checkpoint and ends bit-identical to an uninterrupted run.

Every process writes its output to files, every wait is bounded, and every process is killed (its
whole process group) when a test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from coda_operator import api, render
from coda_trainer import contract, distributed, storage
from coda_trainer.checkpoint import Checkpointer
from coda_trainer.config import DataSource
from coda_trainer.contract import EXIT_OK, EXIT_RETRYABLE
from coda_trainer.corpus import build_default_corpora
from coda_trainer.data import ReaderGroup, make_loader
from coda_trainer.tokenizer import load_tokenizer
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16
)
STEPS = 12
# Orbax, the data pipeline and the CPU devices are identical in both layouts; what differs is
# who adds up a gradient: one process's in-memory all-reduce over 4 devices, or gloo's over 2
# processes, which may add the partial sums in another order. f32 rounding differences of that
# kind (≈1e-7 relative) grow through a dozen Adam steps; 1e-5 relative on losses and weights is
# far above that and far below any real difference (another batch changes the loss by > 1e-2).
# Measured here: losses and gradient norms within 1e-7 relative, weights within 1.6e-7 absolute
# (7 of 25 tensors bit-identical).
RTOL = 1e-5
# A survivor of a kill -9 waits for the coordination service to miss HEARTBEAT_TIMEOUT_S (60 s) of
# heartbeats, then aborts; the rest is slack for 2 busy cores.
SURVIVOR_EXIT_BOUND_S = 120
# One trainer run (start, compile, 12 steps, checkpoints, export), or the SIGTERM checkpoint onto
# the GCS emulator: 1-2 minutes on an idle machine, but on 2 cores shared with other work the
# emulator (one Python process) is slow: measured 75-95 s for the SIGTERM save and over 4 minutes
# for a run's last checkpoint + export beside a busy loop. The bound is only there so a hang fails.
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build_default_corpora(tmp_path_factory.mktemp("corpus"), limit=25, shards=2)


def job(root: Path | str, corpus: dict[str, Path], **stage: object) -> dict:
    spec = {
        "name": "pretrain",
        "kind": "pretrain",
        "steps": STEPS,
        # Two readers (one per process, or both in one process): the same global batch either way.
        "batch": {"sequences": 4, "seq_len": 32, "readers": 2},
        "optimizer": {"name": "adamw", "peak_lr": 3e-3, "schedule": "cosine", "warmup_steps": 2},
        "data": [{"uri": str(corpus["pretrain"] / "train-*.jsonl")}],
        "masking": {"prefix_prob": 0.2, "truncate_prob": 0.2, "block_prob": 0.3},
        "log_every": 1,
        "seed": 7,
    }
    spec.update(stage)
    return {
        "run": "test",
        "model": {"preset": "coda-tiny", "overrides": TINY},
        "tokenizer": "project",
        "checkpoints": {"uri": f"{root}/ckpt", "every_steps": 4, "keep": 5},
        "stage": spec,
    }


def _free_port() -> int:
    """A port no one listens on now. The coordinator (process 0) binds it a second or two later;
    another program could take it in between, which would fail the start loudly, never silently."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Trainer processes as the operator renders them
# --------------------------------------------------------------------------------------------------


def rendered_jobset(accelerator: dict) -> dict:
    """The JobSet the operator renders for a one-stage run on `accelerator`."""
    spec = api.parse_spec(
        {
            "image": "coda:test",
            "model": {"preset": "test-micro"},
            "tokenizer": "project",
            "checkpoints": {"uri": "gs://coda-test/run"},
            "accelerator": accelerator,
            "stages": [
                {
                    "name": "pretrain",
                    "kind": "pretrain",
                    "steps": STEPS,
                    "batch": {"sequences": 16, "seqLen": 32},
                    "mesh": {"data": accelerator.get("tpu", {}).get("slices", 1), "fsdp": -1},
                    "data": [{"uri": "gs://coda-test/data/*.jsonl"}],
                }
            ],
        }
    )
    return render.render_stage("mh", "ml", spec, 0).jobset


# Two hosts in one slice: 2 GPU nodes (the TPU and GPU pods get the same multi-host env).
TWO_HOSTS = {"gpu": {"type": "nvidia-h100-80gb", "gpusPerNode": 2, "nodes": 2}}


def pod_env(jobset: dict, slice_id: int, host: int, port: int) -> dict[str, str]:
    """The environment of the trainer container of pod (slice, host), resolved as the kubelet
    would: `fieldRef`s from the labels/annotations the JobSet and Job controllers put on the pod,
    `$(VAR)` from the variables before it. The coordinator's DNS name (pod 0-0 of the JobSet's
    headless Service) cannot resolve on this machine: 127.0.0.1:`port` replaces it."""
    rj = jobset["spec"]["replicatedJobs"][0]
    fields = {
        "metadata.namespace": jobset["metadata"]["namespace"],
        "metadata.labels['jobset.sigs.k8s.io/jobset-name']": jobset["metadata"]["name"],
        "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']": rj["name"],
        "metadata.labels['jobset.sigs.k8s.io/job-index']": str(slice_id),
        "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']": str(rj["replicas"]),
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(host),
    }
    container = rj["template"]["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for var in container["env"]:
        if "valueFrom" in var:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
    assert env["JAX_COORDINATOR_ADDRESS"].startswith("mh-pretrain-slice-0-0.mh-pretrain:")
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    return env


def pod_command(jobset: dict, config: Path) -> list[str]:
    """The container's rendered command (its shell step included), with this interpreter for
    `python` and `config` for the ConfigMap's mounted job.yaml."""
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]  # fmt: skip
    *shell, line = container["command"]
    mounted = f"{render.CONFIG_DIR}/{render.JOB_FILE}"
    assert " exec python -m coda_trainer.train " in line and mounted in line, line
    line = line.replace("exec python ", f"exec {shlex.quote(sys.executable)} ")
    return [*shell, line.replace(mounted, shlex.quote(str(config)))]


@dataclass
class Trainers:
    """Trainer processes of one job, each in its own process group, output in files."""

    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    started: float = 0.0

    def start(self, pods: list[tuple[list[str], dict[str, str]]], *, devices: int) -> Trainers:
        """Start one process per (argv, pod env), each with `devices` CPU devices."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        for i, (argv, extra) in enumerate(pods):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "CODA_"))}
            env.update(
                PYTHONPATH=os.pathsep.join([str(REPO / "trainer"), env.get("PYTHONPATH", "")]),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu",
                **extra,
            )
            with open(self.out(i), "w") as out, open(self.err(i), "w") as err:
                self.procs.append(
                    subprocess.Popen(
                        argv, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True
                    )
                )
        return self

    def out(self, i: int) -> Path:
        return self.logs / f"process-{i}.out"

    def err(self, i: int) -> Path:
        return self.logs / f"process-{i}.err"

    def stderr(self, i: int) -> str:
        return self.err(i).read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.stderr(i)[-2500:]}" for i in range(len(self.procs)))  # fmt: skip

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"trainers still running after {timeout} s\n{self.tails()}")
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


@pytest.fixture
def trainers(tmp_path):
    """`trainers(name)` starts a job's processes; all of them are killed at the end of the test."""
    made: list[Trainers] = []

    def make(name: str) -> Trainers:
        made.append(Trainers(tmp_path / "logs" / name))
        return made[-1]

    yield make
    for t in made:
        t.kill()


def run_job(make, name: str, config: Path, *, processes: int, devices: int) -> Trainers:
    """One process: the plain trainer command. Two: the operator's rendered pods of a 2-host
    slice (command with its shell step, env), coordinator on a free loopback port."""
    if processes == 1:
        pods = [([sys.executable, "-m", "coda_trainer.train", "--config", str(config)], {})]
    else:
        jobset, port = rendered_jobset(TWO_HOSTS), _free_port()
        pods = [
            (pod_command(jobset, config), pod_env(jobset, 0, h, port)) for h in range(processes)
        ]
    return make(name).start(pods, devices=devices)


def train_lines(stage_dir: str) -> dict[int, dict]:
    """step → the last `train` metrics line for it (a resumed run overwrites an earlier run's)."""
    out = {}
    for line in storage.read_text(f"{stage_dir}/metrics/metrics.jsonl").splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            out[rec["step"]] = rec
    return out


def events(stage_dir: str) -> list[dict]:
    text = storage.read_text(f"{stage_dir}/metrics/metrics.jsonl")
    return [json.loads(line) for line in text.splitlines()]


def final_tensors(stage_dir: str) -> dict[str, np.ndarray]:
    return load_file(f"{stage_dir}/final/model.safetensors")


def write_job(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(predicate, timeout: float, trainers: Trainers, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [i for i, p in enumerate(trainers.procs) if p.poll() is not None]
        assert not dead, f"process(es) {dead} exited before {what}\n{trainers.tails()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s\n{trainers.tails()}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# Fast checks: the env → process id mapping, gloo on CPU only, readers split the data
# --------------------------------------------------------------------------------------------------


def test_process_id_comes_from_the_rendered_pod_env():
    """2 slices × 2 hosts as rendered: the trainer's process ids agree with the id the pod's shell
    step exports (JAX_PROCESS_ID) and number slice 0's hosts first."""
    jobset = rendered_jobset({"tpu": {"type": "v5p", "topology": "2x2x2", "slices": 2}})
    *shell, line = pod_command(jobset, Path("job.yaml"))
    export = line.split(" && exec ")[0]
    ids = []
    for slice_id, host in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        env = pod_env(jobset, slice_id, host, port=1234)
        exported = subprocess.run(
            [*shell, f'{export} && echo "$JAX_PROCESS_ID"'], env=env, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        settings = distributed.distributed_settings({**env, "JAX_PROCESS_ID": exported})
        assert settings["process_id"] == int(exported)
        assert settings["coordinator_address"] == "127.0.0.1:1234"
        assert settings["num_processes"] == 4
        ids.append(settings["process_id"])
    assert ids == [0, 1, 2, 3]
    assert settings["heartbeat_timeout_seconds"] == distributed.HEARTBEAT_TIMEOUT_S
    assert settings["shutdown_timeout_seconds"] == distributed.SHUTDOWN_TIMEOUT_S
    # Inconsistent environments fail as configuration errors (exit 78), not as a hung start.
    with pytest.raises(distributed.ConfigError, match="JAX_PROCESS_ID=2"):
        distributed.distributed_settings({**env, "JAX_PROCESS_ID": "2"})
    with pytest.raises(distributed.ConfigError, match="JAX_NUM_PROCESSES=3"):
        distributed.distributed_settings({**env, "JAX_NUM_PROCESSES": "3"})
    with pytest.raises(distributed.ConfigError, match="outside"):
        distributed.distributed_settings({**env, contract.ENV_HOST_ID: "2"})
    # Without the operator's env: JAX_PROCESS_ID, or the Job's completion index (one slice).
    base = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
    assert (
        distributed.distributed_settings({**base, "JOB_COMPLETION_INDEX": "1"})["process_id"] == 1
    )
    assert "process_id" not in distributed.distributed_settings(
        {}
    )  # JAX detects a TPU slice itself


def test_gloo_only_when_the_devices_are_cpus():
    assert distributed.cpu_only("cpu", [])
    assert distributed.cpu_only("cpu", ["libtpu"])  # JAX_PLATFORMS=cpu wins over installed plugins
    assert not distributed.cpu_only("tpu", [])
    assert not distributed.cpu_only("cuda,cpu", [])
    assert distributed.cpu_only(None, [])
    assert not distributed.cpu_only(None, ["xla_cuda12"]) and not distributed.cpu_only(
        "", ["libtpu"]
    )


def test_readers_split_the_data_and_rebuild_the_one_process_batch(corpus):
    """Reader j of 2 is the same in 1 process (which runs both) and in process j of 2: each process
    reads its own files, and the two halves side by side are the one-process global batch."""
    tokenizer = load_tokenizer("project")
    data = [DataSource(uri=str(corpus["pretrain"] / "train-*.jsonl"))]

    def loader(pi: int, pc: int):
        return make_loader(data, tokenizer, kind="pretrain", batch_size=4 // pc, seq_len=32,
                           seed=7, process_index=pi, process_count=pc, readers=2)  # fmt: skip

    whole, halves = loader(0, 1), [loader(0, 2), loader(1, 2)]
    assert isinstance(whole, ReaderGroup) and len(whole.readers) == 2
    files = [set(h.streams[0].files) for h in halves]
    assert files[0].isdisjoint(files[1]) and len(files[0]) == len(files[1]) == 1
    assert files[0] | files[1] == set(whole.readers[0].streams[0].source.files)
    for _ in range(6):
        batch, parts = next(whole), [next(h) for h in halves]
        assert not np.array_equal(parts[0]["tokens"], parts[1]["tokens"])
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    # The states travel too: the one-process state is the two processes' states side by side.
    state = json.loads(whole.get_state())
    assert state["readers"] == [json.loads(h.get_state()) for h in halves]


# --------------------------------------------------------------------------------------------------
# The real thing: processes over loopback
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, corpus) -> dict[str, tuple[str, Trainers]]:
    """Uninterrupted runs, started together: 1 process × 4 devices and 2 processes × 2 devices."""
    root = tmp_path_factory.mktemp("layouts")
    made: dict[str, Trainers] = {}
    try:
        for name, processes, devices in (("1x4", 1, 4), ("2x2", 2, 2)):
            config = write_job(root / f"{name}.yaml", job(root / name, corpus))
            made[name] = run_job(
                lambda n: Trainers(root / "logs" / n), name, config,
                processes=processes, devices=devices,
            )  # fmt: skip
        for name, t in made.items():
            codes = t.wait(RUN_TIMEOUT_S)
            assert codes == [EXIT_OK] * len(codes), f"{name}: {codes}\n{t.tails()}"
        yield {name: (str(root / name / "ckpt" / "pretrain"), t) for name, t in made.items()}
    finally:
        for t in made.values():
            t.kill()


@pytest.mark.slow
def test_two_processes_train_like_one(layouts):
    one_dir, one = layouts["1x4"]
    two_dir, two = layouts["2x2"]
    assert (
        "mesh {'data': 1, 'fsdp': 4, 'tensor': 1} on 4 cpu device(s), 1 process(es)"
        in one.stderr(0)
    )
    for i in range(2):
        err = two.stderr(i)
        assert "on 4 cpu device(s), 2 process(es)" in err, err[-2000:]
        assert f"process_id={i}" in err and "stop votes:" in err
    ref, ours = train_lines(one_dir), train_lines(two_dir)
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    for key in ("loss", "masked_ce", "grad_norm"):
        np.testing.assert_allclose(
            [ours[s][key] for s in ref], [ref[s][key] for s in ref], rtol=RTOL, err_msg=key
        )
    a, b = final_tensors(two_dir), final_tensors(one_dir)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=1e-7, err_msg=name)

    # Process 0 alone writes metrics, status and the export: each line once, none from process 1.
    evs = events(two_dir)
    assert [e["step"] for e in evs if e["event"] == "train"] == list(range(1, STEPS + 1))
    assert [e["step"] for e in evs if e["event"] == "checkpoint"] == [4, 8, 12]
    assert [e["event"] for e in evs].count("done") == 1
    # (gloo prints "[Gloo] Rank ... connected" lines to stdout too; the metrics are JSON lines)
    json_lines = [
        [line for line in two.out(i).read_text().splitlines() if line.startswith("{")]
        for i in range(2)
    ]
    assert json_lines[1] == [] and len(json_lines[0]) == len(evs), json_lines[0][:3]
    status = json.loads(storage.read_text(f"{two_dir}/status.json"))
    assert (status["state"], status["step"]) == ("done", STEPS)
    assert storage.is_committed(f"{two_dir}/final")


def files_read(stderr: str) -> dict[int, set[str]]:
    """reader → the files it opened, from the data pipeline's log lines."""
    found: dict[int, set[str]] = {}
    for reader, path in re.findall(r"reader (\d+) of 2 reads (\S+) \(", stderr):
        found.setdefault(int(reader), set()).add(path)
    return found


@pytest.mark.slow
def test_each_process_reads_its_own_data(layouts, corpus):
    one_dir, one = layouts["1x4"]
    two_dir, two = layouts["2x2"]
    all_files = {str(p) for p in (corpus["pretrain"]).glob("train-*.jsonl")}
    assert len(all_files) == 2
    # What each process opened: process i ran reader i only, and the two read disjoint files that
    # together are the whole source, the same split the one-process run made between its readers.
    reads = [files_read(two.stderr(i)) for i in range(2)]
    assert list(reads[0]) == [0] and list(reads[1]) == [1], reads
    assert reads[0][0].isdisjoint(reads[1][1])
    assert reads[0][0] | reads[1][1] == all_files
    assert files_read(one.stderr(0)) == {0: reads[0][0], 1: reads[1][1]}

    # What each process consumed: its readers' positions in its own checkpoint file; side by side
    # they are the one-process run's (the same documents consumed, split by process).
    def data_state(stage_dir: str, name: str) -> dict:
        return json.loads(Path(stage_dir, str(STEPS), "data", name).read_text())

    halves = [data_state(two_dir, f"process_{i}-of-2.json") for i in range(2)]
    whole = data_state(one_dir, "process_0-of-1.json")
    assert halves[0] != halves[1]
    assert whole["readers"] == [halves[0], halves[1]]


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)  # two trainer runs and a save (see RUN_TIMEOUT_S)
def test_sigterm_to_one_process_stops_all_at_one_step_on_gcs(
    gcs_bucket, corpus, trainers, tmp_path, layouts
):
    two_dir, _ = layouts["2x2"]
    spec = job(gcs_bucket, corpus)
    spec["checkpoints"]["every_steps"] = 1000  # only the SIGTERM checkpoint
    config = write_job(tmp_path / "job.yaml", spec)
    first = run_job(trainers, "first", config, processes=2, devices=2)
    # Wait until training is under way (process 0 prints a JSON line per step), then preempt the
    # host that is not process 0 (the one that writes metrics and status).
    wait_for(lambda: first.out(0).read_text().count('"event": "train"') >= 2, RUN_TIMEOUT_S,
             first, "second training step")  # fmt: skip
    first.procs[1].send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    codes = first.wait(RUN_TIMEOUT_S)
    print(f"SIGTERM to process 1: both exited after {time.monotonic() - signalled:.1f} s")
    assert codes == [EXIT_RETRYABLE, EXIT_RETRYABLE], f"{codes}\n{first.tails()}"
    assert "received SIGTERM" in first.stderr(1) and "received SIGTERM" not in first.stderr(0)
    stage_dir = f"{gcs_bucket}/ckpt/pretrain"
    ckpt = Checkpointer(stage_dir)
    steps = ckpt.all_steps()
    ckpt.close()
    assert len(steps) == 1 and 2 <= steps[0] < STEPS, steps
    saved = steps[0]
    # Both processes wrote their part of the step: each its data iterator state (and array shards).
    names = {f.rsplit("/", 1)[-1] for f in storage.listdir(f"{stage_dir}/{saved}/data")}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= names, names
    status = json.loads(storage.read_text(f"{stage_dir}/status.json"))
    assert status["state"] == "checkpointed" and status["checkpoint"].endswith(f"/{saved}")

    again = run_job(trainers, "again", config, processes=2, devices=2)
    codes = again.wait(RUN_TIMEOUT_S)
    assert codes == [EXIT_OK, EXIT_OK], f"{codes}\n{again.tails()}"
    for i in range(2):
        assert f"resumed {stage_dir} from step {saved}" in again.stderr(i)
    _assert_same_run(stage_dir, two_dir)


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)  # two trainer runs and the survivor's exit
def test_kill_9_of_one_process_fails_the_others_in_bounded_time_and_resumes(
    corpus, trainers, tmp_path, layouts
):
    two_dir, _ = layouts["2x2"]
    config = write_job(tmp_path / "job.yaml", job(tmp_path, corpus))
    stage_dir = tmp_path / "ckpt" / "pretrain"
    first = run_job(trainers, "first", config, processes=2, devices=2)
    wait_for(lambda: (stage_dir / "4").is_dir(), RUN_TIMEOUT_S, first, "complete checkpoint 4")
    os.killpg(first.procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    first.procs[1].wait(timeout=30)
    try:
        first.procs[0].wait(timeout=SURVIVOR_EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process 0 still running {SURVIVOR_EXIT_BOUND_S} s after its peer's kill -9")
    took = time.monotonic() - killed
    survivor = first.procs[0].returncode
    assert survivor != 0, first.tails()
    print(f"survivor exited {survivor} after {took:.1f} s")
    lines = train_lines(str(stage_dir))
    assert max(lines) < STEPS, "the run finished before the kill"
    ckpt = Checkpointer(str(stage_dir))
    last = max(ckpt.all_steps())  # the newest complete checkpoint the kill left
    ckpt.close()

    again = run_job(trainers, "again", config, processes=2, devices=2)
    codes = again.wait(RUN_TIMEOUT_S)
    assert codes == [EXIT_OK, EXIT_OK], f"{codes}\n{again.tails()}"
    for i in range(2):
        assert f"resumed {stage_dir} from step {last}" in again.stderr(i), again.stderr(i)[-2000:]
    _assert_same_run(str(stage_dir), two_dir)


def _assert_same_run(stage_dir: str, reference_dir: str) -> None:
    """Interrupted + resumed ends exactly where the uninterrupted 2×2 run did (same processes,
    same collectives: bit-identical)."""
    ours, ref = train_lines(stage_dir), train_lines(reference_dir)
    assert sorted(ours) == sorted(ref)
    for step in ref:
        assert ours[step]["loss"] == ref[step]["loss"], step
        assert ours[step]["grad_norm"] == ref[step]["grad_norm"], step
    a, b = final_tensors(stage_dir) if not stage_dir.startswith("gs://") else _gcs_final(stage_dir), final_tensors(reference_dir)  # fmt: skip
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _gcs_final(stage_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(storage.read_bytes(f"{stage_dir}/final/model.safetensors"))
