"""How trainer progress reaches `kubectl get ctr`: the trainer's process 0 merge-patches
`status.progress` of its CodaTrainingRun through the status subresource.

Why this way: the operator needs no storage credentials and no polling, the value is in the
object users already look at, and the trainer's RBAC is one narrow rule (`patch` on
`codatrainingruns/status` in its namespace, see the chart's trainer Role). The operator owns every
other status field and only resets `progress` when a stage starts; progress carries its `stage`,
so a late write from a previous stage is recognisable.

The operator's JobSet pods carry `CODA_PROGRESS=status`, `CODA_RUN_NAME`, `CODA_RUN_NAMESPACE` and
`CODA_STAGE`; `ProgressReporter.from_env()` turns them into a reporter (None when they are absent,
e.g. `coda-ctl local run`). `CODA_PROGRESS_SERVER` names an API URL to use without credentials
(`kubectl proxy`, test servers) instead of the in-cluster ServiceAccount; `CODA_PROGRESS_INTERVAL`
overrides the minimum seconds between unforced patches (default 30).

Stdlib (urllib, threading) plus the contract's pydantic `Progress` model: this module imports
neither kopf nor JAX. Reporting never raises: progress is best-effort and must not stop training.
`report()` sends inline; `BackgroundProgress` sends from a thread so a slow or hung API server
never stalls the training loop (on multi-host jobs every host would wait on process 0).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coda_trainer.contract import (
    ENV_PROGRESS,
    ENV_PROGRESS_INTERVAL,
    ENV_PROGRESS_SERVER,
    ENV_RUN_NAME,
    ENV_RUN_NAMESPACE,
    ENV_STAGE,
    PROGRESS_TO_STATUS,
    Progress,
    status_path,
)

__all__ = ["BackgroundProgress", "ProgressReporter"]

log = logging.getLogger(__name__)
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_INTERVAL_S = 30.0


class ProgressReporter:
    def __init__(
        self,
        run: str,
        namespace: str,
        stage: str,
        *,
        server: str,
        token: str | None = None,
        token_file: str | None = None,
        ca_path: str | None = None,
        min_interval: float = DEFAULT_INTERVAL_S,
        timeout: float = 5.0,
    ):
        self.run, self.namespace, self.stage = run, namespace, stage
        self.url = server.rstrip("/") + status_path(namespace, run)
        self._token = token
        # Projected ServiceAccount tokens are rotated by the kubelet: read the file per request.
        self._token_file = Path(token_file) if token_file else None
        self._ssl = ssl.create_default_context(cafile=ca_path) if ca_path else None
        self.min_interval = min_interval
        self.timeout = timeout
        self._last = float("-inf")
        self._warned = False

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, min_interval: float | None = None
    ) -> ProgressReporter | None:
        """The reporter the operator's pod env asks for (CODA_PROGRESS=status), or None outside a cluster."""
        env = os.environ if env is None else env
        if env.get(ENV_PROGRESS) != PROGRESS_TO_STATUS or not env.get(ENV_RUN_NAME):
            return None
        if not env.get(ENV_STAGE):
            return None
        if min_interval is None:
            try:
                min_interval = float(env.get(ENV_PROGRESS_INTERVAL, DEFAULT_INTERVAL_S))
            except ValueError:
                min_interval = DEFAULT_INTERVAL_S
        common = dict(
            run=env[ENV_RUN_NAME],
            namespace=env.get(ENV_RUN_NAMESPACE) or "default",
            stage=env[ENV_STAGE],
            min_interval=min_interval,
        )
        if env.get(ENV_PROGRESS_SERVER):
            return cls(server=env[ENV_PROGRESS_SERVER], **common)  # type: ignore[arg-type]
        token_file = _SA_DIR / "token"
        if not env.get("KUBERNETES_SERVICE_HOST") or not token_file.exists():
            return None
        host, port = env["KUBERNETES_SERVICE_HOST"], env.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"
        return cls(
            server=f"https://{host}:{port}",
            token_file=str(token_file),
            ca_path=str(_SA_DIR / "ca.crt") if (_SA_DIR / "ca.crt").exists() else None,
            **common,  # type: ignore[arg-type]
        )

    def _bearer(self) -> str | None:
        if self._token_file is not None:
            try:
                return self._token_file.read_text().strip() or None
            except OSError:
                return self._token
        return self._token

    def due(self) -> bool:
        """Whether an unforced report would be sent now (the rate limit has passed)."""
        return time.monotonic() - self._last >= self.min_interval

    def report(
        self,
        *,
        step: int,
        total_steps: int | None = None,
        loss: float | None = None,
        tokens_per_second: float | None = None,
        checkpoint: str | None = None,
        force: bool = False,
    ) -> bool:
        """Patch status.progress (at most every `min_interval` seconds unless forced); True if sent."""
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return False
        progress = Progress(
            stage=self.stage,
            step=int(step),
            update_time=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            total_steps=None if total_steps is None else int(total_steps),
            loss=None if loss is None else round(float(loss), 6),
            tokens_per_second=None
            if tokens_per_second is None
            else round(float(tokens_per_second), 1),
            checkpoint=checkpoint,
        )
        sent = self._send({"progress": progress.to_wire()})
        self._last = now  # a failed attempt also waits out the interval (see _send)
        return sent

    def patch_status(self, status: dict[str, Any]) -> bool:
        """Merge-patch `status` into the run's status now (no rate limit); True if it was sent.
        The evaluation Job reports its scores with it."""
        return self._send(status)

    def _send(self, status: dict[str, Any]) -> bool:
        body = json.dumps({"status": status}).encode()
        req = urllib.request.Request(self.url, data=body, method="PATCH")
        req.add_header("Content-Type", "application/merge-patch+json")
        token = self._bearer()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as rsp:
                rsp.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            # Never raises: a down API server must not stop training (`report` then waits out
            # the interval, so it costs one timeout per interval, not one per step).
            if not self._warned:
                log.warning("could not report progress to %s: %s (training continues)", self.url, e)
                self._warned = True
            return False
        return True


class BackgroundProgress:
    """Hands reports to one daemon thread; `submit` never blocks and never raises.

    One pending report at most: a newer one replaces it, merged so a pending checkpoint URI is not
    lost, and forced if either was. `close` waits (bounded) for the last report, e.g. the final
    checkpoint's.
    """

    def __init__(self, reporter: ProgressReporter):
        self.reporter = reporter
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="coda-progress", daemon=True)
        self._thread.start()

    def submit(self, *, force: bool = False, **fields: Any) -> None:
        if not force and not self.reporter.due():
            return  # cheap check on the training thread; the reporter re-checks when sending
        with self._cv:
            if self._closed:
                return
            merged = {**(self._pending or {}), **{k: v for k, v in fields.items() if v is not None}}
            merged["force"] = force or bool((self._pending or {}).get("force"))
            self._pending = merged
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                fields, self._pending, self._busy = self._pending, None, True
            try:
                self.reporter.report(**fields)
            except Exception as e:  # never let a bug here surface in training
                log.warning("progress reporting failed: %s", e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is pending or being sent; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0)
