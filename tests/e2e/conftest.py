"""Fixtures of the cluster-in-a-box tests: the API emulator and the operator come from
tests/operator's kit, the GCS emulator from tests/conftest.py, the box from box.py."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
# The kits of the other test folders, by unique module names (pytest runs in importlib mode).
for folder in (HERE, HERE.parent / "operator"):
    sys.path.insert(0, str(folder))
