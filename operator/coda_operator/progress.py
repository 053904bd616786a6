"""How trainer progress reaches `kubectl get ctr`: the trainer's process 0 merge-patches
`status.progress` of its CodaTrainingRun through the status subresource.

Why this way: the operator needs no storage credentials and no polling, the value is in the
object users already look at, and the trainer's RBAC is one narrow rule (`patch` on
`codatrainingruns/status` in its namespace, see the chart's trainer Role). The operator owns every
other status field and only resets `progress` when a stage starts; progress carries its `stage`,
so a late write from a previous stage is recognisable.

Stdlib only (urllib): the trainer image needs nothing extra, and this module imports neither kopf
nor JAX. Reporting never raises: progress is best-effort and must not stop training.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["ProgressReporter"]

log = logging.getLogger(__name__)
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ProgressReporter:
    def __init__(
        self,
        run: str,
        namespace: str,
        stage: str,
        *,
        server: str,
        token: str | None = None,
        ca_path: str | None = None,
        min_interval: float = 30.0,
        timeout: float = 5.0,
    ):
        self.run, self.namespace, self.stage = run, namespace, stage
        self.url = f"{server.rstrip('/')}/apis/coda.dev/v1alpha1/namespaces/{namespace}/codatrainingruns/{run}/status"
        self._token = token
        self._ssl = ssl.create_default_context(cafile=ca_path) if ca_path else None
        self.min_interval = min_interval
        self.timeout = timeout
        self._last = float("-inf")
        self._warned = False

    @classmethod
    def from_env(cls, *, min_interval: float = 30.0) -> ProgressReporter | None:
        """The reporter the operator's pod env asks for (CODA_PROGRESS=status), or None outside a cluster."""
        env = os.environ
        if env.get("CODA_PROGRESS") != "status" or not env.get("KUBERNETES_SERVICE_HOST"):
            return None
        token_file = _SA_DIR / "token"
        if not token_file.exists():
            return None
        host, port = env["KUBERNETES_SERVICE_HOST"], env.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"
        return cls(
            env["CODA_RUN_NAME"],
            env.get("CODA_RUN_NAMESPACE", "default"),
            env["CODA_STAGE"],
            server=f"https://{host}:{port}",
            token=token_file.read_text().strip(),
            ca_path=str(_SA_DIR / "ca.crt") if (_SA_DIR / "ca.crt").exists() else None,
            min_interval=min_interval,
        )

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
        progress: dict[str, object] = {
            "stage": self.stage,
            "step": int(step),
            "updateTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if total_steps is not None:
            progress["totalSteps"] = int(total_steps)
        if loss is not None:
            progress["loss"] = round(float(loss), 6)
        if tokens_per_second is not None:
            progress["tokensPerSecond"] = round(float(tokens_per_second), 1)
        if checkpoint is not None:
            progress["checkpoint"] = checkpoint
        body = json.dumps({"status": {"progress": progress}}).encode()
        req = urllib.request.Request(self.url, data=body, method="PATCH")
        req.add_header("Content-Type", "application/merge-patch+json")
        if self._token:
            req.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as rsp:
                rsp.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            if not self._warned:
                log.warning("could not report progress to %s: %s (training continues)", self.url, e)
                self._warned = True
            return False
        self._last = now
        return True
