#!/usr/bin/env python3
"""Operator benchmark: N CodaTrainingRuns × 3 stages driven to Succeeded against the emulator.

    python bench/operator.py                      # 200 runs
    python bench/operator.py --runs 50 --json out.json

A real kopf operator (coda's handlers, production settings) runs in its own thread and event loop;
kmock's Kubernetes emulator and the driver (playing the JobSet controller) share the main loop.
Every JobSet "trains" for a random 0.5–3 s, then the driver marks it Completed. Reported:

- wall time from the first create to the last run Succeeded,
- API requests per run, split by client (the operator's handlers, kopf itself),
- reconcile latency: the driver's JobSet-Completed PATCH → the next stage's JobSet POST arriving
  at the API server (p50/p99; goal p99 < 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "operator"), str(ROOT / "tests" / "operator")]

from coda_operator.handlers import OperatorConfig  # noqa: E402

# The emulator and the operator harness are the operator tests' own (tests/operator/operator_testkit.py).
from operator_testkit import (  # noqa: E402
    Cluster,
    Emulator,
    OperatorTask,
    emulated_cluster,
    run_spec,
)

STAGES = ("pretrain", "midtrain", "sft")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


async def bench(runs: int, min_s: float, max_s: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    async with emulated_cluster() as cluster:
        server_url, emulator = cluster.url, cluster.k
        op = OperatorTask(server_url, OperatorConfig(server=server_url))  # production defaults
        await op.start()
        try:
            return await _drive(cluster, emulator, runs, min_s, max_s, rng)
        finally:
            await op.stop_gracefully()


async def _drive(
    cluster: Cluster, emulator: Emulator, runs: int, min_s: float, max_s: float, rng: random.Random
) -> dict[str, Any]:
    requests_before = len(emulator.log)
    completed_at: dict[str, float] = {}  # jobset name → when the driver's Completed PATCH returned
    finish_due: dict[str, float] = {}
    latencies: list[float] = []
    names = [f"run-{i:03d}" for i in range(runs)]
    t0 = time.perf_counter()

    async def create_all() -> None:
        for name in names:  # a steady stream of submissions (~400/s), not one giant burst
            await cluster.create_run(name, run_spec())
            await asyncio.sleep(0.0025)

    creator = asyncio.create_task(create_all())
    done_runs: set[str] = set()
    seen: set[str] = set()
    while len(done_runs) < runs:
        now = time.perf_counter()
        for (plural, _ns, js), created in list(emulator.created_at.items()):
            if plural != "jobsets" or js in seen:
                continue
            seen.add(js)
            finish_due[js] = created + rng.uniform(min_s, max_s)
            run, stage = js.rsplit("-", 1)
            i = STAGES.index(stage)
            if i > 0:
                latencies.append(created - completed_at[f"{run}-{STAGES[i - 1]}"])
        due = [js for js, t in finish_due.items() if t <= now]
        for js in due:
            del finish_due[js]
            await cluster.finish_jobset(js)
            completed_at[js] = time.perf_counter()
            if js.endswith("-sft"):
                done_runs.add(js.rsplit("-", 1)[0])
        await asyncio.sleep(0.005)
    await creator

    # every run must reach Succeeded (the driver only saw the last JobSet complete)
    async def all_succeeded() -> bool:
        for (resource, _ns, _name), obj in list(emulator.objects.items()):
            if (
                resource.plural == "codatrainingruns"
                and obj.get("status", {}).get("phase") != "Succeeded"
            ):
                return False
        return True

    await cluster.wait_for("all runs Succeeded", all_succeeded, timeout=120)
    wall = time.perf_counter() - t0

    by_agent: collections.Counter[str] = collections.Counter()
    by_verb: collections.Counter[str] = collections.Counter()
    for agent, method, plural, _action, _name in emulator.log[requests_before:]:
        who = (
            "operator"
            if agent.startswith("coda-operator")
            else "kopf"
            if agent.startswith("kopf")
            else "driver"
        )
        by_agent[who] += 1
        if who == "operator":
            by_verb[f"{method} {plural}"] += 1
    jobsets = cluster.creates("jobsets")
    assert len(jobsets) == len(set(jobsets)) == 3 * runs, "duplicate or missing JobSet creations"
    return {
        "runs": runs,
        "stages_per_run": len(STAGES),
        "wall_seconds": round(wall, 2),
        "requests_per_run": {k: round(v / runs, 2) for k, v in sorted(by_agent.items())},
        "operator_requests_per_run_by_verb": {
            k: round(v / runs, 2) for k, v in sorted(by_verb.items())
        },
        "reconcile_latency_ms": {
            "n": len(latencies),
            "p50": round(1000 * statistics.median(latencies), 1),
            "p99": round(1000 * percentile(latencies, 99), 1),
            "max": round(1000 * max(latencies), 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--min-stage-seconds", type=float, default=0.5)
    p.add_argument("--max-stage-seconds", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    result = asyncio.run(
        bench(args.runs, args.min_stage_seconds, args.max_stage_seconds, args.seed)
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    lat = result["reconcile_latency_ms"]
    print(
        f"\n{args.runs} runs × 3 stages in {result['wall_seconds']} s; "
        f"JobSet Completed → next JobSet created p50 {lat['p50']} ms, p99 {lat['p99']} ms "
        f"(goal p99 < 1000 ms): {'OK' if lat['p99'] < 1000 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
