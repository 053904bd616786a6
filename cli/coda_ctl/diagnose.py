""" "Why isn't it running?": a run joined with its JobSets, Jobs, pods, their events and Kueue
Workloads, and the first thing that blocks it.

Pure: `Snapshot` is what `kube.Cluster.snapshot` read; `findings` and `workloads_text` only look at
it (and `now`), so golden tests pin the exact output of `describe` and `doctor`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coda_ctl.views import human_age, parse_time, phase_of, plain_table

JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
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
    status = snap.run.get("status") or {}
    stage = status.get("stage")
    for s in status.get("stages") or []:
        if s.get("name") == stage:
            return s.get("jobSet")
    return None


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
    run, out = snap.run, []
    status = run.get("status") or {}
    phase = phase_of(run)
    name = _name(run)
    ns = (run.get("metadata") or {}).get("namespace", "default")
    if phase == "Succeeded":
        return []
    failed = _condition(run, "Failed")
    if phase == "Failed":
        msg = (failed or {}).get("message") or status.get("message") or "the run failed"
        out.append(
            Finding(
                "RunFailed",
                msg,
                f"coda-ctl -n {ns} logs {name}; then coda-ctl -n {ns} retry {name}",
            )
        )
    if (run.get("spec") or {}).get("suspend"):
        out.append(Finding("Suspended", "spec.suspend is true", f"coda-ctl -n {ns} resume {name}"))
    for c in _conditions(run):
        if c.get("status") == "False" and c.get("reason") == "ServiceAccountNotFound":
            out.append(Finding("ServiceAccountNotFound", c.get("message", ""), ""))
    jobset = current_jobset(snap)
    jobsets = {_name(j): j for j in snap.jobsets}
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
    if (
        phase not in ("Failed", "Suspended")
        and not any(f.reason == "ServiceAccountNotFound" for f in out)
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
    mine = [p for p in snap.pods if jobset is None or _labels(p).get(JOBSET_NAME_LABEL) == jobset]
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


def doctor_text(snap: Snapshot) -> str:
    """The first blocker, then the rest, each with its fix; or that nothing blocks the run."""
    found = findings(snap)
    name = _name(snap.run)
    if not found:
        mine = [
            p for p in snap.pods
            if _labels(p).get(JOBSET_NAME_LABEL) == current_jobset(snap)
        ]  # fmt: skip
        running = sum(1 for p in mine if (p.get("status") or {}).get("phase") == "Running")
        what = f"{running}/{len(mine)} pods running" if mine else phase_of(snap.run).lower()
        return f'run "{name}": nothing is blocking it ({what})'
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
    """The describe sections below the run's own: JobSets, Jobs, Pods, Kueue, their events, and
    the first blocker."""
    out = ["JobSets:"]
    if snap.jobsets:
        rows = []
        for j in snap.jobsets:
            st = j.get("status") or {}
            cond = next((c.get("type") for c in _conditions(j) if c.get("status") == "True"), None)
            suspended = (j.get("spec") or {}).get("suspend")
            rows.append(
                [
                    _name(j),
                    _labels(j).get("coda.dev/stage", "-"),
                    cond or ("Suspended" if suspended else "Active"),
                    str(st.get("restarts", 0)),
                    human_age(parse_time((j.get("metadata") or {}).get("creationTimestamp")), now),
                ]
            )
        out.append(plain_table(["NAME", "STAGE", "STATE", "RESTARTS", "AGE"], rows, indent="  "))
    else:
        out.append(f"  <none>{_why(snap, 'jobsets')}")
    out.append("Jobs:")
    if snap.jobs:
        rows = [
            [
                _name(j),
                str((j.get("status") or {}).get("active", 0)),
                str((j.get("status") or {}).get("succeeded", 0)),
                str((j.get("status") or {}).get("failed", 0)),
            ]
            for j in snap.jobs
        ]
        out.append(plain_table(["NAME", "ACTIVE", "SUCCEEDED", "FAILED"], rows, indent="  "))
    else:
        out.append(f"  <none>{_why(snap, 'jobs')}")
    jobset = current_jobset(snap)
    pods = [p for p in snap.pods if jobset is None or _labels(p).get(JOBSET_NAME_LABEL) == jobset]
    older = len(snap.pods) - len(pods)
    out.append(f"Pods (JobSet {jobset}):" if jobset else "Pods:")
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
    if snap.workloads or "workloads" not in snap.unavailable:
        out.append("Kueue:")
        if snap.workloads:
            rows = []
            for w in snap.workloads:
                admitted = _condition(w, "Admitted") or {}
                rows.append(
                    [
                        _name(w),
                        (w.get("spec") or {}).get("queueName", "-"),
                        "True" if admitted.get("status") == "True" else "False",
                        (_condition(w, "QuotaReserved") or admitted).get("message") or "-",
                    ]
                )
            out.append(plain_table(["WORKLOAD", "QUEUE", "ADMITTED", "MESSAGE"], rows, indent="  "))
        else:
            out.append("  <none>")
    out.append("Pod events:")
    events = sorted(snap.events, key=_event_time)[-last_events:]
    if events:
        rows = [
            [
                e.get("type", "Normal"),
                e.get("reason", "-"),
                f"{(e.get('involvedObject') or {}).get('kind', '?').lower()}/"
                f"{(e.get('involvedObject') or {}).get('name', '?')}",
                human_age(parse_time(_event_time(e)), now),
                (e.get("message") or "").strip().splitlines()[0] if e.get("message") else "-",
            ]
            for e in events
        ]
        out.append(plain_table(["TYPE", "REASON", "OBJECT", "AGE", "MESSAGE"], rows, indent="  "))
    else:
        out.append("  <none>")
    out.append("Diagnosis:")
    out.extend(f"  {line}" for line in doctor_text(snap).splitlines())
    return "\n".join(out)


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
