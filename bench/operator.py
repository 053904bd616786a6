#!/usr/bin/env python3
"""Operator benchmark: N CodaTrainingRuns × 3 stages driven to Succeeded, in three processes.

    python bench/operator.py                          # 200 runs
    python bench/operator.py --runs 1000 --json out.json --out /tmp/opbench

Processes (each one's stdout/stderr goes to a file under --out):
- the Kubernetes API emulator: the operator tests' kmock emulator (tests/operator/operator_testkit.py)
  served on loopback, plus a /bench/ side channel (creations and the request log, with the arrival
  time of every request on the server's clock);
- the operator: `python -m coda_operator --namespace ml --standalone` exactly as deployed (production
  settings; only --server points it at the emulator without credentials);
- this process, the driver: submits the runs (a steady ~400/s stream) and plays the JobSet
  controller: each JobSet "trains" for a random 0.5–3 s, then the driver PATCHes it Completed.

Reported: wall time (first submission → every run Succeeded); hand-off latency measured on the API
server (arrival of the driver's PATCH marking a stage's JobSet Completed → arrival of the next
stage's JobSet POST; p50/p99/max, and every hand-off with its time in <out>/handoffs.csv);
admission latency (a run's POST → its first JobSet's POST); API requests per run by client and by verb; operator CPU seconds
and RSS (from /proc of its pid) and the emulator's CPU seconds (is the emulator the bottleneck?).
CODA_OPERATOR_PROFILE=<file> in the environment makes the operator write a cProfile there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(
    str(ROOT / d) for d in ("trainer", "operator", "cli", "tests/operator")
)
STAGES = ("pretrain", "midtrain", "sft")
NS = "ml"
DRIVER_AGENT = "coda-bench-driver"
RUNS_PATH = f"/apis/coda.dev/v1alpha1/namespaces/{NS}/codatrainingruns"
JOBSETS_PATH = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


# --------------------------------------------------------------------------------------------------
# The emulator process
# --------------------------------------------------------------------------------------------------


def serve_emulator(port: int, kind: str) -> None:
    from operator_testkit import RESOURCES, TRAINER_SERVICE_ACCOUNT, jobset_crd

    if kind == "kmock":
        serve_kmock(port)
        return
    from kube_api import KubeApi, serve

    async def main() -> None:
        api = KubeApi(RESOURCES)
        api.create(api.resource("customresourcedefinitions"), None, jobset_crd())
        sa = {"metadata": {"name": TRAINER_SERVICE_ACCOUNT}}
        api.create(api.resource("serviceaccounts"), NS, sa)
        api.create(api.resource("namespaces"), None, {"metadata": {"name": NS}})
        runner = await serve(api, port)
        print(f"serving on http://127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        api.stopping.set()
        await runner.cleanup()

    asyncio.run(main())


def serve_kmock(port: int) -> None:
    import aiohttp.web
    import kmock
    from operator_testkit import RESOURCES, TRAINER_SERVICE_ACCOUNT, Cluster, Emulator, jobset_crd

    class BenchEmulator(Emulator):
        def __attrs_post_init__(self) -> None:
            super().__attrs_post_init__()
            self.arrived: list[float] = []  # parallel to `log`: when each request arrived

        async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
            if raw.path == "/bench/log":
                since = int(raw.query.get("since", "0"))
                return aiohttp.web.json_response(
                    {"log": self.log[since:], "arrived": self.arrived[since:]}
                )
            if raw.path == "/bench/phases":
                phases: collections.Counter[str] = collections.Counter()
                for (resource, _ns, _name), obj in list(self.objects.items()):
                    if resource.plural == "codatrainingruns":
                        phases[(obj.get("status") or {}).get("phase") or "-"] += 1
                return aiohttp.web.json_response(phases)
            return await super().__call__(raw)

        async def _handle(self, request: Any) -> Any:
            # Emulator._handle appends to `log` before its first await: the two lists stay aligned.
            self.arrived.append(time.perf_counter())
            return await super()._handle(request)

    async def main() -> None:
        emulator = BenchEmulator()
        for key, info in RESOURCES.items():
            emulator.resources[key] = kmock.ResourceInfo(**info)
        async with emulator, kmock.Server(emulator, port=port) as server:
            cluster = Cluster(emulator, server)
            await cluster.create("serviceaccounts", TRAINER_SERVICE_ACCOUNT)
            await cluster.create_crd(jobset_crd())
            await cluster.close()
            print(f"serving on {server.url}", flush=True)
            await asyncio.Event().wait()  # until SIGTERM

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# --------------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


# --------------------------------------------------------------------------------------------------
# The driver (this process)
# --------------------------------------------------------------------------------------------------


def run_body(name: str) -> dict[str, Any]:
    from operator_testkit import run_spec

    return {
        "apiVersion": "coda.dev/v1alpha1",
        "kind": "CodaTrainingRun",
        "metadata": {"name": name, "namespace": NS},
        "spec": run_spec(),
    }


def completed_patch() -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cond = {
        "type": "Completed",
        "status": "True",
        "reason": "AllJobsCompleted",
        "message": "jobset completed successfully",
        "lastTransitionTime": now,
    }
    return {"status": {"terminalState": "Completed", "conditions": [cond]}}


async def drive(
    url: str, runs: int, min_s: float, max_s: float, seed: int, timeout: float
) -> float:
    """Submit the runs, finish every JobSet after its random training time, wait for Succeeded.
    Returns the wall time."""
    import aiohttp

    rng = random.Random(seed)
    names = [f"run-{i:04d}" for i in range(runs)]
    body = run_body("x")
    headers = {"User-Agent": DRIVER_AGENT}
    async with aiohttp.ClientSession(base_url=url, headers=headers) as session:

        async def check(rsp: aiohttp.ClientResponse) -> None:
            if rsp.status >= 400:
                raise RuntimeError(f"{rsp.method} {rsp.url} → {rsp.status}: {await rsp.text()}")

        async def create_all() -> None:
            for name in names:
                body["metadata"]["name"] = name
                async with session.post(RUNS_PATH, json=body) as rsp:
                    await check(rsp)
                await asyncio.sleep(0.0025)

        async def finish(js: str, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            async with session.patch(
                f"{JOBSETS_PATH}/{js}/status",
                json=completed_patch(),
                headers={"Content-Type": "application/merge-patch+json"},
            ) as rsp:
                await check(rsp)

        t0 = time.perf_counter()
        deadline = t0 + timeout
        creator = asyncio.create_task(create_all())
        finishing: set[asyncio.Task[None]] = set()
        seen = 0
        succeeded = 0
        next_phase_check = 0.0
        try:
            while succeeded < runs:
                now = time.perf_counter()
                if now > deadline:
                    raise TimeoutError(f"only {succeeded}/{runs} runs Succeeded after {timeout} s")
                if creator.done() and creator.exception() is not None:
                    raise RuntimeError("submitting runs failed") from creator.exception()
                async with session.get("/bench/log", params={"since": str(seen)}) as rsp:
                    data = await rsp.json()
                seen += len(data["log"])
                for _agent, method, plural, action, name in data["log"]:
                    if method == "POST" and plural == "jobsets" and action.lower() == "create":
                        at = time.perf_counter() + rng.uniform(min_s, max_s)
                        task = asyncio.create_task(finish(name, at))
                        finishing.add(task)
                        task.add_done_callback(finishing.discard)
                if now >= next_phase_check:  # a scan of every run on the server: not too often
                    next_phase_check = now + 0.25
                    async with session.get("/bench/phases") as rsp:
                        succeeded = (await rsp.json()).get("Succeeded", 0)
                await asyncio.sleep(0.05)
            return time.perf_counter() - t0
        finally:
            creator.cancel()
            for task in finishing:
                task.cancel()


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, probe: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if probe():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout} s")


def http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as rsp:
        return rsp.status == 200


def stop(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def analyse(log: list[list[Any]], arrived: list[float], runs: int) -> dict[str, Any]:
    completed_at: dict[str, float] = {}
    created_at: dict[str, float] = {}
    submitted_at: dict[str, float] = {}
    by_agent: collections.Counter[str] = collections.Counter()
    by_verb: collections.Counter[str] = collections.Counter()
    jobset_posts: list[str] = []
    for (agent, method, plural, action, name), t in zip(log, arrived, strict=True):
        who = (
            "operator"
            if agent.startswith("coda-operator")
            else "kopf"
            if agent.startswith("kopf")
            else "driver"
            if agent == DRIVER_AGENT
            else "other"
        )
        by_agent[who] += 1
        if who in ("operator", "kopf"):
            by_verb[f"{who} {method} {plural} {(action or '').lower()}".strip()] += 1
        if plural == "codatrainingruns" and who == "driver" and method == "POST":
            submitted_at[name] = t
        if plural == "jobsets" and name:
            if who == "driver" and method == "PATCH":
                completed_at.setdefault(name, t)
            elif who == "operator" and method == "POST":
                jobset_posts.append(name)
                created_at.setdefault(name, t)
    latencies = []
    handoffs = []  # (previous JobSet's Completed PATCH, seconds after the first request, latency)
    t0 = arrived[0] if arrived else 0.0
    for js, t in created_at.items():
        run, stage = js.rsplit("-", 1)
        i = STAGES.index(stage)
        if i > 0:
            done = completed_at[f"{run}-{STAGES[i - 1]}"]
            latencies.append(t - done)
            handoffs.append((f"{run}-{STAGES[i - 1]}", round(done - t0, 4), round(t - done, 4)))
    # Admission: the run's POST → its first JobSet's POST. Hand-offs go first (the operator holds
    # admissions back while one is in flight), so an overload shows here instead.
    admissions = [created_at[f"{run}-{STAGES[0]}"] - t for run, t in submitted_at.items()]
    if len(set(jobset_posts)) != 3 * runs:
        raise AssertionError(f"{len(set(jobset_posts))} JobSets created for {runs} runs × 3 stages")
    return {
        "handoffs": sorted(handoffs, key=lambda h: h[1]),
        "requests_per_run": {k: round(v / runs, 2) for k, v in sorted(by_agent.items())},
        "requests_per_run_by_verb": {k: round(v / runs, 2) for k, v in sorted(by_verb.items())},
        # a POST of a JobSet that already exists (the index had not seen it yet): answered 409
        "jobset_posts_repeated": len(jobset_posts) - len(set(jobset_posts)),
        "handoff_ms": {
            "n": len(latencies),
            "p50": round(1000 * statistics.median(latencies), 1),
            "p99": round(1000 * percentile(latencies, 99), 1),
            "max": round(1000 * max(latencies), 1),
        },
        "admission_ms": {
            "n": len(admissions),
            "p50": round(1000 * statistics.median(admissions), 1),
            "p99": round(1000 * percentile(admissions, 99), 1),
            "max": round(1000 * max(admissions), 1),
        },
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import urllib.request

    out = args.out or Path(tempfile.mkdtemp(prefix="coda-opbench-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    api_port, health_port = free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}"
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> Any:
        log = (out / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **(extra_env or {})}, cwd=ROOT
        )
        log.close()
        procs.append(proc)
        return proc

    try:
        emulator = start(
            "emulator",
            [
                sys.executable,
                __file__,
                "--serve-emulator",
                str(api_port),
                "--emulator",
                args.emulator,
            ],
        )
        wait_until("emulator", lambda: http_ok(f"{url}/bench/phases"), 60, emulator)
        profile_env = {"CODA_OPERATOR_PROFILE": str(args.profile)} if args.profile else {}
        operator = start(
            "operator",
            [
                sys.executable, "-m", "coda_operator", "--namespace", NS, "--standalone",
                "--liveness", f"http://127.0.0.1:{health_port}/healthz", "--server", url,
            ],
            profile_env,
        )  # fmt: skip
        wait_until(
            "operator", lambda: http_ok(f"http://127.0.0.1:{health_port}/healthz"), 60, operator
        )
        time.sleep(1.0)  # let the watches settle before counting
        op_cpu0, emu_cpu0 = cpu_seconds(operator.pid), cpu_seconds(emulator.pid)
        op_rss0 = memory_mib(operator.pid)
        with urllib.request.urlopen(f"{url}/bench/log?since=0", timeout=30) as rsp:
            before = len(json.load(rsp)["log"])
        load = os.getloadavg()
        wall = asyncio.run(
            drive(url, args.runs, args.min_stage_seconds, args.max_stage_seconds, args.seed,
                  timeout=args.timeout)
        )  # fmt: skip
        op_cpu, emu_cpu = cpu_seconds(operator.pid) - op_cpu0, cpu_seconds(emulator.pid) - emu_cpu0
        op_mem = memory_mib(operator.pid)
        with urllib.request.urlopen(f"{url}/bench/log?since={before}", timeout=60) as rsp:
            data = json.load(rsp)
        stop(operator)  # graceful: a profile is written on the way out
        analysis = analyse(data["log"], data["arrived"], args.runs)
        with (out / "handoffs.csv").open("w") as f:
            f.write("jobset,completed_s,latency_s\n")
            f.writelines(f"{js},{at},{lat}\n" for js, at, lat in analysis.pop("handoffs"))
        result = {
            "runs": args.runs,
            "stages_per_run": len(STAGES),
            "wall_seconds": round(wall, 2),
            **analysis,
            "operator_cpu_seconds": round(op_cpu, 2),
            "operator_cpu_ms_per_run": round(1000 * op_cpu / args.runs, 2),
            "operator_rss_mib": {"idle": op_rss0.get("VmRSS"), **op_mem},
            "operator_rss_kib_per_run": round(
                1024 * (op_mem["VmRSS"] - op_rss0["VmRSS"]) / args.runs, 1
            ),
            "emulator_cpu_seconds": round(emu_cpu, 2),
            "loadavg_at_start": [round(x, 2) for x in load],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "logs": str(out),
        }
        return result
    finally:
        for proc in reversed(procs):
            stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--min-stage-seconds", type=float, default=0.5)
    p.add_argument("--max-stage-seconds", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="give up driving after this long")
    p.add_argument("--out", type=Path, default=None, help="process logs (default: a temp dir)")
    p.add_argument("--profile", type=Path, default=None, help="operator cProfile output")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--emulator",
        choices=("lean", "kmock"),
        default="lean",
        help="API server: bench/kube_api.py (default) or the operator tests' kmock emulator",
    )
    p.add_argument("--serve-emulator", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path[:0] = PYTHONPATH.split(os.pathsep)
    if args.serve_emulator is not None:
        serve_emulator(args.serve_emulator, args.emulator)
        return 0
    result = bench(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    lat = result["handoff_ms"]
    print(
        f"\n{args.runs} runs × 3 stages in {result['wall_seconds']} s; JobSet Completed → next "
        f"JobSet created p50 {lat['p50']} ms, p99 {lat['p99']} ms (goal p99 < 250 ms): "
        f"{'OK' if lat['p99'] < 250 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
