"""The stage machine, as a pure function: (run, observed children, now) → (actions, new status).

No Kubernetes here: `handlers` observes (kopf indexes of JobSets and Deployments), calls `plan`,
applies the actions and patches the status. Everything is level-triggered and idempotent: running
`plan` twice on the same input gives the same output, children have deterministic names and are
created only if absent, and a terminal run (Complete or Failed) never gets a new JobSet.

The state-transition table is in operator/README.md; the tests in tests/operator/test_planner.py
walk every row of it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from coda_trainer.contract import EXIT_PERMANENT, RETRY_ANNOTATION

from coda_operator import render
from coda_operator.api import (
    CodaTrainingRunSpec,
    CodaTrainingRunStatus,
    Condition,
    EvaluationStatus,
    InvalidSpec,
    PreflightStatus,
    Progress,
    SamplerStatus,
    StageStatus,
    parse_spec,
)
from coda_operator.conditions import (
    PHASE_PRECEDENCE,
    WARNING_TYPES,
    Cond,
    Reason,
    set_condition,
)
from coda_operator.observed import DeploymentObs, JobObs, JobSetObs, Observed

__all__ = [
    "Create",
    "DeleteChild",
    "DeleteRun",
    "DeploymentObs",
    "Event",
    "JobObs",
    "JobSetObs",
    "Observed",
    "PatchChild",
    "Reconciliation",
    "coalesce_events",
    "gate_misses",
    "isoformat",
    "parse_time",
    "phase_from_conditions",
    "plan",
    "retry_requested",
]

# The reason Kubernetes gives a Job failed by a FailJob podFailurePolicy rule (the evaluation's
# exit 78); any other failed Job (exit 75, a crash, BackoffLimitExceeded) may be retried.
JOB_POD_FAILURE_POLICY_REASON = "PodFailurePolicy"
# An evaluation Job that completed without its scores in status (its patch was lost): wait this
# long for them before failing the evaluation.
EVAL_SCORES_GRACE_S = 60.0
# `coda-ctl retry RUN` sets this annotation to a new value (a timestamp); a value the status has not
# recorded as handled asks for one more attempt of a Failed run's failed stage.


def isoformat(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def phase_from_conditions(conditions: list[Condition]) -> str:
    true = {c.type for c in conditions if c.status == "True"}
    return next((phase for ctype, phase in PHASE_PRECEDENCE if ctype in true), "Pending")


# --------------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """Create if absent (HTTP 409 means done): objects have deterministic names."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class PatchChild:
    api_version: str
    kind: str
    name: str
    patch: dict[str, Any]


@dataclass(frozen=True)
class DeleteChild:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class DeleteRun:
    reason: str


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = Create | PatchChild | DeleteChild | DeleteRun


@dataclass
class Reconciliation:
    """What one reconcile decided: the actions to apply, the Events to post, the status to write."""

    actions: list[Action]
    events: list[Event]
    status: CodaTrainingRunStatus
    requeue_after: float | None = None
    # (stage kind, seconds) of stages that finished in this step, for the metrics
    finished_stages: list[tuple[str, float]] = field(default_factory=list)

    def status_dict(self) -> dict[str, Any]:
        return self.status.wire()


# --------------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, status: CodaTrainingRunStatus, now: datetime, generation: int | None):
        self.st = status
        self.now = now
        self.now_s = isoformat(now)
        self.gen = generation
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.finished: list[tuple[str, float]] = []
        self.requeue: float | None = None

    def cond(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        set_condition(self.st, type_, status, reason, message, now=self.now_s, generation=self.gen)

    def clear(self, type_: str, reason: str, message: str = "") -> None:
        """Set a condition False only if it exists (keeps never-relevant conditions out of status)."""
        if self.st.condition(type_) is not None:
            self.cond(type_, False, reason, message)

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def requeue_in(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def terminal(self) -> bool:
        return self.st.is_true(Cond.COMPLETE) or self.st.is_true(Cond.FAILED)


# Parsed specs by run uid: a reconcile parses the spec only when it changed. Every reconcile
# parsed it before (pydantic, with the topology and shape checks): ~2 ms, an eighth of a
# reconcile's CPU at 1,000 runs. An entry is used only if the raw spec still equals the one it
# was parsed from (a dict comparison, microseconds), so a spec edited without a new
# metadata.generation (a test body, an emulator) is never served stale. Bounded: the oldest
# entries go first.
SPEC_CACHE_SIZE = 8192
_SPECS: OrderedDict[str, tuple[Any, CodaTrainingRunSpec | None, InvalidSpec | None]] = OrderedDict()


def _parsed_spec(
    uid: str | None, raw: Any
) -> tuple[CodaTrainingRunSpec | None, InvalidSpec | None]:
    """(spec, None) or (None, why it is invalid), parsed once per uid and spec content."""
    if uid is not None:
        hit = _SPECS.get(uid)
        if hit is not None and hit[0] == raw:
            _SPECS.move_to_end(uid)
            return hit[1], hit[2]
    try:
        spec: CodaTrainingRunSpec | None = parse_spec(raw)
        invalid: InvalidSpec | None = None
    except InvalidSpec as e:
        spec, invalid = None, e
    if uid is not None:
        _SPECS[uid] = (copy.deepcopy(raw), spec, invalid)  # a copy: callers may edit `raw` later
        _SPECS.move_to_end(uid)
        while len(_SPECS) > SPEC_CACHE_SIZE:
            _SPECS.popitem(last=False)
    return spec, invalid


def retry_requested(run: Mapping[str, Any]) -> bool:
    """Whether the run carries a `coda.dev/retry` value the operator has not handled yet."""
    value = ((run.get("metadata") or {}).get("annotations") or {}).get(RETRY_ANNOTATION)
    return bool(value) and value != (run.get("status") or {}).get("retryHandled")


def plan(run: Mapping[str, Any], observed: Observed, now: datetime) -> Reconciliation:
    """Decide what to do for one CodaTrainingRun body (metadata + spec + status)."""
    meta = run.get("metadata") or {}
    name, namespace = meta["name"], meta.get("namespace") or "default"
    old_status = run.get("status") or {}
    # Validated into a fresh model the planner may mutate; `run` itself is only read (the handler
    # diffs the new status against it), so no second (deep) copy is needed.
    ctx = _Ctx(CodaTrainingRunStatus.model_validate(old_status), now, meta.get("generation"))
    st = ctx.st
    if st.start_time is None:
        st.start_time = ctx.now_s

    spec, invalid = _parsed_spec(meta.get("uid"), run.get("spec"))

    retry = (meta.get("annotations") or {}).get(RETRY_ANNOTATION)
    if invalid is not None:
        _on_invalid(ctx, invalid)
        _retry_request(ctx, name, retry, None)
    else:
        assert spec is not None
        ctx.clear(Cond.INVALID, Reason.SPEC_VALID)
        _retry_request(ctx, name, retry, spec)
        if not ctx.terminal():
            trained = _advance(ctx, name, namespace, spec, observed)
            if not ctx.terminal() and _evaluations(ctx, name, namespace, spec, observed, trained):
                _complete(ctx, len(spec.stages))
        if st.is_true(Cond.COMPLETE):
            _sampler(ctx, name, namespace, spec, observed)
        _timers(ctx, spec)

    st.phase = phase_from_conditions(st.conditions)  # type: ignore[assignment]
    st.observed_generation = ctx.gen
    _condition_events(ctx, _true_conditions(old_status))
    return Reconciliation(ctx.actions, ctx.events, st, ctx.requeue, ctx.finished)


def _on_invalid(ctx: _Ctx, err: InvalidSpec) -> None:
    message = "; ".join(err.errors)
    ctx.cond(Cond.INVALID, True, Reason.INVALID_SPEC, message)
    started = any(s.job_set for s in ctx.st.stages)
    if not ctx.terminal() and not started:
        # Nothing ran yet: the run cannot start, and says why (Kubeflow #2351: status even when
        # no child could be created).
        ctx.cond(Cond.FAILED, True, Reason.INVALID_SPEC, message)
        ctx.cond(Cond.RUNNING, False, Reason.INVALID_SPEC, message)
        ctx.st.message = message
        ctx.st.completion_time = ctx.st.completion_time or ctx.now_s
    # A run already past its first stage keeps its children; it waits until the spec is valid again.


def _retry_request(
    ctx: _Ctx, name: str, value: str | None, spec: CodaTrainingRunSpec | None
) -> None:
    """A new `coda.dev/retry` value: reopen a Failed run's failed stage for one more attempt.

    Every new value is consumed (recorded in `status.retryHandled`) whether or not it applies, so a
    stale request can never resurrect a later failure. Only a stage failure (retries exhausted) is
    retried: an invalid spec or an exceeded deadline would fail again at once.
    """
    st = ctx.st
    if not value or value == st.retry_handled:
        return
    st.retry_handled = value
    what = f"{RETRY_ANNOTATION}={value}"
    failed = st.condition(Cond.FAILED)
    if failed is None or failed.status != "True":
        phase = phase_from_conditions(st.conditions)
        ctx.event(
            "Normal", "RetryIgnored", f"{what}: the run is {phase}, not Failed; nothing to retry"
        )
        return
    if spec is not None and failed.reason == "EvaluationFailed":
        _retry_evaluation(ctx, name, what, spec)
        return
    if spec is not None and failed.reason == "QualityGateFailed":
        _retry_gate(ctx, what, spec)
        return
    if spec is None or failed.reason != "StageFailed":
        why = "its spec is invalid" if spec is None else f"it failed with {failed.reason}"
        ctx.event(
            "Warning",
            "RetryIgnored",
            f"{what}: {why}; only a failed stage or a failed evaluation can be retried",
        )
        return
    i = next((k for k, ss in enumerate(st.stages) if ss.phase == "Failed"), None)
    if i is None or st.stages[i].name not in spec.stage_names():
        ctx.event("Warning", "RetryIgnored", f"{what}: no failed stage of the spec to retry")
        return
    ss = st.stages[i]
    before = ss.message or "JobSet failed"
    ss.retries += 1
    ss.phase, ss.completion_time = "Pending", None
    ss.message = f"manual retry (attempt {ss.retries + 1}) after: {before}"
    js = render.jobset_name(name, ss.name, ss.retries)
    msg = (
        f"retry of stage {ss.name} requested ({what}): creating JobSet {js}, resuming from the "
        f"stage's newest checkpoint"
    )
    _reopen(ctx, msg)


def _reopen(ctx: _Ctx, msg: str) -> None:
    """A manual retry was accepted: the run is no longer Failed, and says why."""
    ctx.cond(Cond.FAILED, False, Reason.RETRY_REQUESTED, msg)
    ctx.st.message, ctx.st.completion_time = msg, None
    ctx.event("Normal", "RetryRequested", msg)


def _retry_evaluation(ctx: _Ctx, name: str, what: str, spec: CodaTrainingRunSpec) -> None:
    """EvaluationFailed (the eval Job's retries exhausted, or exit 78): one more evaluation Job of
    the failed stage's final checkpoint; training is not touched."""
    st = ctx.st
    failed = [s for s, ev in (st.evaluation or {}).items() if ev.phase == "Failed"]
    if not failed or failed[0] not in spec.evaluated_stages():
        ctx.event("Warning", "RetryIgnored", f"{what}: no failed evaluation of the spec to retry")
        return
    stage, ev = failed[0], st.evaluation[failed[0]]  # type: ignore[index]
    before = ev.message or "Job failed"
    ev.retries += 1
    ev.phase, ev.job, ev.completion_time = "Pending", None, None
    ev.results = None  # a Job that completed without all its scores: the new one reports afresh
    job = render.eval_job_name(name, stage, ev.retries)
    msg = (
        f"retry of the evaluation of stage {stage} requested ({what}): creating Job {job} "
        f"(attempt {ev.retries + 1}) after: {before}"
    )
    _reopen(ctx, msg)


def _retry_gate(ctx: _Ctx, what: str, spec: CodaTrainingRunSpec) -> None:
    """QualityGateFailed: the scores are not measured again — the same checkpoint, sampler
    settings and seed give the same pass@1 — but the gate is checked again against the spec as it
    is now, so lowering (or removing) `spec.evaluation.minPassAt1` and retrying lets the run
    complete and serve. Otherwise the request is ignored and the event says what would help."""
    st = ctx.st
    stages = spec.evaluated_stages()
    results = (st.evaluation or {}).get(stages[-1]) if stages else None
    scores = {b: r.pass_at1 for b, r in ((results and results.results) or {}).items()}
    gate = spec.evaluation.min_pass_at1 if spec.evaluation else {}
    unmeasured = [b for b in gate if b not in scores]
    misses = gate_misses({b: v for b, v in gate.items() if b in scores}, scores)
    if misses or unmeasured:
        ctx.event(
            "Warning",
            "RetryIgnored",
            f"{what}: the quality gate still fails ("
            + "; ".join(misses + [f"{b} was not measured" for b in unmeasured])
            + "). Evaluating the same checkpoint again gives the same score (same settings and "
            "seed): lower spec.evaluation.minPassAt1 and retry, or train a better model",
        )
        return
    met = ", ".join(f"{b} {100 * scores[b]:.1f}% >= {100 * v:.1f}%" for b, v in gate.items())
    msg = (
        f"retry requested ({what}): the quality gate of the current spec is met "
        f"({met or 'no minPassAt1'}); completing the run without evaluating again"
    )
    _reopen(ctx, msg)
    ctx.cond(Cond.QUALITY_GATE, True, Reason.RETRY_REQUESTED, msg)


def _sync_stage_list(ctx: _Ctx, spec: CodaTrainingRunSpec) -> str | None:
    """Align status.stages with spec.stages; returns why the new stage list is refused, if it is."""
    started = [s.name for s in ctx.st.stages if s.job_set]
    names = spec.stage_names()
    if names[: len(started)] != started:
        return (
            f"spec.stages: stages that already started ({', '.join(started)}) must stay first and in order; "
            f"got {', '.join(names)}"
        )
    by_name = {s.name: s for s in ctx.st.stages}
    ctx.st.stages = [by_name.get(n) or StageStatus(name=n) for n in names]
    return None


def _advance(
    ctx: _Ctx, name: str, namespace: str, spec: CodaTrainingRunSpec, observed: Observed
) -> bool:
    """Drive the stages; True when every stage has succeeded."""
    st = ctx.st
    refused = _sync_stage_list(ctx, spec)
    if refused:
        ctx.cond(Cond.SPEC_CHANGE_REJECTED, True, Reason.STAGES_REORDERED, refused)
        return False

    deadline = spec.active_deadline_seconds
    if deadline is not None and st.start_time is not None:
        elapsed = (ctx.now - parse_time(st.start_time)).total_seconds()
        if elapsed >= deadline:
            _fail_deadline(ctx, name, spec, observed, deadline)
            return False

    rejected: list[str] = []
    n = len(spec.stages)
    i = 0
    all_done = False
    while i < n:
        ss = st.stages[i]
        if ss.phase == "Succeeded":
            i += 1
            continue
        stage = spec.stages[i]
        js_name = render.jobset_name(name, stage.name, ss.retries)
        ss.job_set = js_name
        fp = render.fingerprint(name, spec, i)
        obs = observed.jobsets.get(js_name)
        st.stage, st.stage_index = stage.name, i

        if obs is None:
            if not _service_account_missing(ctx, namespace, spec, observed) and _preflight(
                ctx, name, namespace, spec, i, observed
            ):
                _start_stage(ctx, name, namespace, spec, i, fp)
            break

        ctx.cond(Cond.CREATED, True, Reason.JOBSET_CREATED, f"JobSet {js_name} exists")
        ss.job_set_restarts = obs.restarts
        if not ss.fingerprint:
            ss.fingerprint = fp  # created before a crash lost the status write
        changed = [k for k in fp if ss.fingerprint.get(k) != fp[k]]

        if obs.state == "Completed":
            _stage_succeeded(ctx, spec, i, ss)
            i += 1
            continue

        if obs.state == "Failed":
            if _stage_failed(ctx, spec, i, ss, obs):
                continue  # retrying: the same stage, next attempt name
            return False

        # Active JobSet: honour suspend, tell Kueue's hold from a user suspend.
        if changed:
            fields = ", ".join(render.FINGERPRINT_FIELDS[k].format(i=i) for k in changed)
            rejected.append(
                f"{fields} changed while stage {stage.name} runs; not applied to JobSet {js_name} "
                f"(it applies to later stages and to a retry of this one)"
            )
        _active_stage(ctx, spec, ss, obs)
        break
    else:
        all_done = True

    if rejected:
        ctx.cond(
            Cond.SPEC_CHANGE_REJECTED, True, Reason.RUNNING_STAGE_IMMUTABLE, "; ".join(rejected)
        )
    else:
        ctx.clear(Cond.SPEC_CHANGE_REJECTED, Reason.SPEC_ACCEPTED)
    return all_done


def _stage_succeeded(ctx: _Ctx, spec: CodaTrainingRunSpec, i: int, ss: StageStatus) -> None:
    """Stage i's JobSet Completed: record its final checkpoint and duration."""
    stage = spec.stages[i]
    ss.phase = "Succeeded"
    ss.final = render.stage_final(spec, i)
    ss.completion_time = ctx.now_s
    ss.message = None
    ss.fingerprint = {}  # only the running stage's is compared
    if ss.start_time:
        ctx.finished.append((stage.kind, (ctx.now - parse_time(ss.start_time)).total_seconds()))
    ctx.event(
        "Normal",
        "StageSucceeded",
        f"Stage {stage.name} ({i + 1}/{len(spec.stages)}) completed; final checkpoint {ss.final}",
    )


def _stage_failed(
    ctx: _Ctx, spec: CodaTrainingRunSpec, i: int, ss: StageStatus, obs: JobSetObs
) -> bool:
    """Stage i's JobSet Failed: True when another attempt starts, False when the run fails."""
    stage, st = spec.stages[i], ctx.st
    why = obs.message or "JobSet failed"
    # The JobSet's only FailJobSet rule is the trainer's EXIT_PERMANENT: bad config, data
    # or init_from. Another attempt would fail the same way, so it gets none.
    permanent = obs.reason == JOBSET_FAIL_ACTION_REASON
    if permanent:
        why = f"permanent failure, not retried (trainer exit {EXIT_PERMANENT}: bad config, data or init_from; see the leader's log): {why}"
    if not permanent and ss.retries < spec.failure_policy.stage_retries:
        ss.retries += 1
        ss.message = f"retry {ss.retries}/{spec.failure_policy.stage_retries} after: {why}"
        ctx.event(
            "Warning",
            "StageRetrying",
            f"Stage {stage.name}: JobSet {obs.name} failed ({why}); starting retry "
            f"{ss.retries}/{spec.failure_policy.stage_retries}, resuming from the newest checkpoint",
        )
        return True
    ss.phase = "Failed"
    ss.message = why
    ss.completion_time = ctx.now_s
    attempts = ss.retries + 1
    msg = f"stage {stage.name} failed after {attempts} attempt{'s' * (attempts > 1)}: {why}"
    ctx.cond(Cond.FAILED, True, Reason.STAGE_FAILED, msg)
    ctx.cond(Cond.RUNNING, False, Reason.STAGE_FAILED, msg)
    st.message = msg
    st.completion_time = ctx.now_s
    return False


# The reason JobSet (>= v0.5) gives a JobSet failed by a FailJobSet failure-policy rule.
JOBSET_FAIL_ACTION_REASON = "FailJobSetFailurePolicyAction"

# A missing ServiceAccount is fixed by a person, not by time: look again at this pace.
SERVICE_ACCOUNT_RECHECK_S = 30.0


def _service_account_missing(
    ctx: _Ctx, namespace: str, spec: CodaTrainingRunSpec, observed: Observed
) -> bool:
    """A JobSet whose pods name a ServiceAccount that does not exist never gets a pod (the Job
    controller only logs FailedCreate): say so on the run instead of creating it."""
    sa = spec.service_account_name
    if not sa or observed.missing_service_account != sa:
        return False
    message = (
        f"ServiceAccount {sa!r} not found in namespace {namespace!r}: no trainer pod can be "
        f"created. Create it (kubectl -n {namespace} create serviceaccount {sa}), or install the "
        f"chart with --set 'trainerServiceAccount.namespaces={{{namespace}}}'"
    )
    existing = ctx.st.condition(Cond.CREATED)
    if existing is None or existing.reason != "ServiceAccountNotFound":
        ctx.event("Warning", "ServiceAccountNotFound", message)
    ctx.cond(Cond.CREATED, False, Reason.SERVICE_ACCOUNT_NOT_FOUND, message)
    ctx.st.message = message
    ctx.requeue_in(SERVICE_ACCOUNT_RECHECK_S)
    return True


# A pre-flight Job that completed without its report in status (the pod's patch was lost): wait
# this long for it, then count the Job as an infrastructure failure.
PREFLIGHT_REPORT_GRACE_S = 60.0
# Job failure reasons no new pre-flight Job fixes: exit 78 (does not fit, bad config, an image
# without libtpu) through the podFailurePolicy, and a compile past activeDeadlineSeconds.
_PREFLIGHT_PERMANENT = (JOB_POD_FAILURE_POLICY_REASON, "DeadlineExceeded")


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.2f}"


def _preflight(
    ctx: _Ctx, name: str, namespace: str, spec: CodaTrainingRunSpec, i: int, observed: Observed
) -> bool:
    """Stage `i`'s pre-flight compile (TPU stages, unless spec.preflight is false); True when its
    JobSet may be created. A report for the stage's current key (spec parts + image) is a cache
    hit: a retry, an operator restart or a re-run of the same spec never compiles again."""
    if i not in render.preflights(spec):
        return True
    st, ss, stage = ctx.st, ctx.st.stages[i], spec.stages[i]
    tpu = spec.stage_accelerator(i).tpu
    assert tpu is not None
    where = f"{tpu.slices} x {tpu.type} {tpu.topology}"
    key = render.preflight_key(name, spec, i)
    st.preflight = st.preflight or {}
    pf = st.preflight.get(stage.name)
    if pf is None or pf.key != key:
        # The first pre-flight of this stage, or its spec or image changed: a new Job, new name.
        attempt = 0 if pf is None else pf.attempt + (1 if pf.job else 0)
        pf = st.preflight[stage.name] = PreflightStatus(key=key, attempt=attempt)
    elif pf.phase == "Failed" and pf.report_key != key:
        # A manual retry (`coda-ctl retry`) of a stage whose pre-flight Job kept failing: try anew.
        pf.phase, pf.retries, pf.attempt, pf.job = "Pending", 0, pf.attempt + 1, None

    if pf.report is not None and pf.report_key == key:
        return _preflight_reported(ctx, ss, pf, where)

    job = render.preflight_job_name(name, stage.name, pf.attempt)
    obs = observed.jobs.get(job)
    if obs is not None and obs.state == "Completed":
        # Exit 0 comes after the report's patch; wait a little for the watch to bring it.
        first_seen = pf.waiting_since or ctx.now_s
        pf.waiting_since = first_seen
        waited = (ctx.now - parse_time(first_seen)).total_seconds()
        if waited < PREFLIGHT_REPORT_GRACE_S:
            ctx.requeue_in(PREFLIGHT_REPORT_GRACE_S - waited)
            _preflight_waiting(ctx, ss, pf, f"Job {job} completed; waiting for its report")
            return False
    if obs is not None and obs.state != "Active":
        if not _preflight_job_ended(ctx, spec, ss, pf, job, obs):
            return False
        job, obs = render.preflight_job_name(name, stage.name, pf.attempt), None

    if obs is None:
        # Create is create-if-absent: repeating it until the Job is observed is safe.
        ctx.actions.append(
            Create(render.render_preflight_job(name, namespace, spec, i, key, pf.attempt))
        )
        if pf.job != job:
            pf.job = job
            ctx.event(
                "Normal",
                "PreflightStarted",
                f"Stage {stage.name}: compiling its step for {where} in CPU Job {job} before "
                "requesting TPUs",
            )
    _preflight_waiting(ctx, ss, pf, f"compiling the step for {where} in Job {job}")
    return False


def _preflight_reported(ctx: _Ctx, ss: StageStatus, pf: PreflightStatus, where: str) -> bool:
    """The stage's pre-flight report for its current key: True when the step fits (the JobSet
    may be created), else the stage fails."""
    r = pf.report
    assert r is not None
    numbers = (
        f"peak {_gib(r.peak_bytes_per_device)} GiB of {_gib(r.hbm_bytes_per_device)} GiB "
        f"HBM per chip"
    )
    if r.fits:
        pf.phase, pf.message = "Succeeded", numbers
        ctx.cond(Cond.PREFLIGHT, True, Reason.FITS, f"stage {ss.name} on {where}: {numbers}")
        return True
    why = "; ".join(r.problems) or f"does not fit ({numbers})"
    pf.phase, pf.message = "Failed", why
    ctx.cond(Cond.PREFLIGHT, False, Reason.DOES_NOT_FIT, f"stage {ss.name} on {where}: {why}")
    _fail_stage(ctx, ss, "PreflightFailed", f"pre-flight on {where}: {why}")
    return False


def _preflight_job_ended(
    ctx: _Ctx,
    spec: CodaTrainingRunSpec,
    ss: StageStatus,
    pf: PreflightStatus,
    job: str,
    obs: JobObs,
) -> bool:
    """The pre-flight Job failed, or completed without a report: True when another attempt
    starts (pf.attempt moved on), False when the stage fails."""
    why = (
        obs.message or obs.reason or "Job failed"
        if obs.state == "Failed"
        else f"Job {job} completed without writing status.preflight.{ss.name}"
    )
    if obs.state == "Failed" and obs.reason in _PREFLIGHT_PERMANENT:
        msg = f"pre-flight Job {job} failed, not retried (see its log): {why}"
        pf.phase, pf.message = "Failed", msg
        ctx.cond(Cond.PREFLIGHT, False, Reason.PREFLIGHT_FAILED, msg)
        _fail_stage(ctx, ss, "PreflightFailed", msg)
        return False
    if pf.retries >= spec.failure_policy.stage_retries:
        msg = (
            f"pre-flight Job {job} failed after {pf.retries + 1} attempt(s): {why} (see its "
            "log; a pod that cannot write its report needs a ServiceAccount allowed to patch "
            "codatrainingruns/status, the chart's trainerServiceAccount with reportProgress; "
            "or set spec.preflight: false)"
        )
        pf.phase, pf.message = "Failed", msg
        ctx.cond(Cond.PREFLIGHT, False, Reason.PREFLIGHT_FAILED, msg)
        _fail_stage(ctx, ss, "StageFailed", msg)
        return False
    # Evicted, exit 75, a crash: the same contract as training, a new Job (no TPU involved).
    pf.retries += 1
    pf.attempt += 1
    pf.waiting_since = None
    ctx.event(
        "Warning",
        "PreflightRetrying",
        f"Pre-flight of stage {ss.name}: {why}; retry "
        f"{pf.retries}/{spec.failure_policy.stage_retries}",
    )
    return True


def _preflight_waiting(ctx: _Ctx, ss: StageStatus, pf: PreflightStatus, what: str) -> None:
    pf.phase, pf.message = "Running", what
    ss.phase = "Pending"
    msg = f"stage {ss.name}: pre-flight, {what}"
    ctx.cond(Cond.PREFLIGHT, False, Reason.COMPILING, msg)
    ctx.cond(Cond.RUNNING, False, Reason.PREFLIGHT, msg)
    ctx.cond(Cond.COMPLETE, False, Reason.STAGES_REMAINING, msg)
    ctx.st.message = msg


def _fail_stage(ctx: _Ctx, ss: StageStatus, reason: str, why: str) -> None:
    """Stage `ss` failed before its JobSet existed: the run fails, no TPU was asked for."""
    ss.phase, ss.message, ss.completion_time = "Failed", why, ctx.now_s
    msg = f"stage {ss.name} failed: {why}"
    ctx.cond(Cond.FAILED, True, reason, msg)
    ctx.cond(Cond.RUNNING, False, reason, msg)
    ctx.st.message = msg
    ctx.st.completion_time = ctx.now_s


def _start_stage(
    ctx: _Ctx, name: str, namespace: str, spec: CodaTrainingRunSpec, i: int, fp: dict[str, str]
) -> None:
    st, ss, stage = ctx.st, ctx.st.stages[i], spec.stages[i]
    objs = render.render_stage(name, namespace, spec, i, attempt=ss.retries, suspend=spec.suspend)
    ctx.actions += [Create(objs.configmap), Create(objs.jobset)]
    first_time = ss.start_time is None
    ss.phase = "Pending"
    ss.fingerprint = fp
    ss.init_from = render.stage_init_from(spec, i)
    if first_time:
        ss.start_time = ctx.now_s
        acc = spec.stage_accelerator(i)
        where = (
            f"{acc.tpu.slices} x {acc.tpu.type} {acc.tpu.topology}"
            if acc.tpu
            else f"{acc.gpu.nodes} x {acc.gpu.gpus_per_node} {acc.gpu.type}"
            if acc.gpu
            else "cpu"
        )
        ctx.event(
            "Normal",
            "StageStarted",
            f"Stage {stage.name} ({i + 1}/{len(spec.stages)}): creating JobSet {ss.job_set} on {where}"
            + (f", init from {ss.init_from}" if ss.init_from else ""),
        )
    if st.progress is None or st.progress.stage != stage.name:
        st.progress = Progress(stage=stage.name, step=0, total_steps=stage.steps)
    ctx.cond(Cond.CREATED, False, Reason.CREATING, f"creating JobSet {ss.job_set}")
    st.message = f"stage {stage.name}: waiting for JobSet {ss.job_set}"
    _stage_conditions(ctx, spec, ss)


def _active_stage(ctx: _Ctx, spec: CodaTrainingRunSpec, ss: StageStatus, obs: JobSetObs) -> None:
    if spec.suspend:
        if not obs.suspended:
            ctx.actions.append(
                PatchChild(
                    "jobset.x-k8s.io/v1alpha2", "JobSet", obs.name, {"spec": {"suspend": True}}
                )
            )
        ss.phase = "Suspended"
    elif obs.suspended:
        if spec.queue_name:
            ss.phase = "Queued"  # Kueue admits by unsuspending; never mistaken for a user suspend
        else:
            ctx.actions.append(
                PatchChild(
                    "jobset.x-k8s.io/v1alpha2", "JobSet", obs.name, {"spec": {"suspend": False}}
                )
            )
            ss.phase = "Running"
    else:
        ss.phase = "Running"
    ctx.st.message = {
        "Suspended": f"stage {ss.name} suspended (JobSet {obs.name} kept)",
        "Queued": f"stage {ss.name} queued in {spec.queue_name}: waiting for Kueue to admit JobSet {obs.name}",
        "Running": f"stage {ss.name} running (JobSet {obs.name})",
    }[ss.phase]
    _stage_conditions(ctx, spec, ss)


def _stage_conditions(ctx: _Ctx, spec: CodaTrainingRunSpec, ss: StageStatus) -> None:
    phase = ss.phase
    ctx.cond(
        Cond.SUSPENDED,
        spec.suspend,
        Reason.SUSPENDED_BY_USER if spec.suspend else Reason.RESUMED,
        f"spec.suspend is {'true' if spec.suspend else 'false'}",
    )
    if phase == "Queued":
        ctx.cond(
            Cond.QUEUED,
            True,
            Reason.WAITING_FOR_ADMISSION,
            f"Kueue LocalQueue {spec.queue_name} has not admitted {ss.job_set}",
        )
    else:
        ctx.clear(Cond.QUEUED, Reason.ADMITTED if phase == "Running" else phase, "")
    running = phase == "Running"
    ctx.cond(
        Cond.RUNNING,
        running,
        # not running: the stage's phase says why (StageQueued, StageSuspended, StageSucceeded, …)
        Reason.STAGE_RUNNING if running else f"Stage{phase}",
        f"stage {ss.name}: {phase.lower()}",
    )
    ctx.cond(Cond.COMPLETE, False, Reason.STAGES_REMAINING, f"stage {ss.name} is {phase.lower()}")


def _evaluations(
    ctx: _Ctx,
    name: str,
    namespace: str,
    spec: CodaTrainingRunSpec,
    observed: Observed,
    trained: bool,
) -> bool:
    """Evaluate each listed stage once its final checkpoint exists (stage Succeeded), in parallel
    with later stages; True when the run may complete: all evaluations succeeded and every
    `minPassAt1` is met. A permanent or exhausted evaluation failure, or a missed gate, fails the
    run (so no sampler is rolled out). A run without `spec.evaluation` returns `trained`."""
    stages = spec.evaluated_stages()
    if not stages:
        return trained
    assert spec.evaluation is not None
    st = ctx.st
    st.evaluation = st.evaluation or {}
    phases = {ss.name: ss.phase for ss in st.stages}
    done = True
    for stage in stages:
        ev = st.evaluation.setdefault(stage, EvaluationStatus())
        if phases.get(stage) != "Succeeded":
            done = False
            continue
        if ev.phase == "Succeeded":
            continue
        outcome = _evaluate_stage(ctx, name, namespace, spec, observed, stage, ev)
        if outcome == "failed":
            return False
        if outcome == "waiting":
            done = False
    if not (done and trained):
        if trained:
            running = [s for s in stages if st.evaluation[s].phase != "Succeeded"]
            msg = f"all {len(spec.stages)} stages succeeded; evaluating {', '.join(running)}"
            ctx.cond(Cond.RUNNING, True, Reason.EVALUATING, msg)
            ctx.cond(Cond.COMPLETE, False, Reason.EVALUATION_RUNNING, msg)
            st.message = msg
        return False
    return _gate(ctx, spec, stages[-1])


_EvalOutcome = Literal["done", "waiting", "failed"]


def _evaluate_stage(
    ctx: _Ctx,
    name: str,
    namespace: str,
    spec: CodaTrainingRunSpec,
    observed: Observed,
    stage: str,
    ev: EvaluationStatus,
) -> _EvalOutcome:
    """One trained stage's evaluation: create its Job, follow it, take its scores."""
    assert spec.evaluation is not None
    job = render.eval_job_name(name, stage, ev.retries)
    obs = observed.jobs.get(job)
    index = spec.stage_names().index(stage)
    if obs is None:
        # Create is create-if-absent: repeating it while the Job is not yet observed is safe.
        ctx.actions.append(Create(render.render_eval_job(name, namespace, spec, stage, ev.retries)))
        if ev.job != job or ev.phase == "Pending":
            ev.job, ev.phase = job, "Running"
            ev.checkpoint = render.stage_final(spec, index)
            ev.start_time = ev.start_time or ctx.now_s
            ev.completion_time, ev.message = None, f"Job {job} created"
            ctx.event(
                "Normal",
                "EvaluationStarted",
                f"Evaluating stage {stage} ({ev.checkpoint}) on "
                f"{', '.join(spec.evaluation.benchmarks)}: Job {job}",
            )
        return "waiting"
    if obs.state == "Active":
        ev.phase, ev.message = "Running", f"Job {job} running"
        return "waiting"
    if obs.state == "Completed":
        missing = [b for b in spec.evaluation.benchmarks if b not in (ev.results or {})]
        if missing:
            first_seen = ev.completion_time or ctx.now_s
            ev.completion_time = first_seen
            waited = (ctx.now - parse_time(first_seen)).total_seconds()
            if waited < EVAL_SCORES_GRACE_S:
                ev.message = f"Job {job} completed; waiting for its scores ({', '.join(missing)})"
                ctx.requeue_in(EVAL_SCORES_GRACE_S - waited)
                return "waiting"
            _fail_evaluation(
                ctx, stage, ev,
                f"Job {job} completed but reported no scores for {', '.join(missing)} into "
                f"status.evaluation.{stage} (see the Job's log)",
            )  # fmt: skip
            return "failed"
        ev.phase, ev.completion_time = "Succeeded", ev.completion_time or ctx.now_s
        ev.message = None
        scores = ", ".join(
            f"{b} {100 * ev.results[b].pass_at1:.1f}"  # type: ignore[index]
            for b in spec.evaluation.benchmarks
        )
        ctx.event("Normal", "EvaluationSucceeded", f"Stage {stage} pass@1: {scores}")
        ctx.st.score = f"{stage}: {scores}"
        return "done"
    return _evaluation_job_failed(ctx, name, namespace, spec, stage, ev, obs)


def _evaluation_job_failed(
    ctx: _Ctx,
    name: str,
    namespace: str,
    spec: CodaTrainingRunSpec,
    stage: str,
    ev: EvaluationStatus,
    obs: JobObs,
) -> _EvalOutcome:
    """The evaluation Job failed: another attempt ("waiting"), or the run fails ("failed")."""
    job = obs.name
    why = obs.message or obs.reason or "Job failed"
    permanent = obs.reason == JOB_POD_FAILURE_POLICY_REASON
    if not permanent and ev.retries < spec.failure_policy.stage_retries:
        ev.retries += 1
        ev.phase, ev.job = "Pending", None
        ev.message = f"retry {ev.retries}/{spec.failure_policy.stage_retries} after: {why}"
        ctx.event(
            "Warning",
            "EvaluationRetrying",
            f"Evaluation of stage {stage}: Job {job} failed ({why}); starting retry "
            f"{ev.retries}/{spec.failure_policy.stage_retries}",
        )
        # Create the next attempt in this same pass.
        ctx.actions.append(Create(render.render_eval_job(name, namespace, spec, stage, ev.retries)))
        ev.job, ev.phase = render.eval_job_name(name, stage, ev.retries), "Running"
        return "waiting"
    if permanent:
        why = (
            f"permanent failure, not retried (evaluation exit {EXIT_PERMANENT}: bad checkpoint "
            f"or arguments; see the Job's log): {why}"
        )
    attempts = ev.retries + 1
    _fail_evaluation(
        ctx, stage, ev,
        f"evaluation of stage {stage} failed after {attempts} attempt"
        f"{'s' * (attempts > 1)}: {why}",
    )  # fmt: skip
    return "failed"


def _fail_evaluation(ctx: _Ctx, stage: str, ev: EvaluationStatus, msg: str) -> None:
    ev.phase, ev.message = "Failed", msg
    ev.completion_time = ev.completion_time or ctx.now_s
    ctx.cond(Cond.FAILED, True, Reason.EVALUATION_FAILED, msg)
    ctx.cond(Cond.RUNNING, False, Reason.EVALUATION_FAILED, msg)
    ctx.st.message = msg
    ctx.st.completion_time = ctx.now_s


def gate_misses(min_pass_at1: Mapping[str, float], pass_at1: Mapping[str, float]) -> list[str]:
    """One line per benchmark below its `minPassAt1` (the operator's gate and `local run`'s)."""
    return [
        f"{b} pass@1 {100 * pass_at1[b]:.1f}% < minPassAt1 {100 * need:.1f}% "
        f"(missed by {100 * (need - pass_at1[b]):.1f} points)"
        for b, need in min_pass_at1.items()
        if pass_at1[b] < need
    ]


def _gate(ctx: _Ctx, spec: CodaTrainingRunSpec, stage: str) -> bool:
    """`minPassAt1` against the last evaluated stage (the checkpoint the sampler would serve when
    it is the last stage). A miss fails the run: phase Failed, reason QualityGateFailed."""
    assert spec.evaluation is not None and ctx.st.evaluation is not None
    results = ctx.st.evaluation[stage].results or {}
    misses = gate_misses(spec.evaluation.min_pass_at1, {b: r.pass_at1 for b, r in results.items()})
    if not spec.evaluation.min_pass_at1:
        return True
    if misses:
        msg = f"quality gate failed after stage {stage}: {'; '.join(misses)}; no sampler deployed"
        ctx.cond(Cond.QUALITY_GATE, False, Reason.QUALITY_GATE_FAILED, msg)
        ctx.cond(Cond.FAILED, True, Reason.QUALITY_GATE_FAILED, msg)
        ctx.cond(Cond.RUNNING, False, Reason.QUALITY_GATE_FAILED, msg)
        ctx.st.message = msg
        ctx.st.completion_time = ctx.now_s
        return False
    passed = ", ".join(
        f"{b} {100 * results[b].pass_at1:.1f}% >= {100 * need:.1f}%"
        for b, need in spec.evaluation.min_pass_at1.items()
    )
    ctx.cond(Cond.QUALITY_GATE, True, Reason.QUALITY_GATE_PASSED, f"stage {stage}: {passed}")
    return True


def _complete(ctx: _Ctx, n: int) -> None:
    st = ctx.st
    msg = f"all {n} stages succeeded"
    ctx.cond(Cond.COMPLETE, True, Reason.ALL_STAGES_SUCCEEDED, msg)
    ctx.cond(Cond.RUNNING, False, Reason.COMPLETED, msg)
    ctx.clear(Cond.QUEUED, Reason.COMPLETED)
    ctx.clear(Cond.SUSPENDED, Reason.COMPLETED)
    st.message = msg
    st.completion_time = st.completion_time or ctx.now_s


def _fail_deadline(
    ctx: _Ctx, name: str, spec: CodaTrainingRunSpec, observed: Observed, deadline: int
) -> None:
    st = ctx.st
    msg = f"run exceeded activeDeadlineSeconds={deadline}"
    for ss in st.stages:
        obs = observed.jobsets.get(ss.job_set or "")
        if ss.phase != "Succeeded" and obs is not None and obs.state == "Active":
            # Free the slices: a finished run keeps no TPUs (its Succeeded stages keep their checkpoints).
            ctx.actions.append(DeleteChild("jobset.x-k8s.io/v1alpha2", "JobSet", obs.name))
            ss.phase, ss.message, ss.completion_time = "Failed", msg, ctx.now_s
    ctx.cond(Cond.FAILED, True, Reason.DEADLINE_EXCEEDED, msg)
    ctx.cond(Cond.RUNNING, False, Reason.DEADLINE_EXCEEDED, msg)
    ctx.clear(Cond.QUEUED, Reason.DEADLINE_EXCEEDED)
    st.message = msg
    st.completion_time = ctx.now_s


def _sampler(
    ctx: _Ctx, name: str, namespace: str, spec: CodaTrainingRunSpec, observed: Observed
) -> None:
    if not spec.sampler.enabled:
        return
    st = ctx.st
    if st.sampler is None or st.sampler.deployment is None:
        deployment, service = render.render_sampler(name, namespace, spec)
        key = render.render_sampler_key(name, namespace, spec)
        ctx.actions += [*([Create(key)] if key else []), Create(deployment), Create(service)]
        st.sampler = SamplerStatus(
            deployment=deployment["metadata"]["name"],
            service=service["metadata"]["name"],
            endpoint=render.sampler_endpoint(name, namespace),
            checkpoint=render.sampler_checkpoint(spec),
        )
        ctx.event(
            "Normal",
            "SamplerCreated",
            f"Serving {st.sampler.checkpoint} at {st.sampler.endpoint} ({spec.sampler.replicas} replica(s))",
        )
        ctx.cond(Cond.SAMPLER_READY, False, Reason.STARTING, "sampler Deployment created")
        return
    obs = observed.sampler
    if obs is None:
        # Created once; a terminal run never recreates children, so a deleted sampler stays deleted.
        ctx.cond(
            Cond.SAMPLER_READY,
            False,
            Reason.NOT_FOUND,
            f"Deployment {st.sampler.deployment} not found",
        )
        st.sampler.ready, st.sampler.ready_replicas = False, 0
        return
    st.sampler.ready_replicas = obs.ready_replicas
    st.sampler.ready = obs.ready_replicas >= 1
    if st.sampler.ready:
        ctx.cond(
            Cond.SAMPLER_READY,
            True,
            Reason.REPLICAS_READY,
            f"{obs.ready_replicas}/{obs.replicas} replicas ready",
        )
    else:
        ctx.cond(
            Cond.SAMPLER_READY,
            False,
            Reason.STARTING,
            f"{obs.ready_replicas}/{obs.replicas} replicas ready",
        )


def _timers(ctx: _Ctx, spec: CodaTrainingRunSpec) -> None:
    st = ctx.st
    if ctx.terminal():
        ttl = spec.ttl_seconds_after_finished
        if ttl is not None and st.completion_time:
            left = ttl - (ctx.now - parse_time(st.completion_time)).total_seconds()
            if left <= 0:
                ctx.actions.append(DeleteRun(f"ttlSecondsAfterFinished={ttl} expired"))
                ctx.event(
                    "Normal",
                    "TTLExpired",
                    f"deleting the run: ttlSecondsAfterFinished={ttl} expired",
                )
            else:
                ctx.requeue_in(left)
    elif spec.active_deadline_seconds is not None and st.start_time:
        left = spec.active_deadline_seconds - (ctx.now - parse_time(st.start_time)).total_seconds()
        ctx.requeue_in(left)


def coalesce_events(events: list[Event]) -> list[Event]:
    """The Events of one reconcile, with a stage's "running" folded into its "started".

    A stage whose JobSet is created and seen running in the same reconcile (no Kueue hold) used
    to post StageStarted and StageRunning back to back: two API writes for one fact. A
    StageRunning that follows its stage's StageStarted becomes a suffix of it; a StageRunning on
    its own (a Kueue admission, a resume) stays an Event.
    """
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            ev.reason == "StageRunning"
            and prev is not None
            and prev.reason == "StageStarted"
            and prev.message.startswith(f"Stage {ev.message.removeprefix('stage ').split(':')[0]} ")
        ):
            out[-1] = Event(prev.type, prev.reason, f"{prev.message}; running")
            continue
        out.append(ev)
    return out


def _true_conditions(status: Mapping[str, Any]) -> frozenset[str]:
    """The condition types that are True in a raw status (what `_condition_events` compares)."""
    return frozenset(
        c.get("type")
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("status") == "True"
    )


def _condition_events(ctx: _Ctx, was_true_before: frozenset[str]) -> None:
    """One Kubernetes Event per run-level condition that became True (and for Resumed/Admitted)."""
    for c in ctx.st.conditions:
        was_true = c.type in was_true_before
        if c.status == "True" and not was_true and c.type != Cond.CREATED:
            kind: Literal["Normal", "Warning"] = "Warning" if c.type in WARNING_TYPES else "Normal"
            ctx.event(kind, c.reason, c.message or c.type)
        elif c.status == "False" and was_true and c.type in (Cond.SUSPENDED, Cond.QUEUED):
            ctx.event(
                "Normal", c.reason, f"{c.type} → False: {c.message}" if c.message else c.reason
            )
