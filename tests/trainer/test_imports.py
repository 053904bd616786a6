"""The trainer's import contract: the layers point one way.

- no import cycle between the trainer's modules, counting imports inside functions too (they hide
  a cycle from Python's loader, not from the reader);
- the trainer never imports the operator or the CLI (they build on it, not the other way round).

The operator's side (only `coda_trainer.config` and `coda_trainer.contract`, neither pulling in JAX)
is tests/operator/test_imports.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "trainer" / "coda_trainer"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `module` imports. `from pkg import name` counts as `pkg.name` when that is a
    module, else as `pkg`; relative imports are resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        deps = set()
        for name in _imports(module, path, known):
            while name and name not in known:  # `coda_trainer.x.Class` → `coda_trainer.x`
                name = name.rpartition(".")[0]
            # a module's own packages load before it anyway: not a dependency of its design
            if name and name != module and not module.startswith(name + "."):
                deps.add(name)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_the_trainer() -> None:
    graph = _graph()
    assert {"coda_trainer.config", "coda_trainer.model", "coda_trainer.serve.app"} <= set(graph)
    assert "coda_trainer.sharding" in graph["coda_trainer.model"]
    assert "coda_trainer.config" in graph["coda_trainer.train"]


def test_no_import_cycles_inside_the_trainer() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    detail = {m: sorted(graph[m] & set(c)) for c in cycles for m in c}
    assert not cycles, f"import cycles: {cycles}; edges inside them: {detail}"


def test_the_trainer_never_imports_the_operator_or_the_cli() -> None:
    modules = _modules()
    layers_above = ("coda_operator", "coda_ctl")
    offenders = {}
    for module, path in modules.items():
        names = sorted(
            n for n in _imports(module, path, set(modules)) if n.split(".")[0] in layers_above
        )
        if names:
            offenders[module] = names
    assert not offenders, offenders
