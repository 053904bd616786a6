"""Shared fixtures for the trainer tests: small, float32, CPU-friendly models."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from coda_trainer.config import ModelConfig
from coda_trainer.model import Transformer
from flax import nnx


@pytest.fixture
def micro_config() -> ModelConfig:
    """`test-micro` with the reference attention path: exact float32 comparisons."""
    return ModelConfig.preset("test-micro", attention="xla", dtype="float32", param_dtype="float32")


@pytest.fixture
def micro_model(micro_config: ModelConfig) -> Transformer:
    """A randomly initialised `test-micro` Transformer (seed 0)."""
    return Transformer(micro_config, rngs=nnx.Rngs(0))


@pytest.fixture
def proctree():
    """The `proctree` helpers: a process's descendants and whether they are alive."""
    import importlib.util
    import sys
    from pathlib import Path

    module_name = "_coda_trainer_tests_proctree"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, Path(__file__).with_name("proctree.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@dataclass
class StatusSubresource:
    """A real HTTP server in the API server's place for a run's status subresource: it records
    every merge patch as (path, body) and answers `code`."""

    url: str = ""
    code: int = 200
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@pytest.fixture
def status_server() -> Iterator[StatusSubresource]:
    status = StatusSubresource()

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status.patches.append((self.path, body))
            self.send_response(status.code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    status.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield status
    finally:
        server.shutdown()
        server.server_close()
