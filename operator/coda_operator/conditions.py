"""The run's status vocabulary: its condition types, their reasons, and the one writer of them.

Conditions follow the Kubernetes API conventions (metav1.Condition): a type names a state that is
True or False, `reason` is a CamelCase word a program may switch on, `message` is for people.
The printed phase is derived from them (`PHASE_PRECEDENCE`), never stored on its own. Every
condition the operator writes goes through `set_condition`, so `lastTransitionTime` moves exactly
when a status flips. `kubectl get codatrainingrun -o yaml`, `coda-ctl describe` and alerts read
these names: changing one is an API change.
"""

from __future__ import annotations

from typing import Final

from coda_operator.api import CodaTrainingRunStatus, Condition

__all__ = [
    "CONDITION_MESSAGE_MAX",
    "CONDITION_TYPES",
    "PHASE_PRECEDENCE",
    "WARNING_TYPES",
    "Cond",
    "Reason",
    "set_condition",
]


class Cond:
    """Condition types of a CodaTrainingRun (run-level; stages carry their own phase)."""

    CREATED: Final = "Created"  # the current stage's JobSet (or Job) exists
    RUNNING: Final = "Running"  # a stage, its pre-flight or an evaluation is making progress
    QUEUED: Final = "Queued"  # Kueue has not admitted the current stage's JobSet yet
    SUSPENDED: Final = "Suspended"  # spec.suspend: the stage's JobSet is suspended, pods gone
    COMPLETE: Final = "Complete"  # every stage (and its evaluation and gate) succeeded
    FAILED: Final = "Failed"  # the run stopped for good (until `coda-ctl retry`)
    SAMPLER_READY: Final = "SamplerReady"  # the sampler Deployment has a ready replica
    QUALITY_GATE: Final = "QualityGate"  # spec.evaluation.minPassAt1 met by the evaluated stage
    SPEC_CHANGE_REJECTED: Final = "SpecChangeRejected"  # an edit the running run cannot take
    INVALID: Final = "Invalid"  # the spec does not validate (the run waits for a fix)
    PREFLIGHT: Final = "Preflight"  # the current TPU stage compiled for its slice and fits


CONDITION_TYPES: Final = (
    Cond.CREATED, Cond.RUNNING, Cond.QUEUED, Cond.SUSPENDED, Cond.COMPLETE, Cond.FAILED,
    Cond.SAMPLER_READY, Cond.QUALITY_GATE, Cond.SPEC_CHANGE_REJECTED, Cond.INVALID, Cond.PREFLIGHT,
)  # fmt: skip

# The printed phase: the first of these conditions that is True names it (none: Pending).
PHASE_PRECEDENCE: Final = (
    (Cond.FAILED, "Failed"),
    (Cond.COMPLETE, "Succeeded"),
    (Cond.SUSPENDED, "Suspended"),
    (Cond.QUEUED, "Queued"),
    (Cond.RUNNING, "Running"),
)

# Conditions whose turning True is posted as a Warning Event (the rest as Normal).
WARNING_TYPES: Final = frozenset({Cond.FAILED, Cond.SPEC_CHANGE_REJECTED, Cond.INVALID})


class Reason:
    """The fixed reasons the operator writes (a stage's own phase, e.g. `StageSucceeded`, and a
    failed pre-flight's or stage's cause are also used as reasons where the code says so)."""

    # spec
    INVALID_SPEC: Final = "InvalidSpec"
    SPEC_VALID: Final = "SpecValid"
    SPEC_ACCEPTED: Final = "SpecAccepted"
    STAGES_REORDERED: Final = "StagesReordered"
    RUNNING_STAGE_IMMUTABLE: Final = "RunningStageImmutable"
    # children
    CREATING: Final = "Creating"
    JOBSET_CREATED: Final = "JobSetCreated"
    CREATE_FAILED: Final = "CreateFailed"
    SERVICE_ACCOUNT_NOT_FOUND: Final = "ServiceAccountNotFound"
    # stages
    STAGE_RUNNING: Final = "StageRunning"
    STAGE_FAILED: Final = "StageFailed"
    STAGES_REMAINING: Final = "StagesRemaining"
    ALL_STAGES_SUCCEEDED: Final = "AllStagesSucceeded"
    COMPLETED: Final = "Completed"
    WAITING_FOR_ADMISSION: Final = "WaitingForAdmission"
    ADMITTED: Final = "Admitted"
    SUSPENDED_BY_USER: Final = "SuspendedByUser"
    RESUMED: Final = "Resumed"
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    RETRY_REQUESTED: Final = "RetryRequested"
    # pre-flight
    PREFLIGHT: Final = "Preflight"
    COMPILING: Final = "Compiling"
    FITS: Final = "Fits"
    DOES_NOT_FIT: Final = "DoesNotFit"
    PREFLIGHT_FAILED: Final = "PreflightFailed"
    # evaluation and gate
    EVALUATING: Final = "Evaluating"
    EVALUATION_RUNNING: Final = "EvaluationRunning"
    EVALUATION_FAILED: Final = "EvaluationFailed"
    QUALITY_GATE_PASSED: Final = "QualityGatePassed"
    QUALITY_GATE_FAILED: Final = "QualityGateFailed"
    # sampler
    STARTING: Final = "Starting"
    REPLICAS_READY: Final = "ReplicasReady"
    NOT_FOUND: Final = "NotFound"


# metav1.Condition's limit on a message
CONDITION_MESSAGE_MAX = 32768


def set_condition(
    st: CodaTrainingRunStatus,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> None:
    """Set one run-level condition (the only writer of conditions, for planner and handlers):
    lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    message = message[:CONDITION_MESSAGE_MAX]
    existing = st.condition(type_)
    if existing is None:
        st.conditions.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
        return
    if existing.status != value:
        existing.last_transition_time = now
    existing.status, existing.reason, existing.message = value, reason, message
    existing.observed_generation = generation
