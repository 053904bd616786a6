"""Tokenizers for coda: a Hugging Face tokenizer folder (local or gs://) or the project's own.

Everything runs offline on the `tokenizers` library. A folder either has a `tokenizer.json`, or only
`vocab.json` + `merges.txt` (+ added tokens), as the Qwen3 files shipped with CoDA do; the latter is
rebuilt as the byte-level BPE that transformers' `Qwen2Tokenizer` builds (NFC, Qwen2's split
pattern, byte-level pre-tokenizer and decoder), so ids agree with the Hugging Face tokenizer.

The chat format is rendered in Python rather than by running the Jinja `chat_template`: it is the
subset of CoDA's released template (Qwen3's) for system/user/assistant messages, and the tests pin
it against the Jinja rendering. Note what that template does, and what we therefore do too:
- a final assistant message that answers the last user turn gets an empty reasoning block,
  `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{content}<|im_end|>\\n`; earlier assistant
  turns are rendered plainly, and `<think>...</think>` inside them is dropped;
- the generation prompt is `<|im_start|>assistant\\n` (thinking left at its default); with
  `enable_thinking=False` an empty `<think>\\n\\n</think>\\n\\n` follows it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from coda_trainer import storage

__all__ = [
    "PROJECT",
    "QWEN2_SPLIT_PATTERN",
    "SPECIAL_TOKENS",
    "CodaTokenizer",
    "byte_level_pipeline",
    "load_tokenizer",
    "project_tokenizer_dir",
]

PROJECT = "project"

# Qwen2/Qwen3's pre-tokenizer pattern (the `PRETOKENIZE_REGEX` of transformers' Qwen2Tokenizer):
# contractions, letters with one leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Role → token content. bos is `<|endoftext|>` as in Qwen3's config.json (bos_token_id 151643).
SPECIAL_TOKENS = {
    "mask": "<|mask|>",
    "pad": "<|endoftext|>",
    "bos": "<|endoftext|>",
    "eos": "<|im_end|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}

_ROLES = ("system", "user", "assistant")


def _is_tool_response(message: dict[str, Any]) -> bool:
    c = message["content"]
    return c.startswith("<tool_response>") and c.endswith("</tool_response>")


def project_tokenizer_dir() -> Path:
    """The committed project tokenizer (package data)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def byte_level_pipeline(tokenizer: Tokenizer, *, nfc: bool) -> Tokenizer:
    """Give `tokenizer` Qwen2's pre-tokenization and byte-level decoding (in place, returned)."""
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class CodaTokenizer:
    """A `tokenizers.Tokenizer` with coda's special ids and chat format."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None, source: str = ""):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source = source or "<in memory>"
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = {role: self._special_id(role, content) for role, content in SPECIAL_TOKENS.items()}
        self.mask_id: int = ids["mask"]
        self.pad_id: int = ids["pad"]
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.im_start_id: int = ids["im_start"]
        self.im_end_id: int = ids["im_end"]

    def _special_id(self, role: str, content: str) -> int:
        token_id = self.tokenizer.token_to_id(content)
        if token_id is None:
            raise ValueError(f"tokenizer {self.source} has no {content!r} token (needed as {role})")
        # A special that is only a vocab entry would be split when it appears in text (chat_ids).
        if self.tokenizer.encode(content, add_special_tokens=False).ids != [token_id]:
            raise ValueError(
                f"tokenizer {self.source}: {content!r} (id {token_id}) is not an added token, "
                "so text containing it would not encode to its id"
            )
        return token_id

    def __repr__(self) -> str:
        return f"CodaTokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # ---- text ↔ ids ----

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no bos/eos added. Special-token text (e.g. `<|im_end|>`) maps to its id."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() accepts numpy/JAX scalars, which the Rust binding rejects.
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))

    # ---- chat ----

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        enable_thinking: bool | None = None,
    ) -> str:
        """Render `messages` ({"role", "content"}) as CoDA's released chat template does."""
        for i, m in enumerate(messages):
            if m.get("role") not in _ROLES:
                raise ValueError(
                    f"message {i}: role {m.get('role')!r} not supported; use one of {_ROLES}"
                )
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: content must be a string")
        # The template's "last query": the last user turn that is not a wrapped tool response.
        last_user = max(
            (i for i, m in enumerate(messages) if m["role"] == "user" and not _is_tool_response(m)),
            default=len(messages) - 1,
        )
        parts = []
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role != "assistant":
                parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
                continue
            reasoning = ""
            if "</think>" in content:
                reasoning = (
                    content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                )
                content = content.split("</think>")[-1].lstrip("\n")
            if i > last_user and (i == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                body = f"<think>\n{reasoning}\n</think>\n\n{content}"
            else:
                body = content
            parts.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
            if enable_thinking is False:
                parts.append("<think>\n\n</think>\n\n")
        return "".join(parts)

    def chat_ids(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        text = self.apply_chat_template(
            messages, add_generation_prompt, enable_thinking=enable_thinking
        )
        return self.encode(text)

    # ---- consistency with a model ----

    def check_model(self, model_config: Any) -> None:
        """Raise ValueError if `model_config` (a ModelConfig) cannot be used with this tokenizer.

        The model's vocabulary may be larger (it is padded, e.g. 151936 for Qwen3's 151670 tokens);
        the special ids must be the same.
        """
        problems = []
        if self.vocab_size > model_config.vocab_size:
            problems.append(
                f"tokenizer vocab_size={self.vocab_size} > model vocab_size={model_config.vocab_size}"
            )
        for role, field in (
            ("mask", "mask_token_id"),
            ("pad", "pad_token_id"),
            ("eos", "eos_token_id"),
            ("bos", "bos_token_id"),
        ):
            ours, theirs = getattr(self, f"{role}_id"), getattr(model_config, field)
            if ours != theirs:
                problems.append(
                    f"tokenizer {SPECIAL_TOKENS[role]}={ours} but model {field}={theirs}"
                )
        if problems:
            raise ValueError(
                f"tokenizer {self.source} does not match the model config: " + "; ".join(problems)
            )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_json(folder: str, name: str) -> Any:
    uri = storage.join(folder, name)
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri} is not valid JSON: {e}") from None


def _bpe_from_vocab_merges(folder: str) -> Tokenizer:
    vocab = _read_json(folder, "vocab.json")
    merges = []
    merges_uri = storage.join(folder, "merges.txt")
    for n, line in enumerate(storage.read_text(merges_uri).splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(
                f"{merges_uri}:{n}: expected two tokens separated by a space, got {line!r}"
            )
        merges.append((pair[0], pair[1]))
    bpe = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    return byte_level_pipeline(Tokenizer(bpe), nfc=True)


def _added_tokens(
    folder: str, files: set[str], config: dict[str, Any]
) -> list[tuple[int, AddedToken]]:
    """(id, token) for every added token, from tokenizer_config.json or added_tokens.json."""
    if "added_tokens_decoder" in config:
        return sorted(
            (
                int(i),
                AddedToken(
                    t["content"],
                    single_word=t.get("single_word", False),
                    lstrip=t.get("lstrip", False),
                    rstrip=t.get("rstrip", False),
                    normalized=t.get("normalized", False),
                    special=t.get("special", True),
                ),
            )
            for i, t in config["added_tokens_decoder"].items()
        )
    if "added_tokens.json" not in files:
        return []
    specials: set[str] = set()
    if "special_tokens_map.json" in files:
        for value in _read_json(folder, "special_tokens_map.json").values():
            for v in value if isinstance(value, list) else [value]:
                specials.add(v["content"] if isinstance(v, dict) else v)
    return sorted(
        (int(i), AddedToken(content, normalized=False, special=not specials or content in specials))
        for content, i in _read_json(folder, "added_tokens.json").items()
    )


def load_tokenizer(path: str = PROJECT) -> CodaTokenizer:
    """Load a Hugging Face tokenizer folder (local path or gs://), or "project" for the built-in one."""
    folder = str(project_tokenizer_dir()) if path == PROJECT else path.rstrip("/")
    files = set(storage.listdir(folder))
    if not files:
        raise FileNotFoundError(f"no tokenizer folder at {folder} (missing or empty)")
    config = _read_json(folder, "tokenizer_config.json") if "tokenizer_config.json" in files else {}
    if "tokenizer.json" in files:
        tokenizer = Tokenizer.from_str(storage.read_text(storage.join(folder, "tokenizer.json")))
    elif {"vocab.json", "merges.txt"} <= files:
        tokenizer = _bpe_from_vocab_merges(folder)
    else:
        raise FileNotFoundError(
            f"{folder} has neither tokenizer.json nor vocab.json + merges.txt (found: {sorted(files)})"
        )
    # In id order, so each new token takes the next free id; a token already present keeps its id.
    for token_id, token in _added_tokens(folder, files, config):
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(token.content)
        if got != token_id:
            raise ValueError(
                f"{folder}: added token {token.content!r} declared with id {token_id} got id {got}; "
                "are the vocab and the added-token ids from the same tokenizer?"
            )
    return CodaTokenizer(tokenizer, chat_template=config.get("chat_template"), source=path)
