"""Diffusion sampling for CoDA: Dream's `diffusion_generate`, compiled, plus the Fast-dLLM speed-ups.

    from coda_trainer.sampling import SamplingConfig, generate, infill
    out = generate(model, [[1, 2, 3], [4, 5]], SamplingConfig(steps=64, max_new_tokens=64), rng=0)
    out.generated_BxN, out.completions(stop_ids=[eos]), out.num_steps_used

What one step does (as the release): append `max_new_tokens` masks; run the model; shift the logits
one to the right (column i predicts token i + 1); for each masked position pick x0 (argmax at
temperature 0, else a sample after temperature/top-p/top-k) and a confidence (`maskgit_plus` p(x0),
`topk_margin` p1 − p2, `entropy` −H); reveal the k = int(masked · (1 − s/t)) most confident, t and s
consecutive entries of linspace(1, eps, steps + 1), everything left at the last step; `origin`
instead reveals each mask with probability 1 − s/t; with alg_temp > 0 the k positions are drawn from
softmax(confidence / alg_temp).

Exactness. With temperature 0 and alg_temp 0 (any alg but `origin`, which draws random positions)
the tokens equal the release's `diffusion_generate` for the same weights and prompt: the schedule is
rebuilt bit-for-bit in float32 (schedule.py), k is computed per row from that row's masks (the
release averages over the batch, which is the same number because every row has the same mask
count), and ties in confidence go to the lower position (torch.topk leaves tie order unspecified;
the two agree whenever confidences are distinct). The golden test (tests/trainer/test_sampling.py)
checks this against tokens the released PyTorch sampler produced (bench/reference_release_sampler.py).
Deviations, all invisible when the release produces valid text: the mask token is never chosen as a
token; top-p keeps all tokens tied with its last kept one; padded rows never attend to their pads
(the release's model ignores its attention mask, so its padded batches differ from unpadded rows;
ours are equal).

Options beyond the release, and what each costs or buys (per-step costs for a P-token prompt and N
new tokens; a forward's cost is roughly proportional to the tokens it runs):
- `block_length` (semi-autoregressive, LLaDA): the N masks are decoded in N/block_length blocks left
  to right, `steps / num_blocks` steps each, a block's own schedule inside it. Same number of
  forwards as the plain sampler and the same per-forward cost; output changes (tokens are committed
  left to right, which helps instruction-tuned models keep structure and makes caching possible).
  block_length = None is one block, i.e. the release.
- `threshold` τ (Fast-dLLM parallel decoding): each step additionally reveals every masked position
  of the current block whose p(x0) ≥ τ; at least one per step and never fewer than the schedule, so
  `steps` becomes an upper bound and a block ends as soon as it has no masks. Fewer forwards
  (typically 2–4× with τ = 0.9 on a trained model); output changes only where the model is confident.
- `cache="prefix"`: each block starts with one full forward that also returns every layer's keys
  and values; the block's other steps run only the block (+1 column for the logit shift) against the
  cached keys/values of everything to its left. Per-step cost drops from P+N tokens to block+1.
  Approximate for a bidirectional model in two ways: the left context's keys/values are those of the
  block-start forward (they do not see tokens revealed later in the block), and the masks to the
  right of the block are not visible to the block's later steps. Exact when the model is causal
  (left context then never depends on later tokens): tested against cache="none".
- `cache="dual"`: as prefix, and the right side (later masks, an infill suffix) stays visible through
  its cached keys/values; the only approximation is staleness within a block. Same speed as prefix.
  With a causal model (which cannot look right anyway) dual runs as prefix.
- `stop_at_eos`: a row is finished once it holds an eos with no mask before it; everything after
  that eos becomes pad and the loop ends when every row is finished. The tokens up to and including
  the first eos are exactly those without early stop (revealed tokens are never changed); saves the
  forwards that would decode padding.
- `infill(prefix, suffix, n)`: prefix + n masks + suffix in one canvas; only the n masks are ever
  written, so prefix and suffix come back exactly. Needs cache none or dual.

Compilation: `generate` is one `jax.jit` per (sampling plan, batch size, canvas length); prompts are
left-padded to a multiple of `pad_to_multiple_of` so nearby lengths share a compiled program.
Numeric knobs (temperature, top_p, alg_temp, threshold, eps) are traced values and never recompile.
"""

from coda_trainer.sampling.config import Alg, CacheMode, SamplingConfig
from coda_trainer.sampling.decode import block_listener
from coda_trainer.sampling.sampler import (
    Canvas,
    GenerateOutput,
    build_canvas,
    compile_generate,
    generate,
    infill,
    row_keys,
)

__all__ = [
    "Alg",
    "CacheMode",
    "Canvas",
    "GenerateOutput",
    "SamplingConfig",
    "block_listener",
    "build_canvas",
    "compile_generate",
    "generate",
    "infill",
    "row_keys",
]
