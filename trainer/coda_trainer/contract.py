"""The contract between coda's parts: every name and number that the operator, the trainer, the
sampler and the CLI must agree on, defined once and imported by all of them.

Config side, like `coda_trainer.config`: imports nothing heavier than pydantic, because the
operator image installs no JAX. Dependencies run one way: this module imports no other coda
module, and the operator imports nothing from the trainer but `config` and this module.

What lives here:

- the custom resource's API coordinates and the annotations and labels others act on;
- the trainer's process exit codes, and `PermanentError`, the one base class whose subclasses
  make the trainer exit `EXIT_PERMANENT` (the JobSet's podFailurePolicy matches on the number);
- the environment variables the operator puts into pods and the trainer and sampler read;
- the checkpoint layout under `spec.checkpoints.uri`;
- `Progress`, the `status.progress` object the trainer's process 0 writes into its run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "ENV_API_KEY",
    "ENV_ATTEMPT",
    "ENV_HOSTS_PER_SLICE",
    "ENV_HOST_ID",
    "ENV_LOG_LEVEL",
    "ENV_NUM_SLICES",
    "ENV_PROGRESS",
    "ENV_PROGRESS_INTERVAL",
    "ENV_PROGRESS_SERVER",
    "ENV_RUN_NAME",
    "ENV_RUN_NAMESPACE",
    "ENV_SAMPLER_DEFAULTS",
    "ENV_SLICE_ID",
    "ENV_STAGE",
    "ENV_STAGE_INDEX",
    "EVAL_DIR",
    "EXIT_OK",
    "EXIT_PERMANENT",
    "EXIT_RETRYABLE",
    "FINAL_DIR",
    "GROUP",
    "KIND",
    "LABEL_RUN",
    "LABEL_STAGE",
    "METRICS_DIR",
    "PLURAL",
    "PROGRESS_TO_STATUS",
    "RETRY_ANNOTATION",
    "SHORT_NAME",
    "SINGULAR",
    "STATUS_FILE",
    "VERSION",
    "PermanentError",
    "Progress",
    "eval_report_uri",
    "eval_uri",
    "final_uri",
    "metrics_uri",
    "stage_uri",
    "status_path",
    "status_uri",
]

# --------------------------------------------------------------------------------------------------
# The custom resource
# --------------------------------------------------------------------------------------------------

GROUP = "coda.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CodaTrainingRun"
PLURAL = "codatrainingruns"
SINGULAR = "codatrainingrun"
SHORT_NAME = "ctr"

# A new value of this annotation on a Failed run asks the operator to retry its failed stage.
RETRY_ANNOTATION = f"{GROUP}/retry"
# Every object the operator creates for a run carries these labels (the CLI selects pods by them).
LABEL_RUN = f"{GROUP}/run"
LABEL_STAGE = f"{GROUP}/stage"


def status_path(namespace: str, run: str) -> str:
    """The API path of a run's status subresource (what the trainer merge-patches)."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{run}/status"


# --------------------------------------------------------------------------------------------------
# Exit codes of `python -m coda_trainer.train` (and of the evaluation job)
# --------------------------------------------------------------------------------------------------
# The numbers follow BSD `sysexits.h`. Any other non-zero code (1 from an unexpected exception,
# 137 from the OOM killer) is a crash that the operator counts against the run's restart budget.

EXIT_OK = 0
"""The stage finished and `<stage>/final` is published."""
EXIT_RETRYABLE = 75  # EX_TEMPFAIL
"""Try again and it may work: preempted after a checkpoint, or a transient I/O error."""
EXIT_PERMANENT = 78  # EX_CONFIG
"""Retrying cannot help: invalid config, unreadable data, a checkpoint of the wrong shape."""


class PermanentError(ValueError):
    """An error no retry can fix. The trainer maps every subclass to `EXIT_PERMANENT` and the
    JobSet then fails at once instead of spending the run's restarts; raise a subclass of this,
    never a bare ValueError, for a new kind of bad input."""


# --------------------------------------------------------------------------------------------------
# Pod environment (set by the operator's render, read by the trainer and the sampler)
# --------------------------------------------------------------------------------------------------

ENV_RUN_NAME = "CODA_RUN_NAME"
ENV_RUN_NAMESPACE = "CODA_RUN_NAMESPACE"
ENV_STAGE = "CODA_STAGE"
ENV_STAGE_INDEX = "CODA_STAGE_INDEX"
ENV_ATTEMPT = "CODA_ATTEMPT"
# Which slice of a multislice job, how many slices, which host within the slice (the Job's
# completion index) and hosts per slice: the trainer's JAX process id is
# slice_id * hosts_per_slice + host_id.
ENV_SLICE_ID = "CODA_SLICE_ID"
ENV_NUM_SLICES = "CODA_NUM_SLICES"
ENV_HOST_ID = "CODA_HOST_ID"
ENV_HOSTS_PER_SLICE = "CODA_HOSTS_PER_SLICE"
# `status` turns on progress reports into the run's status (see `Progress`).
ENV_PROGRESS = "CODA_PROGRESS"
PROGRESS_TO_STATUS = "status"
# An API URL to report to without credentials (kubectl proxy, test servers).
ENV_PROGRESS_SERVER = "CODA_PROGRESS_SERVER"
# Minimum seconds between unforced progress reports.
ENV_PROGRESS_INTERVAL = "CODA_PROGRESS_INTERVAL"
ENV_LOG_LEVEL = "CODA_LOG_LEVEL"
# The sampler's bearer token (from a Secret in a cluster) and its default sampling settings: a
# JSON object with the snake_case fields of the operator's `spec.sampler.defaults`.
ENV_API_KEY = "CODA_API_KEY"
ENV_SAMPLER_DEFAULTS = "CODA_SAMPLER_DEFAULTS"

# --------------------------------------------------------------------------------------------------
# Checkpoint layout: <uri>/<stage>/<step>/ (orbax), <uri>/<stage>/final/ (Hugging Face folder),
# <uri>/<stage>/status.json (latest progress), <uri>/<stage>/metrics/ (metrics.jsonl, TensorBoard),
# <uri>/<stage>/eval/<benchmark>.json (the evaluation's reports of <stage>/final)
# --------------------------------------------------------------------------------------------------

FINAL_DIR = "final"
EVAL_DIR = "eval"
STATUS_FILE = "status.json"
METRICS_DIR = "metrics"


def stage_uri(root: str, stage: str) -> str:
    return f"{root.rstrip('/')}/{stage}"


def final_uri(root: str, stage: str) -> str:
    """A stage's published result; the next stage's default `init_from`."""
    return f"{stage_uri(root, stage)}/{FINAL_DIR}"


def status_uri(root: str, stage: str) -> str:
    return f"{stage_uri(root, stage)}/{STATUS_FILE}"


def metrics_uri(root: str, stage: str) -> str:
    return f"{stage_uri(root, stage)}/{METRICS_DIR}"


def eval_uri(root: str, stage: str) -> str:
    """Where the evaluation of a stage's final checkpoint writes its reports."""
    return f"{stage_uri(root, stage)}/{EVAL_DIR}"


def eval_report_uri(root: str, stage: str, benchmark: str) -> str:
    return f"{eval_uri(root, stage)}/{benchmark}.json"


# --------------------------------------------------------------------------------------------------
# status.progress
# --------------------------------------------------------------------------------------------------


# The trainer's process 0 merge-patches it; the operator resets it when a stage starts, and
# `stage` makes a late write from a previous stage recognisable. Unknown fields survive, so an
# older operator keeps what a newer trainer adds.
class Progress(BaseModel):
    """The current stage's progress, written by the trainer's process 0."""

    model_config = ConfigDict(
        extra="allow", alias_generator=to_camel, populate_by_name=True, protected_namespaces=()
    )

    stage: str | None = Field(default=None, description="The stage these numbers belong to.")
    step: int | None = Field(default=None, description="Optimiser steps done.")
    total_steps: int | None = Field(default=None, description="The stage's steps.")
    loss: float | None = Field(
        default=None,
        description="Training loss (masked cross-entropy, mean over the last log window).",
    )
    tokens_per_second: float | None = Field(
        default=None, description="Training throughput over the last log window, all hosts."
    )
    checkpoint: str | None = Field(
        default=None, description="The newest complete checkpoint of the stage."
    )
    update_time: str | None = Field(
        default=None, description="When the trainer wrote this (RFC 3339)."
    )

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
