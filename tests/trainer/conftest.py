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
