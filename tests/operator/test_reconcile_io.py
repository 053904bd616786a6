"""What a reconcile reads and writes: the run is reused from the operator's own last status PATCH
only while the watch confirms it is current, and a stage start is one status PATCH."""

from __future__ import annotations

import asyncio
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
