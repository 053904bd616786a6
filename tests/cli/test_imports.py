"""The CLI's side of the import contract: it reaches the trainer only through its public surface,
`coda_trainer.api`, plus `coda_trainer.config` and `coda_trainer.contract` (the shared models and
names), counting imports inside functions too; and `coda-ctl --help` loads neither JAX nor NumPy.

The trainer's and the operator's sides are tests/trainer/test_imports.py and
tests/operator/test_imports.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "cli" / "coda_ctl"
ALLOWED_TRAINER_MODULES = {"coda_trainer.api", "coda_trainer.config", "coda_trainer.contract"}


def trainer_imports(source: str) -> set[str]:
    """The `coda_trainer` modules (or names) a module's source imports, anywhere in it.
    `from coda_trainer import x` counts as `coda_trainer.x`; `from coda_trainer.y import z` as
    `coda_trainer.y`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "coda_trainer":
                names = {f"coda_trainer.{alias.name}" for alias in node.names}
            else:
                names = {node.module}
        else:
            continue
        found |= {n for n in names if n == "coda_trainer" or n.startswith("coda_trainer.")}
    return found


def test_the_checker_sees_internal_imports() -> None:
    source = (
        "from coda_trainer import api, train\n"
        "import coda_trainer.data\n"
        "def f():\n"
        "    from coda_trainer.evaluate.__main__ import main\n"
        "    from coda_trainer.contract import GROUP\n"
    )
    assert trainer_imports(source) == {
        "coda_trainer.api",
        "coda_trainer.train",
        "coda_trainer.data",
        "coda_trainer.evaluate.__main__",
        "coda_trainer.contract",
    }


def test_the_cli_imports_only_the_trainers_public_surface() -> None:
    paths = sorted(CLI.rglob("*.py"))
    assert {"main.py", "localrun.py", "plan.py"} <= {p.name for p in paths}
    offenders = {
        p.name: sorted(bad)
        for p in paths
        if (bad := trainer_imports(p.read_text()) - ALLOWED_TRAINER_MODULES)
    }
    assert not offenders, (
        f"cli/ imports trainer internals {offenders}: add what the CLI needs to "
        "coda_trainer/api.py and import it from there"
    )


def test_help_loads_neither_jax_nor_numpy_nor_the_trainer_surface() -> None:
    """`coda-ctl --help` (and tab completion) imports coda_ctl.main: it stays light because every
    command imports the trainer when it runs."""
    code = (
        "import sys, coda_ctl.main; "
        "print(sorted(m for m in ('jax', 'numpy', 'coda_trainer.api', 'coda_trainer.config') "
        "if m in sys.modules))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("trainer", "operator", "cli")),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_trainer_surface_imports_neither_jax_nor_numpy() -> None:
    code = (
        "import sys, coda_trainer.api; "
        "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
