"""Run the released CoDA PyTorch sampler on our weights: golden tokens and reference timings.

Nothing of the release is copied here: given the path to a checkout of SalesforceAIResearch/CoDA,
its `CoDALanguageModel` package is imported at run time.

    python bench/reference_release_sampler.py --release /tmp/coda-release \\
        --out tests/trainer/sampling_golden.json

What it does:
1. draws the parity weights (`coda_trainer.sampling.parity`: numpy seed → Hugging Face layout),
   loads them into OUR model with `coda_trainer.hf.load_pretrained` and exports that model with
   `coda_trainer.hf.save_pretrained` (so the golden test also covers the export path);
2. builds the release's `CoDALanguageModel` from the exported config.json and loads the exported
   safetensors into it (strict: every tensor must match);
3. runs the release's `_sample` loop (the body of `diffusion_generate`) for fixed prompts and
   deterministic settings, and writes the tokens, plus per-case decision margins, as JSON.

Compatibility shims (the release targets transformers 4.47; this environment has 5.x). None changes
the computation, and each is checked: `attn_implementation="eager"` (transformers 5 refuses to build
a model class that does not declare SDPA support; the release's attention module calls SDPA itself
either way), `rope_parameters=None` after construction (transformers 5 turns `rope_scaling=None`
into a default-RoPE dict, which the release would pass to its unimplemented scaling path; rope_theta
is asserted afterwards), and `_sample` is called directly with a `DLMGenerationConfig` built by its
own constructor (the release's `diffusion_generate` → `GenerationConfig.update` → `validate()`
signature changed in transformers 5). `_sample` receives exactly what `diffusion_generate` would
pass it: max_length = prompt length + max_new_tokens, no attention mask, identity hooks.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RELEASE_COMMIT = "fa1d505008c6cd453ad3e8dbf86d5a8e3a1d8f92"  # CoDA HEAD the golden file came from


# --------------------------------------------------------------------------------------------------
# Loading the release
# --------------------------------------------------------------------------------------------------


def import_release(path: str | Path) -> Any:
    """Import the release's `CoDALanguageModel` package from a checkout; returns the module."""
    root = Path(path).resolve()
    if not (root / "CoDALanguageModel" / "modeling_coda.py").is_file():
        raise SystemExit(
            f"{root} is not a checkout of SalesforceAIResearch/CoDA (no CoDALanguageModel/)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import CoDALanguageModel.generation_utils as gen  # noqa: F401
    import CoDALanguageModel.modeling_coda as modeling

    return modeling


def release_commit(path: str | Path, override: str | None = None) -> str:
    if override:
        return override
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return RELEASE_COMMIT


def release_model(
    release: str | Path,
    hf_config: dict[str, Any],
    *,
    weights: dict[str, Any] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
):
    """The release's CoDALanguageModel for a config.json dict, in eval mode.

    With `weights` (torch tensors by Hugging Face name) every tensor must fit (strict); without, the
    release's own random initialisation (enough for timing: its loop does not depend on values).
    """
    import torch

    modeling = import_release(release)
    from CoDALanguageModel.model_config import CoDAConfig

    keep = {
        k: v for k, v in hf_config.items() if k not in ("architectures", "auto_map", "torch_dtype")
    }
    # The release's flash branch needs a CUDA flash kernel; its default branch is SDPA as well.
    keep["attention_kernel"] = "flash_attention" if device.startswith("cuda") else "sdpa"
    config = CoDAConfig(**keep, attn_implementation="eager")
    config.rope_parameters = None
    torch.manual_seed(0)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with torch.device(device):
        model = modeling.CoDALanguageModel(config)
    if model.model.rope_theta != hf_config["rope_theta"]:
        raise RuntimeError(
            f"release model picked rope_theta={model.model.rope_theta}, config says {hf_config['rope_theta']}"
        )
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise RuntimeError(
                f"weights do not fit the release model: missing {missing}, unexpected {unexpected}"
            )
    return model.to(torch_dtype).eval()


def build_release_model(release: str | Path, hf_folder: str | Path, *, dtype: str = "float32"):
    """The release's CoDALanguageModel with the weights of a Hugging Face folder (CPU, eval mode)."""
    from safetensors.torch import load_file

    hf_config = json.loads((Path(hf_folder) / "config.json").read_text())
    weights: dict[str, Any] = {}
    for file in sorted(Path(hf_folder).glob("*.safetensors")):
        weights |= load_file(str(file))
    return release_model(release, hf_config, weights=weights, dtype=dtype)


def release_generation_config(settings: dict[str, Any], *, prompt_len: int, mask_token_id: int):
    from CoDALanguageModel.generation_utils import DLMGenerationConfig

    return DLMGenerationConfig(
        temperature=settings.get("temperature", 0.0),
        top_p=settings.get("top_p"),
        top_k=settings.get("top_k"),
        max_length=prompt_len + settings["max_new_tokens"],
        max_new_tokens=settings["max_new_tokens"],
        eps=settings.get("eps", 1e-3),
        steps=settings["steps"],
        alg=settings["alg"],
        alg_temp=settings.get("alg_temp"),
        mask_token_id=mask_token_id,
        output_history=False,
        return_dict_in_generate=False,
    )


def release_sample(model, input_ids, settings: dict[str, Any], *, logits_hook=None):
    """The release's `_sample` loop, called as `diffusion_generate` calls it."""
    import torch

    gc = release_generation_config(
        settings, prompt_len=input_ids.shape[1], mask_token_id=model.config.mask_token_id
    )
    with torch.no_grad():
        return model._sample(
            input_ids,
            attention_mask=None,
            generation_config=gc,
            generation_tokens_hook_func=lambda step, x, logits: x,
            generation_logits_hook_func=logits_hook or (lambda step, x, logits: logits),
        )


# --------------------------------------------------------------------------------------------------
# Golden cases
# --------------------------------------------------------------------------------------------------


def golden_prompts(vocab_size: int, special: set[int], seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed + 1000)
    ordinary = np.array([t for t in range(vocab_size) if t not in special])
    lengths = {"p7a": 7, "p7b": 7, "p11": 11, "p20": 20, "p3": 3}
    return {name: rng.choice(ordinary, size=n).tolist() for name, n in lengths.items()}


GOLDEN_CASES: list[dict[str, Any]] = [
    {
        "name": "maskgit_plus_steps16",
        "prompts": ["p7a"],
        "alg": "maskgit_plus",
        "steps": 16,
        "max_new_tokens": 16,
    },
    {
        "name": "topk_margin_steps8",
        "prompts": ["p11"],
        "alg": "topk_margin",
        "steps": 8,
        "max_new_tokens": 16,
    },
    {
        "name": "entropy_steps16_batch2",
        "prompts": ["p7a", "p7b"],
        "alg": "entropy",
        "steps": 16,
        "max_new_tokens": 16,
    },
    {
        "name": "entropy_steps5",
        "prompts": ["p11"],
        "alg": "entropy",
        "steps": 5,
        "max_new_tokens": 16,
    },
    {
        "name": "entropy_steps24_more_than_tokens",
        "prompts": ["p3"],
        "alg": "entropy",
        "steps": 24,
        "max_new_tokens": 16,
    },
    {
        "name": "maskgit_plus_topk5_steps8",
        "prompts": ["p11"],
        "alg": "maskgit_plus",
        "steps": 8,
        "max_new_tokens": 16,
        "top_k": 5,
    },
    {
        "name": "entropy_topp0.9_steps8",
        "prompts": ["p7b"],
        "alg": "entropy",
        "steps": 8,
        "max_new_tokens": 16,
        "top_p": 0.9,
    },
    {
        "name": "topk_margin_eps0.01_steps12",
        "prompts": ["p20"],
        "alg": "topk_margin",
        "steps": 12,
        "max_new_tokens": 24,
        "eps": 0.01,
    },
    {
        "name": "entropy_steps32_len32",
        "prompts": ["p20"],
        "alg": "entropy",
        "steps": 32,
        "max_new_tokens": 32,
    },
    {
        "name": "origin_steps1",
        "prompts": ["p7a", "p7b"],
        "alg": "origin",
        "steps": 1,
        "max_new_tokens": 16,
    },
]
_SETTING_KEYS = (
    "alg",
    "steps",
    "max_new_tokens",
    "eps",
    "top_k",
    "top_p",
    "temperature",
    "alg_temp",
)


def _margin_hook(settings: dict[str, Any], mask_token_id: int, record: dict[str, float]):
    """Tracks how far each decision of a deterministic run is from a tie (smaller = more fragile)."""
    import torch
    from CoDALanguageModel.generation_utils import sample_tokens

    steps = settings["steps"]
    ts = torch.linspace(1, settings.get("eps", 1e-3), steps + 1)

    def hook(i, x, logits):
        mask_index = x == mask_token_id
        mask_logits = logits[mask_index]
        if mask_logits.numel() == 0:
            return logits
        probs = torch.softmax(mask_logits, -1)
        top2 = probs.topk(2, -1).values
        record["argmax_gap"] = min(
            record.get("argmax_gap", 1.0), float((top2[:, 0] - top2[:, 1]).min())
        )
        record["mask_is_argmax"] = record.get("mask_is_argmax", 0) + int(
            (probs.argmax(-1) == mask_token_id).sum()
        )
        if settings["alg"] != "origin":
            kw = {"topk_margin": {"margin_confidence": True}, "entropy": {"neg_entropy": True}}.get(
                settings["alg"], {}
            )
            conf, _ = sample_tokens(
                mask_logits,
                temperature=0.0,
                top_p=settings.get("top_p"),
                top_k=settings.get("top_k"),
                **kw,
            )
            per_row = int(mask_index.sum()) // x.shape[0]
            k = int(per_row * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else per_row
            if 0 < k < per_row:
                for row in conf.view(x.shape[0], per_row):
                    srt = row.sort(descending=True).values
                    record["rank_gap"] = min(
                        record.get("rank_gap", 1.0), float(srt[k - 1] - srt[k])
                    )
        return logits

    return hook


def make_golden(release: str, seed: int, commit: str | None = None) -> dict[str, Any]:
    import torch
    from coda_trainer import hf
    from coda_trainer.sampling.parity import GOLDEN_MODEL_CONFIG, random_hf_weights, write_hf_folder

    torch.set_num_threads(1)
    mc = GOLDEN_MODEL_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_hf_folder(Path(tmp) / "raw", mc, random_hf_weights(mc, seed))
        _, ours = hf.load_pretrained(
            str(raw), config_overrides={"dtype": "float32", "param_dtype": "float32"}
        )
        export = Path(tmp) / "export"
        hf.save_pretrained(ours, str(export))
        model = build_release_model(release, export)

    special = {mc.mask_token_id, mc.pad_token_id, mc.eos_token_id, mc.bos_token_id}
    prompts = golden_prompts(mc.vocab_size, special, seed)
    cases = []
    for case in GOLDEN_CASES:
        settings = {k: case[k] for k in _SETTING_KEYS if k in case}
        settings.setdefault("temperature", 0.0)
        rows = [prompts[p] for p in case["prompts"]]
        margins: dict[str, float] = {}
        if case["alg"] == "origin":
            # origin draws positions; with steps=1 every draw is accepted anyway
            torch.manual_seed(0)
        out = release_sample(
            model,
            torch.tensor(rows),
            settings,
            logits_hook=_margin_hook(settings, mc.mask_token_id, margins),
        )
        cases.append(
            {
                "name": case["name"],
                "settings": settings,
                "prompts": rows,
                "sequences": out.tolist(),
                "margins": margins,
            }
        )
        print(f"{case['name']:40s} margins {margins}", file=sys.stderr)
    return {
        "_source": (
            "Tokens produced by the released CoDA PyTorch sampler (SalesforceAIResearch/CoDA, "
            f"commit {release_commit(release, commit)}, CoDALanguageModel/generation_utils.py `_sample`, called "
            "as diffusion_generate calls it) on CPU, float32, for the weights described in `weights`. "
            "Regenerate with: python bench/reference_release_sampler.py --release PATH --out THIS_FILE"
        ),
        "weights": {
            "recipe": "coda_trainer.sampling.parity.random_hf_weights(GOLDEN_MODEL_CONFIG, seed)",
            "seed": seed,
            "model_config": mc.model_dump(mode="json"),
            "path": "numpy → hf.load_pretrained → hf.save_pretrained → release CoDALanguageModel.load_state_dict",
        },
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--release", required=True, help="path to a checkout of SalesforceAIResearch/CoDA"
    )
    ap.add_argument("--out", default="-", help="JSON file to write (default: stdout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--release-commit", help="commit of the checkout (default: git rev-parse HEAD there)"
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    golden = make_golden(args.release, args.seed, args.release_commit)
    # One line per token list keeps the fixture readable.
    text = json.dumps(golden, indent=1)
    text = re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    if args.out == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(args.out).write_text(text + "\n")
    print(f"wrote {len(golden['cases'])} cases in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
