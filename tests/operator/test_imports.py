"""The operator's side of the contract: it reads the trainer only through `coda_trainer.config`
and `coda_trainer.contract`, and neither of those pulls in JAX (the operator image has none)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALLOWED_TRAINER_MODULES = {"coda_trainer.config", "coda_trainer.contract"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from coda_trainer import contract` names a module too
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_operator_imports_only_config_and_contract_from_the_trainer() -> None:
    offenders = {}
    for path in sorted((REPO / "operator" / "coda_operator").glob("*.py")):
        trainer = {
            m
            for m in _imported_modules(path)
            if m.startswith("coda_trainer.") and m.count(".") == 1
        }
        if trainer - ALLOWED_TRAINER_MODULES:
            offenders[path.name] = sorted(trainer - ALLOWED_TRAINER_MODULES)
    assert not offenders, offenders


def test_contract_and_config_import_no_jax_and_no_other_coda_module() -> None:
    code = (
        "import sys, coda_trainer.contract, coda_trainer.config, coda_operator.render, "
        "coda_operator.planner; "
        "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'numpy') if m in sys.modules); "
        "coda = sorted(m for m in sys.modules if m.startswith('coda_trainer.')); "
        "print(heavy, coda)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("trainer", "operator")),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[] ['coda_trainer.config', 'coda_trainer.contract']"
