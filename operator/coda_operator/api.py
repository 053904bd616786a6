"""The CodaTrainingRun API: pydantic models from which the CRD schema is generated.

`spec.stages[]` items *are* the trainer's `StageConfig` (subclassed only to add a per-stage
accelerator override), `spec.model` is the trainer's `ModelSpec` and `spec.checkpoints` its
`CheckpointConfig`: nothing is defined twice. Everything is camelCase on the wire and accepts
snake_case in Python.

Cluster-only rules (checkpoints must live on gs:// so every host and stage sees them) apply by
default; `coda-ctl local run` validates the same resource with
`parse_spec(data, cluster=False)`.
"""

from __future__ import annotations

from typing import Any, Literal

from coda_trainer.config import (
    PRESETS,
    CheckpointConfig,
    ModelSpec,
    SamplerDefaults,
    StageConfig,
    StrictModel,
)
from coda_trainer.contract import Progress
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from coda_operator import admission
from coda_operator.topology import TopologyError, TpuSlice, multislice_error, tpu_slice

__all__ = [
    "AcceleratorSpec",
    "CodaTrainingRunSpec",
    "CodaTrainingRunStatus",
    "Condition",
    "FailurePolicySpec",
    "GPUSpec",
    "InvalidSpec",
    "Progress",
    "ResourcesSpec",
    "RunModelSpec",
    "RunStage",
    "SamplerDefaults",
    "SamplerSpec",
    "SamplerStatus",
    "SecretKeyRef",
    "StageStatus",
    "TPUSpec",
    "format_validation_error",
    "parse_spec",
]


# Child names: "<run>-<stage>-r<NN>" becomes pod hostnames "<jobset>-slice-<j>-<p>" (a DNS label,
# ≤ 63 chars); leaving room for 3-digit slice/host indexes and a 2-digit retry suffix gives 44.
MAX_RUN_PLUS_STAGE_NAME = 44
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_TOPOLOGY_PATTERN = r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$"


class _Wire(StrictModel):
    """Spec models: the trainer's config base (strict, camelCase on the wire, immutable)."""


class _StatusWire(BaseModel):
    """Status models: lenient (kopf and the trainer may add fields), mutable for the planner."""

    model_config = ConfigDict(
        extra="ignore",
        alias_generator=to_camel,
        populate_by_name=True,
        protected_namespaces=(),
    )

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class InvalidSpec(ValueError):
    """A spec the operator refuses; `errors` are "spec.<field path>: <why>" lines."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


# --------------------------------------------------------------------------------------------------
# Accelerators
# --------------------------------------------------------------------------------------------------


class TPUSpec(_Wire):
    """A GKE TPU slice shape; `slices` > 1 is multislice (DCN between slices)."""

    type: Literal["v4", "v5e", "v5p", "v6e"] = Field(
        description="TPU generation. Slice names like v5p-8 count TensorCores: v5p-8 is type v5p, topology 2x2x1."
    )
    topology: str = Field(
        pattern=_TOPOLOGY_PATTERN,
        max_length=16,
        description="Chip topology: AxBxC for v4/v5p, AxB for v5e/v6e (e.g. 2x2x1 = one v5p host).",
    )
    slices: int = Field(
        default=1, ge=1, le=256, description="Number of slices (multislice over DCN)."
    )

    @model_validator(mode="after")
    def _shape(self) -> TPUSpec:
        one = tpu_slice(
            self.type, self.topology
        )  # raises TopologyError (a ValueError), with a hint
        error = multislice_error(one, self.slices)
        if error:
            raise ValueError(f"slices: {error}")
        return self

    @property
    def slice(self) -> TpuSlice:
        return tpu_slice(self.type, self.topology)


class GPUSpec(_Wire):
    """A GKE GPU node pool: `nodes` hosts with `gpusPerNode` GPUs each (one JAX process per node)."""

    type: str = Field(
        pattern=r"^nvidia-[a-z0-9][-a-z0-9]*$",
        max_length=63,
        description="Value of the cloud.google.com/gke-accelerator node label, e.g. nvidia-h100-80gb.",
    )
    gpus_per_node: int = Field(
        ge=1, le=16, description="GPUs per pod (its nvidia.com/gpu limit); one pod per node."
    )
    nodes: int = Field(
        default=1, ge=1, le=1024, description="Nodes (pods, one JAX process each) of the stage."
    )


class AcceleratorSpec(_Wire):
    """Where a stage runs: a TPU slice (default form) or a GPU node pool; optionally on Spot capacity."""

    tpu: TPUSpec | None = None
    gpu: GPUSpec | None = None
    spot: bool = Field(
        default=False,
        description="Run on Spot/preemptible nodes (cloud.google.com/gke-spot selector and toleration).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> AcceleratorSpec:
        if self.tpu is not None and self.gpu is not None:
            raise ValueError("set accelerator.tpu or accelerator.gpu, not both")
        return self

    def merged(self, override: AcceleratorSpec | None) -> AcceleratorSpec:
        """A stage override wins field by field; choosing tpu drops the default's gpu and vice versa."""
        if override is None:
            return self
        update: dict[str, Any] = {k: getattr(override, k) for k in override.model_fields_set}
        if update.get("tpu") is not None:
            update.setdefault("gpu", None)
        if update.get("gpu") is not None:
            update.setdefault("tpu", None)
        return self.model_copy(update=update)


# --------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------


def _stage_schema(schema: dict[str, Any]) -> None:
    # StageConfig checks its name with a validator; say the same thing in the schema for the CRD.
    name = schema.get("properties", {}).get("name")
    if name is not None:
        name.update(pattern=_DNS_LABEL, maxLength=40, minLength=1)


class RunStage(StageConfig):
    """A trainer StageConfig plus the operator-only per-stage accelerator override."""

    model_config = ConfigDict(json_schema_extra=_stage_schema)

    accelerator: AcceleratorSpec | None = Field(
        default=None, description="Overrides spec.accelerator for this stage (fields set here win)."
    )

    def trainer_stage(self, **update: Any) -> StageConfig:
        """The plain StageConfig the trainer reads (operator-only fields removed)."""
        data = self.model_dump(exclude={"accelerator"})
        data.update(update)
        return StageConfig.model_validate(data)


def _model_schema(schema: dict[str, Any]) -> None:
    preset = schema.get("properties", {}).get("preset")
    if preset is not None:
        preset["enum"] = sorted(PRESETS)


class RunModelSpec(ModelSpec):
    """The trainer's ModelSpec; the subclass only lists the known presets in the CRD schema."""

    model_config = ConfigDict(json_schema_extra=_model_schema)


EvalBenchmark = Literal["humaneval", "humaneval-plus", "mbpp", "mbpp-sanitized"]


class EvaluationSpec(_Wire):
    """Score the run's checkpoints on code benchmarks as part of the run (pass@1 into status)."""

    benchmarks: list[EvalBenchmark] = Field(
        min_length=1,
        max_length=4,
        description="Benchmarks, as the harness names them (python -m coda_trainer.evaluate).",
    )
    limit: int | None = Field(
        default=None, ge=1, le=1000, description="Only the first N problems of each benchmark."
    )
    n_samples: int = Field(default=1, ge=1, le=20, description="Samples per problem (pass@1 mean).")
    sampler: SamplerDefaults = Field(
        default_factory=SamplerDefaults,
        description="Sampler settings for the evaluation (the harness's defaults where unset).",
    )
    after: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Stages whose final checkpoint is evaluated (default: the last stage).",
    )
    min_pass_at1: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Quality gate: benchmark → minimum pass@1 (a fraction, 0–1) of the last evaluated "
            "stage. A miss fails the run (reason QualityGateFailed) and no sampler is deployed."
        ),
    )

    @model_validator(mode="after")
    def _gate_names(self) -> EvaluationSpec:
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"spec.evaluation.benchmarks: duplicates in {self.benchmarks}")
        for bench, value in self.min_pass_at1.items():
            if bench not in self.benchmarks:
                raise ValueError(
                    f"spec.evaluation.minPassAt1.{bench}: not one of the evaluated benchmarks "
                    f"({', '.join(self.benchmarks)})"
                )
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"spec.evaluation.minPassAt1.{bench}: {value} is not a fraction in [0, 1] "
                    f"(pass@1 of 30% is 0.3)"
                )
        return self


class ResourcesSpec(_Wire):
    """Container requests/limits as Kubernetes quantities (strings), e.g. {cpu: "4", memory: 32Gi}."""

    requests: dict[str, str] = Field(
        default_factory=dict, description='Resources the scheduler reserves, e.g. {cpu: "4"}.'
    )
    limits: dict[str, str] = Field(
        default_factory=dict, description="Resource caps, e.g. {memory: 32Gi}."
    )


class SecretKeyRef(_Wire):
    """One key of a Secret in the run's namespace."""

    name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=253, description="The Secret's name.")
    key: str = Field(
        default="api-key", min_length=1, max_length=253, description="The key within the Secret."
    )


class SamplerSpec(_Wire):
    """The sampler Deployment + Service created once the last stage succeeds."""

    enabled: bool = Field(
        default=True, description="Serve the last stage's final checkpoint when training succeeds."
    )
    replicas: int = Field(default=1, ge=0, le=64, description="Sampler pods behind the Service.")
    image: str | None = Field(default=None, description="Defaults to spec.image.")
    accelerator: AcceleratorSpec | None = Field(
        default=None, description="Single-host TPU or one GPU node; omit to serve on CPU."
    )
    resources: ResourcesSpec | None = Field(
        default=None, description="The sampler container's CPU/memory requests and limits."
    )
    defaults: SamplerDefaults = Field(
        default_factory=SamplerDefaults,
        description="Sampling parameters used when a request does not set them.",
    )
    api_key_secret: SecretKeyRef | None = Field(
        default=None,
        description=(
            "The sampler's API key (clients send it as `Authorization: Bearer` or `api-key`). "
            "Omit to have the operator generate one in the Secret `<run>-sampler-key`, key `api-key`."
        ),
    )

    @model_validator(mode="after")
    def _single_host(self) -> SamplerSpec:
        acc = self.accelerator
        tpu = acc.tpu if acc is not None else None
        if tpu is not None and (tpu.slices != 1 or tpu.slice.hosts != 1):
            raise ValueError(
                f"sampler.accelerator.tpu must be one single-host slice (1x1, 2x2, 2x4 or 2x2x1), "
                f"got {tpu.slices} x {tpu.type} {tpu.topology}"
            )
        if acc is not None and acc.gpu is not None and acc.gpu.nodes != 1:
            raise ValueError("sampler.accelerator.gpu.nodes must be 1 (each replica is one pod)")
        return self


class FailurePolicySpec(_Wire):
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="JobSet failurePolicy.maxRestarts: whole-slice restarts on crashes (preemption does not count).",
    )
    stage_retries: int = Field(
        default=1,
        ge=0,
        le=20,
        description="Operator-level retries: a failed JobSet is replaced by <run>-<stage>-r<N> this many times.",
    )


class CodaTrainingRunSpec(_Wire):
    """spec of a CodaTrainingRun: train the stages in order, then serve the last stage's final checkpoint."""

    image: str = Field(
        min_length=1, max_length=512, description="Trainer image (also the sampler's default)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None,
        description="Pull policy of trainer and sampler containers (Kubernetes' default if unset).",
    )
    service_account_name: str | None = Field(
        default=None,
        pattern=_DNS_SUBDOMAIN,
        max_length=253,
        description="Pod ServiceAccount (Workload Identity for GCS); no keys in specs.",
    )
    host_network: bool = Field(
        default=False,
        description=(
            "Run multi-host TPU pods on the node's network (hostNetwork + ClusterFirstWithHostNet "
            "DNS), as xpk does for Multislice DCN traffic. Off by default: Pod Security "
            "'baseline' and 'restricted' reject host-network pods, so the namespace must allow "
            "'privileged'. Single-host and GPU stages ignore it."
        ),
    )
    model: RunModelSpec = Field(
        default_factory=RunModelSpec,
        description="The model every stage trains: preset, overrides and initial weights.",
    )
    tokenizer: str = Field(
        min_length=1, description="HF tokenizer folder (gs:// or in the image), or 'project'."
    )
    checkpoints: CheckpointConfig = Field(
        description="Where and how often stages save: <uri>/<stage>/<step>/ and <uri>/<stage>/final/."
    )
    accelerator: AcceleratorSpec | None = Field(
        default=None, description="Default accelerator of every stage (stages may override it)."
    )
    stages: list[RunStage] = Field(
        min_length=1,
        max_length=16,
        description="Training stages run in order (e.g. pretrain, midtrain, sft), one JobSet each; "
        "a stage starts from the previous stage's final unless it sets initFrom.",
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="Evaluate checkpoints as a step of the run (a Job per evaluated stage).",
    )
    failure_policy: FailurePolicySpec = Field(
        default_factory=FailurePolicySpec,
        description="How often crashed slices are restarted and failed stages retried.",
    )
    preflight: bool = Field(
        default=True,
        description=(
            "Before each TPU stage's JobSet, compile the stage's train and eval steps for its "
            "slice in a CPU Job (`python -m coda_trainer.preflight`, minutes of 2 CPUs) and fail "
            "the stage without requesting TPUs when it does not fit. GPU and CPU stages skip it "
            "(a GPU program cannot be compiled without the GPU). The result is cached in "
            "status.preflight per stage spec and image."
        ),
    )
    suspend: bool = Field(
        default=False, description="Suspend the running stage's JobSet (kept, not deleted)."
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Fail the run this long after it started (suspended time included).",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the run (and, by ownership, its children) this long after it finished.",
    )
    queue_name: str | None = Field(
        default=None,
        pattern=_DNS_SUBDOMAIN,
        max_length=253,
        description="Kueue LocalQueue: JobSets are created suspended and Kueue admits them (phase Queued).",
    )

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[RunStage]) -> list[RunStage]:
        seen: dict[str, int] = {}
        for i, s in enumerate(stages):
            if s.name in seen:
                raise ValueError(
                    f"spec.stages[{i}].name: duplicate stage name {s.name!r} (also spec.stages[{seen[s.name]}])"
                )
            seen[s.name] = i
        return stages

    @model_validator(mode="after")
    def _resolvable(self, info: ValidationInfo) -> CodaTrainingRunSpec:
        try:
            self.model.resolve()
        except ValidationError as e:
            raise ValueError(
                f"spec.model.overrides: {'; '.join(format_validation_error(e, 'model'))}"
            ) from None
        for i, stage in enumerate(self.stages):
            acc = self.stage_accelerator(i)
            if acc.tpu is None and acc.gpu is None:
                raise ValueError(
                    f"spec.stages[{i}].accelerator: stage {stage.name!r} has no accelerator "
                    f"(set spec.accelerator.tpu/gpu or a per-stage override)"
                )
        if self.evaluation is not None and self.evaluation.after is not None:
            names = self.stage_names()
            for j, after in enumerate(self.evaluation.after):
                if after not in names:
                    raise ValueError(
                        f"spec.evaluation.after[{j}]: {after!r} is not a stage "
                        f"(stages: {', '.join(names)})"
                    )
        context = info.context or {}
        cluster = context.get("cluster", True)
        if cluster and not self.checkpoints.uri.startswith("gs://"):
            raise ValueError(
                f"spec.checkpoints.uri: {self.checkpoints.uri!r} must be a gs:// URI on a cluster "
                f"(every host of every stage must see the same checkpoints)"
            )
        if context.get("admission", True):
            # One line per problem, every stage: a user fixes them all in one go.
            problems = [p for i in range(len(self.stages)) for p in self.stage_problems(i, cluster)]
            if problems:
                raise ValueError("\n".join(problems))
        return self

    def stage_accelerator(self, index: int) -> AcceleratorSpec:
        base = self.accelerator or AcceleratorSpec()
        return base.merged(self.stages[index].accelerator)

    def stage_devices(self, index: int) -> admission.StageDevices | None:
        """The devices and hosts stage `index` runs on (None without an accelerator)."""
        acc = self.stage_accelerator(index)
        if acc.tpu is not None:
            return admission.tpu_devices(acc.tpu.slice, acc.tpu.slices)
        if acc.gpu is not None:
            return admission.gpu_devices(acc.gpu.type, acc.gpu.gpus_per_node, acc.gpu.nodes)
        return None

    def stage_problems(self, index: int, cluster: bool = True) -> list[str]:
        """The arithmetic admission rules stage `index` breaks (`coda_operator.admission`).

        `cluster=False` (a local run, whose accelerator is ignored) checks the model rules only.
        """
        stage = self.stages[index]
        devices = self.stage_devices(index) if cluster else None
        return admission.stage_problems(
            stage, self.model.resolve(), devices, field=f"spec.stages[{index}]"
        )

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def evaluated_stages(self) -> list[str]:
        """Stages whose final checkpoint is evaluated, in stage order (none without evaluation)."""
        if self.evaluation is None:
            return []
        wanted = set(self.evaluation.after or [self.stages[-1].name])
        return [n for n in self.stage_names() if n in wanted]


def format_validation_error(err: ValidationError, prefix: str = "spec") -> list[str]:
    """pydantic errors → "spec.stages[1].steps: Input should be greater than 0" lines."""
    lines = []
    for e in err.errors():
        path = prefix
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        # A validator may report several problems, one per line.
        for msg in e["msg"].removeprefix("Value error, ").splitlines():
            # Our own validators already name the field (spec.x.y: ...); do not say it twice.
            lines.append(msg if msg.startswith(f"{prefix}.") else f"{path}: {msg}")
    return lines


def parse_spec(data: Any, *, cluster: bool = True, admission: bool = True) -> CodaTrainingRunSpec:
    """Validate a raw spec dict; raises InvalidSpec whose lines name the offending fields.

    `admission=False` leaves out the per-stage shape arithmetic (`stage_problems`), for callers
    that report it stage by stage themselves (`coda-ctl plan`).
    """
    if not isinstance(data, dict):
        raise InvalidSpec([f"spec: expected an object, got {type(data).__name__}"])
    try:
        return CodaTrainingRunSpec.model_validate(
            data, context={"cluster": cluster, "admission": admission}
        )
    except ValidationError as e:
        raise InvalidSpec(format_validation_error(e)) from None
    except TopologyError as e:  # raised outside pydantic's wrapping (defensive)
        raise InvalidSpec([f"spec.accelerator.tpu: {e}"]) from None


# --------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------

# One vocabulary for the run's phase and each stage's, evaluation's and pre-flight's phase.
Phase = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]


class Condition(_StatusWire):
    """metav1.Condition."""

    type: str = Field(description="Condition type, e.g. Running, Complete, Failed, SamplerReady.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        max_length=1024,
        description="CamelCase reason of the last transition, for machines.",
    )
    message: str = Field(default="", max_length=32768, description="The transition, for humans.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


class StageStatus(_StatusWire):
    name: str = Field(description="The stage's name (spec.stages[].name).")
    phase: Phase = Field(default="Pending", description="Where the stage is in its lifecycle.")
    job_set: str | None = Field(default=None, description="Current JobSet of this stage.")
    retries: int = Field(default=0, ge=0, description="Operator retries used (JobSets replaced).")
    job_set_restarts: int = Field(
        default=0, ge=0, description="Whole-slice restarts inside the current JobSet."
    )
    init_from: str | None = Field(
        default=None, description="The weights the stage started from (URI), if any."
    )
    final: str | None = Field(
        default=None, description="URI of the stage's published final checkpoint (HF folder)."
    )
    start_time: str | None = Field(default=None, description="When the stage started (RFC 3339).")
    completion_time: str | None = Field(
        default=None, description="When the stage succeeded or failed (RFC 3339)."
    )
    message: str | None = Field(default=None, description="Last notable event of the stage.")
    fingerprint: dict[str, str] = Field(
        default_factory=dict,
        description="Hashes of the spec parts the current JobSet was rendered from.",
    )


class SamplerStatus(_StatusWire):
    deployment: str | None = Field(default=None, description="The sampler Deployment's name.")
    service: str | None = Field(default=None, description="The sampler Service's name.")
    endpoint: str | None = Field(
        default=None,
        description="In-cluster base URL of the sampler Service (http://<service>.<namespace>.svc:<port>).",
    )
    checkpoint: str | None = Field(default=None, description="The checkpoint being served (URI).")
    ready: bool = Field(default=False, description="At least one replica serves requests.")
    ready_replicas: int = Field(default=0, description="Replicas passing their readiness probe.")


class BenchmarkScore(_StatusWire):
    """One benchmark's result, written by the evaluation Job."""

    pass_at1: float = Field(description="pass@1 as a fraction (0–1).")
    problems: int = Field(
        description="How many of the benchmark's problems were run (evaluation.limit caps it)."
    )
    samples: int = Field(default=1, description="Samples generated per problem.")
    failures: int = Field(default=0, description="Samples that did not pass.")
    reasons: dict[str, int] = Field(
        default_factory=dict, description="Sample outcomes by status (passed, failed, timeout, …)."
    )
    duration_s: float | None = Field(
        default=None, description="Wall time of the benchmark, seconds."
    )


class EvaluationStatus(_StatusWire):
    """One evaluated stage. The operator owns phase/job/retries/times/message; the evaluation Job
    merge-patches `results`, `report` and `settings` when it finishes."""

    phase: Phase = Field(default="Pending", description="Where the evaluation Job is.")
    job: str | None = Field(default=None, description="The evaluation Job's name.")
    retries: int = Field(default=0, ge=0, description="Evaluation Jobs replaced after failures.")
    checkpoint: str | None = Field(default=None, description="The evaluated checkpoint (URI).")
    start_time: str | None = Field(default=None, description="When the Job started (RFC 3339).")
    completion_time: str | None = Field(
        default=None, description="When the Job finished (RFC 3339)."
    )
    message: str | None = Field(default=None, description="Why it failed, or its last event.")
    report: str | None = Field(default=None, description="The JSON report's URI.")
    settings: dict[str, Any] | None = Field(
        default=None, description="The sampler settings the harness ran with."
    )
    results: dict[str, BenchmarkScore] | None = Field(
        default=None, description="Benchmark name → score."
    )


class PreflightReport(_StatusWire):
    """What the pre-flight Job merge-patches into `status.preflight.<stage>.report` (the stage
    entry of `coda-ctl plan -o json`, trimmed to the numbers)."""

    fits: bool = Field(description="Whether the train (and eval) step fit 90% of the chip's HBM.")
    peak_bytes_per_device: int | None = Field(
        default=None,
        description="The train step's peak bytes per chip (XLA's static buffer assignment).",
    )
    eval_peak_bytes_per_device: int | None = Field(
        default=None, description="The eval step's peak bytes per chip."
    )
    hbm_bytes_per_device: int | None = Field(
        default=None, description="HBM per chip the TPU compiler allows."
    )
    compile_seconds: float | None = Field(
        default=None, description="Seconds the compiles took on the pod's CPUs."
    )
    ideal_step_seconds: float | None = Field(
        default=None, description="Step time at 100% MFU: a floor, not a forecast."
    )
    problems: list[str] = Field(
        default_factory=list,
        description="Why the stage cannot run as written, with a suggested fix.",
    )
    versions: dict[str, str | None] | None = Field(
        default=None,
        description="jax and libtpu versions the compile used (results hold for these).",
    )


class PreflightStatus(_StatusWire):
    """One stage's pre-flight. The operator owns key/job/attempt/retries/phase/message; the Job
    writes `reportKey` and `report` (its key says which spec the report is for)."""

    key: str | None = Field(
        default=None, description="Hash of the stage's spec parts and image being checked."
    )
    phase: Phase = Field(
        default="Pending",
        description="Pending, Running, Succeeded (fits) or Failed (does not fit, or the Job failed for good).",
    )
    job: str | None = Field(default=None, description="The newest pre-flight Job's name.")
    attempt: int = Field(default=0, ge=0, description="Suffix of the newest pre-flight Job.")
    retries: int = Field(default=0, ge=0, description="Infrastructure retries for this key.")
    message: str | None = Field(
        default=None,
        description="Why the pre-flight is in its phase (the report's verdict or the Job's failure).",
    )
    waiting_since: str | None = Field(
        default=None,
        description="When a finished Job's report was first missed (RFC 3339); a new Job follows after a grace period.",
    )
    report_key: str | None = Field(
        default=None,
        description="The key the pod computed its report for; a report counts only when it equals `key`.",
    )
    report: PreflightReport | None = Field(
        default=None, description="The compile's result, written by the pre-flight pod."
    )


class CodaTrainingRunStatus(_StatusWire):
    phase: Phase = Field(
        default="Pending",
        description="Pending, Queued (Kueue), Running, Suspended, Succeeded or Failed.",
    )
    stage: str | None = Field(default=None, description="The current (or last) stage.")
    stage_index: int | None = Field(default=None, description="Index of stage in spec.stages.")
    message: str | None = Field(default=None, description="Human-readable state of the run.")
    stages: list[StageStatus] = Field(
        default_factory=list,
        description="One entry per spec stage, in order (Pending until it starts).",
    )
    progress: Progress | None = Field(
        default=None, description="The running stage's step, loss and throughput (trainer-written)."
    )
    sampler: SamplerStatus | None = Field(
        default=None, description="The sampler Deployment once the last stage has succeeded."
    )
    evaluation: dict[str, EvaluationStatus] | None = Field(
        default=None, description="Per evaluated stage: the evaluation Job and its scores."
    )
    preflight: dict[str, PreflightStatus] | None = Field(
        default=None,
        description="Per TPU stage: the pre-flight compile's Job and report (the cache).",
    )
    score: str | None = Field(
        default=None,
        description='Headline pass@1 (%) of the newest finished evaluation: "sft: humaneval 12.2".',
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Standard conditions, one per type."
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the operator last acted on."
    )
    start_time: str | None = Field(default=None, description="When the run started (RFC 3339).")
    completion_time: str | None = Field(
        default=None, description="When the run succeeded or failed (RFC 3339)."
    )
    retry_handled: str | None = Field(
        default=None,
        description="The last `coda.dev/retry` annotation value the operator acted on (or ignored).",
    )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def is_true(self, type_: str) -> bool:
        c = self.condition(type_)
        return c is not None and c.status == "True"
