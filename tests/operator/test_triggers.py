"""Which watch events of a run start a reconcile (handlers.run_trigger): new work only, never the
run's own status patches echoed back."""

from __future__ import annotations

from typing import Any

from coda_operator.handlers import run_trigger
from coda_operator.planner import RETRY_ANNOTATION


def body(generation: int | None = 1, observed: int | None = None, **annotations: str) -> Any:
    meta: dict[str, Any] = {"name": "r", "namespace": "ml", "annotations": annotations}
    if generation is not None:
        meta["generation"] = generation
    status = {} if observed is None else {"observedGeneration": observed}
    return {"metadata": meta, "spec": {}, "status": status}


def test_a_new_run_and_a_spec_change_reconcile() -> None:
    assert run_trigger("ADDED", body(generation=1)) == "create"
    assert run_trigger("MODIFIED", body(generation=2, observed=1)) == "update"
    assert run_trigger("MODIFIED", body(generation=None, observed=1)) == "update"  # no generation


def test_the_runs_own_status_patch_does_not_reconcile() -> None:
    assert run_trigger("MODIFIED", body(generation=3, observed=3)) is None


def test_the_start_up_listing_reconciles_every_run() -> None:
    assert run_trigger(None, body(generation=3, observed=3)) == "resume"


def test_a_new_retry_value_reconciles_a_handled_one_does_not() -> None:
    b = body(generation=3, observed=3, **{RETRY_ANNOTATION: "1"})
    assert run_trigger("MODIFIED", b) == "retry"
    b["status"]["retryHandled"] = "1"
    assert run_trigger("MODIFIED", b) is None
