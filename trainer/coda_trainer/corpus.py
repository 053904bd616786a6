"""The embedded default corpora, built from Python's own standard-library sources.

Every machine that runs Python has these files, so the default run needs no download. Three corpora,
one per stage, written as JSONL so the data pipeline reads them like any other source:

- pre-training: one document per module (`{"text": source, "path": ...}`);
- mid-training, a code-only mix: every top-level function and class as its own document, plus the
  whole modules again;
- SFT: (docstring → function) pairs as chat rows
  `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`: the user turn gives the
  signature and the docstring's first paragraph, the answer is the function's code without its
  docstring (the docstring is already in the question; the answer is the code a user asks for).

Modules that are data rather than code (the codec tables of `encodings/`, `pydoc_data`'s topic
texts: about a fifth of the library's bytes) are left out of every corpus.

The order is deterministic (sorted relative paths, source order inside a file). A small held-out
split (by a hash of the module path) goes to `eval.jsonl` for the periodic eval loss.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "build_default_corpora",
    "midtrain_documents",
    "pretrain_documents",
    "sft_instruction",
    "sft_pairs",
    "stdlib_files",
]

# Directories whose files are tests, vendored or generated code rather than the library itself.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3",
    "encodings", "pydoc_data",  # generated data tables, not code
})  # fmt: skip
_EVAL_EVERY = 40  # about 2.5% of modules are held out
_VERSION = "3"  # bump when the extraction changes so cached corpora are rebuilt


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(limit: int | None = None, *, root: Path | None = None) -> list[Path]:
    """The standard library's .py files in a deterministic order (sorted relative paths)."""
    root = root or stdlib_root()
    files = sorted(
        (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    return files[:limit] if limit is not None else files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _is_eval(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % _EVAL_EVERY == 0


def _modules(limit: int | None, root: Path | None) -> Iterator[tuple[str, str]]:
    root = root or stdlib_root()
    for path in stdlib_files(limit, root=root):
        source = _read(path)
        if source and source.strip():
            yield path.relative_to(root).as_posix(), source


def pretrain_documents(limit: int | None = None, *, root: Path | None = None) -> Iterator[dict]:
    for rel, source in _modules(limit, root):
        yield {"text": source, "path": rel}


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


def _start(node: ast.stmt) -> int:
    """0-based index of the node's first source line, its decorators included."""
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno, *(d.lineno for d in decorators)]) - 1


def _segment(lines: list[str], node: ast.stmt) -> str:
    """The node's full source lines, decorators included, dedented.

    (`ast.get_source_segment` re-splits the whole file on every call: quadratic on big modules.)
    """
    return textwrap.dedent("".join(lines[_start(node) : node.end_lineno])).strip("\n")


def midtrain_documents(limit: int | None = None, *, root: Path | None = None) -> Iterator[dict]:
    """Top-level functions and classes, each a document, then the whole module."""
    for rel, source in _modules(limit, root):
        tree = _parse(source)
        if tree is not None:
            lines = source.splitlines(keepends=True)
            for node in tree.body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    segment = _segment(lines, node)
                    if segment.strip():
                        yield {"text": segment, "path": f"{rel}::{node.name}"}
        yield {"text": source, "path": rel}


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and methods of top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield item


def _without_docstring(
    lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
) -> str | None:
    """The function's source with its docstring statement removed, or None when nothing but the
    docstring is left or the docstring shares a line with other code."""
    doc_node = node.body[0]
    if len(node.body) < 2 or doc_node.lineno <= node.lineno:
        return None
    if doc_node.end_lineno is None or node.body[1].lineno <= doc_node.end_lineno:
        return None
    kept = lines[_start(node) : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    code = textwrap.dedent("".join(kept)).strip("\n")
    return code if _parse(code) is not None else None


def sft_instruction(signature: str, docstring: str) -> str:
    """The user turn of an SFT pair (and the question to ask a model trained on them)."""
    return f"Write a Python function `{signature}`.\nDocstring:\n{docstring.strip()}"


def _summary(doc: str) -> str:
    """A docstring's first paragraph: what the function does, without argument tables."""
    return doc.strip().split("\n\n", 1)[0].strip()


def sft_pairs(
    limit: int | None = None,
    *,
    root: Path | None = None,
    max_answer_chars: int = 200,
    min_doc_chars: int = 20,
) -> Iterator[dict]:
    """(docstring → function) chat rows: the question gives the signature and the docstring's first
    paragraph, the answer is the function's code without its docstring, dedented.

    `max_answer_chars` keeps short functions (≈ 60 tokens): a tiny model trained for minutes learns
    a short, consistent answer shape — a def line, a body, the end — far sooner than long ones.
    """
    for rel, source in _modules(limit, root):
        tree = _parse(source)
        if tree is None:
            continue
        lines = source.splitlines(keepends=True)
        for node in _functions(tree):
            doc = ast.get_docstring(node)
            doc = _summary(doc) if doc else None
            if not doc or len(doc) < min_doc_chars or node.name.startswith("__"):
                continue
            answer = _without_docstring(lines, node)
            if not answer or len(answer) > max_answer_chars:
                continue
            prompt = sft_instruction(_signature(node), doc)
            yield {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
                "path": f"{rel}::{node.name}",
            }


def _write_jsonl(rows: Iterator[dict], out_dir: Path, shards: int) -> dict[str, int]:
    """Rows go round-robin to `train-0000k.jsonl` shards, held-out modules to `eval.jsonl`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "eval": 0}
    with contextlib.ExitStack() as stack:
        train = [
            stack.enter_context(open(out_dir / f"train-{i:05d}.jsonl", "w", encoding="utf-8"))
            for i in range(shards)
        ]
        held = stack.enter_context(open(out_dir / "eval.jsonl", "w", encoding="utf-8"))
        for row in rows:
            line = json.dumps(row, ensure_ascii=False) + "\n"
            if _is_eval(row["path"].split("::")[0]):
                held.write(line)
                counts["eval"] += 1
            else:
                train[counts["train"] % shards].write(line)
                counts["train"] += 1
    return counts


def build_default_corpora(
    workdir: str | Path, *, limit: int | None = None, shards: int = 4
) -> dict[str, Path]:
    """Write the three corpora under `workdir/corpus/{pretrain,midtrain,sft}` (cached).

    Returns the directory of each corpus. Rebuilt only if the stdlib, the limit or the extraction
    code version changed, so repeated local runs start instantly.
    """
    base = Path(workdir) / "corpus"
    key = json.dumps(
        {"v": _VERSION, "root": str(stdlib_root()), "limit": limit, "shards": shards},
        sort_keys=True,
    )
    stamp = base / "MANIFEST.json"
    dirs = {name: base / name for name in ("pretrain", "midtrain", "sft")}
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return dirs
    builders = {"pretrain": pretrain_documents, "midtrain": midtrain_documents, "sft": sft_pairs}
    counts = {name: _write_jsonl(builders[name](limit), dirs[name], shards) for name in dirs}
    stamp.write_text(json.dumps({"key": key, "counts": counts}, indent=1))
    return dirs
