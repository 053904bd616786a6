""" "Why isn't it running?": a run joined with its JobSets, Jobs (the stages' pre-flight Jobs
among them), pods, their events and Kueue Workloads, and the first thing that blocks it.

Pure: `Snapshot` is what `kube.Cluster.snapshot` read; `findings` and `workloads_text` only look at
it (and `now`), so golden tests pin the exact output of `describe` and `doctor`. The run's status is
read through the operator's typed model (`Snapshot.status`); the Kubernetes objects of other
controllers stay the dicts the API server sent.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coda_operator.api import CodaTrainingRunStatus, PreflightStatus
from coda_operator.render import LABEL_COMPONENT

from coda_ctl.describe import preflight_report_cells
from coda_ctl.runstatus import read_status
from coda_ctl.views import human_age, parse_time, plain_table

JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME_LABEL = "job-name"  # what Job controllers before Kubernetes 1.27 set
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CRASH_REASONS = ("CrashLoopBackOff", "Error", "OOMKilled", "CreateContainerConfigError")
ACCELERATOR_RESOURCES = ("google.com/tpu", "nvidia.com/gpu")


@dataclass(frozen=True)
class Snapshot:
    """A run and what the cluster holds for it. `unavailable`: kinds that could not be read
    (API not installed, or not allowed), named in the output rather than silently empty."""

    run: dict[str, Any]
    jobsets: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # of the pods, Jobs and JobSets
    workloads: list[dict[str, Any]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def status(self) -> CodaTrainingRunStatus:
        """The run's status, typed (entries that do not validate left out: `describe` names them)."""
        return read_status(self.run)[0]


@dataclass(frozen=True)
class Finding:
    """One reason a run is not making progress, with what to do about it."""

    reason: str
    message: str
    fix: str = ""


def _name(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name", "?")


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list((obj.get("status") or {}).get("conditions") or [])


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in _conditions(obj) if c.get("type") == type_), None)


def current_jobset(snap: Snapshot) -> str | None:
    stage = snap.status.stage
    return next((s.job_set for s in snap.status.stages if s.name == stage), None)


def host_of(pod: dict[str, Any]) -> str:
    """`slice 0 host 3`: which host of which slice a pod is (JobSet job index, completion index)."""
    labels = _labels(pod)
    return (
        f"slice {labels.get(JOB_INDEX_LABEL, '?')} host {labels.get(COMPLETION_INDEX_LABEL, '?')}"
    )


def _waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of the first container that waits, if any."""
    status = pod.get("status") or {}
    for cs in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            return waiting.get("reason", ""), waiting.get("message", "")
    return None


def _terminated(pod: dict[str, Any]) -> tuple[str, int | None] | None:
    """(reason, exit code) of the last failed run of the first container that failed, if any."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            term = state.get("terminated")
            if term and term.get("exitCode", 0) != 0:
                return term.get("reason", "Error"), term.get("exitCode")
    return None


def pod_reason(pod: dict[str, Any]) -> str:
    """What kubectl's STATUS column would say: a waiting reason, Unschedulable, or the phase."""
    waiting = _waiting(pod)
    if waiting and waiting[0]:
        return waiting[0]
    scheduled = _condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        return scheduled.get("reason") or "Unschedulable"
    term = _terminated(pod)
    if term:
        return f"{term[0]} (exit {term[1]})"
    return (pod.get("status") or {}).get("phase") or "Pending"


def _node_selector(pods: Sequence[dict[str, Any]]) -> str:
    selector = ((pods[0].get("spec") or {}).get("nodeSelector") or {}) if pods else {}
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "none"


def _accelerators(pod: dict[str, Any]) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        for r in ACCELERATOR_RESOURCES:
            if r in limits:
                return f"{limits[r]} {r}"
    return ""


def findings(snap: Snapshot) -> list[Finding]:
    """Everything in the way of the run, the first blocker first (the order in which they must be
    fixed: nothing below a missing ServiceAccount or a Kueue refusal can happen before it is)."""
    if snap.status.phase == "Succeeded":
        return []
    out = _run_findings(snap)
    out += _preflight_findings(snap)
    out += _jobset_findings(snap, out)
    out += _kueue_findings(snap)
    out += _pod_findings(snap)
    return out


def _where(snap: Snapshot) -> tuple[str, str]:
    """(namespace, name) of the run, for the commands a fix names."""
    return (snap.run.get("metadata") or {}).get("namespace", "default"), _name(snap.run)


def _run_findings(snap: Snapshot) -> list[Finding]:
    """What the run's own spec and status say: it failed, it is suspended, no ServiceAccount."""
    status, (ns, name) = snap.status, _where(snap)
    out = []
    if status.phase == "Failed":
        failed = status.condition("Failed")
        msg = (failed.message if failed else "") or status.message or "the run failed"
        fix = f"coda-ctl -n {ns} logs {name}; then coda-ctl -n {ns} retry {name}"
        preflight = current_preflight(snap)
        if preflight is not None and preflight[1].phase == "Failed" and preflight[1].job:
            # no JobSet ran: the log to read is the pre-flight Job's
            fix = f"kubectl -n {ns} logs job/{preflight[1].job}; then coda-ctl -n {ns} retry {name}"
        out.append(Finding("RunFailed", msg, fix))
    if (snap.run.get("spec") or {}).get("suspend"):
        out.append(Finding("Suspended", "spec.suspend is true", f"coda-ctl -n {ns} resume {name}"))
    for c in status.conditions:
        if c.status == "False" and c.reason == "ServiceAccountNotFound":
            out.append(Finding("ServiceAccountNotFound", c.message, ""))
    return out


def current_preflight(snap: Snapshot) -> tuple[str, PreflightStatus] | None:
    """(stage, status.preflight.<stage>) of the current stage, if the operator checks it."""
    stage = snap.status.stage
    pf = (snap.status.preflight or {}).get(stage or "")
    return (stage, pf) if stage and pf is not None else None


def preflight_pods(snap: Snapshot, job: str | None) -> list[dict[str, Any]]:
    """The pods of pre-flight Job `job` (the Job controller labels them with its name)."""
    if not job:
        return []
    return [
        p
        for p in snap.pods
        if _labels(p).get(LABEL_COMPONENT) == "preflight"
        and job in (_labels(p).get(JOB_NAME_LABEL), _labels(p).get(LEGACY_JOB_NAME_LABEL))
    ]


def _preflight_findings(snap: Snapshot) -> list[Finding]:
    """The current stage's pre-flight compile: it found the stage does not fit (or its Job failed
    for good), or its one CPU pod cannot start. A compile under way blocks nothing."""
    found = current_preflight(snap)
    if found is None:
        return []
    (stage, pf), (ns, name) = found, _where(snap)
    if pf.phase == "Failed":
        fits, peak, hbm = preflight_report_cells(pf)
        message = pf.message or "no reason recorded"
        numbers = f"peak {peak} GiB of {hbm} GiB HBM per chip"
        if fits == "NO" and numbers not in message:  # the operator's message names them, or not
            message += f" ({numbers})"
        return [
            Finding(
                "PreflightFailed",
                f"the pre-flight of stage {stage} (Job {pf.job or '-'}) failed: {message}",
                "coda-ctl plan --compile --search -f RUN.yaml proposes a remat × gradAccum that "
                f"fits; change the stage, re-apply, then coda-ctl -n {ns} retry {name}",
            )
        ]
    if pf.phase != "Running":
        return []
    for pod in preflight_pods(snap, pf.job):
        reason = pod_reason(pod)
        if reason.split(" ")[0] in (*IMAGE_PULL_REASONS, *CRASH_REASONS, "Unschedulable"):
            return [
                Finding(
                    "PreflightPodFailing",
                    f"pre-flight pod {_name(pod)} of Job {pf.job} is {reason}",
                    f"kubectl -n {ns} describe pod {_name(pod)}; kubectl -n {ns} logs {_name(pod)}",
                )
            ]
    return []


def _jobset_findings(snap: Snapshot, before: list[Finding]) -> list[Finding]:
    """The JobSet API is missing, or the current stage's JobSet is (and nothing explains why)."""
    out = []
    if snap.unavailable.get("jobsets", "").startswith("API not installed"):
        out.append(
            Finding(
                "JobSetNotInstalled",
                "the JobSet API (jobset.x-k8s.io) is not installed: the operator cannot create "
                "the stages' JobSets",
                "install JobSet (kubectl apply --server-side -f "
                "https://github.com/kubernetes-sigs/jobset/releases/download/<version>/manifests.yaml)",
            )
        )
    jobset = current_jobset(snap)
    jobsets = {_name(j) for j in snap.jobsets}
    preflight = current_preflight(snap)
    if (
        snap.status.phase not in ("Failed", "Suspended")
        and not any(f.reason == "ServiceAccountNotFound" for f in before)
        # a stage's JobSet is created only once its pre-flight found that it fits
        and not (preflight is not None and preflight[1].phase in ("Pending", "Running"))
        and (jobset is None or (jobset not in jobsets and "jobsets" not in snap.unavailable))
    ):
        what = f"JobSet {jobset}" if jobset else "a JobSet for the first stage"
        out.append(
            Finding(
                "NoJobSet",
                f"the operator has not created {what} yet",
                "check that the coda-operator is running; the run's events (coda-ctl describe) "
                "say what it last did",
            )
        )
    return out


def _kueue_findings(snap: Snapshot) -> list[Finding]:
    """Workloads of the current JobSet that Kueue has not admitted."""
    jobset, out = current_jobset(snap), []
    for wl in snap.workloads:
        owner = [o.get("name") for o in (wl.get("metadata") or {}).get("ownerReferences") or []]
        if jobset and jobset not in owner:
            continue
        admitted = _condition(wl, "Admitted")
        if admitted and admitted.get("status") == "True":
            continue
        pending = _condition(wl, "QuotaReserved") or admitted or {}
        queue = (wl.get("spec") or {}).get("queueName", "?")
        out.append(
            Finding(
                "NotAdmitted",
                f"Kueue has not admitted Workload {_name(wl)} (queue {queue}): "
                + (pending.get("message") or "waiting for quota"),
                "free or add quota in the ClusterQueue, or lower the run's chips",
            )
        )
    return out


def _pod_findings(snap: Snapshot) -> list[Finding]:
    """The current JobSet's pods: an image that cannot be pulled, no node that fits, a host that
    keeps failing."""
    ns, _ = _where(snap)
    jobset, out = current_jobset(snap), []
    mine = [
        p
        for p in snap.pods
        if (_labels(p).get(JOBSET_NAME_LABEL) == jobset)
        or (jobset is None and _labels(p).get(LABEL_COMPONENT) != "preflight")
    ]
    pulls = [p for p in mine if (_waiting(p) or ("", ""))[0] in IMAGE_PULL_REASONS]
    if pulls:
        reason, message = _waiting(pulls[0]) or ("", "")
        image = next(
            (c.get("image") for c in (pulls[0].get("spec") or {}).get("containers") or []), "?"
        )
        out.append(
            Finding(
                "ImagePull",
                f"{len(pulls)}/{len(mine)} pods cannot pull image {image} ({reason}"
                + (f": {message}" if message else "")
                + ")",
                "check spec.image and the nodes' access to the registry (imagePullSecrets, "
                "Artifact Registry reader role)",
            )
        )
    unschedulable = [
        p for p in mine
        if (_condition(p, "PodScheduled") or {}).get("status") == "False"
    ]  # fmt: skip
    if unschedulable:
        cond = _condition(unschedulable[0], "PodScheduled") or {}
        acc = _accelerators(unschedulable[0])
        out.append(
            Finding(
                "Unschedulable",
                f"{len(unschedulable)}/{len(mine)} pods cannot be scheduled"
                + (
                    f" (each asks for {acc}; node selector {_node_selector(unschedulable)})"
                    if acc
                    else ""
                )
                + f": {cond.get('message') or cond.get('reason') or 'no fitting node'}",
                "add capacity (a node pool or a reservation of this accelerator and topology), "
                "or wait for the autoscaler",
            )
        )
    crashing = [p for p in mine if pod_reason(p).split(" ")[0] in CRASH_REASONS]
    if crashing:
        p = crashing[0]
        out.append(
            Finding(
                "HostFailing",
                f"pod {_name(p)} ({host_of(p)}) is {pod_reason(p)}",
                f"kubectl -n {ns} logs {_name(p)} --previous  (its last failed run)",
            )
        )
    return out


def _healthy_text(snap: Snapshot) -> str:
    """What a run that nothing blocks is doing: its pods running, its pre-flight compiling, or
    its phase."""
    jobset = current_jobset(snap)
    mine = [p for p in snap.pods if _labels(p).get(JOBSET_NAME_LABEL) == jobset]
    if mine:
        running = sum(1 for p in mine if (p.get("status") or {}).get("phase") == "Running")
        return f"{running}/{len(mine)} pods running"
    preflight = current_preflight(snap)
    if preflight is not None and preflight[1].phase in ("Pending", "Running"):
        stage, pf = preflight
        return f"pre-flight of stage {stage}: {pf.message or pf.phase.lower()}"
    return snap.status.phase.lower()


def doctor_text(snap: Snapshot) -> str:
    """The first blocker, then the rest, each with its fix; or that nothing blocks the run."""
    found = findings(snap)
    name = _name(snap.run)
    if not found:
        return f'run "{name}": nothing is blocking it ({_healthy_text(snap)})'
    lines = [f'run "{name}" is blocked: {found[0].reason}: {found[0].message}']
    if found[0].fix:
        lines.append(f"  fix: {found[0].fix}")
    for f in found[1:]:
        lines.append(f"also: {f.reason}: {f.message}")
        if f.fix:
            lines.append(f"  fix: {f.fix}")
    for kind, why in sorted(snap.unavailable.items()):
        lines.append(f"note: {kind} not read: {why}")
    return "\n".join(lines)


def workloads_text(snap: Snapshot, now: dt.datetime, last_events: int = 8) -> str:
    """The describe sections below the run's own: JobSets, Jobs, Pods, pre-flight Jobs, Kueue,
    their events, and the first blocker."""
    return "\n".join([
        *_jobset_lines(snap, now),
        *_job_lines(snap),
        *_pod_lines(snap),
        *_preflight_job_lines(snap),
        *_kueue_lines(snap),
        *_event_lines(snap, now, last_events),
        "Diagnosis:",
        *(f"  {line}" for line in doctor_text(snap).splitlines()),
    ])  # fmt: skip


def _jobset_lines(snap: Snapshot, now: dt.datetime) -> list[str]:
    if not snap.jobsets:
        return ["JobSets:", f"  <none>{_why(snap, 'jobsets')}"]
    rows = []
    for j in snap.jobsets:
        cond = next((c.get("type") for c in _conditions(j) if c.get("status") == "True"), None)
        suspended = (j.get("spec") or {}).get("suspend")
        rows.append([
            _name(j),
            _labels(j).get("coda.dev/stage", "-"),
            cond or ("Suspended" if suspended else "Active"),
            str((j.get("status") or {}).get("restarts", 0)),
            human_age(parse_time((j.get("metadata") or {}).get("creationTimestamp")), now),
        ])  # fmt: skip
    headers = ["NAME", "STAGE", "STATE", "RESTARTS", "AGE"]
    return ["JobSets:", plain_table(headers, rows, indent="  ")]


def _job_lines(snap: Snapshot) -> list[str]:
    if not snap.jobs:
        return ["Jobs:", f"  <none>{_why(snap, 'jobs')}"]
    rows = [
        [
            _name(j),
            *(str((j.get("status") or {}).get(k, 0)) for k in ("active", "succeeded", "failed")),
        ]
        for j in snap.jobs
    ]
    return ["Jobs:", plain_table(["NAME", "ACTIVE", "SUCCEEDED", "FAILED"], rows, indent="  ")]


def _pod_lines(snap: Snapshot) -> list[str]:
    """The current JobSet's pods (all trainer pods before there is one), and how many pods of
    earlier JobSets there are."""
    jobset = current_jobset(snap)
    trainers = [p for p in snap.pods if _labels(p).get(LABEL_COMPONENT) != "preflight"]
    pods = [p for p in trainers if jobset is None or _labels(p).get(JOBSET_NAME_LABEL) == jobset]
    older = len(trainers) - len(pods)
    out = [f"Pods (JobSet {jobset}):" if jobset else "Pods:"]
    if pods:
        rows = [
            [
                _name(p),
                host_of(p),
                (p.get("status") or {}).get("phase", "Pending"),
                pod_reason(p),
                (p.get("spec") or {}).get("nodeName") or "-",
            ]
            for p in pods
        ]
        out.append(plain_table(["NAME", "HOST", "PHASE", "REASON", "NODE"], rows, indent="  "))
        out.append(f"  Node selector: {_node_selector(pods)}")
    else:
        out.append(f"  <none>{_why(snap, 'pods')}")
    if older:
        out.append(f"  (+{older} pods of earlier JobSets of this run)")
    return out


def job_state(job: dict[str, Any] | None) -> str:
    """Complete, Failed (with its reason), Active or Pending, as the Job's status says; `<gone>`
    for a Job the status names that the cluster no longer holds."""
    if job is None:
        return "<gone>"
    for type_ in ("Complete", "Failed"):
        cond = _condition(job, type_)
        if cond and cond.get("status") == "True":
            return (
                f"{type_} ({cond['reason']})" if type_ == "Failed" and cond.get("reason") else type_
            )
    return "Active" if (job.get("status") or {}).get("active") else "Pending"


def _preflight_job_lines(snap: Snapshot) -> list[str]:
    """`Pre-flight Jobs:`: per stage the operator compiled before its JobSet, the newest Job's
    state, its pod's, and the report (FITS, peak and HBM GiB per chip). Nothing for a run
    without pre-flights."""
    if not snap.status.preflight:
        return []
    jobs = {_name(j): j for j in snap.jobs}
    rows = []
    for stage, pf in snap.status.preflight.items():
        pods = preflight_pods(snap, pf.job)
        job = jobs.get(pf.job) if pf.job else None
        rows.append([
            stage, pf.job or "-",
            job_state(job) if pf.job and "jobs" not in snap.unavailable else "-",
            pod_reason(pods[-1]) if pods else "-",
            *preflight_report_cells(pf),
        ])  # fmt: skip
    headers = ["STAGE", "JOB", "JOB STATE", "POD", "FITS", "PEAK GiB", "HBM GiB"]
    return ["Pre-flight Jobs:", plain_table(headers, rows, indent="  ")]


def _kueue_lines(snap: Snapshot) -> list[str]:
    if not snap.workloads and "workloads" in snap.unavailable:
        return []  # no Kueue in this cluster: no section
    if not snap.workloads:
        return ["Kueue:", "  <none>"]
    rows = []
    for w in snap.workloads:
        admitted = _condition(w, "Admitted") or {}
        rows.append([
            _name(w),
            (w.get("spec") or {}).get("queueName", "-"),
            "True" if admitted.get("status") == "True" else "False",
            (_condition(w, "QuotaReserved") or admitted).get("message") or "-",
        ])  # fmt: skip
    headers = ["WORKLOAD", "QUEUE", "ADMITTED", "MESSAGE"]
    return ["Kueue:", plain_table(headers, rows, indent="  ")]


def _event_lines(snap: Snapshot, now: dt.datetime, last: int) -> list[str]:
    events = sorted(snap.events, key=_event_time)[-last:]
    if not events:
        return ["Pod events:", "  <none>"]
    rows = []
    for e in events:
        involved = e.get("involvedObject") or {}
        message = e.get("message")
        rows.append([
            e.get("type", "Normal"),
            e.get("reason", "-"),
            f"{involved.get('kind', '?').lower()}/{involved.get('name', '?')}",
            human_age(parse_time(_event_time(e)), now),
            message.strip().splitlines()[0] if message else "-",
        ])  # fmt: skip
    headers = ["TYPE", "REASON", "OBJECT", "AGE", "MESSAGE"]
    return ["Pod events:", plain_table(headers, rows, indent="  ")]


def _why(snap: Snapshot, kind: str) -> str:
    return f" ({snap.unavailable[kind]})" if kind in snap.unavailable else ""


def _event_time(event: dict[str, Any]) -> str:
    return (
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )
