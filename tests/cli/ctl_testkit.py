"""Helpers shared by the CLI tests (imported by conftest.py and the test modules): the kmock
Kubernetes emulator in a background thread, kubeconfig files, the helm/kubectl binaries, paths."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
NAMESPACE = "ml"


def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(
            f"shared data folder missing: {SHARED_DATA} (expected ../shared/data beside the repo)"
        )
    return SHARED_DATA


def helm_binary() -> str:
    """The real helm: PATH first, then tools/bin. Missing helm is a failure, never a skip."""
    helm = shutil.which("helm") or str(REPO / "tools" / "bin" / "helm")
    if not os.access(helm, os.X_OK):
        pytest.fail(
            "helm not found on PATH or in tools/bin: run `make tools` (CI's `make test` does)"
        )
    return helm


def kubectl_binary() -> str:
    kubectl = shutil.which("kubectl") or str(REPO / "tools" / "bin" / "kubectl")
    if not os.access(kubectl, os.X_OK):
        pytest.fail("kubectl not found on PATH or in tools/bin: run `make tools`")
    return kubectl


class Emulator:
    """kmock's stateful Kubernetes emulator served from a background thread's event loop."""

    def __init__(self, crd: bool = True) -> None:
        self.crd = crd  # False: a cluster without the CodaTrainingRun CRD
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.logs: dict[str, bytes] = {}  # pod name → log text served by pods/<name>/log
        self.proxy: Callable[[Any], Any] | None = None  # service proxy handler (set by tests)
        self.requests: list[tuple[str, str]] = []
        self.log_params: list[dict[str, str]] = []  # query of every pods/<name>/log request

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        async with kmock.KubernetesEmulator() as k, kmock.Server(k) as server:
            if self.crd:
                k.resources["coda.dev/v1alpha1/codatrainingruns"] = kmock.ResourceInfo(
                    kind="CodaTrainingRun",
                    namespaced=True,
                    shortnames={"ctr"},
                    subresources={"status"},
                    verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                )
                # A server-side dry run is answered, never stored (kmock would store it).
                (
                    k[
                        "post",
                        kmock.resource("coda.dev/v1alpha1/codatrainingruns"),
                        kmock.params(dryRun="All"),
                    ]
                    << self._dry_run
                )
            else:
                # A real API server 404s everything under an unserved group; kmock would store a
                # POST and then list the group in discovery, so say it by path (naming the
                # resource in a reaction would declare it).
                k[kmock.path(re.compile(r"/apis/coda\.dev(/.*)?"))] << self._no_crd
            for plural, kind in [
                ("pods", "Pod"), ("events", "Event"), ("services", "Service"), ("secrets", "Secret")
            ]:  # fmt: skip
                k.resources[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True)
            k.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False)
            for resource, kind in [
                ("jobset.x-k8s.io/v1alpha2/jobsets", "JobSet"),
                ("batch/v1/jobs", "Job"),
                ("kueue.x-k8s.io/v1beta1/workloads", "Workload"),
            ]:
                k.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=True)
            # The emulator knows no subresources beyond status: serve pod logs and the service proxy.
            k["get", kmock.resource("v1/pods"), kmock.subresource("log")] << self._serve_log
            k["post", kmock.resource("v1/services")] << self._serve_proxy
            self._k = k
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def _dry_run(self, request: Any) -> Any:
        self.requests.append(
            ("dry-run", "&".join(f"{k}={v}" for k, v in sorted(request.params.items())))
        )
        # kmock stores every create before any reaction runs; a dry run must leave nothing behind.
        key = (request.resource, request.namespace, request.data["metadata"]["name"])
        self._k._objects[key].delete()
        return request.data

    def _no_crd(self, request: Any) -> Any:
        raise kmock.KubernetesResourceNotFoundError()

    def _serve_log(self, request: Any) -> bytes:
        self.requests.append(("log", request.name))
        self.log_params.append(dict(request.params))
        if request.name not in self.logs:
            raise kmock.KubernetesObjectNotFoundError()
        return self.logs[request.name]

    def _serve_proxy(self, request: Any) -> Any:
        self.requests.append(
            ("proxy", str(request.url.path) if hasattr(request, "url") else request.name)
        )
        if self.proxy is None or request.name is None:
            raise kmock.KubernetesObjectNotFoundError()
        return self.proxy(request)

    def start(self) -> Emulator:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("kmock emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def serve_emulator_forever(url_file: str, crd: bool) -> None:
    """Entry point of an emulator in its own process (kmock patches aiohttp's resolver per
    process, so two emulators in one process cannot stop in any order): writes its URL, then waits
    to be killed."""
    emu = Emulator(crd=crd).start()
    Path(url_file).write_text(emu.url)
    threading.Event().wait()


def write_kubeconfig(path: Path, server: str, namespace: str = NAMESPACE) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [
                    {
                        "name": "emu",
                        "context": {
                            "cluster": "emulator",
                            "user": "tester",
                            "namespace": namespace,
                        },
                    },
                    {
                        "name": "other",
                        "context": {"cluster": "emulator", "user": "tester", "namespace": "other"},
                    },
                ],
                "current-context": "emu",
            }
        )
    )
    return path


# The clock of the golden outputs: ages are computed against it (see `frozen_clock`), so a test that
# runs minutes after its fixtures were built (a loaded machine, a long suite) prints the same ages.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def ago(**delta: float) -> str:
    return (NOW - dt.timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> dt.datetime:
    """coda-ctl's notion of now pinned to NOW for in-process invocations."""
    import coda_ctl.main

    monkeypatch.setattr(coda_ctl.main, "_now", lambda: NOW)
    return NOW


# ---------------------------------------------------------------------------------- schemas

K8S_VERSIONS = ("1.30.0", "1.35.0")  # oldest supported and a current release


def jobset_crd() -> dict[str, Any]:
    path = shared_data() / "jobset-crd" / "jobset.x-k8s.io_jobsets.yaml"
    if not path.exists():
        raise RuntimeError(f"JobSet CRD missing: {path}")
    return yaml.safe_load(path.read_text())


def _crd_validators(crds: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    import jsonschema
    from coda_ctl.runspec import _strict

    out = {}
    for crd in crds:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = _strict(v["schema"]["openAPIV3Schema"])
            schema.get("properties", {}).pop("metadata", None)  # ObjectMeta is the API server's
            schema.get("properties", {}).pop("apiVersion", None)
            schema.get("properties", {}).pop("kind", None)
            out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def validate_objects(
    docs: list[dict[str, Any]], crds: tuple[dict[str, Any], ...] = ()
) -> list[str]:
    """Validate every object: built-in kinds with kubernetes-validate (strict) for each version in
    K8S_VERSIONS, custom kinds with jsonschema against their CRD (unknown fields rejected).
    Returns the problems; an object of a kind with no schema at all is a problem too."""
    import kubernetes_validate as kv

    custom = _crd_validators(
        [jobset_crd(), *crds, *(d for d in docs if d.get("kind") == "CustomResourceDefinition")]
    )
    problems = []
    for d in docs:
        key = (d.get("apiVersion", ""), d.get("kind", ""))
        label = f"{key[1]}/{d.get('metadata', {}).get('name', '?')}"
        if key in custom:
            for err in custom[key].iter_errors(
                {k: v for k, v in d.items() if k not in ("apiVersion", "kind", "metadata")}
            ):
                problems.append(f"{label}: {'.'.join(map(str, err.absolute_path))}: {err.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(d, version, strict=True)
            except kv.SchemaNotFoundError:
                problems.append(f"{label}: no schema for {key} in Kubernetes {version}")
            except kv.ValidationError as e:
                problems.append(f"{label} (k8s {version}): {str(e).splitlines()[0]}")
    return problems


# ------------------------------------------------------------------------------------ local runs

LOCAL_STAGE: dict[str, Any] = {
    "kind": "pretrain",
    "steps": 10,
    "batch": {"sequences": 2, "seqLen": 32},  # 64 tokens a step
}


def local_run(root: Path, stages: list[dict[str, Any]], name: str = "ux") -> dict[str, Any]:
    """A small CodaTrainingRun for `coda-ctl local run` tests: coda-tiny, `stages` over a
    10-step pretrain default, each reading a one-document JSONL written under `root/data`
    unless the stage names its own data."""
    data = root / "data" / "docs.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text('{"text": "def f():\\n    return 1\\n"}\n')
    default_data = [{"uri": str(data), "format": "jsonl"}]
    return {
        "apiVersion": "coda.dev/v1alpha1",
        "kind": "CodaTrainingRun",
        "metadata": {"name": name},
        "spec": {
            "image": "local",
            "model": {"preset": "coda-tiny"},
            "tokenizer": "project",
            "checkpoints": {"everySteps": 5},
            "accelerator": {"tpu": {"type": "v5e", "topology": "1x1"}},
            "stages": [
                {**copy.deepcopy(LOCAL_STAGE), "data": copy.deepcopy(default_data), **stage}
                for stage in stages
            ],
        },
    }
