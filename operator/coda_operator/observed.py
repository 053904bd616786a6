"""What the operator observed of a run's children, parsed from their Kubernetes bodies.

The handlers keep kopf indexes of JobSets, Jobs and sampler Deployments; each body is reduced here
to the few fields the planner decides on, so the planner never reads a raw Kubernetes object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from coda_operator import render

__all__ = ["DeploymentObs", "JobObs", "JobSetObs", "Observed"]


@dataclass(frozen=True)
class JobSetObs:
    name: str
    stage: str | None
    suspended: bool
    state: Literal["Active", "Completed", "Failed"]
    message: str = ""
    restarts: int = 0
    reason: str = ""  # of the terminal condition, e.g. JOBSET_FAIL_ACTION_REASON

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobSetObs:
        meta, spec, status = (
            body.get("metadata") or {},
            body.get("spec") or {},
            body.get("status") or {},
        )
        state: Literal["Active", "Completed", "Failed"] = "Active"
        message = reason = ""
        terminal = status.get("terminalState")
        for cond in status.get("conditions") or []:
            if cond.get("status") == "True" and cond.get("type") in ("Completed", "Failed"):
                terminal = terminal or cond["type"]
                message = cond.get("message") or cond.get("reason") or ""
                reason = cond.get("reason") or ""
        if terminal in ("Completed", "Failed"):
            state = terminal
        return cls(
            name=meta.get("name", ""),
            stage=(meta.get("labels") or {}).get(render.LABEL_STAGE),
            suspended=bool(spec.get("suspend")),
            state=state,
            message=message,
            restarts=int(status.get("restarts") or 0),
            reason=reason,
        )


@dataclass(frozen=True)
class JobObs:
    """A batch/v1 Job (the evaluation's), reduced to what the planner needs."""

    name: str
    state: Literal["Active", "Completed", "Failed"]
    reason: str = ""
    message: str = ""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobObs:
        state: Literal["Active", "Completed", "Failed"] = "Active"
        reason = message = ""
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond.get("status") != "True":
                continue
            if cond.get("type") == "Complete":
                state = "Completed"
            elif cond.get("type") == "Failed":
                state = "Failed"
                reason, message = cond.get("reason") or "", cond.get("message") or ""
        return cls(
            name=(body.get("metadata") or {}).get("name", ""),
            state=state,
            reason=reason,
            message=message,
        )


@dataclass(frozen=True)
class DeploymentObs:
    name: str
    replicas: int
    ready_replicas: int

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> DeploymentObs:
        spec, status = body.get("spec") or {}, body.get("status") or {}
        return cls(
            name=(body.get("metadata") or {}).get("name", ""),
            replicas=int(spec.get("replicas", 1) or 0),
            ready_replicas=int(status.get("readyReplicas") or 0),
        )


@dataclass(frozen=True)
class Observed:
    jobsets: Mapping[str, JobSetObs] = field(default_factory=dict)
    sampler: DeploymentObs | None = None
    jobs: Mapping[str, JobObs] = field(default_factory=dict)  # evaluation Jobs by name
    # spec.serviceAccountName when the handler found no such ServiceAccount in the namespace
    missing_service_account: str | None = None
