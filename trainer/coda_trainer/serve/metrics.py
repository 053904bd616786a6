"""Prometheus metrics of the sampler service, in a registry of their own (one per app, so several
servers in one process, as in tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "coda_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "coda_request_latency_seconds", "Request latency by route.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("coda_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generated_tokens = Counter(
            "coda_generated_tokens",
            "Tokens returned to clients (after eos/stop/max_tokens).",
            registry=r,
        )
        self.batch_size = Histogram(
            "coda_batch_size", "Requests (rows) per model call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "coda_batch_latency_seconds",
            "Wall time of one model call.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "coda_tokens_per_second",
            "Generated tokens per second of the last model call.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "coda_queue_depth", "Requests waiting for a model call.", registry=r
        )
        self.ready = Gauge("coda_ready", "1 once the model is loaded and compiled.", registry=r)
        self.compile_seconds = Gauge(
            "coda_warmup_seconds", "Time spent compiling the shape buckets at start-up.", registry=r
        )

    def observe_batch(self, rows: int, seconds: float, tokens: int) -> None:
        self.batch_size.observe(rows)
        self.batch_latency.observe(seconds)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
