"""The data pipeline: packing, SFT rows, determinism, resumable state, mixing, sharding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from coda_trainer import data
from coda_trainer.config import DataSource, SFTConfig
from coda_trainer.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("project")


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _docs(prefix: str, n: int, words: int = 7) -> list[dict]:
    return [{"text": " ".join(f"{prefix}{i}w{j}" for j in range(words + i % 5))} for i in range(n)]


def _loader(sources, tok, **kw):
    # The packing tests read the packer's raw stream; test_row_shuffle_* cover the shuffle buffer.
    kw.setdefault("shuffle_rows", 0)
    kw.setdefault("kind", "pretrain")
    kw.setdefault("batch_size", 2)
    kw.setdefault("seq_len", 32)
    return data.make_loader(sources, tok, **kw)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


# ---- packing ----


def test_packing_segments_positions_and_eos(tmp_path, tok):
    rows = _docs("a", 12)
    src = [DataSource(uri=_write_jsonl(tmp_path / "a.jsonl", rows))]
    loader = _loader(src, tok, batch_size=3, seq_len=40)
    batches = _take(loader, 4)
    for b in batches:
        assert b["tokens"].shape == b["segment_ids"].shape == b["positions"].shape == (3, 40)
        assert b["tokens"].dtype == np.int32
        for toks, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"], strict=True):
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
            assert np.all(seg > 0)  # packing never pads
            for s in np.unique(seg):
                piece = pos[seg == s]
                np.testing.assert_array_equal(piece, np.arange(len(piece)))  # restart per piece
            # a piece that ends before the row does ends with eos (the document separator)
            ends = np.nonzero(np.diff(seg))[0]
            assert np.all(toks[ends] == tok.eos_id)
    # The concatenated stream is exactly the documents (in the loader's order), each + eos.
    stream = np.concatenate([b["tokens"].reshape(-1) for b in batches]).tolist()
    texts = {r["text"] for r in rows}
    pieces = tok.decode(stream).split(tok.decode([tok.eos_id]))
    assert all(p in texts for p in pieces[:-1])
    assert len(set(pieces[:-1])) == len(pieces[:-1]) or len(pieces) > len(rows)  # epoch wrap only


def test_pretokenised_parquet_and_text_column(tmp_path, tok):
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "ids.parquet")
    b = next(
        _loader([DataSource(uri=str(tmp_path / "ids.parquet"))], tok, batch_size=1, seq_len=12)
    )
    # all three documents, each followed by eos, in some seeded order
    docs, cur = [], []
    for t in b["tokens"][0].tolist():
        if t == tok.eos_id:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert sorted(docs[:3]) == sorted(tuple(i) for i in ids)

    pq.write_table(pa.table({"content": ["def f():\n    return 1\n"] * 3}), tmp_path / "t.parquet")
    b = next(
        _loader(
            [DataSource(uri=str(tmp_path / "t.parquet"), text_field="content")], tok, seq_len=16
        )
    )
    assert "def f" in tok.decode(b["tokens"][0])


def test_text_files_are_one_document_each(tmp_path, tok):
    for i in range(3):
        (tmp_path / "src" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "src" / f"m{i}.py").write_text(f"x{i} = {i}\n")
    b = next(_loader([DataSource(uri=str(tmp_path / "src"))], tok, batch_size=1, seq_len=30))
    text = tok.decode(b["tokens"][0])
    assert all(f"x{i} = {i}" in text for i in range(3))


def test_row_shuffle_mixes_documents_and_keeps_every_row(tmp_path, tok):
    """A long document must not fill consecutive batches; shuffling only reorders packed rows."""
    long_doc = {"text": " ".join(f"long{j}" for j in range(400))}
    src = [DataSource(uri=_write_jsonl(tmp_path / "a.jsonl", [long_doc, *_docs("s", 40)]))]
    n = 40
    raw = [r for b in _take(_loader(src, tok, batch_size=1, seq_len=16), n) for r in b["tokens"]]
    mixed = _loader(src, tok, batch_size=1, seq_len=16, shuffle_rows=8)
    shuffled = [r for b in _take(mixed, n) for r in b["tokens"]]
    assert [r.tolist() for r in shuffled] != [r.tolist() for r in raw]
    # Every emitted row is a row of the raw stream, none twice, drawn from a window of 8 rows ahead.
    raw_rows = [tuple(r.tolist()) for r in raw] + [
        tuple(r.tolist())
        for b in _take(_loader(src, tok, batch_size=1, seq_len=16, seed=0), n + 8)[n:]
        for r in b["tokens"]
    ]
    positions = [raw_rows.index(tuple(r.tolist())) for r in shuffled]
    assert len(set(positions)) == n and all(p < i + 8 for i, p in enumerate(positions))


def test_row_shuffle_state_resumes_exactly(tmp_path, tok):
    src = [DataSource(uri=_write_jsonl(tmp_path / "a.jsonl", _docs("a", 30)))]
    a = _loader(src, tok, shuffle_rows=16)
    _take(a, 3)
    state = a.get_state()
    expected = _take(a, 4)
    b = _loader(src, tok, shuffle_rows=16)
    b.set_state(state)
    for x, y in zip(expected, _take(b, 4), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---- determinism and state ----


def test_deterministic_and_seeded(tmp_path, tok):
    src = [DataSource(uri=_write_jsonl(tmp_path / "a.jsonl", _docs("a", 30)))]
    a = _take(_loader(src, tok, seed=1), 5)
    b = _take(_loader(src, tok, seed=1), 5)
    c = _take(_loader(src, tok, seed=2), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("prefetch", [False, True])
def test_state_resumes_exactly(tmp_path, tok, prefetch):
    srcs = [
        DataSource(
            uri=_write_jsonl(tmp_path / "a" / "0.jsonl", _docs("a", 9)).rsplit("/", 1)[0]
            + "/*.jsonl"
        ),
        DataSource(uri=_write_jsonl(tmp_path / "b.jsonl", _docs("b", 5, words=30)), weight=0.5),
    ]
    _write_jsonl(tmp_path / "a" / "1.jsonl", _docs("c", 7))
    full = _take(_loader(srcs, tok, seed=3), 12)  # several epochs of the small sources

    first = _loader(srcs, tok, seed=3)
    first = data.Prefetch(first) if prefetch else first
    _take(first, 5)
    state = first.get_state()
    if prefetch:
        first.close()
    resumed = _loader(srcs, tok, seed=3)
    resumed = data.Prefetch(resumed) if prefetch else resumed
    resumed.set_state(state)
    rest = _take(resumed, 7)
    for x, y in zip(full[5:], rest, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    if prefetch:
        resumed.close()


def test_state_rejects_changed_sources(tmp_path, tok):
    src = [DataSource(uri=_write_jsonl(tmp_path / "a.jsonl", _docs("a", 5)))]
    state = _loader(src, tok).get_state()
    two = _loader([*src, DataSource(uri=str(tmp_path / "a.jsonl"))], tok)
    with pytest.raises(ValueError, match="sources"):
        two.set_state(state)


# ---- mixing and sharding ----


def test_mixture_weights_are_token_shares(tmp_path, tok):
    a = DataSource(uri=_write_jsonl(tmp_path / "a.jsonl", _docs("a", 40)), weight=3.0)
    b = DataSource(uri=_write_jsonl(tmp_path / "b.jsonl", _docs("zz", 40, words=20)), weight=1.0)
    loader = _loader([a, b], tok, batch_size=4, seq_len=64)
    _take(loader, 30)
    drawn = [s.drawn for s in loader.streams]
    share = drawn[0] / sum(drawn)
    assert share == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("n_files", [1, 4])
def test_process_sharding_is_disjoint_and_complete(tmp_path, tok, n_files):
    rows = _docs("d", 24)
    for f in range(n_files):
        _write_jsonl(tmp_path / f"s{f}.jsonl", rows[f::n_files])
    src = [DataSource(uri=str(tmp_path / "s*.jsonl"))]
    seen = []
    for pi in range(2):
        loader = _loader(src, tok, process_index=pi, process_count=2)
        stream = loader.streams[0]
        docs = []
        while stream.epoch == 0:
            docs.append(stream.next())
        seen.append(docs[:-1])  # the last call already belongs to epoch 1
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {r["text"] for r in rows}


# ---- SFT ----


SFT_MESSAGES = [
    {"role": "user", "content": "Write add."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
]


@pytest.mark.parametrize("span", ["assistant-role", "generation-prompt"])
def test_sft_example_prompt_mask_ends_after_assistant_header(tok, span):
    messages = SFT_MESSAGES
    ex = data.build_sft_example(tok, messages, seq_len=64, prompt_span=span)
    tokens, prompt = ex["tokens"], ex["prompt_mask"]
    n_prompt = int(prompt.sum())
    assert prompt[:n_prompt].all() and not prompt[n_prompt:].any()
    rendered = tok.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    # assistant-role (the default, the release's src_mask): the newline after the role is maskable.
    want = rendered[:-1] if span == "assistant-role" else rendered
    assert tok.decode(tokens[:n_prompt]) == want
    n_rendered = len(tok.encode(rendered))
    assert tok.decode(tokens[n_prompt:n_rendered]) == ("\n" if span == "assistant-role" else "")
    answer = tok.encode(messages[1]["content"])
    n_prompt = n_rendered
    np.testing.assert_array_equal(tokens[n_prompt : n_prompt + len(answer)], answer)
    assert tokens[n_prompt + len(answer)] == tok.im_end_id
    assert np.all(tokens[n_prompt + len(answer) + 1 :] == tok.pad_id)
    assert np.all(ex["segment_ids"] == 1)  # pads stay maskable (the model learns to stop)
    np.testing.assert_array_equal(ex["positions"], np.arange(64))


def test_sft_default_span_is_the_releases_on_qwen3_ids():
    """Fidelity: with the Qwen3 tokenizer the default unmaskable span ends with the ids
    [151644, 77091] (`<|im_start|>assistant`), where SalesforceAIResearch/CoDA's src_mask ends."""
    qwen3 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "qwen3-tokenizer"
    if not (qwen3 / "vocab.json").exists():
        pytest.fail(f"shared Qwen3 tokenizer files missing at {qwen3}")
    tok = load_tokenizer(str(qwen3.resolve()))
    ex = data.build_sft_example(tok, SFT_MESSAGES, seq_len=64)
    n_prompt = int(ex["prompt_mask"].sum())
    assert list(ex["tokens"][n_prompt - 2 : n_prompt + 1]) == [151644, 77091, 198]
    assert SFTConfig().prompt_span == "assistant-role"


def test_sft_over_length_drop_and_truncate(tmp_path, tok):
    short = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1"}]
    }
    long = {"instruction": "Explain.", "output": "word " * 200}
    path = _write_jsonl(tmp_path / "sft.jsonl", [short, long] * 4)
    src = [DataSource(uri=path, format="chat")]
    dropped = data.make_loader(src, tok, kind="sft", batch_size=4, seq_len=48)
    b = next(dropped)
    assert dropped.dropped >= 1
    assert all("x = 1" in tok.decode(t) for t in b["tokens"])
    trunc = data.make_loader(src, tok, kind="sft", batch_size=8, seq_len=48, over_length="truncate")
    b = next(trunc)
    assert trunc.dropped == 0
    assert any("word word" in tok.decode(t) and tok.pad_id not in t for t in b["tokens"])


# ---- errors ----


def test_clear_errors(tmp_path, tok):
    with pytest.raises(data.DataError, match="matches no files"):
        data.resolve_sources([DataSource(uri=str(tmp_path / "missing/*.jsonl"))])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nthis is not json\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: not a JSON line"):
        data.validate_sources([DataSource(uri=str(bad))], tok, kind="pretrain", seq_len=32)
    fake = tmp_path / "fake.parquet"
    fake.write_text("definitely not parquet")
    with pytest.raises(data.DataError, match="not a readable Parquet file"):
        data.validate_sources([DataSource(uri=str(fake))], tok, kind="pretrain", seq_len=32)
    nofield = _write_jsonl(tmp_path / "nofield.jsonl", [{"content": "x"}])
    with pytest.raises(data.DataError, match="no string field 'text'"):
        data.validate_sources([DataSource(uri=nofield)], tok, kind="pretrain", seq_len=32)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(data.DataError, match="is empty"):
        data.validate_sources([DataSource(uri=str(empty))], tok, kind="pretrain", seq_len=32)
    with pytest.raises(data.DataError, match="is empty"):
        next(_loader([DataSource(uri=str(empty))], tok))
    notchat = _write_jsonl(tmp_path / "notchat.jsonl", [{"text": "x"}])
    with pytest.raises(data.DataError, match="needs `messages`"):
        data.validate_sources([DataSource(uri=notchat)], tok, kind="sft", seq_len=32)
    toolong = _write_jsonl(tmp_path / "long.jsonl", [{"instruction": "a " * 100, "output": "b"}])
    with pytest.raises(data.DataError, match="fits seq_len"):
        data.validate_sources([DataSource(uri=toolong)], tok, kind="sft", seq_len=32)


def test_gcs_source(gcs_bucket, tok):
    from coda_trainer import storage

    rows = _docs("g", 10)
    for i in range(2):
        storage.write_text(
            f"{gcs_bucket}/corpus/part-{i}.jsonl", "".join(json.dumps(r) + "\n" for r in rows[i::2])
        )
    src = [DataSource(uri=f"{gcs_bucket}/corpus/*.jsonl")]
    data.validate_sources(src, tok, kind="pretrain", seq_len=32)
    b = next(_loader(src, tok, batch_size=2, seq_len=32))
    assert (
        "g0w0" in tok.decode(b["tokens"].reshape(-1))
        or "g1w0" in tok.decode(b["tokens"].reshape(-1))
        or b["tokens"].size
    )
