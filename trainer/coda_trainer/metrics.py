"""Training metrics: JSON lines on stdout, a metrics file, TensorBoard events, and a status file.

Where things go (process 0 only):

- stdout: one JSON object per logged step, `{"event": "train", "step": ..., "loss": ..., ...}`
  (and `"event": "eval"` / `"checkpoint"` / `"done"` lines); human-oriented messages go to stderr.
- `<metrics_dir>/metrics.jsonl`: the same lines.
- `<metrics_dir>/` TensorBoard event files (tensorboardX), one scalar per metric.
- `<stage_dir>/status.json`: the latest progress, rewritten at every log step and checkpoint, for
  the operator and `coda-ctl`:
  `{"run", "stage", "state": "running"|"checkpointed"|"done"|"failed", "step", "total_steps",
  "loss", "tokens_per_second", "mfu", "checkpoint": <uri of the newest saved step or final>,
  "compiling": true until the first step of this attempt is done, "compile_seconds": how long
  that first step (compile included) took, "updated": <unix time>}`.

MFU = train_flops_per_token(seq_len) · tokens/s / (peak FLOP/s per device · devices), with full
(bidirectional) attention FLOPs; null where the device's peak is unknown (CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from coda_trainer import storage

__all__ = ["MetricsWriter", "mfu", "peak_flops_per_device"]

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per JAX device (a TPU chip — v4/v5p run one megacore device per chip — or
# a GPU), from vendor datasheets. Keys are `device_kind` as JAX reports it, lower-cased: TPU
# generations name themselves "TPU v4", "TPU v5" (v5p), "TPU v5 lite" (v5e), "TPU v6 lite" (v6e).
_PEAK_FLOPS_BY_KIND = {
    "tpu v4": 275e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}
# GPUs report marketing names ("NVIDIA H100 80GB HBM3"): matched by substring.
_PEAK_FLOPS_GPU = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this `device_kind`; None where unknown (CPU)."""
    kind = " ".join(device_kind.lower().split())
    if kind in _PEAK_FLOPS_BY_KIND:
        return _PEAK_FLOPS_BY_KIND[kind]
    for key, flops in _PEAK_FLOPS_GPU:
        if key in kind:
            return flops
    return None


def mfu(
    flops_per_token: float, tokens_per_second: float, device_kind: str, num_devices: int
) -> float | None:
    peak = peak_flops_per_device(device_kind)
    if peak is None or num_devices <= 0:
        return None
    return flops_per_token * tokens_per_second / (peak * num_devices)


def _summary_writer(logdir: str) -> Any:
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch (≈2 s, and GBs of address space) only to accept torch tensors; we
    log Python floats, so torch is hidden from that one import when it is not already loaded.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir, flush_secs=30)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null, numpy/JAX scalars become floats."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


class MetricsWriter:
    """Writes metric lines, TensorBoard scalars and the status file (no-ops off process 0)."""

    def __init__(
        self,
        metrics_dir: str,
        status_uri: str,
        *,
        run: str,
        stage: str,
        total_steps: int,
        enabled: bool = True,
        tensorboard: bool = True,
        stdout: Any = None,
    ):
        self.metrics_dir, self.status_uri = metrics_dir, status_uri
        self.run, self.stage, self.total_steps = run, stage, total_steps
        self.enabled = enabled
        self.stdout = stdout or sys.stdout
        self._lines: list[str] = []
        self._remote = storage.is_remote(metrics_dir)
        self._jsonl_uri = storage.join(metrics_dir, "metrics.jsonl")
        self._tb = None
        self._tb_dir: str | None = None
        self._status: dict[str, Any] = {"run": run, "stage": stage, "state": "running",
                                        "step": 0, "total_steps": total_steps}  # fmt: skip
        if not enabled:
            return
        storage.makedirs(metrics_dir)
        if self._remote:  # object stores cannot append: keep earlier attempts' lines ourselves
            # Read, not `exists` + read: only a missing file may mean "first attempt".
            with contextlib.suppress(FileNotFoundError):
                self._lines = storage.read_text(self._jsonl_uri).splitlines(keepends=True)
        if tensorboard:
            try:
                # tensorboardX's own gs:// writer re-uploads from __del__ at interpreter exit (and
                # hangs if the endpoint is gone): write locally and upload the files ourselves.
                self._tb_dir = tempfile.mkdtemp(prefix="coda-tb-") if self._remote else metrics_dir
                self._tb = _summary_writer(self._tb_dir)
            except Exception as e:  # TensorBoard is a convenience, never fatal
                log.warning("TensorBoard events disabled: %s", e)

    def emit(self, event: str, step: int, values: dict[str, Any]) -> dict[str, Any]:
        record = {"event": event, "run": self.run, "stage": self.stage, "step": step,
                  **{k: _clean(v) for k, v in values.items()}}  # fmt: skip
        if not self.enabled:
            return record
        line = json.dumps(record) + "\n"
        self.stdout.write(line)
        self.stdout.flush()
        if self._remote:
            self._lines.append(line)
            storage.write_text(self._jsonl_uri, "".join(self._lines))
        else:
            with storage.open_file(self._jsonl_uri, "a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "event", "run", "stage") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{event}/{key}", value, step)
        return record

    def status(self, **fields: Any) -> None:
        self._status.update({k: _clean(v) for k, v in fields.items()}, updated=time.time())
        if not self.enabled:
            return
        text = json.dumps(self._status, indent=1)
        if self._remote:
            if "checkpoint" in fields or "state" in fields:
                self._upload_tensorboard()
            storage.write_text(self.status_uri, text)
        else:  # write-then-rename so a reader never sees half a file
            tmp = f"{self.status_uri}.tmp"
            storage.write_text(tmp, text)
            fs, path = storage.filesystem(tmp)
            fs.mv(path, storage.filesystem(self.status_uri)[1])

    def _upload_tensorboard(self) -> None:
        if self._tb is None or not self._remote or self._tb_dir is None:
            return
        self._tb.flush()
        for name in os.listdir(self._tb_dir):
            with open(os.path.join(self._tb_dir, name), "rb") as f:
                storage.write_bytes(storage.join(self.metrics_dir, name), f.read())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._upload_tensorboard()
            self._tb.close()
            self._tb = None
            if self._remote and self._tb_dir:
                shutil.rmtree(self._tb_dir, ignore_errors=True)
