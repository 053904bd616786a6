"""Thin kopf layer: observe, call the pure planner, apply its actions, patch status, post Events.

Triggers (all end in the same level-triggered `reconcile(namespace, name)`):
- a CodaTrainingRun's watch events that carry new work: created, spec changed (generation ahead of
  status.observedGeneration), a new `coda.dev/retry` annotation value, the start-up listing,
- any event on a JobSet or sampler Deployment labelled `coda.dev/run` (react at once to
  Completed/Failed and to Kueue admission),
- a slow resync of every run (safety net, one loop, `CODA_OPERATOR_RESYNC_SECONDS`, default 60 s),
- precise wake-ups the planner asks for (activeDeadlineSeconds, ttlSecondsAfterFinished) and
  back-off retries after API errors.

Children are observed through kopf indexes (no list call per reconcile); the run itself is read
fresh inside a per-run lock (or taken from the operator's own last status PATCH while the watch
shows nothing newer, `_State.current_run`), so concurrent triggers never act on a stale status. Children have
deterministic names and are created only if absent, so a restarted operator (or a reconcile that
runs twice) never duplicates a JobSet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from coda_trainer import contract

from coda_operator import api, metrics, planner, render
from coda_operator.conditions import Cond, Reason, set_condition
from coda_operator.jobset_support import JOBSET_CRD, jobset_crd_problem
from coda_operator.kube import ApiError, Kube

__all__ = ["OperatorConfig", "make_memo", "reconcile", "registry", "run_operator"]

log = logging.getLogger("coda_operator")

registry = kopf.OperatorRegistry()
RUNS = (contract.GROUP, contract.VERSION, contract.PLURAL)
JOBSETS = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
DEPLOYMENTS = ("apps", "v1", "deployments")
JOBS = ("batch", "v1", "jobs")
# Every Job coda renders (evaluation and pre-flight): the planner tells them apart by name.
_JOB_LABELS = {render.LABEL_RUN: kopf.PRESENT, render.LABEL_COMPONENT: kopf.PRESENT}
RESYNC_SECONDS = float(os.environ.get("CODA_OPERATOR_RESYNC_SECONDS", "60"))
_API_ERRORS = (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class OperatorConfig:
    server: str | None = (
        None  # an API URL to use without credentials (emulators); else in-cluster/kubeconfig
    )
    metrics_port: int | None = None
    batch_window: float = 0.02  # kopf waits this long for more events of one object before handling
    retry_backoff: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60)
    # Reconciles that admit a new run (its first look: created, or listed at start-up) run at most
    # this many at a time, and only while no reconcile answering a child's change is in flight
    # (ChildReconciles); reconciles of runs already training do not wait. A burst of submissions
    # then queues behind itself instead of in front of the hand-offs of running runs, where a
    # delay leaves a TPU slice idle.
    admission_concurrency: int = 4


Key = tuple[str, str]


# How long a child this operator created counts as observed while the watch has not shown it.
CREATED_EXPECTATION_S = 30.0


class _State:
    """Per-operator state, kept in kopf's memo (several operators can share a process in tests)."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        self.info: kopf.ConnectionInfo | None = None
        self.kube: Kube | None = None
        self.locks: dict[Key, asyncio.Lock] = {}
        self.wakeups: dict[Key, asyncio.TimerHandle] = {}
        self.failures: dict[Key, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.admissions = asyncio.Semaphore(config.admission_concurrency)
        self.child_reconciles = ChildReconciles()
        self.events = EventPoster(yield_to=self.child_reconciles)
        self.known: set[Key] = set()  # runs seen in the watch (the resync loop visits them)
        self.phases = metrics.PhaseTracker()
        self.jobsets: Any = None  # kopf.Index, bound from the handler kwargs
        self.samplers: Any = None
        self.eval_jobs: Any = None
        # (namespace, name) of ServiceAccounts seen to exist (deleting one later is not noticed)
        self.service_accounts_seen: set[tuple[str, str]] = set()
        # The run as our last status PATCH left it, and the resourceVersion of the run's newest
        # watch event: see `current_run`.
        self.written: dict[Key, dict[str, Any]] = {}
        self.watched_rv: dict[Key, str] = {}
        # Children this operator POSTed that the watch indexes have not shown yet, per run:
        # (kind, name) → (monotonic time, POST response). See `observe`.
        self.created: dict[Key, dict[tuple[str, str], tuple[float, dict[str, Any]]]] = {}

    def bind(self, kwargs: dict[str, Any]) -> _State:
        self.jobsets = kwargs.get("coda_jobsets", self.jobsets)
        self.samplers = kwargs.get("coda_samplers", self.samplers)
        self.eval_jobs = kwargs.get("coda_eval_jobs", self.eval_jobs)
        return self

    def client(self) -> Kube:
        if self.kube is None:
            if self.info is None:
                raise RuntimeError("not logged in yet")
            self.kube = Kube(self.info, relogin=self._relogin)
        return self.kube

    async def _relogin(self) -> kopf.ConnectionInfo:
        self.info = _login(self.config) or self.info
        assert self.info is not None
        return self.info

    def current_run(self, key: Key) -> dict[str, Any] | None:
        """The run as our last status PATCH returned it, when it is provably still current: the
        watch has since delivered exactly that resourceVersion and nothing newer. Otherwise None
        (the caller GETs). Saves a GET per reconcile of a run whose only writer since was us;
        any other write (spec, annotation, the trainer's progress, deletion) shows in the watch
        as a newer resourceVersion first, and the run is read again."""
        body = self.written.get(key)
        if body is None:
            return None
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv is None or self.watched_rv.get(key) != rv:
            return None
        return body

    def remember_created(self, key: Key, body: dict[str, Any]) -> None:
        """Note a child this reconcile POSTed, if the planner observes its kind (see `observe`)."""
        kind, name = body.get("kind", ""), (body.get("metadata") or {}).get("name", "")
        if kind in ("JobSet", "Job", "Deployment"):
            self.created.setdefault(key, {})[(kind, name)] = (time.monotonic(), body)

    def observe(self, key: Key) -> planner.Observed:
        """The run's children as the watch indexes show them, plus those this operator created
        that the indexes do not show yet. A watch lags a POST (seconds on a loaded API server);
        without the second part, a reconcile in that window (a spec edit, a resync) would see
        "no JobSet", plan its creation again and post a duplicate (409) instead of, say, the
        suspend patch. Like a Kubernetes controller's expectations, a remembered child counts
        until the index shows it or for `CREATED_EXPECTATION_S`, whichever comes first."""
        jobsets = {obs.name: obs for obs in (self.jobsets or {}).get(key, [])}
        samplers = list((self.samplers or {}).get(key, []))
        jobs = {obs.name: obs for obs in (self.eval_jobs or {}).get(key, [])}
        observed = planner.Observed(
            jobsets=jobsets, sampler=samplers[0] if samplers else None, jobs=jobs
        )
        pending = self.created.get(key)
        if not pending:
            return observed
        now = time.monotonic()
        seen = {"JobSet": set(jobsets), "Job": set(jobs), "Deployment": {s.name for s in samplers}}
        for (kind, name), (at, _) in list(pending.items()):
            if name in seen.get(kind, {name}) or now - at > CREATED_EXPECTATION_S:
                del pending[(kind, name)]
        if not pending:
            self.created.pop(key, None)
            return observed
        return _with_created(observed, [body for _, body in pending.values()])

    def wake_in(self, key: Key, delay: float, trigger: str) -> None:
        old = self.wakeups.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self.wakeups[key] = loop.call_later(max(delay, 0.0) + 0.01, self._spawn, key, trigger)

    def _spawn(self, key: Key, trigger: str) -> None:
        self.wakeups.pop(key, None)
        task = asyncio.create_task(reconcile(self, key[0], key[1], trigger=trigger))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def retry_later(self, key: Key) -> None:
        n = self.failures[key] = self.failures.get(key, 0) + 1
        backoff = self.config.retry_backoff
        self.wake_in(key, backoff[min(n - 1, len(backoff) - 1)], "retry")

    def forget(self, key: Key) -> None:
        self.known.discard(key)
        handle = self.wakeups.pop(key, None)
        if handle is not None:
            handle.cancel()
        self.failures.pop(key, None)
        self.phases.forget(key)
        self.written.pop(key, None)
        self.watched_rv.pop(key, None)
        self.created.pop(key, None)

    async def close(self) -> None:
        await self.events.close()
        for handle in self.wakeups.values():
            handle.cancel()
        self.wakeups.clear()
        for task in list(self.tasks):
            task.cancel()
        self.phases.clear()
        if self.kube is not None:
            await self.kube.close()


class ChildReconciles:
    """How many reconciles answering a child's change are in flight; others can wait for none.

    A child's change is where a TPU slice waits on the operator: a stage's JobSet Completed (the
    next stage's JobSet is due), Failed (a retry), admitted by Kueue; an evaluation Job or the
    sampler moving. Admitting new runs and posting Events can wait. Without this, an operator
    saturated by a burst of submissions served hand-offs in turn with the admissions (4 at a
    time) and Event POSTs, at every await: hand-off p50 0.4 s at 1,000 runs (bench/operator.py),
    60 ms with it.
    """

    def __init__(self, max_wait_s: float = 5.0) -> None:
        # A waiter goes ahead after this long even if child work never stopped (a child
        # reconcile stuck on a slow API call, a flood of sampler events): delayed, never starved.
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self._none = asyncio.Event()
        self._none.set()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.in_flight += 1
        self._none.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._none.set()

    async def none_running(self) -> None:
        """Return once no child reconcile is in flight, or after `max_wait_s`. Waiters all go
        together when it happens (they are not re-checked)."""
        if self._none.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none.wait(), self.max_wait_s)


class EventPoster:
    """Posts Kubernetes Events in order, one at a time, from one background task.

    Events were 11 of a run's ~36 API requests, posted inside the reconcile: under load every
    hand-off queued behind other runs' Event POSTs. Here they wait their turn instead (one task
    among the many reconciles gets a small share of the event loop) and keep their order.
    """

    def __init__(self, yield_to: ChildReconciles | None = None) -> None:
        self._yield_to = yield_to
        self._queue: asyncio.Queue[tuple[Kube, dict[str, Any], planner.Event]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def post(self, kube: Kube, run: dict[str, Any], event: planner.Event) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="coda-events")
        self._queue.put_nowait((kube, run, event))

    async def _run(self) -> None:
        while True:
            kube, run, ev = await self._queue.get()
            if self._yield_to is not None:  # an Event can wait; a hand-off should not
                await self._yield_to.none_running()
            try:
                await kube.post_event(run, ev.type, ev.reason, ev.message)
                metrics.EVENTS.labels(ev.reason).inc()
            except _API_ERRORS as e:  # an Event is informational: never retried
                log.debug("posting event %s for %s: %s", ev.reason, run["metadata"]["name"], e)
            finally:
                self._queue.task_done()

    async def close(self, flush_seconds: float = 5.0) -> None:
        """Post what is queued (bounded), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), flush_seconds)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def make_memo(config: OperatorConfig | None = None) -> kopf.Memo:
    return kopf.Memo(coda=_State(config or OperatorConfig()))


def _state(memo: Any, kwargs: dict[str, Any]) -> _State:
    return memo.coda.bind(kwargs)


# --------------------------------------------------------------------------------------------------
# Operator lifecycle
# --------------------------------------------------------------------------------------------------


def _login(config: OperatorConfig, **kwargs: Any) -> kopf.ConnectionInfo | None:
    if config.server:
        return kopf.ConnectionInfo(server=config.server, insecure=True)
    # In a pod: the ServiceAccount; elsewhere: the kubeconfig (the same order `kubectl` uses).
    settings = kwargs.get("settings") or kopf.OperatorSettings()
    logger = kwargs.get("logger", log)
    # login_via_client is None when the kubernetes package is missing: then the minimal fallbacks
    return (
        kopf.login_via_client(logger=logger, settings=settings)
        or kopf.login_with_service_account(settings=settings)
        or kopf.login_with_kubeconfig(settings=settings)
    )


@kopf.on.login(registry=registry)
def login(memo: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    state: _State = memo.coda
    state.info = _login(state.config, **kwargs)
    return state.info


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    state: _State = memo.coda
    # Our Events are posted by `reconcile` (one per transition); kopf's own would duplicate them.
    settings.posting.enabled = False
    settings.batching.batch_window = state.config.batch_window
    # No on.create/on.update handlers (see run_event): nothing reads a diff-base, so none is built.
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="coda.dev")
    settings.networking.request_timeout = 60
    await _require_jobset(state, settings, logger)
    resync = asyncio.create_task(_resync_forever(state, RESYNC_SECONDS), name="coda-resync")
    state.tasks.add(resync)  # cancelled by close() at cleanup
    if state.config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(state.config.metrics_port)
        logger.info("metrics on :%d/metrics", state.config.metrics_port)


async def _require_jobset(state: _State, settings: kopf.OperatorSettings, logger: Any) -> None:
    """Refuse to start against a JobSet CRD that would prune fields the rendered JobSets rely on
    (see jobset_support): better no operator than stages failed by one preempted host."""
    info = _login(state.config, settings=settings, logger=logger)
    if info is None:
        raise kopf.PermanentError("no Kubernetes credentials (in-cluster or kubeconfig)")
    kube = Kube(info)
    try:
        crd = await kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", JOBSET_CRD)
    except ApiError as e:
        raise kopf.PermanentError(
            f"cannot read the JobSet CRD {JOBSET_CRD} ({e}); the operator's ClusterRole needs "
            "get on customresourcedefinitions"
        ) from e
    finally:
        await kube.close()
    problem = jobset_crd_problem(crd)
    if problem:
        raise kopf.PermanentError(problem)


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds a diff-base (a deep copy of the body) for every watch event of every watched
    kind, for on.create/on.update/field handlers; coda registers none, so the essence is empty."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return kopf.BodyEssence()

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        pass


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: Any, **_: Any) -> None:
    await memo.coda.close()


@kopf.on.probe(id="runs", registry=registry)
def probe_runs(memo: Any, **_: Any) -> int:
    return len(memo.coda.locks)


# --------------------------------------------------------------------------------------------------
# Observation: children through indexes
# --------------------------------------------------------------------------------------------------


@kopf.index(*JOBSETS, labels={render.LABEL_RUN: kopf.PRESENT}, registry=registry)
def coda_jobsets(namespace: str, labels: Any, body: Any, **_: Any) -> dict[Key, planner.JobSetObs]:
    return {(namespace, labels[render.LABEL_RUN]): planner.JobSetObs.from_body(body)}


@kopf.index(
    *DEPLOYMENTS,
    labels={render.LABEL_RUN: kopf.PRESENT, render.LABEL_COMPONENT: "sampler"},
    registry=registry,
)
def coda_samplers(
    namespace: str, labels: Any, body: Any, **_: Any
) -> dict[Key, planner.DeploymentObs]:
    return {(namespace, labels[render.LABEL_RUN]): planner.DeploymentObs.from_body(body)}


@kopf.index(*JOBS, labels=_JOB_LABELS, registry=registry)
def coda_eval_jobs(namespace: str, labels: Any, body: Any, **_: Any) -> dict[Key, planner.JobObs]:
    return {(namespace, labels[render.LABEL_RUN]): planner.JobObs.from_body(body)}


# --------------------------------------------------------------------------------------------------
# Triggers
# --------------------------------------------------------------------------------------------------


def run_trigger(event_type: str | None, body: Any) -> str | None:
    """Why a run's watch event needs a reconcile, or None when it does not.

    Most events of a run are its own status patches echoed back: reconciling on them would only
    re-read and re-plan. New work shows as a spec change (generation ahead of
    status.observedGeneration, which every reconcile records), a new `coda.dev/retry` value, or
    the start-up listing (a restarted operator looks at every run once).
    """
    if event_type is None:
        return "resume"  # kopf's initial listing
    if planner.retry_requested(body):
        return "retry"
    generation = (body.get("metadata") or {}).get("generation")
    if generation is None or (body.get("status") or {}).get("observedGeneration") != generation:
        return "create" if event_type == "ADDED" else "update"
    return None


# One plain watch handler for runs instead of kopf's on.create/on.update/on.resume: those need
# kopf's diff-base (a deep copy of every event's body, and a PATCH of the run per handled change),
# which took about a third of the operator's CPU at 1,000 runs; the reconcile is level-triggered
# and reads the run fresh, so "something changed that the last reconcile did not see" is all a
# trigger has to say.
@kopf.on.event(*RUNS, registry=registry)
async def run_event(
    event: dict[str, Any], namespace: str, name: str, memo: Any, body: Any, **kwargs: Any
) -> None:
    state = _state(memo, kwargs)
    if event.get("type") == "DELETED":
        state.forget((namespace, name))
        return
    state.known.add((namespace, name))
    rv = (body.get("metadata") or {}).get("resourceVersion")
    if rv is not None:
        state.watched_rv[(namespace, name)] = rv
    else:
        state.watched_rv.pop((namespace, name), None)
    trigger = run_trigger(event.get("type"), body)
    if trigger is not None:
        await reconcile(state, namespace, name, trigger=trigger)


async def _resync_forever(state: _State, interval: float) -> None:
    """The safety net: every run reconciled once per `interval`, spread evenly over it.

    One loop for the operator instead of a kopf timer per run: a kopf timer is a task per run and
    makes kopf put a finalizer on every run (one more PATCH per run, each a JSON patch guarded by
    the resourceVersion kopf last saw, which fails and backs off while the run's status moves).
    """
    while True:
        keys = sorted(state.known)
        if not keys:
            await asyncio.sleep(interval)
            continue
        pause = interval / len(keys)
        for key in keys:
            await asyncio.sleep(pause)
            if key in state.known and key not in state.wakeups:  # a wake-up is already due
                state.wake_in(key, 0.0, "timer")


@kopf.on.event(*JOBSETS, labels={render.LABEL_RUN: kopf.PRESENT}, registry=registry)
async def jobset_event(namespace: str, labels: Any, memo: Any, **kwargs: Any) -> None:
    await reconcile(_state(memo, kwargs), namespace, labels[render.LABEL_RUN], trigger="jobset")


@kopf.on.event(*JOBS, labels=_JOB_LABELS, registry=registry)
async def eval_job_event(namespace: str, labels: Any, memo: Any, **kwargs: Any) -> None:
    await reconcile(_state(memo, kwargs), namespace, labels[render.LABEL_RUN], trigger="evaljob")


@kopf.on.event(
    *DEPLOYMENTS,
    labels={render.LABEL_RUN: kopf.PRESENT, render.LABEL_COMPONENT: "sampler"},
    registry=registry,
)
async def sampler_event(namespace: str, labels: Any, memo: Any, **kwargs: Any) -> None:
    await reconcile(_state(memo, kwargs), namespace, labels[render.LABEL_RUN], trigger="sampler")


# --------------------------------------------------------------------------------------------------
# Reconcile
# --------------------------------------------------------------------------------------------------


_ADMISSION_TRIGGERS = frozenset({"create", "resume"})
# A child's change: these reconciles go before admissions and Events (ChildReconciles) and may
# reuse the run from our own last write (`_State.current_run`); a trigger from the run's own watch
# event, a resync or a retry after an error always reads it.
_CHILD_TRIGGERS = frozenset({"jobset", "evaljob", "sampler"})


async def reconcile(state: _State, namespace: str, name: str, *, trigger: str) -> None:
    """Reconcile one run. Admissions (a new run, the start-up listing) go at most
    `admission_concurrency` at a time and only while no child reconcile is in flight: a burst
    of submissions queues behind itself and behind hand-offs (see ChildReconciles)."""
    if trigger in _ADMISSION_TRIGGERS:
        async with state.admissions:
            await state.child_reconciles.none_running()
            await _reconcile_locked(state, namespace, name, trigger=trigger)
    elif trigger in _CHILD_TRIGGERS:
        with state.child_reconciles.running():
            await _reconcile_locked(state, namespace, name, trigger=trigger)
    else:
        await _reconcile_locked(state, namespace, name, trigger=trigger)


async def _reconcile_locked(state: _State, namespace: str, name: str, *, trigger: str) -> None:
    key = (namespace, name)
    metrics.RECONCILES.labels(trigger).inc()
    lock = state.locks.setdefault(key, asyncio.Lock())
    async with lock:
        with metrics.RECONCILE_SECONDS.time():
            try:
                await _reconcile(state, key, trigger)
            except Exception:  # never let kopf's slow back-off take over; retry on our schedule
                log.exception("reconcile of %s/%s failed", namespace, name)
                metrics.RECONCILE_ERRORS.labels("unexpected").inc()
                state.retry_later(key)


def _describe(action: planner.Action) -> str:
    if isinstance(action, planner.Create):
        return f"creating {action.obj['kind']} {action.obj['metadata']['name']}"
    if isinstance(action, planner.PatchChild):
        return f"patching {action.kind} {action.name}"
    if isinstance(action, planner.DeleteChild):
        return f"deleting {action.kind} {action.name}"
    return "deleting the run"


def _with_generated_key(obj: dict[str, Any]) -> dict[str, Any]:
    """A Secret rendered for a generated API key gets one here: randomness stays out of render."""
    key = (obj["metadata"].get("annotations") or {}).get(render.GENERATE_ANNOTATION)
    if obj["kind"] != "Secret" or not key:
        return obj
    return {**obj, "stringData": {key: secrets.token_urlsafe(32)}}


async def _apply(kube: Kube, run: dict[str, Any], action: planner.Action) -> dict[str, Any] | None:
    """Apply one action; returns the object a Create made (None if it existed, or another verb)."""
    ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
    if isinstance(action, planner.Create):
        obj = _with_generated_key(action.obj)
        kopf.adopt(obj, owner=run)  # ownerReference → garbage collection with the run
        return await kube.create(obj)  # an existing object (and so an existing key) is kept
    elif isinstance(action, planner.PatchChild):
        await kube.patch(action.api_version, action.kind, ns, action.name, action.patch)
    elif isinstance(action, planner.DeleteChild):
        await kube.delete(action.api_version, action.kind, ns, action.name)
    elif isinstance(action, planner.DeleteRun):
        await kube.delete(contract.API_VERSION, contract.KIND, ns, name)
    return None


def _with_created(observed: planner.Observed, created: list[dict[str, Any]]) -> planner.Observed:
    """`observed` plus the JobSets, Jobs and sampler Deployment this reconcile just created, as
    their POST responses show them (what their watch events will report moments later)."""
    jobsets, jobs, sampler = dict(observed.jobsets), dict(observed.jobs), observed.sampler
    for body in created:
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if (api_version, kind) == ("jobset.x-k8s.io/v1alpha2", "JobSet"):
            obs = planner.JobSetObs.from_body(body)
            jobsets[obs.name] = obs
        elif (api_version, kind) == ("batch/v1", "Job"):
            job = planner.JobObs.from_body(body)
            jobs[job.name] = job
        elif (api_version, kind) == ("apps/v1", "Deployment"):
            sampler = planner.DeploymentObs.from_body(body)
    return dataclasses.replace(observed, jobsets=jobsets, jobs=jobs, sampler=sampler)


_STATUS_KEYS = {f.alias or n for n, f in api.CodaTrainingRunStatus.model_fields.items()}


def _merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning `old` into `new` (nested dicts diffed, lists replaced)."""
    patch: dict[str, Any] = {}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            sub = _merge_diff(old[k], v)
            if sub:
                patch[k] = sub
        elif old.get(k) != v:
            patch[k] = v
    patch.update({k: None for k in old if k not in new})
    return patch


def _not_ours(status: dict[str, Any]) -> dict[str, Any]:
    """The status fields the planner does not own (kopf's, future ones)."""
    return {k: v for k, v in status.items() if k not in _STATUS_KEYS}


def _status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge patch of the fields we own; others (kopf's, future ones) are left alone."""
    return _merge_diff({k: v for k, v in old.items() if k in _STATUS_KEYS}, new)


async def _missing_service_account(
    state: _State, kube: Kube, namespace: str, run: dict[str, Any]
) -> str | None:
    """spec.serviceAccountName if no such ServiceAccount exists in the run's namespace.

    Not asked for finished runs, and remembered once found, so a fleet of runs in a few
    namespaces costs one request per namespace.
    """
    sa = (run.get("spec") or {}).get("serviceAccountName")
    if not sa or (namespace, sa) in state.service_accounts_seen:
        return None
    if (run.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    try:
        found = await kube.get("v1", "ServiceAccount", namespace, sa)
    except _API_ERRORS as e:  # unknown: let the JobSet be created and the Job report it
        log.warning("checking ServiceAccount %s/%s: %s", namespace, sa, e)
        return None
    if found is None:
        return sa
    state.service_accounts_seen.add((namespace, sa))
    return None


async def _read_run(state: _State, kube: Kube, key: Key, trigger: str) -> dict[str, Any] | None:
    """The run to plan from: our own last write while current, else a GET. None when it is gone
    (forgotten) or could not be read (a retry is scheduled)."""
    namespace, name = key
    run = state.current_run(key) if trigger in _CHILD_TRIGGERS else None
    if run is None:
        state.written.pop(key, None)
        try:
            run = await kube.get(contract.API_VERSION, contract.KIND, namespace, name)
        except _API_ERRORS as e:
            log.warning("reading %s/%s: %s", namespace, name, e)
            metrics.RECONCILE_ERRORS.labels("read").inc()
            state.retry_later(key)
            return None
    if run is None or (run.get("metadata") or {}).get("deletionTimestamp"):
        state.forget(key)  # deleted: children go with it (ownerReferences); nothing is recreated
        return None
    run.setdefault("apiVersion", contract.API_VERSION)
    run.setdefault("kind", contract.KIND)
    return run


def _settled_after_create(
    run: dict[str, Any],
    status: dict[str, Any],
    observed: planner.Observed,
    created: list[dict[str, Any]],
    now: datetime,
) -> planner.Reconciliation | None:
    """Plan once more with what was just created as observed: the status the created JobSet's
    watch event would lead to (Created, Running or Queued) goes out in this reconcile's one
    status PATCH instead of a second reconcile's. None when that plan asks for more than a
    status change (then the next reconcile does it)."""
    settled = planner.plan(
        {**run, "status": {**_not_ours(run.get("status") or {}), **status}},
        _with_created(observed, created),
        now,
    )
    return None if settled.actions else settled


async def _reconcile(state: _State, key: Key, trigger: str = "") -> None:
    namespace, name = key
    kube = state.client()
    run = await _read_run(state, kube, key, trigger)
    if run is None:
        return

    observed = state.observe(key)
    missing_sa = await _missing_service_account(state, kube, namespace, run)
    if missing_sa:
        observed = dataclasses.replace(observed, missing_service_account=missing_sa)
    now = datetime.now(UTC)
    result = planner.plan(run, observed, now)
    status = result.status_dict()
    events = list(result.events)
    finished_stages = list(result.finished_stages)
    requeue_after = result.requeue_after

    failed: list[str] = []
    created: list[dict[str, Any]] = []
    for action in result.actions:
        try:
            made = await _apply(kube, run, action)
        except _API_ERRORS as e:
            failed.append(f"{_describe(action)}: {e}")
        else:
            if made is not None:
                created.append(made)
                state.remember_created(key, made)
    if created and not failed:
        settled = _settled_after_create(run, status, observed, created, now)
        if settled is not None:
            status = settled.status_dict()
            events += settled.events
            finished_stages += settled.finished_stages
            requeue_after = settled.requeue_after
    if failed:
        # Status says what went wrong even when no child could be created (Kubeflow #2351).
        metrics.RECONCILE_ERRORS.labels("apply").inc()
        message = "; ".join(failed)
        st = api.CodaTrainingRunStatus.model_validate(status)
        set_condition(
            st,
            Cond.CREATED,
            False,
            Reason.CREATE_FAILED,
            message,
            now=planner.isoformat(now),
            generation=(run.get("metadata") or {}).get("generation"),
        )
        st.message = message
        status = st.wire()
        events.append(planner.Event("Warning", "CreateFailed", message))
        state.retry_later(key)
    else:
        state.failures.pop(key, None)

    patch = _status_patch(run.get("status") or {}, status)
    if patch:
        state.written.pop(key, None)
        try:
            written = await kube.patch(
                contract.API_VERSION, contract.KIND, namespace, name, {"status": patch}, status=True
            )
        except _API_ERRORS as e:
            log.warning("patching status of %s/%s: %s", namespace, name, e)
            metrics.RECONCILE_ERRORS.labels("status").inc()
            state.retry_later(key)
            return  # events follow the status they describe; they are re-derived next time
        if isinstance(written, dict) and written.get("metadata"):
            written.setdefault("apiVersion", contract.API_VERSION)
            written.setdefault("kind", contract.KIND)
            state.written[key] = written
    # after the status they describe; posted off the reconcile (see EventPoster)
    for ev in planner.coalesce_events(events):
        state.events.post(kube, run, ev)
    state.phases.set(key, status.get("phase", "Pending"))
    for kind, seconds in finished_stages:
        metrics.STAGE_SECONDS.labels(kind).observe(seconds)
    if requeue_after is not None and not failed:
        state.wake_in(key, requeue_after, "timer")


# --------------------------------------------------------------------------------------------------
# Entry point (used by __main__ and the tests)
# --------------------------------------------------------------------------------------------------


async def run_operator(
    *,
    namespaces: list[str] | tuple[str, ...] = (),
    clusterwide: bool = False,
    standalone: bool = True,
    peering: str | None = None,
    liveness: str | None = None,
    config: OperatorConfig | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    await kopf.operator(
        registry=registry,
        memo=make_memo(config),
        namespaces=list(namespaces),
        clusterwide=clusterwide,
        standalone=standalone,
        peering_name=peering,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
