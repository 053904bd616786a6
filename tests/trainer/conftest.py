"""Shared fixtures for the trainer tests: small, float32, CPU-friendly models."""

from __future__ import annotations

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
