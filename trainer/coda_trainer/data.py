"""Training data: files → documents → token rows, deterministic and resumable.

Pipeline (per JAX process):

1. **Sources** (`resolve_sources`): each `DataSource.uri` (file, directory or glob, local or gs://)
   becomes a sorted file list with one format: `text`/`python` (a file is one document), `jsonl`
   (a row's `text_field`), `parquet` (a `text_field` string column or a pre-tokenised `input_ids`
   column), `chat` (JSONL/Parquet rows with `messages`, or `instruction`/`output`).
2. **Order** (`_SourceStream`): per epoch, the source's files are permuted with a seeded RNG and the
   documents inside each file too. Readers read disjoint data: whole files round-robin when a
   source has at least as many files as readers, otherwise every reader-count-th document. There
   is one reader per JAX process unless `batch.readers` fixes the number (`ReaderGroup`: a
   process then runs several and concatenates their rows, so the global batch does not depend on
   the number of hosts).
3. **Mixing**: a source's weight is its share of *tokens* (pre/mid-training) or *examples* (SFT).
   The next document comes from the source furthest behind its share (argmin drawn/weight), which
   is deterministic and needs no RNG state.
4. **Rows**: pre/mid-training concatenates documents, each followed by eos, and cuts the stream
   every `seq_len` tokens (no padding; a document cut at a row end continues in the next row).
   `segment_ids` number the document pieces 1.. in each row, `positions` restart at 0 with each
   piece. SFT puts one example per row: the prompt rendered by the tokenizer's chat template through
   `<|im_start|>assistant\\n` (`prompt_mask`), the answer, `<|im_end|>`, then pad to `seq_len`;
   the pads keep segment id 1 because the loss treats them as maskable (the model learns to stop).

State: `get_state()`/`set_state()` capture everything needed to continue exactly (per source:
epoch, file and document cursors, tokens/examples drawn; the unfinished document piece carried into
the next row). They use bytes, the protocol `grain.checkpoint.CheckpointSave` expects, so the
checkpoint stores one state file per process.

This is a plain Python iterator rather than a grain `DataLoader`: grain's map datasets need random
access to every document up front, which streaming text/JSONL files from gs:// does not give, and
token-weighted mixing plus cross-document packing would need custom grain stages anyway.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from coda_trainer import storage
from coda_trainer.config import DataSource, PromptSpan
from coda_trainer.contract import PermanentError

log = logging.getLogger("coda_trainer.data")

__all__ = [
    "Batch",
    "DataError",
    "PackedLoader",
    "Prefetch",
    "ReaderGroup",
    "SFTLoader",
    "Source",
    "batch_fields",
    "build_sft_example",
    "make_loader",
    "resolve_sources",
    "validate_sources",
]

Batch = dict[str, np.ndarray]
Format = Literal["text", "jsonl", "parquet", "chat"]
_STATE_VERSION = 1


class DataError(PermanentError):
    """The data cannot be used (missing, unreadable, empty, not in its declared format). Permanent."""


class Tokenizer(Protocol):  # what the pipeline needs from coda_trainer.tokenizer.CodaTokenizer
    eos_id: int
    pad_id: int
    im_end_id: int

    def encode(self, text: str) -> list[int]: ...
    def chat_ids(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]: ...


# --------------------------------------------------------------------------------------------------
# Sources and file reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    uri: str
    weight: float
    format: Format
    text_field: str
    files: tuple[str, ...]


_EXT_FORMAT: dict[str, Format] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet",
}  # fmt: skip


def _file_format(path: str, declared: str, sft: bool) -> Format:
    if declared in ("text", "python"):
        return "text"
    if declared == "parquet":
        return "parquet"
    if declared == "chat":
        return "chat"
    if declared == "jsonl":
        return "chat" if sft else "jsonl"
    for ext, fmt in _EXT_FORMAT.items():
        if path.endswith(ext):
            return "chat" if sft and fmt == "jsonl" else fmt
    return "text"


def resolve_sources(sources: Sequence[DataSource], *, sft: bool = False) -> list[Source]:
    """Expand each source's glob; raise DataError for a source that matches no file."""
    out = []
    for src in sources:
        try:
            files = storage.glob(src.uri)
        except Exception as e:  # any storage failure is reported with the uri
            raise DataError(f"data source {src.uri!r} cannot be listed: {e}") from e
        files = [f for f in files if not os.path.basename(f).startswith((".", "_"))]
        if not files:
            raise DataError(f"data source {src.uri!r} matches no files")
        formats = {_file_format(f, src.format, sft) for f in files}
        if src.format == "auto" and len(formats) > 1:
            raise DataError(
                f"data source {src.uri!r} mixes file formats {sorted(formats)}; "
                "use one glob per format or set `format`"
            )
        out.append(Source(src.uri, src.weight, formats.pop(), src.text_field, tuple(files)))
    return out


def _open_text(path: str) -> str:
    data = storage.read_bytes(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None


def _jsonl_rows(path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(_open_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{n}: not a JSON line ({e.msg}); is this really JSONL?"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _parquet_table(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(path)))
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None


def _read_documents(path: str, source: Source) -> list[Any]:
    """A file's documents: str (text), list[int] (pre-tokenised) or dict (chat rows)."""
    try:
        if source.format == "text":
            return [_open_text(path)]
        if source.format == "jsonl":
            field = source.text_field
            docs = []
            for n, row in enumerate(_jsonl_rows(path), 1):
                if not isinstance(row.get(field), str):
                    raise DataError(
                        f"{path}: row {n} has no string field {field!r} (keys: {sorted(row)})"
                    )
                docs.append(row[field])
            return docs
        if source.format == "chat":
            if path.endswith(".parquet"):
                return _parquet_table(path).to_pylist()
            return _jsonl_rows(path)
        table = _parquet_table(path)
        if "input_ids" in table.column_names:
            return [list(map(int, ids)) for ids in table.column("input_ids").to_pylist()]
        if source.text_field not in table.column_names:
            raise DataError(
                f"{path}: no column {source.text_field!r} or 'input_ids' (columns: {table.column_names})"
            )
        return [t for t in table.column(source.text_field).to_pylist() if t is not None]
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"data file {path} disappeared: {e}") from None
    except OSError as e:
        # Network and permission errors: reported as I/O (a retry may help).
        raise OSError(f"cannot read data file {path}: {e}") from e


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class _SourceStream:
    """One source's documents for this process, epoch after epoch, in a seeded order."""

    def __init__(
        self, source: Source, index: int, seed: int, process_index: int, process_count: int
    ):
        self.source, self.index, self.seed = source, index, seed
        self.pi, self.pc = process_index, process_count
        # Enough files: each process owns whole files. Otherwise each owns every pc-th document.
        self.by_file = len(source.files) >= process_count
        self.files = source.files[process_index::process_count] if self.by_file else source.files
        self.epoch = self.file_pos = self.doc_pos = 0
        self.drawn = 0.0  # tokens (packing) or examples (SFT), for weighted mixing
        self._docs_in_epoch = 0
        self._cache: tuple[str, list[Any]] | None = None
        self._perm: tuple[tuple[int, ...], np.ndarray] | None = None
        self._file_order: tuple[int, np.ndarray] | None = None

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "file_pos": self.file_pos, "doc_pos": self.doc_pos,
                "drawn": self.drawn, "docs_in_epoch": self._docs_in_epoch}  # fmt: skip

    def restore(self, s: dict[str, Any]) -> None:
        self.epoch, self.file_pos, self.doc_pos = s["epoch"], s["file_pos"], s["doc_pos"]
        self.drawn, self._docs_in_epoch = s["drawn"], s["docs_in_epoch"]

    def _docs(self, path: str) -> list[Any]:
        if self._cache is None or self._cache[0] != path:
            docs = _read_documents(path, self.source)
            self._cache = (path, docs if self.by_file else docs[self.pi :: self.pc])
            # One line per file opened (files are large shards, so this is rare): which host
            # reads which shard is the first question when hosts disagree or one lags.
            log.info(
                "reader %d of %d reads %s (%s)", self.pi, self.pc, path,
                f"{len(docs)} documents" if self.by_file
                else f"documents {self.pi}::{self.pc} of {len(docs)}",
            )  # fmt: skip
        return self._cache[1]

    def _order(self, *key: int, n: int) -> np.ndarray:
        # Cached: recomputing a permutation per document would be quadratic in the file size.
        if self._perm is None or self._perm[0] != (*key, n):
            self._perm = ((*key, n), _rng(self.seed, self.index, *key).permutation(n))
        return self._perm[1]

    def next(self) -> Any:
        while True:
            if self._file_order is None or self._file_order[0] != self.epoch:
                self._file_order = (
                    self.epoch,
                    _rng(self.seed, self.index, self.epoch).permutation(len(self.files)),
                )
            order = self._file_order[1]
            if self.file_pos >= len(order):
                if self._docs_in_epoch == 0:
                    raise DataError(
                        f"data source {self.source.uri!r} is empty"
                        + (f" for process {self.pi} of {self.pc}" if self.pc > 1 else "")
                    )
                self.epoch, self.file_pos, self.doc_pos, self._docs_in_epoch = (
                    self.epoch + 1,
                    0,
                    0,
                    0,
                )
                continue
            docs = self._docs(self.files[order[self.file_pos]])
            doc_order = self._order(self.epoch, self.file_pos, n=len(docs))
            if self.doc_pos >= len(docs):
                self.file_pos, self.doc_pos = self.file_pos + 1, 0
                continue
            doc = docs[doc_order[self.doc_pos]]
            self.doc_pos += 1
            self._docs_in_epoch += 1
            return doc


def _pick(streams: Sequence[_SourceStream]) -> _SourceStream:
    """The source furthest behind its weight share (ties → the first)."""
    return min(streams, key=lambda s: (s.drawn / s.source.weight, s.index))


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


class _Loader:
    """Shared plumbing: streams, the grain-compatible state protocol, batching."""

    kind = "base"

    def __init__(
        self,
        sources: Sequence[Source],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len} must be ≥ 1 and ≥ 2")
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.seed = seed
        self.streams = [
            _SourceStream(s, i, seed, process_index, process_count) for i, s in enumerate(sources)
        ]
        self.rows = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows = [self._row() for _ in range(self.batch_size)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _row(self) -> Batch:
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _restore_extra(self, state: dict[str, Any]) -> None:
        pass

    def get_state(self) -> bytes:
        state = {"version": _STATE_VERSION, "kind": self.kind, "rows": self.rows,
                 "sources": [s.state() for s in self.streams], **self._extra_state()}  # fmt: skip
        return json.dumps(state).encode()

    def set_state(self, state: bytes | str | dict[str, Any]) -> None:
        state = _decoded_state(state, self.kind)
        if len(state["sources"]) != len(self.streams):
            raise ValueError(
                f"data state has {len(state['sources'])} sources but the stage has {len(self.streams)}; "
                "the data list changed since the checkpoint"
            )
        for stream, s in zip(self.streams, state["sources"], strict=True):
            stream.restore(s)
        self.rows = state["rows"]
        self._restore_extra(state)

    def start_prefetch(self) -> None:  # grain's CheckpointHandler calls this after restoring
        pass


class PackedLoader(_Loader):
    """Pre/mid-training rows: documents + eos concatenated and cut every seq_len tokens.

    Packed rows are then drawn at random from a buffer of `shuffle_rows` rows (seeded by the row
    number, so the order is reproducible and resumable): without it a long module fills many
    consecutive rows, and a small batch sees pieces of one file step after step.
    """

    kind = "packed"

    def __init__(self, *args: Any, shuffle_rows: int = 64, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if shuffle_rows < 0:
            raise ValueError(f"shuffle_rows={shuffle_rows} must be ≥ 0")
        self.carry: list[int] = []
        self.shuffle_rows = shuffle_rows
        self.buffer: list[Batch] = []

    def _tokens(self, doc: Any) -> list[int]:
        ids = doc if isinstance(doc, list) else self.tokenizer.encode(doc)
        return [*ids, self.tokenizer.eos_id] if ids else []

    def _row(self) -> Batch:
        if self.shuffle_rows <= 1:
            row = self._packed_row()
        else:
            while len(self.buffer) < self.shuffle_rows:
                self.buffer.append(self._packed_row())
            i = int(_rng(self.seed, 0x5EED, self.rows).integers(len(self.buffer)))
            row, self.buffer[i] = self.buffer[i], self.buffer[-1]
            self.buffer.pop()
        self.rows += 1
        return row

    def _packed_row(self) -> Batch:
        L = self.seq_len
        tokens = np.empty(L, np.int32)
        segment_ids = np.empty(L, np.int32)
        positions = np.empty(L, np.int32)
        filled, segment = 0, 0
        while filled < L:
            while not self.carry:
                stream = _pick(self.streams)
                self.carry = self._tokens(stream.next())
                stream.drawn += len(self.carry)
            n = min(L - filled, len(self.carry))
            segment += 1
            tokens[filled : filled + n] = self.carry[:n]
            segment_ids[filled : filled + n] = segment
            positions[filled : filled + n] = np.arange(n)
            self.carry = self.carry[n:]
            filled += n
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def _extra_state(self) -> dict[str, Any]:
        buffer = [{k: v.tolist() for k, v in row.items()} for row in self.buffer]
        return {"carry": self.carry, "buffer": buffer}

    def _restore_extra(self, state: dict[str, Any]) -> None:
        self.carry = list(state["carry"])
        self.buffer = [
            {k: np.asarray(v, np.int32) for k, v in row.items()} for row in state.get("buffer", [])
        ]


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Chat rows (`messages`) or instruction rows (`instruction`[, `input`], `output`)."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise DataError(
                f"{where}: `messages` must be a non-empty list of {{role, content}} objects"
            )
        return msgs
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": row["output"]},
        ]
    raise DataError(
        f"{where}: an SFT row needs `messages` or `instruction` and `output` (keys: {sorted(row)})"
    )


def build_sft_example(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    seq_len: int,
    over_length: Literal["drop", "truncate"] = "drop",
    prompt_span: PromptSpan = "assistant-role",
) -> dict[str, np.ndarray] | None:
    """One SFT row, or None if it is dropped for length.

    The prompt is every message before the last, rendered through the generation prompt
    `<|im_start|>assistant\\n`; the answer is the last (assistant) message's text plus
    `<|im_end|>`; pads follow. `prompt_mask` (unmaskable) covers the prompt through
    `<|im_start|>assistant` (`assistant-role`, the release's span: the newline is maskable) or the
    whole generation prompt (`generation-prompt`). `truncate` cuts the answer at seq_len (a prompt
    that alone fills the row leaves nothing to learn and is dropped either way).
    """
    if messages[-1].get("role") != "assistant":
        raise DataError(
            f"the last message must be the assistant's answer, got role {messages[-1].get('role')!r}"
        )
    prompt = tokenizer.chat_ids(list(messages[:-1]), add_generation_prompt=True)
    answer = [*tokenizer.encode(messages[-1]["content"]), tokenizer.im_end_id]
    if len(prompt) + len(answer) > seq_len:
        if over_length == "drop" or len(prompt) >= seq_len:
            return None
        answer = answer[: seq_len - len(prompt)]
    n = len(prompt) + len(answer)
    tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
    tokens[:n] = prompt + answer
    prompt_mask = np.zeros(seq_len, bool)
    prompt_mask[: _unmaskable_len(tokenizer, prompt, prompt_span)] = True
    return {
        "tokens": tokens,
        "segment_ids": np.ones(seq_len, np.int32),  # pads stay in the loss (see module doc)
        "positions": np.arange(seq_len, dtype=np.int32),
        "prompt_mask": prompt_mask,
    }


def _unmaskable_len(tokenizer: Tokenizer, prompt: list[int], prompt_span: PromptSpan) -> int:
    """How many leading prompt tokens stay unmaskable (see `build_sft_example`)."""
    if prompt_span == "generation-prompt":
        return len(prompt)
    # The rendered prompt ends with "assistant\n"; both the Qwen3 and the project tokenizer give
    # the newline its own token there, so dropping it leaves exactly `...<|im_start|>assistant`.
    newline = tokenizer.encode("\n")
    if prompt[-len(newline) :] != newline:
        raise DataError(
            "sft.prompt_span=assistant-role: this tokenizer merges the newline after "
            "`<|im_start|>assistant` into another token; use sft.prompt_span=generation-prompt"
        )
    return len(prompt) - len(newline)


class SFTLoader(_Loader):
    """SFT rows: one (prompt, answer) example per row, padded."""

    kind = "sft"
    max_consecutive_drops = 10_000

    def __init__(
        self,
        *args: Any,
        over_length: Literal["drop", "truncate"] = "drop",
        prompt_span: PromptSpan = "assistant-role",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.over_length = over_length
        self.prompt_span = prompt_span
        self.dropped = 0

    def _row(self) -> Batch:
        for _ in range(self.max_consecutive_drops):
            stream = _pick(self.streams)
            row = stream.next()
            stream.drawn += 1
            where = f"{stream.source.uri} (epoch {stream.epoch})"
            if not isinstance(row, dict):
                raise DataError(
                    f"{where}: SFT data must be chat/instruction rows, got {type(row).__name__}"
                )
            example = build_sft_example(
                self.tokenizer,
                _messages(row, where),
                self.seq_len,
                self.over_length,
                self.prompt_span,
            )
            if example is not None:
                self.rows += 1
                return example
            self.dropped += 1
        raise DataError(
            f"{self.max_consecutive_drops} consecutive SFT examples were longer than seq_len="
            f"{self.seq_len} and dropped; raise seq_len or set sft.over_length=truncate"
        )

    def _extra_state(self) -> dict[str, Any]:
        return {"dropped": self.dropped}

    def _restore_extra(self, state: dict[str, Any]) -> None:
        self.dropped = state["dropped"]


def _decoded_state(state: bytes | str | dict[str, Any], kind: str) -> dict[str, Any]:
    """A loader state as a dict, refused when it was written by another loader kind or version."""
    if not isinstance(state, dict):
        state = json.loads(state)
    if state.get("version") != _STATE_VERSION or state.get("kind") != kind:
        raise ValueError(
            f"data state {state.get('kind')}/v{state.get('version')} is not {kind}/v{_STATE_VERSION}"
        )
    return state


class ReaderGroup:
    """Several data readers in one process: their rows, concatenated in reader order, are this
    process's share of the global batch.

    Reader j of R reads what process j of R processes would read with one reader each (whole files
    round-robin, or every R-th document), so a global batch built from R readers is the same
    whether one process runs all of them or R/P processes run R/P each. The state is the list of
    the readers' states.
    """

    kind = "readers"

    def __init__(self, readers: Sequence[_Loader], first: int):
        self.readers, self.first = list(readers), first

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        parts = [next(r) for r in self.readers]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        state = {"version": _STATE_VERSION, "kind": self.kind, "first": self.first,
                 "readers": [json.loads(r.get_state()) for r in self.readers]}  # fmt: skip
        return json.dumps(state).encode()

    def set_state(self, state: bytes | str | dict[str, Any]) -> None:
        state = _decoded_state(state, self.kind)
        if (state["first"], len(state["readers"])) != (self.first, len(self.readers)):
            raise ValueError(
                f"data state holds readers {state['first']}.. ({len(state['readers'])}) but this "
                f"process runs readers {self.first}.. ({len(self.readers)}); batch.readers or the "
                "number of processes changed since the checkpoint"
            )
        for reader, s in zip(self.readers, state["readers"], strict=True):
            reader.set_state(s)

    def start_prefetch(self) -> None:  # grain's CheckpointHandler calls this after restoring
        pass


def batch_fields(kind: str) -> dict[str, np.dtype]:
    """Name → dtype of the (rows, seq_len) arrays a loader of stage `kind` yields per batch."""
    fields = {"tokens": np.dtype(np.int32), "segment_ids": np.dtype(np.int32),
              "positions": np.dtype(np.int32)}  # fmt: skip
    if kind == "sft":
        fields["prompt_mask"] = np.dtype(bool)
    return fields


def make_loader(
    data: Sequence[DataSource],
    tokenizer: Tokenizer,
    *,
    kind: str,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    readers: int | None = None,
    over_length: Literal["drop", "truncate"] = "drop",
    prompt_span: PromptSpan = "assistant-role",
    shuffle_rows: int = 64,
) -> PackedLoader | SFTLoader | ReaderGroup:
    """The loader for a stage kind; `batch_size` is this process's share of the global batch.

    `readers` (default: one per process) is the number of readers over the whole job; this process
    runs readers `process_index*readers/process_count` .. and concatenates their rows.
    """
    sft = kind == "sft"
    sources = resolve_sources(data, sft=sft)
    readers = readers or process_count
    if readers % process_count or batch_size % (readers // process_count):
        raise ValueError(
            f"{readers} data readers cannot be split over {process_count} processes of "
            f"{batch_size} rows each"
        )
    per_process = readers // process_count

    def reader(index: int, rows: int) -> PackedLoader | SFTLoader:
        common = dict(batch_size=rows, seq_len=seq_len, seed=seed,
                      process_index=index, process_count=readers)  # fmt: skip
        if sft:
            return SFTLoader(
                sources, tokenizer, over_length=over_length, prompt_span=prompt_span, **common
            )
        return PackedLoader(sources, tokenizer, shuffle_rows=shuffle_rows, **common)

    if per_process == 1:  # one reader per process: its plain loader (and state format)
        return reader(process_index, batch_size)
    first = process_index * per_process
    rows = batch_size // per_process
    return ReaderGroup([reader(first + i, rows) for i in range(per_process)], first)


def validate_sources(
    data: Sequence[DataSource],
    tokenizer: Tokenizer,
    *,
    kind: str,
    seq_len: int,
    over_length: Literal["drop", "truncate"] = "drop",
    prompt_span: PromptSpan = "assistant-role",
    probe: int = 64,
) -> None:
    """Cheap pre-flight checks, before any device work: every source lists files, its first file
    reads in its format, and it yields a usable document (SFT: one that fits seq_len among the first
    `probe`). Raises DataError with the source and file named."""
    for source in resolve_sources(data, sft=kind == "sft"):
        usable = False
        for path in source.files:
            docs = _read_documents(path, source)
            if kind != "sft":
                usable = any(
                    (isinstance(d, list) and d) or (isinstance(d, str) and d.strip()) for d in docs
                )
            else:
                for n, row in enumerate(docs[:probe], 1):
                    if not isinstance(row, dict):
                        raise DataError(f"{path}: SFT data must be chat/instruction rows")
                    ex = build_sft_example(
                        tokenizer,
                        _messages(row, f"{path}: row {n}"),
                        seq_len,
                        over_length,
                        prompt_span,
                    )
                    usable = usable or ex is not None
                if docs and not usable:
                    raise DataError(
                        f"{path}: none of the first {min(probe, len(docs))} SFT examples fits "
                        f"seq_len={seq_len}; raise seq_len or set sft.over_length=truncate"
                    )
            if usable:
                break
        if not usable:
            raise DataError(
                f"data source {source.uri!r} is empty (no documents in {len(source.files)} file(s))"
            )


# --------------------------------------------------------------------------------------------------
# Background prefetch
# --------------------------------------------------------------------------------------------------


class Prefetch:
    """Builds the next batches on a thread; the state is that of the last batch handed out.

    Each queued batch travels with the loader state right after it was built, so checkpointing a
    prefetching loader stays exact.
    """

    def __init__(self, loader: _Loader, depth: int = 2):
        self.loader, self.depth = loader, depth
        self._state = loader.get_state()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _work(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = (next(self.loader), self.loader.get_state())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer
            while not stop.is_set():
                try:
                    q.put(e, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def start_prefetch(self) -> None:
        self.close()
        # The stopped worker may have built batches nobody consumed: rewind to the consumed state.
        self.loader.set_state(self._state)
        self._stop = threading.Event()
        self._queue = queue.Queue(self.depth)
        self._thread = threading.Thread(
            target=self._work, args=(self._queue, self._stop), daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self.start_prefetch()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, state: bytes | str | dict[str, Any]) -> None:
        self.close()
        self.loader.set_state(state)
        self._state = self.loader.get_state()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None
