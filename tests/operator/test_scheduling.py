"""Which work waits for which inside the operator: a hand-off (a reconcile answering a child's
change) never queues behind admissions of new runs or behind Event POSTs; and the collector
settings `python -m coda_operator` runs with."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from coda_operator import handlers
from coda_operator.__main__ import GC_THRESHOLDS
from coda_operator.handlers import EventPoster, OperatorConfig, _State
from coda_operator.planner import Event

ROOT = Path(__file__).resolve().parents[2]


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_admissions_wait_while_a_child_reconcile_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[tuple[str, str]] = []
    release = asyncio.Event()

    async def fake_reconcile(state: Any, namespace: str, name: str, *, trigger: str) -> None:
        started.append((name, trigger))
        if trigger == "jobset":
            await release.wait()  # the hand-off's API round trips

    monkeypatch.setattr(handlers, "_reconcile_locked", fake_reconcile)
    state = _State(OperatorConfig())
    handoff = asyncio.create_task(handlers.reconcile(state, "ml", "old", trigger="jobset"))
    await _turns()
    admissions = [
        asyncio.create_task(handlers.reconcile(state, "ml", f"new-{i}", trigger=trigger))
        for i, trigger in enumerate(("create", "resume"))
    ]
    others = [
        asyncio.create_task(handlers.reconcile(state, "ml", "old", trigger=trigger))
        for trigger in ("update", "timer", "sampler")
    ]
    await _turns()
    # a spec change, a timer and another child's change go at once; new runs wait
    assert [t for _, t in started] == ["jobset", "update", "timer", "sampler"]
    assert state.child_reconciles.in_flight == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(handoff, *admissions, *others), 5)
    assert sorted(started[4:]) == [("new-0", "create"), ("new-1", "resume")]
    assert state.child_reconciles.in_flight == 0


@pytest.mark.asyncio
async def test_a_failed_child_reconcile_does_not_block_admissions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def failing(state: Any, namespace: str, name: str, *, trigger: str) -> None:
        if trigger == "jobset":
            raise RuntimeError("boom")

    monkeypatch.setattr(handlers, "_reconcile_locked", failing)
    state = _State(OperatorConfig())
    with pytest.raises(RuntimeError):
        await handlers.reconcile(state, "ml", "old", trigger="jobset")
    await asyncio.wait_for(handlers.reconcile(state, "ml", "new", trigger="create"), 5)
    assert state.child_reconciles.in_flight == 0


@pytest.mark.asyncio
async def test_an_admission_waits_for_a_stuck_child_reconcile_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[str] = []
    stuck = asyncio.Event()  # never set: a child reconcile hanging on a slow API call

    async def fake_reconcile(state: Any, namespace: str, name: str, *, trigger: str) -> None:
        started.append(trigger)
        if trigger == "jobset":
            await stuck.wait()

    monkeypatch.setattr(handlers, "_reconcile_locked", fake_reconcile)
    state = _State(OperatorConfig())
    state.child_reconciles.max_wait_s = 0.2
    handoff = asyncio.create_task(handlers.reconcile(state, "ml", "old", trigger="jobset"))
    try:
        await _turns()
        admission = asyncio.create_task(handlers.reconcile(state, "ml", "new", trigger="create"))
        await asyncio.sleep(0.05)
        assert started == ["jobset"]  # still held back
        await asyncio.wait_for(admission, 5)  # then goes ahead: delayed, not starved
        assert started == ["jobset", "create"]
    finally:
        handoff.cancel()


class _RecordingKube:
    """Only what EventPoster calls: the Events it would POST, in order."""

    def __init__(self) -> None:
        self.posted: list[str] = []

    async def post_event(self, run: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.posted.append(reason)


@pytest.mark.asyncio
async def test_events_wait_while_a_child_reconcile_is_in_flight() -> None:
    state = _State(OperatorConfig())
    poster = EventPoster(yield_to=state.child_reconciles)
    kube = _RecordingKube()
    run = {"metadata": {"name": "r", "namespace": "ml"}}
    with state.child_reconciles.running():
        poster.post(kube, run, Event("Normal", "StageStarted", "pretrain"))  # type: ignore[arg-type]
        poster.post(kube, run, Event("Normal", "StageSucceeded", "pretrain"))  # type: ignore[arg-type]
        await _turns()
        assert kube.posted == []
    await asyncio.wait_for(poster.close(), 5)
    assert kube.posted == ["StageStarted", "StageSucceeded"]  # in order, once the hand-off is done


def test_the_operator_process_freezes_start_up_objects_and_collects_less_often() -> None:
    code = (
        "import gc, json; from coda_operator.__main__ import tune_gc; "
        "before = gc.get_threshold(); tune_gc(); "
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("trainer", "operator")),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    before, after, frozen = json.loads(out.stdout)
    assert tuple(after) == GC_THRESHOLDS and tuple(before) != GC_THRESHOLDS
    assert frozen > 10_000  # the operator's modules and kopf's registry, out of every scan
