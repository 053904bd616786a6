"""coda_trainer.tokenizer against Hugging Face transformers, and the committed project tokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sysconfig
import unicodedata
from pathlib import Path

import pytest
from coda_trainer.config import PROJECT_TOKENIZER_IDS, PROJECT_VOCAB_SIZE, ModelConfig
from coda_trainer.tokenizer import load_tokenizer, project_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]
QWEN3_DIR = (REPO / ".." / "shared" / "data" / "qwen3-tokenizer").resolve()
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# ~1000 lines of ordinary stdlib code (prose, regexes, string escapes, numbers).
CODE_FILES = ["textwrap.py", "colorsys.py", "json/decoder.py"]
# Cases byte-level BPE and the pre-tokenizer split get wrong when they differ: non-ASCII letters and
# digits, a combining accent that NFC composes, CRLF, runs of spaces, contractions, emoji, special
# tokens inside text and an unknown `<|...|>` that must be split.
TRICKY = [
    "café naïve Ünïcödé, 東京都 123456789 ١٢٣",
    "e\u0301 vs \u00e9; Å vs A\u030a",
    "line1\r\nline2\n\n\n    indented\t\ttabs   trailing   ",
    "I'm we'll they'RE DON'T it's IT'Set",
    "emoji 🤖🚀 and ZWJ 👩‍💻",
    "<|im_start|>user\nhi<|im_end|>\n<|mask|><|mask|> <|endoftext|> <|not_special|><think>a</think>",
    "",
]


@pytest.fixture(scope="module")
def qwen3():
    if not (QWEN3_DIR / "vocab.json").exists():
        pytest.fail(f"shared Qwen3 tokenizer files missing at {QWEN3_DIR}")
    return load_tokenizer(str(QWEN3_DIR))


@pytest.fixture(scope="module")
def hf_qwen2():
    from transformers import Qwen2Tokenizer

    # transformers 5 builds Qwen2Tokenizer on the `tokenizers` backend from vocab.json + merges.txt
    # when the folder has no tokenizer.json; local_files_only keeps it off the network.
    return Qwen2Tokenizer.from_pretrained(str(QWEN3_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def project():
    return load_tokenizer()


@pytest.fixture(scope="module")
def code_texts():
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CODE_FILES]


# ---- Qwen3 files: identical to transformers' Qwen2Tokenizer ----


def test_qwen3_encodes_stdlib_code_like_transformers(qwen3, hf_qwen2, code_texts):
    assert sum(t.count("\n") for t in code_texts) > 300
    for text in code_texts:
        ids = qwen3.encode(text)
        assert ids == hf_qwen2.encode(text, add_special_tokens=False)
        assert qwen3.decode(ids) == hf_qwen2.decode(ids) == text
    lines = [line for t in code_texts for line in t.splitlines(keepends=True)]
    assert qwen3.encode_batch(lines) == hf_qwen2(lines, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TRICKY)
def test_qwen3_tricky_strings_like_transformers(qwen3, hf_qwen2, text):
    ids = qwen3.encode(text)
    assert ids == hf_qwen2.encode(text, add_special_tokens=False)
    assert qwen3.decode(ids) == hf_qwen2.decode(ids) == unicodedata.normalize("NFC", text)
    assert qwen3.decode(ids, skip_special_tokens=True) == hf_qwen2.decode(
        ids, skip_special_tokens=True
    )


def test_qwen3_special_ids(qwen3, hf_qwen2):
    assert (qwen3.mask_id, qwen3.pad_id, qwen3.eos_id, qwen3.im_start_id, qwen3.im_end_id) == (
        151669,
        151643,
        151645,
        151644,
        151645,
    )
    assert qwen3.bos_id == 151643  # Qwen3's config.json bos_token_id
    assert (qwen3.mask_id, qwen3.pad_id, qwen3.eos_id) == (
        hf_qwen2.mask_token_id,
        hf_qwen2.pad_token_id,
        hf_qwen2.eos_token_id,
    )
    assert qwen3.vocab_size == len(hf_qwen2) == 151670
    assert qwen3.encode("<|mask|>") == [151669]
    qwen3.check_model(ModelConfig.preset("coda-1.7b"))


def test_vocab_merges_with_added_tokens_json_only(tmp_path, qwen3):
    """Without tokenizer_config.json the added tokens come from added_tokens.json."""
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        (tmp_path / name).symlink_to(QWEN3_DIR / name)
    tok = load_tokenizer(str(tmp_path))
    text = TRICKY[5]
    assert tok.encode(text) == qwen3.encode(text)
    assert tok.mask_id == 151669 and tok.vocab_size == 151670
    # `<think>` is not in special_tokens_map.json, so it stays when specials are skipped.
    ids = tok.encode("<|im_start|><think>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>"


# ---- chat template: ours equals the released Jinja template rendered by transformers ----

SYS = {"role": "system", "content": "You are a careful Python programmer."}
USER = {"role": "user", "content": "Write `add(a, b)`.\nKeep it short."}
ASSISTANT = {"role": "assistant", "content": "def add(a, b):\n    return a + b"}
CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYS, USER],
    "system_user_assistant": [SYS, USER, ASSISTANT],
    "user_assistant": [USER, ASSISTANT],
    "multi_turn": [
        SYS,
        USER,
        {"role": "assistant", "content": "<think>\nsum\n</think>\n\ndef add(a, b): return a+b"},
        {"role": "user", "content": "Now subtract."},
        ASSISTANT,
    ],
    "assistant_with_reasoning": [USER, {"role": "assistant", "content": "<think>plan</think>ok"}],
    "second_system": [SYS, USER, SYS],
    "tool_response_is_not_a_query": [
        USER,
        {"role": "assistant", "content": "<think>call</think>calling"},
        {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
        ASSISTANT,
    ],
    "no_user": [SYS, ASSISTANT],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [None, False])
def test_chat_template_matches_jinja(qwen3, hf_qwen2, name, add_generation_prompt, enable_thinking):
    messages = CONVERSATIONS[name]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    want = hf_qwen2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    got = qwen3.apply_chat_template(messages, add_generation_prompt, **kwargs)
    assert got == want
    assert qwen3.chat_ids(messages, add_generation_prompt, **kwargs) == hf_qwen2.encode(
        want, add_special_tokens=False
    )


def test_chat_format_as_released(qwen3, project):
    """The release's template adds an empty think block to a final answer; pin what CoDA trains on."""
    assert qwen3.apply_chat_template([SYS, USER]) == (
        "<|im_start|>system\nYou are a careful Python programmer.<|im_end|>\n"
        "<|im_start|>user\nWrite `add(a, b)`.\nKeep it short.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert qwen3.apply_chat_template([USER, ASSISTANT], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\ndef add(a, b):\n    return a + b<|im_end|>\n"
    )
    ids = project.chat_ids([USER])
    assert ids[0] == project.im_start_id and ids.count(project.im_end_id) == 1
    assert project.decode(ids) == project.apply_chat_template([USER])
    with pytest.raises(ValueError, match="role 'tool' not supported"):
        qwen3.apply_chat_template([{"role": "tool", "content": "42"}])


# ---- the project tokenizer ----


def test_project_tokenizer_fixed_ids(project):
    assert project.vocab_size == PROJECT_VOCAB_SIZE == 4096
    assert (project.pad_id, project.bos_id, project.eos_id, project.mask_id) == (
        PROJECT_TOKENIZER_IDS["pad_token_id"],
        PROJECT_TOKENIZER_IDS["bos_token_id"],
        PROJECT_TOKENIZER_IDS["eos_token_id"],
        PROJECT_TOKENIZER_IDS["mask_token_id"],
    )
    assert (project.pad_id, project.im_start_id, project.im_end_id, project.mask_id) == (0, 1, 2, 3)
    config = json.loads((project_tokenizer_dir() / "tokenizer_config.json").read_text())
    assert config["chat_template"] == project.chat_template
    assert (
        config["chat_template"]
        == json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())["chat_template"]
    )
    size = sum(p.stat().st_size for p in project_tokenizer_dir().iterdir())
    assert size < 1_000_000


def test_project_tokenizer_round_trips_exactly(project, code_texts):
    every_byte = bytes(range(256)).decode("latin-1")
    for text in [*code_texts, *TRICKY, every_byte]:
        ids = project.encode(text)
        assert project.decode(ids) == text  # no normalizer: exact, even for non-NFC text
        assert max(ids, default=0) < project.vocab_size
    # It learned code: well under one token per 3 characters of stdlib source.
    assert len(project.encode(code_texts[0])) < len(code_texts[0]) / 3


def test_check_model_names_both_sides(project):
    project.check_model(ModelConfig.preset("coda-tiny"))
    with pytest.raises(ValueError) as err:
        project.check_model(ModelConfig.preset("coda-1.7b"))
    msg = str(err.value)
    assert "<|mask|>=3 but model mask_token_id=151669" in msg
    assert "<|endoftext|>=0 but model pad_token_id=151643" in msg
    assert "<|im_end|>=2 but model eos_token_id=151645" in msg
    bigger = project.vocab_size + 1
    small = ModelConfig.preset("coda-tiny", vocab_size=bigger - 2)
    with pytest.raises(
        ValueError, match=f"tokenizer vocab_size={bigger - 1} > model vocab_size={bigger - 2}"
    ):
        project.check_model(small)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        load_tokenizer(str(tmp_path / "absent"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"neither tokenizer.json nor vocab.json \+ merges.txt"
    ):
        load_tokenizer(str(tmp_path))
    shutil.copy(project_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mask|>"]
    del data["model"]["vocab"]["<|mask|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no '<\|mask\|>' token \(needed as mask\)"):
        load_tokenizer(str(tmp_path))


@pytest.fixture
def gcs_bucket(monkeypatch):
    """A gs:// bucket served by gcp-storage-emulator on loopback."""
    import gcsfs
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="tokenizers")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client could point at another emulator
    try:
        yield "gs://tokenizers"
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        server.stop()


def test_load_from_gcs(gcs_bucket, qwen3):
    from coda_trainer import storage

    for path in project_tokenizer_dir().iterdir():
        storage.write_bytes(f"{gcs_bucket}/project/{path.name}", path.read_bytes())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        storage.write_bytes(f"{gcs_bucket}/qwen3/{name}", (QWEN3_DIR / name).read_bytes())
    remote = load_tokenizer(f"{gcs_bucket}/project")
    assert remote.tokenizer.to_str() == load_tokenizer().tokenizer.to_str()
    remote_qwen3 = load_tokenizer(f"{gcs_bucket}/qwen3/")
    assert remote_qwen3.encode(TRICKY[0]) == qwen3.encode(TRICKY[0])
    assert remote_qwen3.mask_id == 151669


def _train_script():
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", REPO / "scripts" / "train_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_is_deterministic():
    script = _train_script()
    files = script.corpus_files(STDLIB)
    assert files == sorted(files, key=lambda p: p.relative_to(STDLIB).as_posix())
    assert not any("test" in p.relative_to(STDLIB).parts for p in files)
    texts = script.read_texts(files[:8])
    first, second = script.train(texts, vocab_size=600), script.train(texts, vocab_size=600)
    assert first.to_str() == second.to_str()
    assert [first.token_to_id(t) for t in script.SPECIAL_TOKENS] == [0, 1, 2, 3]
