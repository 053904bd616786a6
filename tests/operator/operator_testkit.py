"""Test kit of the operator tests: a Kubernetes API emulator (kmock) and a real kopf operator.

`Emulator` adds what kmock's stateful emulator leaves out and the operator relies on: uid,
creationTimestamp, generation (bumped on spec changes), resourceVersion, generateName, and the
status subresource split (a PATCH to /status touches only status; a PATCH to the object leaves
status alone). It still has no garbage collection and no schema validation: the tests play the
JobSet/Deployment controllers by patching child status, and validate manifests separately.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import yaml
from coda_operator.handlers import OperatorConfig, run_operator
from coda_trainer import contract

NS = "ml"
ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": dict(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get", "create"}
    ),
    "coda.dev/v1alpha1/codatrainingruns": dict(
        kind="CodaTrainingRun",
        namespaced=True,
        shortnames={"ctr"},
        verbs={"list", "watch", "get", "create", "patch", "delete"},
        subresources={"status"},
    ),
    "jobset.x-k8s.io/v1alpha2/jobsets": dict(
        kind="JobSet",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "delete"},
        subresources={"status"},
    ),
    "apps/v1/deployments": dict(
        kind="Deployment",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "delete"},
        subresources={"status"},
    ),
    "batch/v1/jobs": dict(
        kind="Job",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "delete"},
        subresources={"status"},
    ),
    "v1/configmaps": dict(
        kind="ConfigMap",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "delete"},
    ),
    "v1/services": dict(
        kind="Service", namespaced=True, verbs={"list", "watch", "get", "create", "patch", "delete"}
    ),
    "v1/events": dict(kind="Event", namespaced=True, verbs={"list", "get", "create"}),
    "v1/secrets": dict(kind="Secret", namespaced=True, verbs={"get", "create"}),
    "v1/serviceaccounts": dict(kind="ServiceAccount", namespaced=True, verbs={"get", "create"}),
}
# The ServiceAccount run_spec() names, as the chart creates it in each namespace runs use.
TRAINER_SERVICE_ACCOUNT = "coda-trainer"
_WITH_STATUS = {"codatrainingruns", "jobsets", "deployments", "jobs"}


class Emulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1)
        self.created_at: dict[tuple[str, str, str], float] = {}
        # (plural, name) → (HTTP status, message): creations the "API server" refuses (quota, webhook)
        self.reject: dict[tuple[str, str], tuple[int, str]] = {}
        # Every request, compactly: (User-Agent, method, plural, action, name).
        self.log: list[tuple[str, str, str | None, str | None, str | None]] = []
        self._inflight: list[Any] = []

    def __iter__(self) -> Any:
        # kmock matches each request against its reactions by scanning the whole request history
        # (O(n) per request, O(n²) per test). Only in-flight requests can still match, so the
        # history seen by the matcher is just those; `log` keeps the full record for assertions.
        yield from self._inflight

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8's path parser cannot parse /api/v1/namespaces (it reads "namespaces" as the
        # namespace prefix of a namespaced URL); serve the one test namespace here.
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._namespaces(raw_request)
        if raw_request.method == "POST" and self.reject:
            body = await raw_request.json()
            refused = self.reject.get(
                (raw_request.path.rstrip("/").rsplit("/", 1)[-1], body["metadata"]["name"])
            )
            if refused is not None:
                code, message = refused
                return aiohttp.web.json_response(
                    {
                        "apiVersion": "v1",
                        "kind": "Status",
                        "status": "Failure",
                        "code": code,
                        "reason": "Forbidden" if code == 403 else "Invalid",
                        "message": message,
                    },
                    status=code,
                )
        return await super().__call__(raw_request)

    async def _namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        ns = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NS, "uid": "ns-uid", "resourceVersion": "1"},
        }
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response(
                {
                    "kind": "NamespaceList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"},
                    "items": [ns],
                }
            )
        rsp = aiohttp.web.StreamResponse()
        await rsp.prepare(raw_request)
        await rsp.write(json.dumps({"type": "ADDED", "object": ns}).encode() + b"\n")
        await asyncio.sleep(float(raw_request.query.get("timeoutSeconds") or 3600))
        return rsp

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            self._apiserver_fields(request)
        name = request.name
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            name = request.data.get("metadata", {}).get("name")
        self.log.append(
            (
                request.headers.get("User-Agent", ""),
                request.method.name,
                request.resource.plural if request.resource is not None else None,
                request.action.name if request.action is not None else None,
                name,
            )
        )
        if len(self._requests) > 256:
            del self._requests[:-64]  # the full record is `log`; kmock's own list only grows
        self._inflight.append(request)
        try:
            return await super()._handle(request)
        finally:
            self._inflight.remove(request)

    def _apiserver_fields(self, request: Any) -> None:
        plural = request.resource.plural
        data = request.data
        if plural == "secrets" and isinstance(data, dict) and "stringData" in data:
            # as the API server does: stringData is write-only, merged into data (base64)
            encoded = {
                k: base64.b64encode(v.encode()).decode() for k, v in data.pop("stringData").items()
            }
            data["data"] = {**(data.get("data") or {}), **encoded}
        if request.action == kmock.action.CREATE:
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("namespace", request.namespace)
            meta.update(
                uid=str(uuid.uuid4()),
                creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                generation=1,
                resourceVersion=str(next(self._rv)),
            )
            if plural in _WITH_STATUS:
                data.pop("status", None)
            self.created_at[(plural, meta["namespace"], meta["name"])] = time.perf_counter()
        elif request.action == kmock.action.UPDATE and request.name:
            rv = str(next(self._rv))
            if request.subresource == "status":
                status = data.get("status")
                data.clear()  # the request object is frozen; its payload dict is not
                data.update(status=status, metadata={"resourceVersion": rv})
                return
            if plural in _WITH_STATUS:
                data.pop("status", None)
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = rv
            key = (request.resource, request.namespace, request.name)
            if "spec" in data and key in self.objects:
                current = self.objects[key].get("metadata", {}).get("generation", 1)
                meta["generation"] = current + 1


class Cluster:
    """The test's side of the API: create runs, play the JobSet controller, wait for conditions."""

    def __init__(self, emulator: Emulator, server: kmock.Server):
        self.k = emulator
        self.url = str(server.url)
        self.session = aiohttp.ClientSession(base_url=self.url)

    async def close(self) -> None:
        await self.session.close()

    @staticmethod
    def path(plural: str, name: str | None = None, sub: str | None = None, ns: str = NS) -> str:
        group = {
            "codatrainingruns": "/apis/coda.dev/v1alpha1",
            "jobsets": "/apis/jobset.x-k8s.io/v1alpha2",
            "deployments": "/apis/apps/v1",
            "jobs": "/apis/batch/v1",
        }.get(plural, "/api/v1")
        p = f"{group}/namespaces/{ns}/{plural}"
        return p + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _json(self, rsp: aiohttp.ClientResponse) -> Any:
        data = await rsp.json(content_type=None)
        if rsp.status >= 400:
            raise AssertionError(f"{rsp.method} {rsp.url} → {rsp.status}: {data}")
        return data

    async def create(self, plural: str, name: str, **fields: Any) -> dict[str, Any]:
        body = {"metadata": {"name": name, "namespace": NS}, **fields}
        async with self.session.post(self.path(plural), json=body) as rsp:
            return await self._json(rsp)

    async def create_run(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": contract.API_VERSION,
            "kind": contract.KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        }
        async with self.session.post(self.path("codatrainingruns"), json=body) as rsp:
            return await self._json(rsp)

    async def create_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd
        ) as rsp:
            return await self._json(rsp)

    async def get(self, plural: str, name: str) -> dict[str, Any] | None:
        async with self.session.get(self.path(plural, name)) as rsp:
            if rsp.status == 404:
                return None
            return await self._json(rsp)

    async def run(self, name: str) -> dict[str, Any]:
        run = await self.get("codatrainingruns", name)
        assert run is not None
        return run

    async def patch(
        self, plural: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        async with self.session.patch(
            self.path(plural, name, sub),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        ) as rsp:
            return await self._json(rsp)

    async def delete(self, plural: str, name: str) -> None:
        async with self.session.delete(self.path(plural, name)) as rsp:
            await self._json(rsp)

    async def finish_jobset(self, name: str, *, failed: bool = False, message: str = "") -> None:
        """Play the JobSet controller: mark a JobSet Completed or Failed."""
        state = "Failed" if failed else "Completed"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cond = {
            "type": state,
            "status": "True",
            "reason": "AllJobsCompleted" if not failed else "FailedJobs",
            "message": message
            or ("jobset completed successfully" if not failed else "jobset failed"),
            "lastTransitionTime": now,
        }
        await self.patch(
            "jobsets",
            name,
            {"status": {"terminalState": state, "conditions": [cond]}},
            sub="status",
        )

    def objects(self, plural: str) -> dict[str, dict[str, Any]]:
        out = {}
        for (resource, ns, name), obj in list(self.k.objects.items()):
            if resource.plural == plural and ns == NS and not obj.deleted:
                out[name] = copy.deepcopy(dict(obj.raw))
        return out

    def creates(self, plural: str) -> list[str]:
        """Names POSTed for a resource, in order (duplicates included: 409s show up here)."""
        return [
            name for _, method, p, action, name in self.k.log if p == plural and action == "CREATE"
        ]

    def events(self, run: str | None = None) -> list[dict[str, Any]]:
        evs = [
            e
            for e in self.objects("events").values()
            if run is None or e["involvedObject"]["name"] == run
        ]
        return sorted(evs, key=lambda e: e["metadata"]["name"])

    async def wait_events(
        self, run: str, *reasons: str, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """The run's Events once every reason in `reasons` is among them. Events are posted after
        the status write they describe, off the reconcile (handlers.EventPoster), so a test that
        has seen a status waits for its Events rather than assuming they are already there."""

        async def probe() -> list[dict[str, Any]] | None:
            evs = self.events(run)
            seen = {e["reason"] for e in evs}
            return evs if all(r in seen for r in reasons) else None

        return await self.wait_for(f"Events {', '.join(reasons)} of {run}", probe, timeout)

    async def wait_for(
        self, what: str, predicate: Callable[[], Awaitable[Any]], timeout: float = 15.0
    ) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await predicate()
            if last:
                return last
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")

    async def wait_run(
        self, name: str, check: Callable[[dict[str, Any]], Any], what: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        async def probe() -> Any:
            run = await self.get("codatrainingruns", name)
            return run if run is not None and check(run) else None

        return await self.wait_for(what, probe, timeout)

    async def wait_jobset(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        return await self.wait_for(f"JobSet {name}", lambda: self.get("jobsets", name), timeout)


class OperatorTask:
    """A real kopf operator with coda's handlers, in its own thread and event loop.

    Not a task in the test's loop: when kopf.operator() ends it cancels every task it did not
    start itself, which would include the emulator's request handlers and the test's own teardown.
    """

    def __init__(self, url: str, config: OperatorConfig | None = None):
        self.url = url
        # short back-offs and batching for tests; the benchmark passes the production defaults
        self.config = config or OperatorConfig(
            server=url, batch_window=0.01, retry_backoff=(0.1, 0.2, 0.5)
        )
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def _main(self, stop: threading.Event, ready: threading.Event) -> None:
        async def body() -> None:
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task()
            await run_operator(
                namespaces=[NS],
                standalone=True,
                config=self.config,
                stop_flag=stop,
                ready_flag=ready,
            )

        try:
            asyncio.run(body())
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # surfaced by start()/stop
            self.error = e

    async def start(self) -> None:
        self.stop, ready = threading.Event(), threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(self.stop, ready), name="kopf", daemon=True
        )
        self.thread.start()
        ok = await asyncio.to_thread(ready.wait, 20)
        if self.error is not None:
            raise self.error
        assert ok, "operator did not become ready"

    async def kill(self) -> None:
        """Stop abruptly: cancel the operator's task mid-flight (no stop flag, no graceful wait)."""
        if self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        await self._join()

    async def stop_gracefully(self) -> None:
        self.stop.set()
        await self._join()
        if self.error is not None:
            raise self.error

    async def _join(self) -> None:
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 20)
            assert not self.thread.is_alive(), "operator thread did not stop"
        self.thread = self.loop = self.task = None


def run_spec(**overrides: Any) -> dict[str, Any]:
    """A small, valid 3-stage spec (pretrain → midtrain → sft) for the end-to-end tests."""
    spec: dict[str, Any] = {
        "image": "us-docker.pkg.dev/acme/coda/trainer:0.1.0",
        "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
        "model": {"preset": "test-micro"},
        "tokenizer": "project",
        "checkpoints": {"uri": "gs://coda-test/runs/demo", "everySteps": 50},
        "accelerator": {"tpu": {"type": "v5p", "topology": "2x2x2"}},
        "stages": [
            {
                "name": "pretrain",
                "kind": "pretrain",
                "steps": 100,
                "batch": {"sequences": 8, "seqLen": 128},
                "data": [{"uri": "gs://coda-data/stdlib/*.py", "format": "python"}],
            },
            {
                "name": "midtrain",
                "kind": "midtrain",
                "steps": 50,
                # 2 × 16 chips: the batch divides over 32 devices, data parallelism spans slices
                "batch": {"sequences": 32, "seqLen": 128},
                "mesh": {"data": 2, "fsdp": -1},
                "accelerator": {"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}},
                "data": [{"uri": "gs://coda-data/stdlib-code/*.py", "format": "python"}],
                "masking": {"curriculum": "paper-table-3"},
            },
            {
                "name": "sft",
                "kind": "sft",
                "steps": 20,
                "batch": {"sequences": 8, "seqLen": 128},
                "data": [{"uri": "gs://coda-data/sft/*.jsonl", "format": "chat"}],
                "sft": {"promptRampFraction": 0.05},
            },
        ],
        "sampler": {
            "enabled": True,
            "replicas": 1,
            "accelerator": {"tpu": {"type": "v6e", "topology": "1x1"}},
            "defaults": {"steps": 64, "alg": "entropy"},
        },
        "failurePolicy": {"maxRestarts": 2, "stageRetries": 1},
        # The pre-flight Job before each TPU stage has its own tests (test_preflight_job.py); the
        # others start at the JobSet.
        "preflight": False,
    }
    spec.update(overrides)
    return spec


def fit_stages_to(spec: dict[str, Any], accelerator: dict[str, Any]) -> dict[str, Any]:
    """Make every stage of `spec` admissible on `accelerator` (its only accelerator): a batch of
    one sequence per device where the batch did not divide, data parallelism across the slices.
    Returns `spec`."""
    from coda_operator import api

    acc = api.AcceleratorSpec.model_validate(accelerator)
    if acc.tpu is not None:
        devices, slices = acc.tpu.slice.chips * acc.tpu.slices, acc.tpu.slices
    else:
        devices, slices = acc.gpu.gpus_per_node * acc.gpu.nodes, 1
    spec["accelerator"] = accelerator
    for stage in spec["stages"]:
        stage.pop("accelerator", None)
        if stage["batch"]["sequences"] % devices:
            stage["batch"] = {**stage["batch"], "sequences": devices}
        stage["mesh"] = {"data": slices, "fsdp": -1}
    return spec


def jobset_crd_schema() -> dict[str, Any]:
    doc = jobset_crd()
    return next(v for v in doc["spec"]["versions"] if v["name"] == "v1alpha2")["schema"][
        "openAPIV3Schema"
    ]


@functools.cache
def _jobset_crd_parsed() -> dict[str, Any]:
    path = SHARED_DATA / "jobset-crd" / "jobset.x-k8s.io_jobsets.yaml"
    if not path.exists():
        raise FileNotFoundError(f"missing shared data: {path} (the JobSet CRD of the tests)")
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def jobset_crd() -> dict[str, Any]:
    """The JobSet CustomResourceDefinition from ../shared/data (a current release), a fresh copy."""
    return copy.deepcopy(_jobset_crd_parsed())


@contextlib.asynccontextmanager
async def emulated_cluster(
    *, jobset: dict[str, Any] | bool | None = True
) -> AsyncIterator[Cluster]:
    """kmock's API server on loopback with coda's resources, the trainer's ServiceAccount and the
    JobSet CRD (`jobset=True`: the shared one; a dict: that CRD; None: not installed)."""
    emulator = Emulator()
    for key, info in RESOURCES.items():
        emulator.resources[key] = kmock.ResourceInfo(**info)
    async with emulator, kmock.Server(emulator) as server:
        c = Cluster(emulator, server)
        await c.create("serviceaccounts", TRAINER_SERVICE_ACCOUNT)
        if jobset is not None:
            await c.create_crd(jobset_crd() if jobset is True else jobset)
        try:
            yield c
        finally:
            await c.close()
