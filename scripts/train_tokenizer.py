"""Train the project's default tokenizer on Python's standard library and write its files.

    .venv/bin/python scripts/train_tokenizer.py            # → trainer/coda_trainer/assets/tokenizer

A byte-level BPE with Qwen2's pre-tokenizer split (no normalizer, so any text round-trips exactly),
4096 ids in all, and the chat special tokens at fixed ids 0-3, the ids `config.PROJECT_TOKENIZER_IDS`
hard-codes. The corpus is a fixed half of the stdlib's non-test `*.py` files, chosen by a hash of each
file's relative path (so a file's membership does not depend on which other files exist), read in
sorted order. Output is deterministic: the same Python stdlib gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from coda_trainer.config import PROJECT_TOKENIZER_IDS, PROJECT_VOCAB_SIZE  # noqa: E402
from coda_trainer.tokenizer import byte_level_pipeline, load_tokenizer  # noqa: E402

# Position = id. Must agree with PROJECT_TOKENIZER_IDS (checked below and by the tests).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}
DEFAULT_QWEN3 = REPO.parent / "shared" / "data" / "qwen3-tokenizer"
DEFAULT_OUT = REPO / "trainer" / "coda_trainer" / "assets" / "tokenizer"

_IDS = {
    "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
    "bos_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
    "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    "mask_token_id": SPECIAL_TOKENS.index("<|mask|>"),
}
if _IDS != PROJECT_TOKENIZER_IDS:
    raise RuntimeError(
        f"SPECIAL_TOKENS give {_IDS}, config.PROJECT_TOKENIZER_IDS says {PROJECT_TOKENIZER_IDS}"
    )


def corpus_files(stdlib: Path, keep_per_256: int = 128) -> list[Path]:
    """Non-test `*.py` files of `stdlib` whose path hash falls in the first `keep_per_256` buckets."""
    chosen = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib).as_posix()
        if SKIP_DIRS & set(rel.split("/")):
            continue
        if hashlib.sha256(rel.encode()).digest()[0] < keep_per_256:
            chosen.append((rel, path))
    return [path for _, path in sorted(chosen)]


def read_texts(files: Iterable[Path]) -> list[str]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:  # a few stdlib files are Latin-1; leave them out
            continue
    return texts


def train(texts: Iterable[str], vocab_size: int = PROJECT_VOCAB_SIZE) -> Tokenizer:
    tokenizer = byte_level_pipeline(Tokenizer(models.BPE()), nfc=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, seen or not, so every string can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"trained vocab has {got} ids, expected {vocab_size}; corpus too small?")
    return tokenizer


def tokenizer_config(chat_template: str, max_length: int) -> dict:
    """A tokenizer_config.json that Hugging Face loaders understand, with CoDA's chat template."""
    decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": chat_template,
    }


README = """\
# Project tokenizer

The default tokenizer of coda's embedded pipeline (model preset `coda-tiny`). Made by

    .venv/bin/python scripts/train_tokenizer.py

which trains a byte-level BPE with the `tokenizers` library (BpeTrainer; Qwen2's pre-tokenizer split
pattern, then byte-level; no normalizer) on {n_files} non-test `*.py` files of the Python {py}
standard library (a fixed half chosen by a hash of each relative path, {mb:.1f} MB). The output is
deterministic for a given stdlib.

- `tokenizer.json`: {vocab} ids; `<|endoftext|>`=0 (pad, bos), `<|im_start|>`=1, `<|im_end|>`=2 (eos),
  `<|mask|>`=3, then the 256 byte symbols and the learned merges.
- `tokenizer_config.json`: special tokens and `chat_template`, which is the template of CoDA's
  released tokenizer (Qwen3's, Apache-2.0, from `shared/data/qwen3-tokenizer/tokenizer_config.json`),
  so Hugging Face tools render chats as `coda_trainer.tokenizer` does.

Load it with `coda_trainer.tokenizer.load_tokenizer("project")`.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--chat-template-from",
        type=Path,
        default=DEFAULT_QWEN3,
        help="folder whose tokenizer_config.json supplies chat_template (CoDA's Qwen3 files)",
    )
    args = parser.parse_args(argv)

    config_path = args.chat_template_from / "tokenizer_config.json"
    if not config_path.exists():
        sys.exit(f"error: {config_path} not found (needed for the chat template)")
    chat_template = json.loads(config_path.read_text())["chat_template"]

    files = corpus_files(Path(sysconfig.get_paths()["stdlib"]))
    texts = read_texts(files)
    tokenizer = train(texts)

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=False)
    config = tokenizer_config(chat_template, max_length=4096)
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "README.md").write_text(
        README.format(
            n_files=len(texts),
            py=platform.python_version(),
            mb=sum(len(t.encode()) for t in texts) / 1e6,
            vocab=PROJECT_VOCAB_SIZE,
        )
    )
    loaded = load_tokenizer(str(args.out))  # the files must load and carry the fixed ids
    if (loaded.pad_id, loaded.im_start_id, loaded.eos_id, loaded.mask_id) != (0, 1, 2, 3):
        raise RuntimeError(f"{args.out}: special ids moved; got {loaded!r}")
    print(f"wrote {args.out} ({len(texts)} files, vocab {loaded.vocab_size})")


if __name__ == "__main__":
    main()
