"""The embedded default corpora extracted from Python's standard library."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from coda_trainer import corpus


def test_stdlib_files_are_deterministic_and_skip_tests():
    files = corpus.stdlib_files()
    root = corpus.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100
    assert rel == sorted(rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    assert corpus.stdlib_files(limit=5) == files[:5]


def test_midtrain_mix_has_functions_classes_and_modules():
    docs = list(corpus.midtrain_documents(limit=20))
    pieces = [d for d in docs if "::" in d["path"]]
    modules = [d for d in docs if "::" not in d["path"]]
    assert pieces and modules
    for d in pieces[:50]:
        tree = ast.parse(d["text"])  # each extracted piece is valid code on its own
        assert isinstance(tree.body[-1], ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)


def test_sft_pairs_are_docstring_to_function_chats():
    pairs = list(corpus.sft_pairs(limit=40))
    assert len(pairs) > 20
    for row in pairs:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        fn = ast.parse(assistant["content"]).body[0]
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        assert f"def {fn.name}(" in user["content"]
        assert ast.get_docstring(fn) is None  # the docstring is the question, not the answer
        doc = user["content"].split("Docstring:\n", 1)[1]
        assert doc and "\n\n" not in doc and fn.body  # its first paragraph only
        assert len(assistant["content"]) <= 200


def test_build_writes_jsonl_shards_and_is_cached(tmp_path: Path):
    dirs = corpus.build_default_corpora(tmp_path, limit=15, shards=2)
    assert set(dirs) == {"pretrain", "midtrain", "sft"}
    for name, d in dirs.items():
        shards = sorted(d.glob("train-*.jsonl"))
        assert len(shards) == 2
        rows = [json.loads(line) for s in shards for line in s.read_text().splitlines()]
        assert rows, name
        key = "messages" if name == "sft" else "text"
        assert all(key in r for r in rows)
    stamp = (tmp_path / "corpus" / "MANIFEST.json").stat().st_mtime_ns
    again = corpus.build_default_corpora(tmp_path, limit=15, shards=2)
    assert again == dirs
    assert (tmp_path / "corpus" / "MANIFEST.json").stat().st_mtime_ns == stamp  # not rebuilt
    first = (dirs["pretrain"] / "train-00000.jsonl").read_text()
    rebuilt = corpus.build_default_corpora(tmp_path / "other", limit=15, shards=2)
    assert (rebuilt["pretrain"] / "train-00000.jsonl").read_text() == first  # deterministic
