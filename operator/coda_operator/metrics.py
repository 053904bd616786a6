"""Prometheus metrics of the operator (served with `--metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "EVENTS",
    "RECONCILES",
    "RECONCILE_ERRORS",
    "RECONCILE_SECONDS",
    "RUNS",
    "STAGE_SECONDS",
    "PhaseTracker",
]

PHASES = ("Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed")

RUNS = Gauge("coda_operator_runs", "CodaTrainingRuns known to this operator, by phase.", ["phase"])
STAGE_SECONDS = Histogram(
    "coda_operator_stage_duration_seconds",
    "Wall time of a succeeded stage, from JobSet creation to Completed (retries included).",
    ["kind"],
    buckets=(60, 600, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400),
)
RECONCILES = Counter("coda_operator_reconciles_total", "Reconciles by trigger.", ["trigger"])
RECONCILE_ERRORS = Counter(
    "coda_operator_reconcile_errors_total", "Reconciles that hit an API error, by step.", ["step"]
)
RECONCILE_SECONDS = Histogram(
    "coda_operator_reconcile_duration_seconds",
    "Time of one reconcile (read, plan, apply, status, events).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS = Counter("coda_operator_events_total", "Kubernetes Events posted, by reason.", ["reason"])

for _phase in PHASES:
    RUNS.labels(_phase).set(0)


class PhaseTracker:
    """Keeps RUNS consistent: each run counts once, in its latest phase."""

    def __init__(self) -> None:
        self._phase: dict[tuple[str, str], str] = {}

    def set(self, key: tuple[str, str], phase: str) -> None:
        old = self._phase.get(key)
        if old == phase:
            return
        if old is not None:
            RUNS.labels(old).dec()
        RUNS.labels(phase).inc()
        self._phase[key] = phase

    def forget(self, key: tuple[str, str]) -> None:
        old = self._phase.pop(key, None)
        if old is not None:
            RUNS.labels(old).dec()

    def clear(self) -> None:
        for key in list(self._phase):
            self.forget(key)
