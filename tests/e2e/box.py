"""A cluster in a box: the controllers and the kubelet that a real cluster would run for the
objects coda's operator creates, played with real processes on this machine.

The API server is kmock's emulator (tests/operator/operator_testkit.py); the operator is the real
kopf operator. `Box.step()` then does what these would do, and nothing else:

- **JobSet + Job controllers**: a JobSet that is not suspended gets `replicas × parallelism` pods
  (indexed, with the labels and annotations JobSet and Job put on them). A pod's exit code goes
  through the Job's `podFailurePolicy` (FailJob on an exit code or a DisruptionTarget condition;
  otherwise `backoffLimit: 0`) and then the JobSet's `failurePolicy` rules (first rule whose
  reasons and message patterns match: FailJobSet, or RestartJobSetAndIgnoreMaxRestarts; no rule:
  restart while `maxRestarts` allows). A restart recreates every pod (`Recreate`). The outcome is
  written as JobSet status (`terminalState`, conditions, `restarts`) through the API, as the
  controller does.
- **Job controller** (the evaluation's batch/v1 Jobs): one pod; exit 0 → `Complete`; otherwise
  the `podFailurePolicy` (FailJob on an exit code → reason PodFailurePolicy) or, with
  `backoffLimit: 0`, BackoffLimitExceeded → `Failed`.
- **Deployment controller**: `replicas` pods; `status.readyReplicas` counts pods whose
  readinessProbe (an HTTP GET on the pod's address) answers 2xx.
- **kubelet**: each pod's container command runs as a local process. Env is resolved as the
  kubelet does (`value` with `$(VAR)` expansion, `fieldRef` on the pod's metadata, `secretKeyRef`
  from Secrets in the API), ConfigMap volumes are files, and `$(VAR)` in command/args is
  expanded. Where a pod differs from a process, the box maps it and says so:
  * paths: a volume's `mountPath` becomes a folder of the pod (the command's `/etc/coda/job.yaml`
    is rewritten to that folder's `job.yaml`);
  * network: each pod gets its own loopback address (127.0.0.N) as its "pod IP"; `0.0.0.0` in its
    arguments is that address (binding all interfaces of a pod binds its own IP), and JobSet's DNS
    names (`<jobset>-<job>-<j>-<i>.<jobset>`) resolve to pod IPs by substitution in env values;
  * devices: `google.com/tpu: N` becomes N host-platform CPU devices (`XLA_FLAGS`);
  * the node: `NODE_ENV` (JAX on CPU, the GCS emulator's endpoints, the API server for progress
    reports in place of the in-cluster ServiceAccount token) and the repository's virtualenv on
    PATH in place of the image.
- **Service proxy**: `POST /api/v1/namespaces/ns/services/<svc>:<port>/proxy/<path>` is
  forwarded to a ready pod selected by the Service, with `Authorization` stripped as the real API
  server does.
- **Preemption**: `preempt(pod)` sets DisruptionTarget, sends SIGTERM, and SIGKILLs after the
  pod's terminationGracePeriodSeconds, as the kubelet does on a Spot reclaim.

Every process's output goes to a file (`Pod.log`), and `close()` kills every process group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kmock
from operator_testkit import NS, Cluster

REPO = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_ip_counter = itertools.count(2)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones left as written."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass
class Pod:
    name: str
    ip: str
    labels: dict[str, str]
    annotations: dict[str, str]
    container: dict[str, Any]
    grace_s: float
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    conditions: set[str] = field(default_factory=set)
    exit_code: int | None = None
    sigterm_at: float | None = None

    @property
    def log(self) -> Path:
        return self.root / "log"

    def poll(self) -> int | None:
        if self.proc is not None and self.exit_code is None:
            code = self.proc.poll()
            if code is not None:
                self.exit_code = 128 - code if code < 0 else code  # a signal as the shell reports
        return self.exit_code

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.poll()


@dataclass
class _JobSetRun:
    """One attempt of a JobSet: its pods; `restarts` counts the Recreate restarts so far."""

    name: str
    pods: list[Pod]
    restarts: int = 0
    counted_restarts: int = 0
    done: bool = False


class Box:
    def __init__(self, cluster: Cluster, workdir: Path, node_env: dict[str, str]):
        self.cluster = cluster
        self.workdir = workdir
        self.node_env = node_env
        self.jobsets: dict[str, _JobSetRun] = {}
        self.jobs: dict[str, _JobSetRun] = {}  # batch/v1 Jobs: one attempt, one pod
        self.deployments: dict[str, list[Pod]] = {}
        self.history: list[tuple[str, str, int | None]] = []  # (jobset, pod, exit code)
        cluster.k["post", kmock.resource("v1/services")] << self._proxy

    # ------------------------------------------------------------------------------ kubelet

    def _resolve_env(self, pod: Pod, hosts: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        meta = {"metadata.name": pod.name, "metadata.namespace": NS, "status.podIP": pod.ip}
        for item in pod.container.get("env", []):
            name = item["name"]
            if "value" in item:
                value = _expand(item["value"], env)
            else:
                src = item["valueFrom"]
                if "fieldRef" in src:
                    value = self._field(pod, meta, src["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in src:
                    value = self._secret(src["secretKeyRef"]["name"], src["secretKeyRef"]["key"])
                else:
                    raise AssertionError(f"pod {pod.name}: unsupported env source {src}")
            for host, ip in hosts.items():  # the JobSet's headless-Service DNS names
                value = value.replace(host, ip)
            env[name] = value
        return env

    @staticmethod
    def _field(pod: Pod, meta: dict[str, str], path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            source = pod.labels if m.group(1) == "labels" else pod.annotations
            return source[m.group(2)]
        return meta[path]

    def _secret(self, name: str, key: str) -> str:
        secret = self.cluster.objects("secrets").get(name)
        assert secret is not None, f"secret {name} not found (the pod would not start)"
        if key in (secret.get("stringData") or {}):
            return secret["stringData"][key]
        return base64.b64decode(secret["data"][key]).decode()

    def _mounts(self, pod: Pod, volumes: list[dict[str, Any]]) -> dict[str, Path]:
        """mountPath → the pod's local folder, ConfigMaps written out as files."""
        by_name = {v["name"]: v for v in volumes}
        out: dict[str, Path] = {}
        for mount in pod.container.get("volumeMounts", []):
            local = pod.root / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            volume = by_name[mount["name"]]
            if "configMap" in volume:
                cm = self.cluster.objects("configmaps").get(volume["configMap"]["name"])
                assert cm is not None, f"configmap {volume['configMap']['name']} not found"
                for key, text in (cm.get("data") or {}).items():
                    (local / key).write_text(text)
            out[mount["mountPath"]] = local
        return out

    def _start(self, pod: Pod, pod_spec: dict[str, Any], hosts: dict[str, str]) -> None:
        pod.root.mkdir(parents=True, exist_ok=True)
        env = self._resolve_env(pod, hosts)
        mounts = self._mounts(pod, pod_spec.get("volumes", []))

        def remap(text: str) -> str:
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                text = re.sub(re.escape(mount_path) + r"(?=/|$|\s)", str(local), text)
            return text

        argv = [*pod.container.get("command", []), *pod.container.get("args", [])]
        argv = [remap(_expand(a, env)) for a in argv]
        argv = [pod.ip if a == "0.0.0.0" else a for a in argv]
        env = {k: remap(v) for k, v in env.items()}
        chips = (pod.container.get("resources", {}).get("limits") or {}).get("google.com/tpu")
        full_env = {**self.node_env, **env}
        if chips:
            full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={chips}"
        with pod.log.open("wb") as log:
            pod.proc = subprocess.Popen(
                argv, env=full_env, cwd=pod.root, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    # ------------------------------------------------------------------------- JobSet + Job

    def _jobset_pods(self, js: dict[str, Any], restarts: int) -> tuple[list[Pod], dict[str, str]]:
        name = js["metadata"]["name"]
        pods, hosts = [], {}
        for rj in js["spec"]["replicatedJobs"]:
            job_spec = rj["template"]["spec"]
            pod_template = job_spec["template"]
            for j in range(rj.get("replicas", 1)):
                for i in range(job_spec.get("parallelism", 1)):
                    hostname = f"{name}-{rj['name']}-{j}-{i}"
                    ip = f"127.0.0.{next(_ip_counter) % 250 + 2}"
                    hosts[f"{hostname}.{name}"] = ip
                    labels = {
                        **(pod_template.get("metadata", {}).get("labels") or {}),
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": rj["name"],
                        "jobset.sigs.k8s.io/job-index": str(j),
                        "jobset.sigs.k8s.io/replicatedjob-replicas": str(rj.get("replicas", 1)),
                        "jobset.sigs.k8s.io/restart-attempt": str(restarts),
                    }
                    annotations = {"batch.kubernetes.io/job-completion-index": str(i)}
                    pod_spec = pod_template["spec"]
                    pods.append(
                        Pod(
                            name=f"{hostname}-r{restarts}",
                            ip=ip,
                            labels=labels,
                            annotations=annotations,
                            container=pod_spec["containers"][0],
                            grace_s=float(pod_spec.get("terminationGracePeriodSeconds", 30)),
                            root=self.workdir / "pods" / f"{hostname}-r{restarts}",
                        )
                    )
        if any(
            "google.com/tpu" in (p.container.get("resources", {}).get("limits") or {}) for p in pods
        ):
            # GKE's TPU webhook: every host learns its worker id and the slice's hostnames.
            for p in pods:
                same_slice = [
                    q
                    for q in pods
                    if q.labels["jobset.sigs.k8s.io/job-index"]
                    == p.labels["jobset.sigs.k8s.io/job-index"]
                ]
                p.container = {
                    **p.container,
                    "env": [
                        *p.container.get("env", []),
                        {
                            "name": "TPU_WORKER_ID",
                            "value": p.annotations["batch.kubernetes.io/job-completion-index"],
                        },
                        {
                            "name": "TPU_WORKER_HOSTNAMES",
                            "value": ",".join(q.ip for q in same_slice),
                        },
                    ],
                }
        return pods, hosts

    def _start_jobset(self, js: dict[str, Any], run: _JobSetRun | None) -> _JobSetRun:
        restarts = run.restarts if run else 0
        pods, hosts = self._jobset_pods(js, restarts)
        pod_spec = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        for pod in pods:
            self._start(pod, pod_spec, hosts)
        if run is None:
            return _JobSetRun(js["metadata"]["name"], pods)
        run.pods = pods
        return run

    @staticmethod
    def _job_failure(job_spec: dict[str, Any], pod: Pod) -> tuple[str, str]:
        """(reason, message) of the Job that `pod` failed, as the Job controller words them."""
        rules = job_spec.get("podFailurePolicy", {})
        for index, rule in enumerate(rules.get("rules", [])):
            if rule["action"] != "FailJob":
                continue
            codes = rule.get("onExitCodes")
            if codes and pod.exit_code in codes["values"]:
                return "PodFailurePolicy", (
                    f"Container {codes['containerName']} for pod {NS}/{pod.name} failed with exit "
                    f"code {pod.exit_code} matching FailJob rule at index {index}"
                )
            for cond in rule.get("onPodConditions", []):
                if cond["type"] in pod.conditions:
                    return "PodFailurePolicy", (
                        f"Pod {NS}/{pod.name} has condition {cond['type']} matching FailJob rule "
                        f"at index {index}"
                    )
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"

    async def _finish(
        self, name: str, state: str, reason: str, message: str, restarts: int
    ) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cond = {"type": state, "status": "True", "reason": reason, "message": message,
                "lastTransitionTime": now}  # fmt: skip
        await self.cluster.patch(
            "jobsets", name,
            {"status": {"terminalState": state, "conditions": [cond], "restarts": restarts}},
            sub="status",
        )  # fmt: skip

    async def _step_jobset(self, js: dict[str, Any]) -> None:
        name = js["metadata"]["name"]
        run = self.jobsets.get(name)
        if js["spec"].get("suspend") or (run is not None and run.done):
            return
        if (js.get("status") or {}).get("terminalState"):
            return
        if run is None:
            self.jobsets[name] = self._start_jobset(js, None)
            return
        codes = [p.poll() for p in run.pods]
        if all(c == 0 for c in codes):
            for p in run.pods:
                self.history.append((name, p.name, p.exit_code))
            run.done = True
            await self._finish(
                name, "Completed", "AllJobsCompleted", "jobset completed successfully", run.restarts
            )
            return
        failed = next((p for p in run.pods if p.exit_code not in (None, 0)), None)
        if failed is None:
            return
        reason, message = self._job_failure(
            js["spec"]["replicatedJobs"][0]["template"]["spec"], failed
        )
        await _terminate(run.pods)  # Recreate: the rest of the group goes too
        for p in run.pods:
            self.history.append((name, p.name, p.exit_code))
        policy = js["spec"].get("failurePolicy") or {}
        for rule in policy.get("rules", []):
            if reason not in rule.get("onJobFailureReasons", [reason]):
                continue
            patterns = rule.get("onJobFailureMessagePatterns")
            if patterns and not any(re.search(pat, message) for pat in patterns):
                continue
            if rule["action"] == "FailJobSet":  # JobSet's own words for it (its constants.go)
                run.done = True
                labels = failed.labels
                job = f"{name}-{labels['jobset.sigs.k8s.io/replicatedjob-name']}-{labels['jobset.sigs.k8s.io/job-index']}"
                await self._finish(
                    name, "Failed", "FailJobSetFailurePolicyAction",
                    f"applying FailJobSet failure policy action (first failed job: {job})",
                    run.restarts,
                )  # fmt: skip
                return
            if rule["action"] == "RestartJobSetAndIgnoreMaxRestarts":
                run.restarts += 1
                await self._restart(js, run)
                return
        if run.counted_restarts >= policy.get("maxRestarts", 0):
            run.done = True
            await self._finish(name, "Failed", "ReachedMaxRestarts",
                               "jobset failed due to reaching max number of restarts", run.restarts)  # fmt: skip
            return
        run.restarts += 1
        run.counted_restarts += 1
        await self._restart(js, run)

    async def _restart(self, js: dict[str, Any], run: _JobSetRun) -> None:
        await self.cluster.patch(
            "jobsets", run.name, {"status": {"restarts": run.restarts}}, sub="status"
        )
        self._start_jobset(js, run)

    # ---------------------------------------------------------------------------------- Job

    async def _step_job(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        run = self.jobs.get(name)
        if job["spec"].get("suspend") or (run is not None and run.done):
            return
        pod_spec = job["spec"]["template"]["spec"]
        if run is None:
            pod = Pod(
                name=f"{name}-0",
                ip=f"127.0.0.{next(_ip_counter) % 250 + 2}",
                labels=dict(job["spec"]["template"]["metadata"].get("labels") or {}),
                annotations={"batch.kubernetes.io/job-completion-index": "0"},
                container=pod_spec["containers"][0],
                grace_s=float(pod_spec.get("terminationGracePeriodSeconds", 30)),
                root=self.workdir / "pods" / f"{name}-0",
            )
            self._start(pod, pod_spec, {})
            self.jobs[name] = _JobSetRun(name, [pod])
            return
        (pod,) = run.pods
        if pod.poll() is None:
            return
        run.done = True
        self.history.append((name, pod.name, pod.exit_code))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if pod.exit_code == 0:
            cond = {"type": "Complete", "status": "True", "lastTransitionTime": now}
            counts = {"succeeded": 1}
        else:
            reason, message = self._job_failure(job["spec"], pod)
            cond = {"type": "Failed", "status": "True", "reason": reason, "message": message,
                    "lastTransitionTime": now}  # fmt: skip
            counts = {"failed": 1}
        await self.cluster.patch(
            "jobs", name, {"status": {**counts, "conditions": [cond]}}, sub="status"
        )

    # --------------------------------------------------------------------------- Deployment

    async def _step_deployment(self, dep: dict[str, Any]) -> None:
        name = dep["metadata"]["name"]
        pods = self.deployments.get(name)
        pod_spec = dep["spec"]["template"]["spec"]
        if pods is None:
            pods = []
            for i in range(dep["spec"].get("replicas", 1)):
                pod = Pod(
                    name=f"{name}-{i}",
                    ip=f"127.0.0.{next(_ip_counter) % 250 + 2}",
                    labels=dict(dep["spec"]["template"]["metadata"]["labels"]),
                    annotations={},
                    container=pod_spec["containers"][0],
                    grace_s=float(pod_spec.get("terminationGracePeriodSeconds", 30)),
                    root=self.workdir / "pods" / f"{name}-{i}",
                )
                self._start(pod, pod_spec, {})
                pods.append(pod)
            self.deployments[name] = pods
        ready = sum([p.poll() is None and await self._ready(p) for p in pods])
        status = dep.get("status") or {}
        if status.get("readyReplicas", 0) != ready or status.get("replicas") != len(pods):
            await self.cluster.patch(
                "deployments", name, {"status": {"replicas": len(pods), "readyReplicas": ready}},
                sub="status",
            )  # fmt: skip

    @staticmethod
    def _port(container: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in container["ports"] if p["name"] == port)

    async def _ready(self, pod: Pod) -> bool:
        probe = pod.container.get("readinessProbe", {}).get("httpGet")
        if probe is None:
            return True
        url = f"http://{pod.ip}:{self._port(pod.container, probe['port'])}{probe['path']}"
        try:
            async with httpx.AsyncClient(timeout=probe.get("timeoutSeconds", 1)) as client:
                return (await client.get(url)).is_success
        except httpx.HTTPError:
            return False

    # -------------------------------------------------------------------------- Service proxy

    async def _proxy(self, request: Any) -> Any:
        service_name, _, port = (request.name or "").partition(":")
        service = self.cluster.objects("services").get(service_name)
        if service is None:
            raise kmock.KubernetesObjectNotFoundError()
        selector = service["spec"]["selector"]
        svc_port = next(p for p in service["spec"]["ports"] if str(p["port"]) == port)
        pods = [
            p for pods in self.deployments.values() for p in pods
            if all(p.labels.get(k) == v for k, v in selector.items()) and await self._ready(p)
        ]  # fmt: skip
        if not pods:
            raise kmock.KubernetesObjectNotFoundError()
        pod = pods[0]
        target = self._port(pod.container, svc_port["targetPort"])
        path = request.subresource.removeprefix("proxy")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "host", "content-length")}  # fmt: skip
        async with httpx.AsyncClient(timeout=300) as client:
            rsp = await client.post(
                f"http://{pod.ip}:{target}{path}", json=request.data, headers=headers
            )
        return rsp.json()

    # ------------------------------------------------------------------------------- driving

    async def step(self) -> None:
        now = time.monotonic()
        for pod in self._all_pods():  # the kubelet's grace period after SIGTERM
            if (
                pod.sigterm_at is not None
                and pod.poll() is None
                and now - pod.sigterm_at > pod.grace_s
            ):
                pod.signal(signal.SIGKILL)
        for _name, js in sorted(self.cluster.objects("jobsets").items()):
            await self._step_jobset(js)
        for name, run in list(self.jobsets.items()):
            if name not in self.cluster.objects("jobsets"):  # deleted: its pods go
                for p in run.pods:
                    p.kill()
                del self.jobsets[name]
        for _, job in sorted(self.cluster.objects("jobs").items()):
            await self._step_job(job)
        for _, dep in sorted(self.cluster.objects("deployments").items()):
            await self._step_deployment(dep)

    def running_pods(self, jobset: str) -> list[Pod]:
        run = self.jobsets.get(jobset)
        return [p for p in run.pods if p.poll() is None] if run else []

    def preempt(self, pod: Pod) -> None:
        """A Spot reclaim: DisruptionTarget, SIGTERM now, SIGKILL after the grace period."""
        pod.conditions.add("DisruptionTarget")
        pod.signal(signal.SIGTERM)
        pod.sigterm_at = time.monotonic()

    def logs(self) -> str:
        out = []
        for pod in self._all_pods():
            if pod.log.exists():
                out.append(
                    f"==== {pod.name} (exit {pod.exit_code})\n{pod.log.read_text(errors='replace')[-3000:]}"
                )
        return "\n".join(out)

    def _all_pods(self) -> list[Pod]:
        runs = [*self.jobsets.values(), *self.jobs.values()]
        return [p for r in runs for p in r.pods] + [
            p for pods in self.deployments.values() for p in pods
        ]

    def close(self) -> None:
        for pod in self._all_pods():
            pod.kill()


async def _terminate(pods: list[Pod]) -> None:
    """SIGTERM, then SIGKILL whatever outlives its grace period (without blocking the loop)."""
    start = time.monotonic()
    for p in pods:
        p.signal(signal.SIGTERM)
    while any(p.poll() is None for p in pods):
        for p in pods:
            if p.poll() is None and time.monotonic() - start > p.grace_s:
                p.signal(signal.SIGKILL)
        await asyncio.sleep(0.1)


def node_env(extra: dict[str, str]) -> dict[str, str]:
    """What every node of the box provides: the repository's Python as the image's, JAX on CPU."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("trainer", "operator", "cli")),
        "PYTHONUNBUFFERED": "1",
        "JAX_PLATFORMS": "cpu",
        "HOME": "/tmp",
        **extra,
    }
