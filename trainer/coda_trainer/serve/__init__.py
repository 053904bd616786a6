"""The CoDA sampler service: an OpenAI-compatible HTTP API over the diffusion sampler.

    python -m coda_trainer.serve --checkpoint runs/sft/final --port 8000

Routes: POST /v1/completions, /v1/chat/completions (both with `stream`), /v1/infill;
GET /v1/models, /healthz, /readyz, /metrics. See app.py (API), engine.py (shape buckets, sampling
defaults), batcher.py (dynamic batching), metrics.py (Prometheus).
"""

from coda_trainer.serve.app import create_app
from coda_trainer.serve.engine import Engine, SamplerGenerator, SamplingDefaults, ServeSettings

__all__ = ["Engine", "SamplerGenerator", "SamplingDefaults", "ServeSettings", "create_app"]
