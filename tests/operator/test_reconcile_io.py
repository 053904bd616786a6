"""What a reconcile reads and writes: the run is reused from the operator's own last status PATCH
only while the watch confirms it is current, and a stage start is one status PATCH."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from coda_operator.handlers import OperatorConfig, _State
from coda_operator.planner import Event, coalesce_events
from operator_testkit import Cluster, OperatorTask, run_spec


def _run(rv: str) -> dict[str, Any]:
    return {"metadata": {"name": "r", "namespace": "ml", "resourceVersion": rv}, "status": {}}


def test_the_run_from_our_own_write_is_reused_only_once_the_watch_shows_exactly_it() -> None:
    state = _State(OperatorConfig())
    key = ("ml", "r")
    assert state.current_run(key) is None  # nothing written yet: read it
    state.written[key] = _run("7")
    assert state.current_run(key) is None  # the watch has not shown our write yet
    state.watched_rv[key] = "7"
    assert state.current_run(key) is state.written[key]
    state.watched_rv[key] = "8"  # someone wrote after us (spec, annotation, progress, deletion)
    assert state.current_run(key) is None
    state.watched_rv[key] = "7"
    state.forget(key)  # deleted
    assert state.current_run(key) is None


def _status_patches(cluster: Cluster, run: str) -> int:
    return sum(
        1
        for agent, method, plural, _, name in cluster.k.log
        if agent.startswith("coda-operator")
        and method == "PATCH"
        and plural == "codatrainingruns"
        and name == run
    )


@pytest.mark.asyncio
async def test_a_stage_start_is_one_status_patch(cluster: Cluster, operator: OperatorTask) -> None:
    def stage_running(stage: str) -> Any:
        return lambda r: (
            r.get("status", {}).get("stage") == stage and r["status"].get("phase") == "Running"
        )

    await cluster.create_run("one", run_spec())
    await cluster.wait_run("one", stage_running("pretrain"), "pretrain running")
    before = _status_patches(cluster, "one")
    await cluster.finish_jobset("one-pretrain")
    run = await cluster.wait_run("one", stage_running("midtrain"), "midtrain running")
    # pretrain Succeeded, midtrain's JobSet created and seen Running: one write, not two
    assert run["status"]["stages"][0]["phase"] == "Succeeded"
    assert run["status"]["stages"][1]["jobSet"] == "one-midtrain"
    # settle: the JobSet's own watch event brings nothing new to write
    await cluster.wait_jobset("one-midtrain")
    await cluster.wait_for(
        "the midtrain JobSet's reconcile", lambda: _idle_for(cluster, "one", 0.5), timeout=10
    )
    assert _status_patches(cluster, "one") - before == 1


async def _idle_for(cluster: Cluster, run: str, seconds: float) -> bool:
    n = _status_patches(cluster, run)
    await asyncio.sleep(seconds)
    return _status_patches(cluster, run) == n


def test_a_stage_started_and_running_in_one_reconcile_is_one_event() -> None:
    started = Event("Normal", "StageStarted", "Stage sft (3/3): creating JobSet r-sft on cpu")
    running = Event("Normal", "StageRunning", "stage sft: running")
    succeeded = Event("Normal", "StageSucceeded", "Stage midtrain (2/3) completed")
    assert coalesce_events([succeeded, started, running]) == [
        succeeded,
        Event("Normal", "StageStarted", f"{started.message}; running"),
    ]
    # running on its own (Kueue admitted the JobSet later), or another stage's: kept
    assert coalesce_events([running]) == [running]
    other = Event("Normal", "StageRunning", "stage midtrain: running")
    assert coalesce_events([started, other]) == [started, other]


def _created_jobset(name: str) -> dict[str, Any]:
    """A JobSet as a POST response shows it."""
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": "ml", "labels": {}},
        "spec": {"suspend": False},
        "status": {},
    }


def test_a_child_we_created_counts_as_observed_until_the_watch_shows_it(monkeypatch) -> None:
    """The watch lags a POST; a reconcile in that window must not plan the JobSet again (a
    duplicate POST, 409) but act on it, e.g. suspend it."""
    from coda_operator import handlers, planner

    state = _State(OperatorConfig())
    key = ("ml", "demo")
    spec = run_spec(suspend=True)
    run = {"metadata": {"name": "demo", "namespace": "ml", "generation": 2}, "spec": spec,
           "status": {}}  # fmt: skip
    state.remember_created(key, _created_jobset("demo-pretrain"))
    state.remember_created(key, {"kind": "ConfigMap", "metadata": {"name": "demo-pretrain"}})
    observed = state.observe(key)
    assert (
        list(observed.jobsets) == ["demo-pretrain"]
        and observed.jobsets["demo-pretrain"].state == "Active"
    )
    actions = planner.plan(run, observed, datetime.now(UTC)).actions
    assert not any(isinstance(a, planner.Create) and a.obj["kind"] == "JobSet" for a in actions)
    assert any(isinstance(a, planner.PatchChild) and a.name == "demo-pretrain" for a in actions)
    # without the memory, the same reconcile would POST the JobSet again
    bare = planner.plan(run, planner.Observed(), datetime.now(UTC)).actions
    assert any(isinstance(a, planner.Create) and a.obj["kind"] == "JobSet" for a in bare)

    # the index shows it: the memory is dropped, the index is what counts
    state.jobsets = {key: [planner.JobSetObs.from_body(_created_jobset("demo-pretrain"))]}
    state.observe(key)
    assert key not in state.created
    # a child the watch never shows (deleted at once) stops counting after the expectation time
    state.jobsets = None
    state.remember_created(key, _created_jobset("demo-pretrain-r1"))
    monkeypatch.setattr(handlers, "CREATED_EXPECTATION_S", -1.0)
    assert state.observe(key).jobsets == {} and key not in state.created
