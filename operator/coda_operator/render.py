"""Pure manifest builders: a validated spec in, plain Kubernetes dicts out.

One stage = one ConfigMap holding the resolved trainer job YAML (`TrainJobConfig`) and one JobSet
running `python -m coda_trainer.train --config /etc/coda/job.yaml` on every host of every slice.
After the last stage: the sampler Deployment + Service `<run>-sampler`.

Failure handling lives in the manifests, where Kubernetes enforces it:
- Job `podFailurePolicy` turns the trainer's permanent exit code (78) and its retryable code (75,
  SIGTERM after a checkpoint) and pod disruptions (DisruptionTarget: preemption, host maintenance)
  into a Job failure with reason PodFailurePolicy and a message naming the cause.
- JobSet `failurePolicy.rules` then fail the JobSet at once on code 78 and restart the whole JobSet
  with `RestartJobSetAndIgnoreMaxRestarts` on code 75 or a disruption, so Spot/Kueue preemption never
  eats `maxRestarts` (JobSet #1117); any other crash restarts it counting against `maxRestarts`.
- Every host gets a unique JAX process id `slice * hostsPerSlice + host` and all hosts share the
  coordinator `<jobset>-slice-0-0.<jobset>` (Kubeflow Trainer #3537 gave slices duplicate ids).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import yaml
from coda_trainer import contract
from coda_trainer.config import ModelSpec, TrainJobConfig, sampler_flag
from coda_trainer.contract import EXIT_PERMANENT, EXIT_RETRYABLE

from coda_operator.api import (
    AcceleratorSpec,
    CodaTrainingRunSpec,
    SamplerSpec,
    SecretKeyRef,
    parse_spec,
)

__all__ = [
    "CONFIG_DIR",
    "COORDINATOR_PORT",
    "GENERATE_ANNOTATION",
    "JOB_FILE",
    "LABEL_ATTEMPT",
    "LABEL_COMPONENT",
    "LABEL_RUN",
    "LABEL_STAGE",
    "REPLICATED_JOB",
    "SAMPLER_PORT",
    "StageObjects",
    "configmap_name",
    "eval_command",
    "eval_job_name",
    "fingerprint",
    "jobset_name",
    "render_all",
    "render_eval_job",
    "render_sampler",
    "render_sampler_key",
    "render_stage",
    "sampler_api_key",
    "sampler_checkpoint",
    "sampler_endpoint",
    "sampler_name",
    "stage_final",
    "stage_init_from",
    "stage_job_config",
]

LABEL_RUN = contract.LABEL_RUN
LABEL_STAGE = contract.LABEL_STAGE
LABEL_ATTEMPT = "coda.dev/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
TPU_RESOURCE = "google.com/tpu"
GPU_RESOURCE = "nvidia.com/gpu"
SPOT_LABEL = "cloud.google.com/gke-spot"

REPLICATED_JOB = "slice"
CONTAINER = "trainer"
CONFIG_DIR = "/etc/coda"
JOB_FILE = "job.yaml"
# libyaml's emitter writes the same text as the pure-Python SafeDumper ~4× faster, and rendering a
# stage is on the hand-off path (the operator's profile at 1,000 runs: yaml emit was the largest
# share of a reconcile).
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
COORDINATOR_PORT = 8476
SAMPLER_PORT = 8000
# Seconds between SIGTERM and SIGKILL: the trainer checkpoints on SIGTERM before exiting 75.
TERMINATION_GRACE_SECONDS = 120
TRAINER_UID = 1000
# On a Secret the operator creates: fill this key with a random API key (see render_sampler_key).
GENERATE_ANNOTATION = "coda.dev/generate-key"

# Shell step in front of the trainer: the only arithmetic the downward API cannot do.
_LAUNCH = (
    f"export JAX_PROCESS_ID=$(({contract.ENV_SLICE_ID} * {contract.ENV_HOSTS_PER_SLICE}"
    f" + {contract.ENV_HOST_ID})) && "
    f"exec python -m coda_trainer.train --config {CONFIG_DIR}/{JOB_FILE}"
)


def jobset_name(run: str, stage: str, attempt: int = 0) -> str:
    return f"{run}-{stage}" + (f"-r{attempt}" if attempt else "")


def eval_job_name(run: str, stage: str, attempt: int = 0) -> str:
    return f"{run}-{stage}-eval" + (f"-r{attempt}" if attempt else "")


def preflight_job_name(run: str, stage: str, attempt: int = 0) -> str:
    return f"{run}-{stage}-preflight" + (f"-r{attempt}" if attempt else "")


def configmap_name(run: str, stage: str, attempt: int = 0) -> str:
    return f"{jobset_name(run, stage, attempt)}-config"


def sampler_name(run: str) -> str:
    return f"{run}-sampler"


def sampler_api_key(run: str, spec: CodaTrainingRunSpec) -> SecretKeyRef:
    """Where the sampler's API key lives: the run's own Secret, or the one the operator generates."""
    return spec.sampler.api_key_secret or SecretKeyRef(name=f"{run}-sampler-key")


def sampler_endpoint(run: str, namespace: str) -> str:
    return f"http://{sampler_name(run)}.{namespace}.svc:{SAMPLER_PORT}"


def stage_final(spec: CodaTrainingRunSpec, index: int) -> str:
    return contract.final_uri(spec.checkpoints.uri, spec.stages[index].name)


def sampler_checkpoint(spec: CodaTrainingRunSpec) -> str:
    """The sampler serves the last stage's final checkpoint (the SFT model in the CoDA recipe)."""
    return stage_final(spec, len(spec.stages) - 1)


def stage_init_from(spec: CodaTrainingRunSpec, index: int) -> str | None:
    """An explicit stage initFrom wins; otherwise stage i > 0 starts from stage i−1's final."""
    explicit = spec.stages[index].init_from
    if explicit is not None or index == 0:
        return explicit
    return stage_final(spec, index - 1)


def stage_job_config(run: str, spec: CodaTrainingRunSpec, index: int) -> TrainJobConfig:
    """What the trainer reads from /etc/coda/job.yaml for stage `index`."""
    stage = spec.stages[index].trainer_stage(init_from=stage_init_from(spec, index))
    model = ModelSpec.model_validate(spec.model.model_dump())
    if index > 0:
        # Weights come from the previous stage; the run-level initFrom only seeds the first stage.
        model = model.model_copy(update={"init_from": None})
    return TrainJobConfig(
        run=run, model=model, tokenizer=spec.tokenizer, checkpoints=spec.checkpoints, stage=stage
    )


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# fingerprint key → the spec field a user would have changed
FINGERPRINT_FIELDS = {
    "stage": "spec.stages[{i}]",
    "model": "spec.model",
    "tokenizer": "spec.tokenizer",
    "checkpoints": "spec.checkpoints",
    "image": "spec.image",
    "accelerator": "spec.accelerator (or spec.stages[{i}].accelerator)",
    "serviceAccountName": "spec.serviceAccountName",
    "queueName": "spec.queueName",
    "maxRestarts": "spec.failurePolicy.maxRestarts",
    "hostNetwork": "spec.hostNetwork",
}


# fingerprint() memo: (run, id(spec), index) → (spec, hashes). The spec object is kept in the
# value and compared by identity, so an id reused after a spec is freed never matches. Specs are
# immutable and the planner parses a run's spec once per change (planner._parsed_spec), so the
# running stage's hashes (asked for on every reconcile) are computed once per spec.
_FINGERPRINTS: OrderedDict[tuple[str, int, int], tuple[Any, dict[str, str]]] = OrderedDict()
FINGERPRINT_CACHE_SIZE = 8192


def fingerprint(run: str, spec: CodaTrainingRunSpec, index: int) -> dict[str, str]:
    """Short hashes of every spec part the stage's JobSet is rendered from (spec-change detection).

    Fields at their defaults are left out of the hashes, so an operator upgrade that adds an
    optional field does not make every running stage look changed. Returns a fresh dict.
    """
    key = (run, id(spec), index)
    hit = _FINGERPRINTS.get(key)
    if hit is not None and hit[0] is spec:
        _FINGERPRINTS.move_to_end(key)
        return dict(hit[1])
    hashes = _fingerprint(run, spec, index)
    _FINGERPRINTS[key] = (spec, hashes)
    while len(_FINGERPRINTS) > FINGERPRINT_CACHE_SIZE:
        _FINGERPRINTS.popitem(last=False)
    return dict(hashes)


def _fingerprint(run: str, spec: CodaTrainingRunSpec, index: int) -> dict[str, str]:
    job = stage_job_config(run, spec, index)

    def dump(model: Any) -> Any:
        return model.model_dump(mode="json", exclude_defaults=True)

    return {
        "stage": _digest(dump(job.stage)),
        "model": _digest(dump(job.model)),
        "tokenizer": _digest(job.tokenizer),
        "checkpoints": _digest(dump(job.checkpoints)),
        "image": _digest([spec.image, spec.image_pull_policy]),
        "accelerator": _digest(dump(spec.stage_accelerator(index))),
        "serviceAccountName": _digest(spec.service_account_name),
        "queueName": _digest(spec.queue_name),
        "maxRestarts": _digest(spec.failure_policy.max_restarts),
        # only when set: hashes of runs without it stay what they were
        **({"hostNetwork": _digest(True)} if spec.host_network else {}),
    }


# The fingerprint parts a compiled step depends on: a new queue, ServiceAccount or restart budget
# reuses the cached pre-flight; a new stage, model, tokenizer, slice or image compiles again.
PREFLIGHT_KEY_FIELDS = ("stage", "model", "tokenizer", "accelerator", "image")


def preflight_key(run: str, spec: CodaTrainingRunSpec, index: int) -> str:
    """The cache key of stage `index`'s pre-flight (status.preflight.<stage>.key)."""
    fp = fingerprint(run, spec, index)
    return _digest({k: fp[k] for k in PREFLIGHT_KEY_FIELDS})


# --------------------------------------------------------------------------------------------------
# Pod building blocks
# --------------------------------------------------------------------------------------------------


def _labels(run: str, component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "coda",
        LABEL_COMPONENT: component,
        "app.kubernetes.io/managed-by": "coda-operator",
        LABEL_RUN: run,
        **extra,
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security(read_only_root: bool) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


@dataclass(frozen=True)
class _Placement:
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    limits: dict[str, str]
    hosts: int
    slices: int
    tpu: bool


def _placement(acc: AcceleratorSpec) -> _Placement:
    selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    limits: dict[str, str] = {}
    hosts, slices, tpu = 1, 1, False
    if acc.tpu is not None:
        sl = acc.tpu.slice
        selector = {
            "cloud.google.com/gke-tpu-accelerator": sl.accelerator,
            "cloud.google.com/gke-tpu-topology": sl.topology,
        }
        tolerations.append({"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
        limits[TPU_RESOURCE] = str(sl.chips_per_host)
        hosts, slices, tpu = sl.hosts, acc.tpu.slices, True
    elif acc.gpu is not None:
        selector = {"cloud.google.com/gke-accelerator": acc.gpu.type}
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
        limits[GPU_RESOURCE] = str(acc.gpu.gpus_per_node)
        hosts = acc.gpu.nodes
    if acc.spot:
        selector[SPOT_LABEL] = "true"
        tolerations.append(
            {"key": SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        )
    return _Placement(selector, tolerations, limits, hosts, slices, tpu)


def _place(pod_spec: dict[str, Any], spec: CodaTrainingRunSpec, pl: _Placement) -> None:
    """The run's identity and the accelerator's node placement, shared by every pod coda renders."""
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if pl.node_selector:
        pod_spec["nodeSelector"] = dict(pl.node_selector)
    if pl.tolerations:
        pod_spec["tolerations"] = list(pl.tolerations)


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _trainer_env(
    run: str, spec: CodaTrainingRunSpec, index: int, attempt: int, pl: _Placement
) -> list[dict[str, Any]]:
    stage = spec.stages[index]
    coordinator_host = "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_RUN_NAME, "value": run},
        _field_env(contract.ENV_RUN_NAMESPACE, "metadata.namespace"),
        {"name": contract.ENV_STAGE, "value": stage.name},
        {"name": contract.ENV_STAGE_INDEX, "value": str(index)},
        {"name": contract.ENV_ATTEMPT, "value": str(attempt)},
        # The trainer's process 0 merge-patches status.progress of its CodaTrainingRun.
        {"name": contract.ENV_PROGRESS, "value": contract.PROGRESS_TO_STATUS},
        _field_env("JOBSET_NAME", "metadata.labels['jobset.sigs.k8s.io/jobset-name']"),
        _field_env(
            "REPLICATED_JOB_NAME", "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']"
        ),
        _field_env(contract.ENV_SLICE_ID, "metadata.labels['jobset.sigs.k8s.io/job-index']"),
        _field_env(
            contract.ENV_NUM_SLICES, "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']"
        ),
        _field_env(
            contract.ENV_HOST_ID, "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        ),
        {"name": contract.ENV_HOSTS_PER_SLICE, "value": str(pl.hosts)},
        {"name": "JAX_NUM_PROCESSES", "value": str(pl.hosts * pl.slices)},
        {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{coordinator_host}:{COORDINATOR_PORT}"},
    ]
    if pl.tpu and pl.slices > 1:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": coordinator_host},
            _field_env(
                "MEGASCALE_NUM_SLICES",
                "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']",
            ),
            _field_env("MEGASCALE_SLICE_ID", "metadata.labels['jobset.sigs.k8s.io/job-index']"),
        ]
    return env


def _fail_job_on_exit(code: int) -> dict[str, Any]:
    """A podFailurePolicy rule: the trainer container exiting with `code` fails its Job at once."""
    return {
        "action": "FailJob",
        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [code]},
    }


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            _fail_job_on_exit(EXIT_PERMANENT),
            _fail_job_on_exit(EXIT_RETRYABLE),
            # A disrupted pod fails its Job (not Ignore: one host cannot rejoin a running JAX slice alone),
            # and the JobSet rule below restarts the whole group without spending maxRestarts.
            {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def _jobset_failure_policy(max_restarts: int) -> dict[str, Any]:
    return {
        "maxRestarts": max_restarts,
        "restartStrategy": "Recreate",
        "rules": [
            {
                "name": "PermanentFailure",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [f"exit code {EXIT_PERMANENT} matching FailJob"],
            },
            {
                "name": "PreemptedOrRetryable",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [
                    f"exit code {EXIT_RETRYABLE} matching FailJob",
                    "DisruptionTarget",
                ],
            },
        ],
    }


# --------------------------------------------------------------------------------------------------
# Stage: ConfigMap + JobSet
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageObjects:
    configmap: dict[str, Any]
    jobset: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        return [self.configmap, self.jobset]


def _stage_pod_spec(
    run: str, spec: CodaTrainingRunSpec, index: int, attempt: int, pl: _Placement, cm_name: str
) -> dict[str, Any]:
    """The pod of every trainer host: the launch script, the job file from the ConfigMap, the
    accelerator placement."""
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": ["/bin/sh", "-c", _LAUNCH],
        "env": _trainer_env(run, spec, index, attempt, pl),
        "ports": [{"name": "jax-coord", "containerPort": COORDINATOR_PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(pl.limits), "limits": dict(pl.limits)},
        "securityContext": _container_security(read_only_root=False),
        "volumeMounts": [
            {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires it; restarts are whole-JobSet
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "job-config", "configMap": {"name": cm_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    _place(pod_spec, spec, pl)
    if spec.host_network and pl.tpu and pl.hosts * pl.slices > 1:
        # The node's network for Multislice DCN and host-to-host traffic (xpk's default); the
        # JobSet's headless-service names (the coordinator address) still resolve through
        # cluster DNS only with ClusterFirstWithHostNet.
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    return pod_spec


def _stage_jobset_metadata(
    run: str, spec: CodaTrainingRunSpec, index: int, name: str, namespace: str,
    labels: dict[str, str], pl: _Placement,
) -> dict[str, Any]:  # fmt: skip
    """The JobSet's name, Kueue queue label, config hash and (TPU) exclusive-topology annotation."""
    js_labels = dict(labels)
    if spec.queue_name:
        js_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    annotations = {"coda.dev/config-hash": _digest(fingerprint(run, spec, index))}
    if pl.tpu:
        annotations[EXCLUSIVE_TOPOLOGY] = "cloud.google.com/gke-nodepool"
    return {"name": name, "namespace": namespace, "labels": js_labels, "annotations": annotations}


def render_stage(
    run: str,
    namespace: str,
    spec: CodaTrainingRunSpec,
    index: int,
    *,
    attempt: int = 0,
    suspend: bool = False,
) -> StageObjects:
    """ConfigMap + JobSet for stage `index`. With a Kueue queue the JobSet is always created
    suspended: Kueue admits it by unsuspending."""
    stage = spec.stages[index]
    pl = _placement(spec.stage_accelerator(index))
    cm_name = configmap_name(run, stage.name, attempt)
    labels = _labels(run, "trainer", **{LABEL_STAGE: stage.name, LABEL_ATTEMPT: str(attempt)})
    job = stage_job_config(run, spec, index)
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": namespace, "labels": dict(labels)},
        "data": {JOB_FILE: yaml.dump(job.to_yaml_dict(), Dumper=_YAML_DUMPER, sort_keys=False)},
    }
    pod_spec = _stage_pod_spec(run, spec, index, attempt, pl, cm_name)
    js_name = jobset_name(run, stage.name, attempt)
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": _stage_jobset_metadata(run, spec, index, js_name, namespace, labels, pl),
        "spec": {
            "suspend": bool(suspend or spec.queue_name),
            "failurePolicy": _jobset_failure_policy(spec.failure_policy.max_restarts),
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": pl.slices,
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            "parallelism": pl.hosts,
                            "completions": pl.hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "podFailurePolicy": _pod_failure_policy(),
                            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
                        },
                    },
                }
            ],
        },
    }
    return StageObjects(configmap=configmap, jobset=jobset)


# --------------------------------------------------------------------------------------------------
# Sampler: Deployment + Service
# --------------------------------------------------------------------------------------------------


def _sampler_resources(sampler: SamplerSpec, pl: _Placement) -> dict[str, Any]:
    """The user's requests/limits with the accelerator's on top; empty parts left out."""
    requests = dict(sampler.resources.requests) if sampler.resources else {}
    limits = dict(sampler.resources.limits) if sampler.resources else {}
    requests.update(pl.limits)
    limits.update(pl.limits)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _sampler_container(run: str, spec: CodaTrainingRunSpec, pl: _Placement) -> dict[str, Any]:
    """`python -m coda_trainer.serve` on the last stage's export, with its key, defaults, probes."""
    sampler = spec.sampler
    resources = _sampler_resources(sampler, pl)
    defaults = sampler.defaults.model_dump(mode="json", exclude_none=True)
    api_key = sampler_api_key(run, spec)
    probe = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
    }
    container: dict[str, Any] = {
        "name": "sampler",
        "image": sampler.image or spec.image,
        "command": [
            "python",
            "-m",
            "coda_trainer.serve",
            "--checkpoint",
            sampler_checkpoint(spec),
            # Every interface: the Service, the kubelet's probes and the API server's proxy
            # reach the pod on its own address. /v1 needs the API key; the probes do not.
            "--host",
            "0.0.0.0",
            "--port",
            str(SAMPLER_PORT),
        ],
        "env": [
            {
                "name": contract.ENV_API_KEY,
                "valueFrom": {"secretKeyRef": {"name": api_key.name, "key": api_key.key}},
            },
            {"name": contract.ENV_RUN_NAME, "value": run},
            {"name": contract.ENV_SAMPLER_DEFAULTS, "value": json.dumps(defaults, sort_keys=True)},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": "http", "containerPort": SAMPLER_PORT, "protocol": "TCP"}],
        # Loading a 1.7B checkpoint and compiling takes minutes: the startup probe covers it.
        "startupProbe": {**probe, "failureThreshold": 90},
        "livenessProbe": {**probe, "failureThreshold": 3},
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 2,
        },
        "securityContext": _container_security(read_only_root=True),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if resources:
        container["resources"] = resources
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def render_sampler(
    run: str, namespace: str, spec: CodaTrainingRunSpec
) -> tuple[dict[str, Any], dict[str, Any]]:
    sampler = spec.sampler
    name = sampler_name(run)
    selector = {LABEL_RUN: run, LABEL_COMPONENT: "sampler"}
    labels = _labels(run, "sampler")
    pl = _placement(sampler.accelerator or AcceleratorSpec())
    pod_spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [_sampler_container(run, spec, pl)],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    _place(pod_spec, spec, pl)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": sampler.replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": SAMPLER_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
    return deployment, service


def render_sampler_key(
    run: str, namespace: str, spec: CodaTrainingRunSpec
) -> dict[str, Any] | None:
    """The Secret holding a generated API key, or None when the run names its own Secret.

    Rendered without the key (this module is pure): the operator fills `stringData` with fresh
    random bytes when it creates the Secret (`GENERATE_ANNOTATION`), and never overwrites one
    that exists.
    """
    if spec.sampler.api_key_secret is not None:
        return None
    ref = sampler_api_key(run, spec)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": ref.name,
            "namespace": namespace,
            "labels": _labels(run, "sampler"),
            "annotations": {GENERATE_ANNOTATION: ref.key},
        },
    }


def _one_shot_pod(
    container: dict[str, Any], spec: CodaTrainingRunSpec, pl: _Placement
) -> dict[str, Any]:
    """The pod of a one-pod Job (evaluation, pre-flight): never restarted in place, hardened, a
    writable /tmp emptyDir behind its read-only root, placed by `pl`."""
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    _place(pod_spec, spec, pl)
    return pod_spec


def eval_command(spec: CodaTrainingRunSpec, stage: str) -> list[str]:
    """`python -m coda_trainer.evaluate …` for `stage`'s final checkpoint, reports into
    `<uri>/<stage>/eval/` (the evaluation Job's command; `coda-ctl local run` runs the same)."""
    evaluation = spec.evaluation
    assert evaluation is not None
    index = spec.stage_names().index(stage)
    command = ["python", "-m", "coda_trainer.evaluate", "--checkpoint", stage_final(spec, index)]
    for bench in evaluation.benchmarks:
        command += ["--benchmark", bench]
    command += ["--n-samples", str(evaluation.n_samples)]
    if evaluation.limit is not None:
        command += ["--limit", str(evaluation.limit)]
    for key, value in evaluation.sampler.model_dump(mode="json", exclude_none=True).items():
        command += [sampler_flag(key), str(value)]
    return [*command, "--report-dir", contract.eval_uri(spec.checkpoints.uri, stage)]


def render_eval_job(
    run: str, namespace: str, spec: CodaTrainingRunSpec, stage: str, attempt: int = 0
) -> dict[str, Any]:
    """The evaluation of `stage`'s final checkpoint: one pod (the sampler's accelerator, or CPU)
    running the in-process harness; it writes `<uri>/<stage>/eval/<benchmark>.json` and
    merge-patches `status.evaluation.<stage>` with the scores.

    Exit codes as for training: 78 (bad checkpoint or arguments) fails the Job at once through the
    podFailurePolicy (reason PodFailurePolicy, which the operator does not retry); any other failure
    (75 transient, a crash) ends it with BackoffLimitExceeded, which the operator retries as a new
    Job up to spec.failurePolicy.stageRetries.
    """
    name = eval_job_name(run, stage, attempt)
    labels = _labels(run, "evaluation", **{LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)})
    command = eval_command(spec, stage)
    pl = _placement(spec.sampler.accelerator or AcceleratorSpec())
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": command,
        "env": [
            {"name": contract.ENV_RUN_NAME, "value": run},
            _field_env(contract.ENV_RUN_NAMESPACE, "metadata.namespace"),
            {"name": contract.ENV_STAGE, "value": stage},
            {"name": contract.ENV_ATTEMPT, "value": str(attempt)},
            {"name": contract.ENV_PROGRESS, "value": contract.PROGRESS_TO_STATUS},
            {"name": "HOME", "value": "/tmp"},
        ],
        # Candidate programs run in the harness's sandbox (rlimits, own session, no network where
        # the kernel allows): the pod adds a read-only root, no capabilities, a non-root uid.
        "securityContext": _container_security(read_only_root=True),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if pl.limits:
        container["resources"] = {"limits": dict(pl.limits), "requests": dict(pl.limits)}
    pod_spec = _one_shot_pod(container, spec, pl)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [_fail_job_on_exit(EXIT_PERMANENT)]},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }


# --------------------------------------------------------------------------------------------------
# Pre-flight: the stage's step compiled for its TPU slice in a CPU Job
# --------------------------------------------------------------------------------------------------

PREFLIGHT_CONFIG_ENV = "CODA_PREFLIGHT_CONFIG"
# What one pre-flight pod asks for: the compile is mostly one XLA thread plus helpers (a 1.7B
# stage on 16-64 chips: 5-8 min on 2 cores). Measured peak RSS: 1.55 GiB for the 1.7B SFT stage on
# v5p 2x2x4 (bench/preflight.py under /usr/bin/time); the limit leaves room for bigger meshes and
# models, which were not measured.
PREFLIGHT_RESOURCES = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "16Gi"}}
# A compile that has not finished in this long will not: the Job fails (not retried).
PREFLIGHT_DEADLINE_SECONDS = 7200


def preflight_command(spec: CodaTrainingRunSpec, index: int, key: str) -> list[str]:
    tpu = spec.stage_accelerator(index).tpu
    assert tpu is not None, "only TPU stages are pre-flighted"
    return [
        "python", "-m", "coda_trainer.preflight", "--config-env", PREFLIGHT_CONFIG_ENV,
        "--tpu", f"{tpu.type}:{tpu.topology}", "--slices", str(tpu.slices), "--report-key", key,
    ]  # fmt: skip


def render_preflight_job(
    run: str, namespace: str, spec: CodaTrainingRunSpec, index: int, key: str, attempt: int = 0
) -> dict[str, Any]:
    """Stage `index`'s pre-flight: one CPU pod in the trainer image compiles the stage's train and
    eval steps for its TPU slice (compile-only devices, no TPU node) and merge-patches its report,
    with `key`, into `status.preflight.<stage>`. The stage's job config travels in an env var, so
    the Job is the only object (the stage's ConfigMap is created with its JobSet).

    Exit 78 (does not fit, bad config) fails the Job through the podFailurePolicy (reason
    PodFailurePolicy: not retried); an evicted pod is replaced by the Job controller (Ignore rule);
    75 or a crash ends the Job with BackoffLimitExceeded, which the operator retries.
    """
    stage = spec.stages[index].name
    name = preflight_job_name(run, stage, attempt)
    labels = _labels(run, "preflight", **{LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)})
    job = stage_job_config(run, spec, index)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": preflight_command(spec, index, key),
        "env": [
            {"name": contract.ENV_RUN_NAME, "value": run},
            _field_env(contract.ENV_RUN_NAMESPACE, "metadata.namespace"),
            {"name": contract.ENV_STAGE, "value": stage},
            {"name": contract.ENV_PROGRESS, "value": contract.PROGRESS_TO_STATUS},
            {"name": "JAX_PLATFORMS", "value": "cpu"},
            {"name": "HOME", "value": "/tmp"},
            {
                "name": PREFLIGHT_CONFIG_ENV,
                "value": yaml.safe_dump(job.to_yaml_dict(), sort_keys=False),
            },
        ],
        "resources": {k: dict(v) for k, v in PREFLIGHT_RESOURCES.items()},
        "securityContext": _container_security(read_only_root=True),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec = _one_shot_pod(container, spec, _placement(AcceleratorSpec()))  # no accelerator
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"coda.dev/preflight-key": key},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": PREFLIGHT_DEADLINE_SECONDS,
            "podFailurePolicy": {
                "rules": [
                    _fail_job_on_exit(EXIT_PERMANENT),
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }


def preflights(spec: CodaTrainingRunSpec) -> list[int]:
    """Indexes of the stages the operator pre-flights (TPU stages, unless spec.preflight is false)."""
    if not spec.preflight:
        return []
    return [i for i in range(len(spec.stages)) if spec.stage_accelerator(i).tpu is not None]


def render_all(run: dict[str, Any], *, cluster: bool = True) -> list[dict[str, Any]]:
    """Every object the operator would create for a CodaTrainingRun (first attempts; sampler last).

    Raises `api.InvalidSpec` naming the offending fields. Used by `coda-ctl render`.
    """
    meta = run.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not name:
        raise ValueError("a CodaTrainingRun needs metadata.name")
    spec = parse_spec(run.get("spec"), cluster=cluster)
    objects: list[dict[str, Any]] = []
    for i in range(len(spec.stages)):
        if i in preflights(spec):
            key = preflight_key(name, spec, i)
            objects.append(render_preflight_job(name, namespace, spec, i, key))
        objects += render_stage(name, namespace, spec, i, suspend=spec.suspend).all()
    objects += [render_eval_job(name, namespace, spec, s) for s in spec.evaluated_stages()]
    if spec.sampler.enabled:
        key = render_sampler_key(name, namespace, spec)
        objects += [*([key] if key else []), *render_sampler(name, namespace, spec)]
    return objects
