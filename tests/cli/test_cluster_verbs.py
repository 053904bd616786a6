"""coda-ctl's cluster verbs against the kmock Kubernetes emulator, with runs in several states.

Runs and their status are created through the real Kubernetes API (create + status patch), the way
the operator would leave them; outputs of `get`/`describe` are pinned by golden files
(set CODA_UPDATE_GOLDEN=1 to rewrite them after an intended change).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from coda_ctl.errors import Exit
from coda_ctl.main import app
from ctl_testkit import NAMESPACE, REPO, ago, frozen_clock, write_kubeconfig
from typer.testing import CliRunner

GOLDEN = Path(__file__).parent / "golden"
__all__ = ["frozen_clock"]  # a fixture used by name

STAGES = [
    {
        "name": "pretrain",
        "kind": "pretrain",
        "steps": 50000,
        "batch": {"sequences": 512, "seqLen": 8192},
        "data": [{"uri": "gs://acme-data/dclm/*.parquet"}],
    },
    {
        "name": "midtrain",
        "kind": "midtrain",
        "steps": 50000,
        "batch": {"sequences": 512, "seqLen": 8192},
        "data": [{"uri": "gs://acme-data/annealing/*.parquet"}],
    },
    {
        "name": "sft",
        "kind": "sft",
        "steps": 20000,
        "batch": {"sequences": 512, "seqLen": 1024},
        "data": [{"uri": "gs://acme-data/sft/*.jsonl", "format": "chat"}],
    },
]


def _run(
    name: str, created: dict[str, float], status: dict[str, Any] | None, suspend: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`created`: how long ago, as timedelta arguments; turned into a timestamp when the fixture
    creates the run (not at import: other modules may run first, and ages in goldens would drift)."""
    body = {
        "apiVersion": "coda.dev/v1alpha1",
        "kind": "CodaTrainingRun",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "creationTimestamp": created,
            "uid": f"uid-{name}",
        },
        "spec": {
            "image": "us-docker.pkg.dev/acme/coda/trainer:0.1.0",
            "model": {"preset": "coda-1.7b", "initFrom": "gs://acme-models/qwen3-1.7b"},
            "tokenizer": "gs://acme-models/qwen3-1.7b",
            "checkpoints": {"uri": f"gs://acme-ckpt/{name}"},
            "accelerator": {"tpu": {"type": "v5p", "topology": "8x8x8", "slices": 1}},
            "stages": STAGES,
            "suspend": suspend,
        },
    }
    return body, status


def _cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


RUNS = [
    _run(
        "coda-1p7b",
        {"hours": 5, "minutes": 10},
        {
            "phase": "Running",
            "stage": "midtrain",
            "progress": {
                "step": 12000,
                "totalSteps": 50000,
                "loss": 1.83,
                "tokensPerSecond": 2.1e6,
                "checkpoint": "gs://acme-ckpt/coda-1p7b/midtrain/12000",
            },
            "stages": [
                {
                    "name": "pretrain",
                    "phase": "Succeeded",
                    "jobSet": "coda-1p7b-pretrain",
                    "final": "gs://acme-ckpt/coda-1p7b/pretrain/final",
                },
                {
                    "name": "midtrain",
                    "phase": "Running",
                    "jobSet": "coda-1p7b-midtrain-r1",
                    "retries": 1,
                    "jobSetRestarts": 2,
                },
            ],
            "conditions": [
                _cond("Running", "True", "StageRunning", "stage midtrain (2/3) is running")
            ],
        },
    ),
    _run("queued-run", {"minutes": 20}, None),
    _run(
        "sft-done",
        {"days": 3, "hours": 1},
        {
            "phase": "Succeeded",
            "stage": "sft",
            "progress": {"step": 20000, "totalSteps": 20000, "loss": 0.4121},
            "stages": [
                {
                    "name": s["name"],
                    "phase": "Succeeded",
                    "jobSet": f"sft-done-{s['name']}",
                    "final": f"gs://acme-ckpt/sft-done/{s['name']}/final",
                }
                for s in STAGES
            ],
            "sampler": {"endpoint": "http://sft-done-sampler.ml.svc:8000", "ready": True},
            "conditions": [
                _cond("Complete", "True", "AllStagesSucceeded", "3/3 stages succeeded"),
                _cond("SamplerReady", "True", "DeploymentAvailable", "1/1 replicas ready"),
            ],
        },
    ),
    _run(
        "broken",
        {"hours": 30},
        {
            "phase": "Failed",
            "stage": "pretrain",
            "progress": {"step": 310, "totalSteps": 50000, "loss": 9.5},
            "stages": [
                {
                    "name": "pretrain",
                    "phase": "Failed",
                    "jobSet": "broken-pretrain-r1",
                    "retries": 1,
                }
            ],
            "conditions": [
                _cond(
                    "Failed",
                    "True",
                    "StageRetriesExhausted",
                    "stage pretrain failed 2 times: trainer exited 78 (invalid data)",
                )
            ],
        },
    ),
    _run(
        "paused",
        {"minutes": 90},
        {
            "phase": "Suspended",
            "stage": "pretrain",
            "progress": {"step": 800, "totalSteps": 50000, "loss": 4.2},
            "stages": [{"name": "pretrain", "phase": "Suspended", "jobSet": "paused-pretrain"}],
            "conditions": [_cond("Suspended", "True", "UserSuspended", "spec.suspend is true")],
        },
        suspend=True,
    ),
]


def _pod(name: str, jobset: str, job_index: int, completion_index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": jobset,
                "jobset.sigs.k8s.io/job-index": str(job_index),
                "batch.kubernetes.io/job-completion-index": str(completion_index),
                "coda.dev/run": "coda-1p7b",
            },
        },
        "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
    }


@pytest.fixture(scope="module")
def cluster_state(emulator: Any, kube_api: Any) -> Any:
    from kubernetes import client

    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    for body, _ in RUNS:
        created = body["metadata"]["creationTimestamp"]
        if isinstance(created, dict):
            body["metadata"]["creationTimestamp"] = ago(**created)
    for body, status in RUNS:
        custom.create_namespaced_custom_object(
            "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", body
        )
        if status is not None:
            custom.patch_namespaced_custom_object_status(
                "coda.dev",
                "v1alpha1",
                NAMESPACE,
                "codatrainingruns",
                body["metadata"]["name"],
                {"status": status},
            )
    # Two hosts of the retried midtrain JobSet, one of the old JobSet, and an unrelated one.
    for name, jobset, j, c in [
        ("coda-1p7b-midtrain-r1-slice-0-1-abcde", "coda-1p7b-midtrain-r1", 0, 1),
        ("coda-1p7b-midtrain-r1-slice-0-0-fghij", "coda-1p7b-midtrain-r1", 0, 0),
        ("coda-1p7b-midtrain-slice-0-0-old00", "coda-1p7b-midtrain", 0, 0),
        ("coda-1p7b-pretrain-slice-0-0-zzzzz", "coda-1p7b-pretrain", 0, 0),
    ]:
        core.create_namespaced_pod(NAMESPACE, _pod(name, jobset, j, c))
    # The JobSet of the running stage, as the JobSet controller leaves it.
    custom.create_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", NAMESPACE, "jobsets",
        {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": {
                "name": "coda-1p7b-midtrain-r1",
                "namespace": NAMESPACE,
                "creationTimestamp": ago(minutes=29),
                "labels": {"coda.dev/run": "coda-1p7b", "coda.dev/stage": "midtrain"},
            },
            "spec": {"suspend": False},
            "status": {"restarts": 2},
        },
    )  # fmt: skip
    # The key the operator generates for sft-done's sampler (render.render_sampler_key).
    key = base64.b64encode(b"k3y").decode()
    core.create_namespaced_secret(
        NAMESPACE, {"metadata": {"name": "sft-done-sampler-key"}, "data": {"api-key": key}}
    )
    emulator.logs["coda-1p7b-midtrain-r1-slice-0-0-fghij"] = (
        b'{"step": 12000, "loss": 1.83}\nleader log line\n'
    )
    emulator.logs["coda-1p7b-midtrain-r1-slice-0-1-abcde"] = b"worker 1 log\n"
    emulator.logs["coda-1p7b-pretrain-slice-0-0-zzzzz"] = b"pretrain leader log\n"
    for i, (reason, message, minutes) in enumerate(
        [
            ("StageStarted", "created JobSet coda-1p7b-pretrain", 300),
            (
                "StageSucceeded",
                "stage pretrain succeeded; final gs://acme-ckpt/coda-1p7b/pretrain/final",
                200,
            ),
            (
                "StageRetried",
                "JobSet coda-1p7b-midtrain failed (host maintenance); retry 1 of 1",
                30,
            ),
        ]
    ):
        core.create_namespaced_event(
            NAMESPACE,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"coda-1p7b.{i}", "namespace": NAMESPACE},
                "involvedObject": {
                    "kind": "CodaTrainingRun",
                    "name": "coda-1p7b",
                    "namespace": NAMESPACE,
                    "apiVersion": "coda.dev/v1alpha1",
                },
                "reason": reason,
                "message": message,
                "type": "Warning" if "Retried" in reason else "Normal",
                "lastTimestamp": ago(minutes=minutes),
                "firstTimestamp": ago(minutes=minutes),
                "source": {"component": "coda-operator"},
            },
        )
    return custom


@pytest.fixture()
def ctl(kubeconfig: Path, cluster_state: Any, frozen_clock: Any) -> Any:
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Any:
        return runner.invoke(
            app, ["--kubeconfig", str(kubeconfig), *args], input=input, catch_exceptions=False
        )

    return invoke


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CODA_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing: run with CODA_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"output differs from {path}"


# ------------------------------------------------------------------------------------ get


def test_get_lists_runs_in_the_context_namespace(ctl: Any) -> None:
    res = ctl("get")
    assert res.exit_code == 0, res.output
    _golden("get.txt", res.stdout)
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "STAGE", "STEP", "LOSS", "AGE"]
    row = next(line for line in lines if line.startswith("coda-1p7b"))
    assert row.split() == ["coda-1p7b", "Running", "midtrain", "12000/50000", "1.8300", "5h"]
    assert next(line for line in lines if line.startswith("queued-run")).split()[1] == "Pending"


def test_get_wide_and_single(ctl: Any) -> None:
    res = ctl("get", "-o", "wide")
    assert res.exit_code == 0, res.output
    _golden("get-wide.txt", res.stdout)
    assert "http://sft-done-sampler.ml.svc:8000 (ready)" in res.stdout
    one = ctl("get", "sft-done")
    assert one.exit_code == 0 and len(one.stdout.splitlines()) == 2
    assert one.stdout.splitlines()[1].split()[:4] == ["sft-done", "Succeeded", "sft", "20000/20000"]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_get_machine_readable(ctl: Any, fmt: str) -> None:
    one = ctl("get", "broken", "-o", fmt)
    assert one.exit_code == 0, one.output
    obj = json.loads(one.stdout) if fmt == "json" else yaml.safe_load(one.stdout)
    assert obj["status"]["phase"] == "Failed" and obj["metadata"]["name"] == "broken"
    many = ctl("get", "-o", fmt)
    lst = json.loads(many.stdout) if fmt == "json" else yaml.safe_load(many.stdout)
    assert lst["kind"] == "List"
    assert sorted(i["metadata"]["name"] for i in lst["items"]) == sorted(
        b["metadata"]["name"] for b, _ in RUNS
    )


def test_get_bad_output_format_is_usage_error(ctl: Any) -> None:
    res = ctl("get", "-o", "xml")
    assert res.exit_code == Exit.USAGE and "unknown output format" in res.stderr


def test_namespace_flag_and_context(ctl: Any, kubeconfig: Path) -> None:
    res = ctl("get", "-n", "elsewhere")
    assert res.exit_code == 0 and "No CodaTrainingRuns" in res.stderr
    res = CliRunner().invoke(app, ["--kubeconfig", str(kubeconfig), "--context", "other", "get"])
    assert res.exit_code == 0 and 'namespace "other"' in res.stderr
    res = CliRunner().invoke(app, ["--kubeconfig", str(kubeconfig), "--context", "nope", "get"])
    assert res.exit_code == Exit.NO_CLUSTER and "context 'nope' not found" in res.stderr


# ------------------------------------------------------------------------------------ describe


def test_describe_running_run(ctl: Any) -> None:
    res = ctl("describe", "coda-1p7b")
    assert res.exit_code == 0, res.output
    _golden("describe-coda-1p7b.txt", res.stdout)
    assert "midtrain (2/3)" in res.stdout
    assert "coda-1p7b-midtrain-r1" in res.stdout
    assert "StageRetried" in res.stdout and "retry 1 of 1" in res.stdout


def test_describe_succeeded_run_shows_sampler_and_finals(ctl: Any) -> None:
    res = ctl("describe", "sft-done")
    assert res.exit_code == 0, res.output
    _golden("describe-sft-done.txt", res.stdout)
    assert "gs://acme-ckpt/sft-done/sft/final" in res.stdout
    assert "Endpoint:  http://sft-done-sampler.ml.svc:8000" in res.stdout


# ------------------------------------------------------------------------------------ errors


def test_missing_run_is_not_found(ctl: Any) -> None:
    for verb in (
        ["get", "nope"],
        ["describe", "nope"],
        ["logs", "nope"],
        ["delete", "nope"],
        ["suspend", "nope"],
    ):
        res = ctl(*verb)
        assert res.exit_code == Exit.NOT_FOUND, (verb, res.output)
        assert 'codatrainingrun "nope" in namespace "ml" not found' in res.stderr


def test_no_cluster_exit_code(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = write_kubeconfig(tmp_path / "config", f"http://127.0.0.1:{port}")
    res = CliRunner().invoke(app, ["--kubeconfig", str(kc), "get"])
    assert res.exit_code == Exit.NO_CLUSTER, res.output
    assert f"cannot reach the API server at http://127.0.0.1:{port}" in res.stderr
    res = CliRunner().invoke(app, ["--kubeconfig", str(tmp_path / "missing"), "get"])
    assert res.exit_code == Exit.NO_CLUSTER and "does not exist" in res.stderr


def test_no_kubeconfig_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    res = CliRunner().invoke(app, ["get"])
    assert res.exit_code == Exit.NO_CLUSTER and "no cluster configured" in res.stderr


# ------------------------------------------------------------------------------------ logs


def test_logs_reads_the_leader_pod_of_the_current_stage(ctl: Any) -> None:
    res = ctl("logs", "coda-1p7b")
    assert res.exit_code == 0, res.output
    assert res.stdout == '{"step": 12000, "loss": 1.83}\nleader log line\n'
    res = ctl("logs", "coda-1p7b", "--stage", "pretrain", "-f")
    assert res.exit_code == 0 and res.stdout == "pretrain leader log\n"


def test_logs_all_hosts_previous_and_container(ctl: Any, emulator: Any) -> None:
    res = ctl("logs", "coda-1p7b", "--all-hosts")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        '[slice 0 host 0] {"step": 12000, "loss": 1.83}',
        "[slice 0 host 0] leader log line",
        "[slice 0 host 1] worker 1 log",
    ]
    res = ctl("logs", "coda-1p7b", "--previous", "-c", "sidecar")
    assert res.exit_code == 0, res.output
    assert emulator.log_params[-1].get("previous") == "true"
    assert emulator.log_params[-1].get("container") == "sidecar"
    res = ctl("logs", "coda-1p7b", "--all-hosts", "-f")
    assert res.exit_code == Exit.USAGE and "without -f" in res.stderr


def test_logs_errors(ctl: Any) -> None:
    res = ctl("logs", "coda-1p7b", "--stage", "bogus")
    assert res.exit_code == Exit.NOT_FOUND and "has no stage 'bogus'" in res.stderr
    res = ctl("logs", "coda-1p7b", "--stage", "sft")
    assert (
        res.exit_code == Exit.NOT_FOUND
        and "has no leader pod yet (JobSet coda-1p7b-sft)" in res.stderr
    )


# ------------------------------------------------------------------------------------ state changes


def test_suspend_resume_retry_delete(ctl: Any, cluster_state: Any) -> None:
    def get(n):
        return cluster_state.get_namespaced_custom_object(
            "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", n
        )

    assert ctl("suspend", "coda-1p7b").exit_code == 0
    assert get("coda-1p7b")["spec"]["suspend"] is True
    res = ctl("resume", "paused")
    assert res.exit_code == 0 and "resumed" in res.stdout
    assert get("paused")["spec"]["suspend"] is False
    ctl("resume", "coda-1p7b")

    res = ctl("retry", "coda-1p7b")
    assert res.exit_code == Exit.CONFLICT and "not Failed" in res.stderr
    res = ctl("retry", "broken")
    assert res.exit_code == 0, res.output
    assert "coda.dev/retry" in get("broken")["metadata"]["annotations"]

    body = dict(RUNS[1][0], metadata={**RUNS[1][0]["metadata"], "name": "to-delete"})
    cluster_state.create_namespaced_custom_object(
        "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", body
    )
    res = ctl("delete", "to-delete")
    assert res.exit_code == 0 and 'codatrainingrun.coda.dev "to-delete" deleted' in res.stdout
    assert ctl("get", "to-delete").exit_code == Exit.NOT_FOUND


def test_watch_ends_with_the_run(ctl: Any) -> None:
    res = ctl("watch", "sft-done", "--interval", "0.1")
    assert res.exit_code == 0, res.output
    assert (
        "pretrain 50000/50000 Succeeded" in res.stdout and 'run "sft-done" succeeded' in res.stdout
    )
    res = ctl("watch", "broken", "--interval", "0.1")
    assert res.exit_code == Exit.ERROR and "exited 78" in res.stderr
    res = ctl("watch", "paused", "--interval", "0.1", "--timeout", "0.3")
    assert res.exit_code == Exit.ERROR and "timed out" in res.stderr


def test_sample_through_the_service_proxy(ctl: Any, emulator: Any) -> None:
    seen: list[Any] = []

    def proxy(request: Any) -> dict[str, Any]:
        seen.append((request.name, request.subresource, request.data, request.headers))
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "sft-done",
            "choices": [{"index": 0, "text": "    return a + b\n", "finish_reason": "stop"}],
        }

    emulator.proxy = proxy
    try:
        res = ctl("sample", "sft-done", "--prompt", "def add(a, b):\n", "--max-tokens", "16")
    finally:
        emulator.proxy = None
    assert res.exit_code == 0, res.output
    assert res.stdout == "    return a + b\n\n"
    name, sub, data, headers = seen[0]
    assert name == "sft-done-sampler:8000" and sub == "proxy/v1/completions"
    assert headers.get("api-key") == "k3y"  # the sampler's key, read from the run's Secret
    assert data["prompt"] == "def add(a, b):\n" and data["max_tokens"] == 16


def test_entry_point_runs_as_a_process(kubeconfig: Path, cluster_state: Any) -> None:
    """The installed console script behaves like the in-process app (exit codes included)."""
    exe = Path(sys.executable).with_name("coda-ctl")
    assert exe.exists(), "coda-ctl console script missing: pip install -e ."
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    ok = subprocess.run(
        [str(exe), "get", "sft-done"], capture_output=True, text=True, env=env, timeout=60
    )
    assert ok.returncode == 0 and ok.stdout.startswith("NAME"), ok.stderr
    missing = subprocess.run(
        [str(exe), "describe", "nope"], capture_output=True, text=True, env=env, timeout=60
    )
    assert missing.returncode == Exit.NOT_FOUND and missing.stderr.startswith("error: ")
    usage = subprocess.run(
        [str(exe), "describe"], capture_output=True, text=True, env=env, timeout=60
    )
    assert usage.returncode == Exit.USAGE


def test_rich_output_on_a_terminal(ctl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import coda_ctl.main as main_mod

    monkeypatch.setattr(main_mod, "_tty", lambda: True)
    res = ctl("get")
    assert res.exit_code == 0, res.output
    assert "NAME" in res.stdout and "coda-1p7b" in res.stdout and "12000/50000" in res.stdout
    res = ctl("watch", "sft-done", "--interval", "0.1")
    assert res.exit_code == 0 and 'run "sft-done" succeeded' in res.stdout


def test_shell_completion_script() -> None:
    # `--show-completion` detects the calling shell from the process tree, so ask from a real bash,
    # as a user would (under make or CI the test's own parent is sh, which typer does not support).
    ctl = Path(sys.executable).with_name("coda-ctl")
    # (a second command keeps bash from exec-ing coda-ctl in its own place)
    script = f"{ctl} --show-completion; code=$?; exit $code"
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "complete" in res.stdout and "_CODA_CTL_COMPLETE" in res.stdout


def test_help_documents_exit_codes() -> None:
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "4 invalid spec" in res.stdout and "5 no cluster" in res.stdout
    for verb in (
        "submit",
        "get",
        "describe",
        "logs",
        "watch",
        "suspend",
        "resume",
        "retry",
        "delete",
        "sample",
        "infill",
        "eval",
        "render",
        "crd",
        "train",
        "local",
        "doctor",
        "version",
    ):
        assert verb in res.stdout


# ------------------------------------------------------------------------------------ kubectl habits


def _example_named(tmp_path: Path, name: str) -> Path:
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "coda-1.7b-v5p.yaml").read_text())
    doc["metadata"] = {"name": name, "labels": {"team": "search"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_submit_server_dry_run_is_strict_and_stores_nothing(
    ctl: Any, emulator: Any, tmp_path: Path
) -> None:
    path = _example_named(tmp_path, "dry-one")
    res = ctl("submit", "-f", str(path), "--dry-run=server")
    assert res.exit_code == 0, res.output
    assert res.stdout == "codatrainingrun.coda.dev/dry-one created (server dry run)\n"
    sent = [q for kind, q in emulator.requests if kind == "dry-run"]
    assert sent and "dryRun=All" in sent[-1] and "fieldValidation=Strict" in sent[-1]
    assert ctl("get", "dry-one").exit_code == Exit.NOT_FOUND
    res = ctl("submit", "-f", str(path), "--dry-run=client", "-o", "name")
    assert res.exit_code == 0 and res.stdout == "codatrainingrun.coda.dev/dry-one\n"
    res = ctl("submit", "-f", str(path), "--dry-run=maybe")
    assert res.exit_code == Exit.USAGE and "'maybe' is not one of" in res.output


def test_get_output_name_jsonpath_and_custom_columns(ctl: Any) -> None:
    res = ctl("get", "sft-done", "broken", "-o", "name")
    assert res.exit_code == 0, res.output
    assert res.stdout == "codatrainingrun.coda.dev/sft-done\ncodatrainingrun.coda.dev/broken\n"
    res = ctl("get", "broken", "-o", "jsonpath={.status.phase}")
    assert res.exit_code == 0 and res.stdout == "Failed\n", res.output
    tmpl = r"{range .items[*]}{.metadata.name}={.status.stages[0].phase}\n{end}"
    res = ctl("get", "sft-done", "broken", "-o", f"jsonpath={tmpl}")
    assert res.exit_code == 0 and res.stdout == "sft-done=Succeeded\nbroken=Failed\n\n", res.output
    res = ctl(
        "get", "sft-done", "queued-run",
        "-o", "custom-columns=RUN:.metadata.name,FINAL:.status.stages[*].final,TPU:.spec.accelerator.tpu.type",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [line.split() for line in res.stdout.splitlines()]
    finals = ",".join(f"gs://acme-ckpt/sft-done/{s['name']}/final" for s in STAGES)
    assert lines == [
        ["RUN", "FINAL", "TPU"],
        ["sft-done", finals, "v5p"],
        ["queued-run", "<none>", "v5p"],
    ]
    for bad in ("xml", "jsonpath=", "jsonpath={.a", "custom-columns=NAME", "jsonpath={range .x}"):
        res = ctl("get", "-o", bad)
        assert res.exit_code == Exit.USAGE, (bad, res.output)


def test_get_selector_several_names_and_describe_several(ctl: Any, cluster_state: Any) -> None:
    cluster_state.patch_namespaced_custom_object(
        "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", "sft-done",
        {"metadata": {"labels": {"team": "search"}}},
    )  # fmt: skip
    res = ctl("get", "-l", "team=search", "-o", "name")
    assert res.exit_code == 0 and res.stdout == "codatrainingrun.coda.dev/sft-done\n", res.output
    res = ctl("get", "-l", "!team", "-o", "name")
    assert res.exit_code == 0 and "sft-done" not in res.stdout and "broken" in res.stdout
    res = ctl("get", "-l", "team in (a,b)")
    assert res.exit_code == Exit.USAGE and "unsupported selector" in res.stderr
    res = ctl("get", "sft-done", "nope")
    assert res.exit_code == Exit.NOT_FOUND and '"nope"' in res.stderr
    res = ctl("describe", "sft-done", "broken")
    assert res.exit_code == 0, res.output
    assert "Name:" in res.stdout and res.stdout.count("Name:") >= 2
    assert "sft-done" in res.stdout and "exited 78" in res.stdout


def test_get_watch_prints_changes(ctl: Any, cluster_state: Any, tmp_path: Path) -> None:
    import threading

    body = dict(RUNS[1][0], metadata={**RUNS[1][0]["metadata"], "name": "watched"})
    cluster_state.create_namespaced_custom_object(
        "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", body
    )

    def progress() -> None:
        cluster_state.patch_namespaced_custom_object_status(
            "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", "watched",
            {"status": {"phase": "Running", "stage": "pretrain",
                        "progress": {"step": 7, "totalSteps": 50000}}},
        )  # fmt: skip

    timer = threading.Timer(0.6, progress)
    timer.start()
    try:
        res = ctl("get", "watched", "-w", "--watch-timeout", "2.5", "--interval", "0.2")
    finally:
        timer.cancel()
        ctl("delete", "watched")
    assert res.exit_code == 0, res.output
    rows = [line.split()[:4] for line in res.stdout.splitlines()]
    assert rows == [
        ["NAME", "PHASE", "STAGE", "STEP"],
        ["watched", "Pending", "-", "-"],
        ["watched", "Running", "pretrain", "7/50000"],
    ]


def test_get_wide_is_never_cropped_on_a_terminal(ctl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import coda_ctl.main as main_mod

    monkeypatch.setattr(main_mod, "_tty", lambda: True)
    monkeypatch.setenv("COLUMNS", "60")
    res = ctl("get", "-o", "wide")
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if line.startswith("coda-1p7b"))
    assert "gs://acme-ckpt/coda-1p7b/midtrain/12000" in row
    row = next(line for line in res.stdout.splitlines() if line.startswith("sft-done"))
    assert "http://sft-done-sampler.ml.svc:8000 (ready)" in row


def test_version_names_client_and_cluster(ctl: Any) -> None:
    res = ctl("version")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("Client Version: coda-ctl ") and "(coda.dev/v1alpha1)" in lines[0]
    assert lines[1].startswith("Kubernetes Version: v1.")
    assert lines[2] == "CRD Versions: coda.dev/v1alpha1 (preferred v1alpha1)"
    res = CliRunner().invoke(app, ["--kubeconfig", "/nonexistent", "version", "--client"])
    assert res.exit_code == 0 and res.stdout.startswith("Client Version: coda-ctl ")


def test_delete_several(ctl: Any, cluster_state: Any) -> None:
    for n in ("gone-1", "gone-2"):
        body = dict(RUNS[1][0], metadata={**RUNS[1][0]["metadata"], "name": n})
        cluster_state.create_namespaced_custom_object(
            "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", body
        )
    res = ctl("delete", "gone-1", "gone-2")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        'codatrainingrun.coda.dev "gone-1" deleted',
        'codatrainingrun.coda.dev "gone-2" deleted',
    ]


def test_run_and_stage_names_complete_in_bash(kubeconfig: Path, cluster_state: Any) -> None:
    """What bash gets when the user presses TAB (click's completion protocol, the console script)."""
    exe = Path(sys.executable).with_name("coda-ctl")

    def complete(words: str, cword: int, config: str = str(kubeconfig)) -> list[str]:
        env = {
            **os.environ,
            "KUBECONFIG": config,
            "_CODA_CTL_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
        }
        res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        return [w for w in res.stdout.splitlines() if w]

    assert complete("coda-ctl describe s", 2) == ["sft-done"]
    assert complete("coda-ctl get q", 2) == ["queued-run"]
    assert complete("coda-ctl logs coda-1p7b --stage ", 4) == ["pretrain", "midtrain", "sft"]
    assert complete("coda-ctl -n elsewhere describe ", 4) == []  # another namespace: no runs
    assert complete("coda-ctl describe ", 2, config="/nonexistent") == []  # no cluster: quiet


def test_watch_shows_the_evaluation_and_the_gate(
    ctl: Any, cluster_state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the evaluation Job runs, then its pass@1 per benchmark and the gate's verdict, on
    plain output and on a terminal."""
    import threading

    import coda_ctl.main as main_mod

    stages = [{"name": s["name"], "phase": "Succeeded"} for s in STAGES]

    def create(name: str) -> None:
        body, _ = _run(name, {"hours": 1}, None)
        body["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        body["spec"]["evaluation"] = {
            "benchmarks": ["humaneval", "humaneval-plus"], "minPassAt1": {"humaneval": 0.3},
        }  # fmt: skip
        cluster_state.create_namespaced_custom_object(
            "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", body
        )

    def patch(name: str, status: dict[str, Any]) -> None:
        cluster_state.patch_namespaced_custom_object_status(
            "coda.dev", "v1alpha1", NAMESPACE, "codatrainingruns", name, {"status": status}
        )

    miss = "quality gate failed after stage sft: humaneval pass@1 25.0% < minPassAt1 30.0% (...)"
    results = {"humaneval": {"passAt1": 0.25, "problems": 164},
               "humaneval-plus": {"passAt1": 0.2, "problems": 164}}  # fmt: skip
    running = {"phase": "Running", "stage": "sft", "stages": stages,
               "evaluation": {"sft": {"phase": "Running", "job": "gated-sft-eval"}}}  # fmt: skip
    failed = {
        "phase": "Failed", "stage": "sft", "stages": stages,
        "evaluation": {"sft": {"phase": "Succeeded", "results": results}},
        "conditions": [_cond("QualityGate", "False", "QualityGateFailed", miss),
                       _cond("Failed", "True", "QualityGateFailed", miss)],
    }  # fmt: skip
    for tty in (False, True):
        name = f"gated-{'tty' if tty else 'plain'}"
        create(name)
        try:
            monkeypatch.setattr(main_mod, "_tty", lambda tty=tty: tty)
            patch(name, running)
            timer = threading.Timer(2.0, patch, (name, failed))
            timer.start()
            try:
                res = ctl("watch", name, "--interval", "0.1", "--timeout", "10")
            finally:
                timer.cancel()
            assert res.exit_code == Exit.ERROR and "QualityGateFailed" not in res.stdout
            assert "eval: sft Running  gate: pending" in res.stdout, res.stdout
            # (a terminal may wrap the long line: compare with whitespace collapsed)
            want = (
                f"eval: sft Succeeded humaneval 25.0%, humaneval-plus 20.0% gate: FAILED ({miss})"
            )
            assert " ".join(want.split()) in " ".join(res.stdout.split()), res.stdout
            assert "quality gate failed after stage sft" in res.stderr
        finally:
            ctl("delete", name)
