"""Fixtures shared by every test folder: a real GCS endpoint on loopback (`gcs_emulator`, one per
session, and `gcs_bucket`, a fresh gs:// bucket per test; see trainer/gcs_emulator.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# The test extras bring libtpu (for deviceless TPU compiles, which run on the CPU platform). Without
# this, every JAX process of the suite would probe for a TPU and take libtpu's /tmp lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _load(path: Path, name: str):
    """Import a helper module by path (pytest runs with --import-mode=importlib)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_gcs = _load(Path(__file__).parent / "trainer" / "gcs_emulator.py", "_coda_tests_gcs_emulator")
gcs_emulator = _gcs.gcs_emulator
gcs_bucket = _gcs.gcs_bucket
