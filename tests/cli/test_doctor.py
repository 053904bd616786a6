""" "Why isn't it running": `describe` and `doctor` on stuck runs in the kmock emulator.

Each run is left the way the operator, the JobSet/Job controllers, Kueue and the scheduler would
leave it (objects created through the real Kubernetes API, statuses included); golden files pin
the output (CODA_UPDATE_GOLDEN=1 rewrites them after an intended change).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from coda_ctl.errors import Exit
from coda_ctl.main import app
from ctl_testkit import ago, frozen_clock
from typer.testing import CliRunner

# ages in the goldens are against ctl_testkit.NOW
pytestmark = pytest.mark.usefixtures(frozen_clock.__name__)

GOLDEN = Path(__file__).parent / "golden"
NS = "stuck"
IMAGE = "us-docker.pkg.dev/acme/coda/trainer:0.1.0"
TPU_SELECTOR = {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "8x8x8",
}


def _run(name: str, status: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "apiVersion": "coda.dev/v1alpha1",
        "kind": "CodaTrainingRun",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": ago(minutes=40)},
        "spec": {
            "image": IMAGE,
            "model": {"preset": "coda-1.7b"},
            "tokenizer": "gs://acme-models/qwen3-1.7b",
            "checkpoints": {"uri": f"gs://acme-ckpt/{name}"},
            "accelerator": {"tpu": {"type": "v5p", "topology": "8x8x8"}},
            "serviceAccountName": "coda-trainer",
            "stages": [
                {
                    "name": "pretrain",
                    "kind": "pretrain",
                    "steps": 50000,
                    "batch": {"sequences": 512, "seqLen": 8192},
                    "data": [{"uri": "gs://acme-data/dclm/*.parquet"}],
                }
            ],
        },
        "_status": status,
    }


def _running(name: str) -> dict[str, Any]:
    return {
        "phase": "Running",
        "stage": "pretrain",
        "stages": [{"name": "pretrain", "phase": "Running", "jobSet": f"{name}-pretrain"}],
    }


def _jobset(name: str, suspend: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": f"{name}-pretrain",
            "namespace": NS,
            "creationTimestamp": ago(minutes=38),
            "labels": {"coda.dev/run": name, "coda.dev/stage": "pretrain"},
        },
        "spec": {"suspend": suspend},
        "status": {"restarts": 0},
    }


def _job(name: str, active: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{name}-pretrain-slice-0",
            "namespace": NS,
            "labels": {
                "coda.dev/run": name,
                "jobset.sigs.k8s.io/jobset-name": f"{name}-pretrain",
            },
        },
        "status": {"active": active},
    }


def _pod(name: str, host: int, status: dict[str, Any], node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": TPU_SELECTOR,
        "containers": [
            {"name": "trainer", "image": IMAGE, "resources": {"limits": {"google.com/tpu": "4"}}}
        ],
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-pretrain-slice-0-{host}-x{host}",
            "namespace": NS,
            "labels": {
                "coda.dev/run": name,
                "coda.dev/stage": "pretrain",
                "app.kubernetes.io/component": "trainer",
                "jobset.sigs.k8s.io/jobset-name": f"{name}-pretrain",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": str(host),
            },
        },
        "spec": spec,
        "status": status,
    }


UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/12 nodes are available: 12 Insufficient google.com/tpu. preemption: "
            "0/12 nodes are available: 12 No preemption victims found for incoming pod.",
        }
    ],
}
IMAGE_PULL = {
    "phase": "Pending",
    "conditions": [{"type": "PodScheduled", "status": "True"}],
    "containerStatuses": [
        {
            "name": "trainer",
            "image": IMAGE,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{IMAGE}"',
                }
            },
        }
    ],
}
RUNNING = {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}
CRASHING = {
    "phase": "Running",
    "conditions": [{"type": "PodScheduled", "status": "True"}],
    "containerStatuses": [
        {
            "name": "trainer",
            "image": IMAGE,
            "imageID": "",
            "ready": False,
            "restartCount": 5,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
        }
    ],
}


def _event(obj: dict[str, Any], reason: str, message: str, minutes: int) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{reason.lower()}", "namespace": NS},
        "involvedObject": {"kind": obj["kind"], "name": name, "namespace": NS},
        "reason": reason,
        "message": message,
        "type": "Warning",
        "lastTimestamp": ago(minutes=minutes),
    }


def _workload(name: str, admitted: bool, message: str) -> dict[str, Any]:
    conditions = [
        {"type": "QuotaReserved", "status": str(admitted), "reason": "Pending", "message": message},
        {"type": "Admitted", "status": str(admitted), "reason": "Pending", "message": message},
    ]
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "Workload",
        "metadata": {
            "name": f"jobset-{name}-pretrain-1a2b3",
            "namespace": NS,
            "ownerReferences": [{"kind": "JobSet", "name": f"{name}-pretrain"}],
        },
        "spec": {"queueName": "tpu-queue"},
        "status": {"conditions": conditions},
    }


GIB = 1 << 30


def _preflight_job(name: str, status: dict[str, Any]) -> dict[str, Any]:
    """The operator's pre-flight Job of stage pretrain (render.render_preflight_job's labels)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{name}-pretrain-preflight",
            "namespace": NS,
            "creationTimestamp": ago(minutes=39),
            "labels": {
                "coda.dev/run": name,
                "coda.dev/stage": "pretrain",
                "app.kubernetes.io/component": "preflight",
            },
        },
        "status": status,
    }


def _preflight_pod(name: str, status: dict[str, Any]) -> dict[str, Any]:
    """The pre-flight Job's one CPU pod, labelled by the Job controller with its Job's name."""
    job = f"{name}-pretrain-preflight"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-x7k2p",
            "namespace": NS,
            "labels": {
                "coda.dev/run": name,
                "coda.dev/stage": "pretrain",
                "app.kubernetes.io/component": "preflight",
                "batch.kubernetes.io/job-name": job,
                "job-name": job,
            },
        },
        "spec": {"containers": [{"name": "trainer", "image": IMAGE}]},
        "status": status,
    }


def _preflighting(
    name: str, preflight: dict[str, Any], stage_phase: str = "Pending", **status: Any
) -> dict[str, Any]:
    """A run whose stage pretrain waits for (or failed) its pre-flight: no JobSet exists yet,
    though status names the one it will create (the planner sets it before the pre-flight)."""
    return {
        "phase": "Pending",
        "stage": "pretrain",
        "stages": [{"name": "pretrain", "phase": stage_phase, "jobSet": f"{name}-pretrain"}],
        "preflight": {"pretrain": {"key": "k1", "job": f"{name}-pretrain-preflight", **preflight}},
        **status,
    }


def _compiling(name: str) -> dict[str, Any]:
    what = f"compiling the step for 1 x v5p 8x8x8 in Job {name}-pretrain-preflight"
    return _preflighting(name, {"phase": "Running", "message": what})


TOO_BIG = "does not fit (peak 120.00 GiB of 95.00 GiB HBM per chip)"


def _preflight_scene() -> list[dict[str, Any]]:
    """A pre-flight compiling, one whose pod cannot pull the image, and one that found the stage
    does not fit (the run failed before asking for TPUs)."""
    failed = {
        "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
        "message": "Container trainer for pod x exited with 78",
    }  # fmt: skip
    too_big_msg = f"stage pretrain failed: pre-flight on 1 x v5p 8x8x8: {TOO_BIG}"
    report = {"fits": False, "peakBytesPerDevice": 120 * GIB, "hbmBytesPerDevice": 95 * GIB}
    return [
        _run("compiling", _compiling("compiling")),
        _preflight_job("compiling", {"active": 1}),
        _preflight_pod("compiling", RUNNING),
        _run("preflight-pull", _compiling("preflight-pull")),
        _preflight_job("preflight-pull", {"active": 1}),
        _preflight_pod("preflight-pull", IMAGE_PULL),
        _run(
            "too-big",
            _preflighting(
                "too-big",
                {"phase": "Failed", "message": TOO_BIG, "reportKey": "k1", "report": report},
                stage_phase="Failed",
                phase="Failed",
                message=too_big_msg,
                conditions=[
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "PreflightFailed",
                        "message": too_big_msg,
                        "lastTransitionTime": ago(minutes=30),
                    },
                ],
            ),
        ),
        _preflight_job("too-big", {"failed": 1, "conditions": [failed]}),
    ]


def _scene() -> list[dict[str, Any]]:
    """Every object of every stuck run, runs first."""
    sa_message = (
        f"ServiceAccount 'coda-trainer' not found in namespace '{NS}': no trainer pod can be "
        f"created. Create it (kubectl -n {NS} create serviceaccount coda-trainer), or install "
        f"the chart with --set 'trainerServiceAccount.namespaces={{{NS}}}'"
    )
    no_tpu_pods = [_pod("no-tpu", h, UNSCHEDULABLE) for h in range(2)]
    crash_pods = [_pod("crashing", h, RUNNING, node=f"gke-tpu-{h}") for h in range(3)]
    crash_pods.append(_pod("crashing", 3, CRASHING, node="gke-tpu-3"))
    return [
        _run("no-tpu", _running("no-tpu")),
        _jobset("no-tpu"),
        _job("no-tpu", active=2),
        _workload("no-tpu", True, "Quota reserved in ClusterQueue tpu-cq"),
        *no_tpu_pods,
        _event(no_tpu_pods[0], "FailedScheduling", UNSCHEDULABLE["conditions"][0]["message"], 3),
        _event(
            no_tpu_pods[1],
            "NotTriggerScaleUp",
            "pod didn't trigger scale-up: 2 node(s) didn't match Pod's node affinity/selector",
            2,
        ),
        _run("queued", _running("queued")),
        _jobset("queued", suspend=True),
        _workload(
            "queued",
            False,
            "couldn't assign flavors to pod set slice: insufficient unused quota for "
            "google.com/tpu in flavor v5p-8x8x8, 2048 more needed",
        ),
        _run("bad-image", _running("bad-image")),
        _jobset("bad-image"),
        *[_pod("bad-image", h, IMAGE_PULL, node=f"gke-tpu-{h}") for h in range(2)],
        _run(
            "no-sa",
            {
                "phase": "Pending",
                "stage": "pretrain",
                "message": sa_message,
                "conditions": [
                    {
                        "type": "Created",
                        "status": "False",
                        "reason": "ServiceAccountNotFound",
                        "message": sa_message,
                        # required by the CRD (and the CLI's typed status): the API server
                        # refuses a condition without it
                        "lastTransitionTime": ago(minutes=39),
                    }
                ],
            },
        ),
        _run("crashing", _running("crashing")),
        _jobset("crashing"),
        *crash_pods,
        _run("never-seen", None),
        _run("fine", _running("fine")),
        _jobset("fine"),
        *[_pod("fine", h, RUNNING, node=f"gke-tpu-{h}") for h in range(2)],
        *_preflight_scene(),
    ]


@pytest.fixture(scope="module")
def stuck(kube_api: Any) -> None:
    from kubernetes import client

    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    batch = client.BatchV1Api(kube_api)
    plural = {"JobSet": "jobsets", "Workload": "workloads", "CodaTrainingRun": "codatrainingruns"}
    for obj in _scene():
        kind = obj["kind"]
        if kind == "CodaTrainingRun":
            status = obj.pop("_status")
            custom.create_namespaced_custom_object("coda.dev", "v1alpha1", NS, plural[kind], obj)
            if status:
                custom.patch_namespaced_custom_object_status(
                    "coda.dev", "v1alpha1", NS, "codatrainingruns", obj["metadata"]["name"],
                    {"status": status},
                )  # fmt: skip
        elif kind in ("JobSet", "Workload"):
            group, version = obj["apiVersion"].split("/")
            custom.create_namespaced_custom_object(group, version, NS, plural[kind], obj)
        elif kind == "Job":
            batch.create_namespaced_job(NS, obj)
        elif kind == "Pod":
            core.create_namespaced_pod(NS, obj)
        elif kind == "Event":
            core.create_namespaced_event(NS, obj)


def _ctl(kubeconfig: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["--kubeconfig", str(kubeconfig), "-n", NS, *args])


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CODA_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing: run with CODA_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"output differs from {path}"


def test_describe_joins_jobsets_jobs_pods_events_and_kueue(kubeconfig: Path, stuck: None) -> None:
    res = _ctl(kubeconfig, "describe", "no-tpu")
    assert res.exit_code == 0, res.output
    _golden("describe-stuck-no-tpu.txt", res.stdout)
    out = res.stdout
    assert "no-tpu-pretrain   pretrain   Active" in out
    assert "slice 0 host 1   Pending   Unschedulable" in out
    assert "Node selector: cloud.google.com/gke-tpu-accelerator=tpu-v5p-slice" in out
    assert "FailedScheduling" in out and "NotTriggerScaleUp" in out
    assert "tpu-queue   True" in out
    assert 'run "no-tpu" is blocked: Unschedulable: 2/2 pods cannot be scheduled' in out


EXPECTED_FIRST = {
    "no-tpu": "Unschedulable: 2/2 pods cannot be scheduled (each asks for 4 google.com/tpu;",
    "queued": "NotAdmitted: Kueue has not admitted Workload jobset-queued-pretrain-1a2b3 "
    "(queue tpu-queue): couldn't assign flavors",
    "bad-image": f"ImagePull: 2/2 pods cannot pull image {IMAGE} (ImagePullBackOff",
    "no-sa": "ServiceAccountNotFound: ServiceAccount 'coda-trainer' not found in namespace 'stuck'",
    "crashing": "HostFailing: pod crashing-pretrain-slice-0-3-x3 (slice 0 host 3) is "
    "CrashLoopBackOff",
    "never-seen": "NoJobSet: the operator has not created a JobSet for the first stage yet",
}


def test_doctor_names_the_first_blocker(kubeconfig: Path, stuck: None) -> None:
    outputs = []
    for run, first in EXPECTED_FIRST.items():
        res = _ctl(kubeconfig, "doctor", run)
        assert res.exit_code == Exit.ERROR, (run, res.output)
        assert res.stdout.startswith(f'run "{run}" is blocked: {first}'), res.stdout
        outputs.append(f"$ coda-ctl -n {NS} doctor {run}\n{res.stdout}")
    _golden("doctor-stuck.txt", "".join(outputs))


def test_doctor_of_a_healthy_run_exits_0(kubeconfig: Path, stuck: None) -> None:
    res = _ctl(kubeconfig, "doctor", "fine")
    assert res.exit_code == 0, res.output
    assert res.stdout == 'run "fine": nothing is blocking it (2/2 pods running)\n'


# ------------------------------------------------------------------------------- pre-flight Jobs


def test_doctor_of_a_run_whose_preflight_compiles_says_so_not_no_jobset(
    kubeconfig: Path, stuck: None
) -> None:
    """While the stage's pre-flight compiles, the operator holds its JobSet back on purpose:
    nothing blocks the run (the JobSet's absence is no NoJobSet finding)."""
    res = _ctl(kubeconfig, "doctor", "compiling")
    assert res.exit_code == 0, res.output
    assert res.stdout == (
        'run "compiling": nothing is blocking it (pre-flight of stage pretrain: compiling the '
        "step for 1 x v5p 8x8x8 in Job compiling-pretrain-preflight)\n"
    )


def test_doctor_names_a_preflight_pod_that_cannot_start(kubeconfig: Path, stuck: None) -> None:
    res = _ctl(kubeconfig, "doctor", "preflight-pull")
    assert res.exit_code == Exit.ERROR, res.output
    pod = "preflight-pull-pretrain-preflight-x7k2p"
    assert res.stdout.startswith(
        f'run "preflight-pull" is blocked: PreflightPodFailing: pre-flight pod {pod} of Job '
        "preflight-pull-pretrain-preflight is ImagePullBackOff\n"
        f"  fix: kubectl -n {NS} describe pod {pod}; kubectl -n {NS} logs {pod}\n"
    ), res.stdout
    assert "NoJobSet" not in res.stdout


def test_doctor_and_describe_of_a_run_whose_preflight_found_it_does_not_fit(
    kubeconfig: Path, stuck: None
) -> None:
    res = _ctl(kubeconfig, "doctor", "too-big")
    assert res.exit_code == Exit.ERROR, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith('run "too-big" is blocked: RunFailed: stage pretrain failed: ')
    # no JobSet ran: the log that says why is the pre-flight Job's
    assert lines[1] == (
        f"  fix: kubectl -n {NS} logs job/too-big-pretrain-preflight; "
        f"then coda-ctl -n {NS} retry too-big"
    )
    assert lines[2] == (
        "also: PreflightFailed: the pre-flight of stage pretrain (Job too-big-pretrain-preflight) "
        f"failed: {TOO_BIG}"
    )
    assert lines[3].startswith("  fix: coda-ctl plan --compile --search -f RUN.yaml")

    res = _ctl(kubeconfig, "describe", "too-big")
    assert res.exit_code == 0, res.output
    _golden("describe-preflight-too-big.txt", res.stdout)
    sections = res.stdout.split("\nPre-flight")
    assert len(sections) == 3, res.stdout  # `Pre-flight:` (the status), `Pre-flight Jobs:`
    status_rows, job_rows = sections[1].splitlines(), sections[2].splitlines()
    assert status_rows[1].split()[:7] == ["STAGE", "PHASE", "JOB", "FITS", "PEAK", "GiB", "HBM"]
    assert status_rows[2].split()[:6] == [
        "pretrain", "Failed", "too-big-pretrain-preflight", "NO", "120.00", "95.00"
    ]  # fmt: skip
    assert job_rows[2].split()[:4] == [
        "pretrain", "too-big-pretrain-preflight", "Failed", "(PodFailurePolicy)"
    ]  # fmt: skip
    assert "NoJobSet" not in res.stdout


def test_describe_lists_the_preflight_job_and_pod_of_a_compiling_run(
    kubeconfig: Path, stuck: None
) -> None:
    res = _ctl(kubeconfig, "describe", "compiling")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert (
        "Pods (JobSet compiling-pretrain):\n  <none>\n" in out
    )  # the pre-flight pod is not a host
    assert "pods of earlier JobSets" not in out
    job_rows = out.split("Pre-flight Jobs:\n")[1].splitlines()
    assert job_rows[1].split() == [
        "pretrain", "compiling-pretrain-preflight", "Active", "Running", "-", "-", "-"
    ]  # fmt: skip
