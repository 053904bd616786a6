"""The CoDA sampler service: an OpenAI-compatible HTTP API over the diffusion sampler.

    python -m coda_trainer.serve --checkpoint runs/sft/final --port 8000

Routes: POST /v1/completions, /v1/chat/completions (both with `stream`), /v1/infill;
GET /v1/models, /healthz, /readyz, /metrics. See app.py (API), engine.py (shape buckets, sampling
defaults), batcher.py (dynamic batching), metrics.py (Prometheus).

The names below load on first use: `python -m coda_trainer.serve` imports this package before its
`main` runs, and importing JAX here would keep SIGTERM at its default (die by signal) for the
seconds that import takes, before the server's own handler is installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Engine", "SamplerGenerator", "SamplingDefaults", "ServeSettings", "create_app"]

_HOME = {
    "create_app": "coda_trainer.serve.app",
    "Engine": "coda_trainer.serve.engine",
    "SamplerGenerator": "coda_trainer.serve.engine",
    "SamplingDefaults": "coda_trainer.serve.engine",
    "ServeSettings": "coda_trainer.serve.engine",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
