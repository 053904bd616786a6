"""The diffusion sampler: release parity, schedule, invariants, accelerations, infilling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from coda_trainer import hf
from coda_trainer.sampling import SamplingConfig, generate, infill
from coda_trainer.sampling.parity import GOLDEN_MODEL_CONFIG, random_hf_weights, write_hf_folder
from coda_trainer.sampling.schedule import reveal_counts, timesteps_f32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

GOLDEN = json.loads(Path(__file__).with_name("sampling_golden.json").read_text())
MC = GOLDEN_MODEL_CONFIG
MASK, PAD, EOS = MC.mask_token_id, MC.pad_token_id, MC.eos_token_id
ORDINARY = st.integers(2, MC.vocab_size - 2)  # no pad/bos (0), eos (1) or mask (255)
FEW = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _model(tmp_path_factory, seed: int, *, causal: bool = False, eos_boost: float = 1.0):
    weights = random_hf_weights(MC, seed)
    weights["lm_head.weight"][EOS] *= eos_boost
    folder = write_hf_folder(tmp_path_factory.mktemp(f"weights{seed}"), MC, weights)
    overrides = {"dtype": "float32", "param_dtype": "float32", "attention": "xla", "causal": causal}
    _, model = hf.load_pretrained(str(folder), config_overrides=overrides)
    return model


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    """The weights the golden file was made with (numpy seed → HF folder → our loader)."""
    return _model(tmp_path_factory, GOLDEN["weights"]["seed"])


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    return _model(tmp_path_factory, 1, causal=True)


def _gen_region_unchanged_outside(out, canvas_tokens: np.ndarray) -> None:
    lo, n = out.gen_start, out.generated_BxN.shape[1]
    np.testing.assert_array_equal(out.tokens_BxT[:, :lo], canvas_tokens[:, :lo])
    np.testing.assert_array_equal(out.tokens_BxT[:, lo + n :], canvas_tokens[:, lo + n :])


def _left_padded(prompts, n, P):
    canvas = np.full((len(prompts), P + n), PAD, np.int32)
    for b, p in enumerate(prompts):
        canvas[b, P - len(p) : P] = p
    canvas[:, P:] = MASK
    return canvas


def _revealed_per_step(out) -> np.ndarray:
    """(steps, B): tokens revealed at each step, from the recorded history."""
    masks_UxB = np.concatenate(
        [np.full((1, out.history_UxBxN.shape[1]), out.generated_BxN.shape[1])],
        axis=0,
    )
    masks_UxB = np.concatenate([masks_UxB, (out.history_UxBxN == MASK).sum(-1)], axis=0)
    return masks_UxB[:-1] - masks_UxB[1:]


# --------------------------------------------------------------------------------------------------
# Parity with the released sampler
# --------------------------------------------------------------------------------------------------


def test_timesteps_are_torch_linspace_bit_for_bit():
    torch = pytest.importorskip("torch", reason="torch is a dev dependency")
    for steps in [*range(1, 300), 512, 768, 1024]:
        for eps in (1e-3, 1e-2, 0.1):
            want = torch.linspace(1, eps, steps + 1).numpy()
            np.testing.assert_array_equal(
                timesteps_f32(eps, steps), want, err_msg=f"{steps=} {eps=}"
            )


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_greedy_tokens_equal_the_release(golden_model, case):
    """Tokens of the released PyTorch `_sample` (fixture header) for the same weights and prompts."""
    config = SamplingConfig(**case["settings"])
    out = generate(golden_model, case["prompts"], config, rng=0)
    for b, (prompt, want) in enumerate(zip(case["prompts"], case["sequences"], strict=True)):
        got = out.tokens_BxT[b, out.gen_start - len(prompt) :].tolist()
        assert got == want, f"row {b}"


def test_release_parity_without_padding_bucket(golden_model):
    case = GOLDEN["cases"][0]
    out = generate(
        golden_model, case["prompts"], SamplingConfig(**case["settings"]), pad_to_multiple_of=1
    )
    assert out.tokens_BxT.tolist() == case["sequences"]


# --------------------------------------------------------------------------------------------------
# Invariants of the plain sampler
# --------------------------------------------------------------------------------------------------


@FEW
@given(
    prompts=st.lists(st.lists(ORDINARY, min_size=1, max_size=16), min_size=3, max_size=3),
    alg=st.sampled_from(["maskgit_plus", "topk_margin", "entropy", "origin"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_plain_sampler_invariants(golden_model, prompts, alg, seed):
    steps = 5  # uneven: k varies from step to step
    config = SamplingConfig(steps=steps, max_new_tokens=16, alg=alg)
    out = generate(golden_model, prompts, config, rng=seed, record_history=True)
    canvas = _left_padded(prompts, 16, out.gen_start)
    _gen_region_unchanged_outside(out, canvas)  # prompt tokens (and pads) never change
    assert not (out.generated_BxN == MASK).any()  # no mask left after the last step
    # A revealed token never changes again.
    hist = out.history_UxBxN
    for s in range(1, hist.shape[0]):
        done = hist[s - 1] != MASK
        np.testing.assert_array_equal(hist[s][done], hist[s - 1][done])
    if alg != "origin":  # the number revealed per step follows the schedule, in every row
        want = reveal_counts(16, config.eps, steps)
        assert _revealed_per_step(out).T.tolist() == [want] * len(prompts)


def test_block_decoding_follows_each_blocks_schedule(golden_model):
    config = SamplingConfig(steps=8, max_new_tokens=16, block_length=4, alg="entropy")
    out = generate(golden_model, [[5, 6, 7], [9]], config, record_history=True)
    per_block = reveal_counts(4, config.eps, 2)
    assert _revealed_per_step(out).T.tolist() == [per_block * 4] * 2
    for s in range(8):  # left to right: nothing beyond the current block is revealed
        block = s // 2
        assert (out.history_UxBxN[s][:, (block + 1) * 4 :] == MASK).all()
        assert not (out.history_UxBxN[s][:, : block * 4] == MASK).any()
    assert out.num_steps_used == 8


# --------------------------------------------------------------------------------------------------
# Accelerations
# --------------------------------------------------------------------------------------------------


@FEW
@given(
    prompts=st.lists(st.lists(ORDINARY, min_size=1, max_size=16), min_size=2, max_size=2),
    threshold=st.sampled_from([0.05, 0.3, 0.9]),
    cache=st.sampled_from(["none", "dual"]),
)
def test_threshold_decoding_reveals_at_least_one_per_step(golden_model, prompts, threshold, cache):
    config = SamplingConfig(
        steps=16, max_new_tokens=16, block_length=8, threshold=threshold, cache=cache
    )
    out = generate(golden_model, prompts, config, record_history=True)
    _gen_region_unchanged_outside(out, _left_padded(prompts, 16, out.gen_start))
    assert not (out.generated_BxN == MASK).any()
    revealed_UxB = _revealed_per_step(out)
    hist = out.history_UxBxN
    before_UxB = np.concatenate([np.full((1, 2), 16), (hist == MASK).sum(-1)[:-1]])
    ran_U = np.concatenate([[True], (hist[1:] != hist[:-1]).any(axis=(1, 2))])
    # Each step that ran revealed ≥ 1 token in every row that still had masks in its block.
    for s in np.nonzero(ran_U)[0]:
        block = s // 8
        had_masks_B = (hist[s - 1] if s else np.full_like(hist[0], MASK))[
            :, block * 8 : block * 8 + 8
        ]
        rows = (had_masks_B == MASK).any(-1)
        assert (revealed_UxB[s][rows] >= 1).all(), f"step {s}"
    assert out.num_steps_used <= 16
    assert (before_UxB >= 0).all()


def test_threshold_saves_steps_where_the_model_is_confident(golden_model):
    plain = SamplingConfig(steps=16, max_new_tokens=16, block_length=8)
    fast = plain.model_copy(update={"threshold": 0.05})
    # The schedule's forwards: steps that reveal nothing (k = 0) are skipped, changing no token.
    scheduled = 2 * sum(k > 0 for k in reveal_counts(8, plain.eps, 8))
    assert generate(golden_model, [[5, 6, 7]], plain).num_steps_used == scheduled
    assert generate(golden_model, [[5, 6, 7]], fast).num_steps_used < scheduled


def test_prefix_cache_is_exact_when_the_prefix_is_frozen(causal_model):
    """A causal model's left context never depends on later tokens: the cache must not change a token."""
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    base = SamplingConfig(steps=16, max_new_tokens=16, block_length=4, alg="entropy")
    want = generate(causal_model, prompts, base)
    got = generate(causal_model, prompts, base.model_copy(update={"cache": "prefix"}))
    np.testing.assert_array_equal(got.tokens_BxT, want.tokens_BxT)
    # Uncached: one full forward per step that reveals something; cached: one full forward per
    # block (its first step, run even when it reveals nothing: it refreshes the cache), then blocks.
    per_block = reveal_counts(4, base.eps, 4)
    assert want.num_full_forwards == 4 * sum(k > 0 for k in per_block)
    assert got.num_full_forwards == 4
    assert got.num_block_forwards == 4 * sum(k > 0 for k in per_block[1:])


def test_bidirectional_cache_runs_to_completion(golden_model):
    """Approximate for a bidirectional model (documented); it must still keep every invariant."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    config = SamplingConfig(steps=8, max_new_tokens=16, block_length=8, cache="prefix")
    out = generate(golden_model, prompts, config)
    _gen_region_unchanged_outside(out, _left_padded(prompts, 16, out.gen_start))
    assert not (out.generated_BxN == MASK).any()


def test_stop_at_eos_keeps_text_up_to_eos(tmp_path_factory):
    model = _model(tmp_path_factory, 2, eos_boost=4.0)
    prompts = [[5, 6, 7], [30, 31, 32, 33], [100]]
    base = SamplingConfig(steps=32, max_new_tokens=32, block_length=8, alg="entropy")
    full = generate(model, prompts, base)
    early = generate(model, prompts, base.model_copy(update={"stop_at_eos": True}))
    stopped = 0
    for row_full, row_early in zip(
        full.generated_BxN.tolist(), early.generated_BxN.tolist(), strict=True
    ):
        if EOS not in row_full[:-1]:
            continue
        j = row_full.index(EOS)
        assert row_early[: j + 1] == row_full[: j + 1]
        assert row_early[j + 1 :] == [PAD] * (31 - j)
        stopped += 1
    assert stopped >= 1, "the eos-heavy model should end at least one row early"
    assert early.num_steps_used <= full.num_steps_used


# --------------------------------------------------------------------------------------------------
# Padding, infilling, sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"block_length": 4, "threshold": 0.3, "cache": "prefix"}],
    ids=["plain", "block-threshold-prefix"],
)
def test_left_padded_rows_equal_rows_alone(golden_model, extra):
    """Pads are invisible: a row's tokens do not depend on batch-mates or on the padding bucket."""
    prompts = [[5, 6, 7], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40] * 14]
    config = SamplingConfig(steps=8, max_new_tokens=16, alg="entropy", **extra)
    batch = generate(golden_model, prompts, config)
    for b, p in enumerate(prompts):  # alone: 13, 7 and 2 pads instead of batch-mates
        alone = generate(golden_model, [p], config)
        np.testing.assert_array_equal(batch.generated_BxN[b], alone.generated_BxN[0])


@FEW
@given(
    prefixes=st.lists(st.lists(ORDINARY, min_size=1, max_size=16), min_size=2, max_size=2),
    suffixes=st.lists(
        st.lists(st.integers(0, MC.vocab_size - 1), max_size=16), min_size=2, max_size=2
    ),
    cache=st.sampled_from(["none", "dual"]),
)
def test_infill_keeps_prefix_and_suffix_exactly(golden_model, prefixes, suffixes, cache):
    config = SamplingConfig(steps=8, max_new_tokens=8, block_length=4, threshold=0.5, cache=cache)
    out = infill(golden_model, prefixes, suffixes, 8, config, rng=0)
    P = out.gen_start
    for b, (prefix, suffix) in enumerate(zip(prefixes, suffixes, strict=True)):
        row = out.tokens_BxT[b].tolist()
        assert row[P - len(prefix) : P] == prefix
        assert row[P + 8 : P + 8 + len(suffix)] == suffix  # even a suffix holding mask/eos ids
        assert MASK not in row[P : P + 8]
        assert set(row[: P - len(prefix)]) <= {PAD} and set(row[P + 8 + len(suffix) :]) <= {PAD}


def test_infill_rejects_prefix_cache(golden_model):
    with pytest.raises(ValueError, match="dual"):
        infill(
            golden_model, [[5]], [[6]], 8, SamplingConfig(steps=8, max_new_tokens=8, cache="prefix")
        )


def test_sampling_is_reproducible_per_rng(golden_model):
    config = SamplingConfig(
        steps=8, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, alg_temp=0.5
    )
    a = generate(golden_model, [[5, 6, 7]], config, rng=1).generated_BxN
    b = generate(golden_model, [[5, 6, 7]], config, rng=1).generated_BxN
    c = generate(golden_model, [[5, 6, 7]], config, rng=2).generated_BxN
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert not (a == MASK).any()


def test_padded_array_input_with_lengths(golden_model):
    config = SamplingConfig(steps=4, max_new_tokens=8)
    arr = np.array([[5, 6, 7, 0], [9, 10, 0, 0]])
    from_array = generate(golden_model, arr, config, prompt_lengths=[3, 2])
    from_lists = generate(golden_model, [[5, 6, 7], [9, 10]], config)
    np.testing.assert_array_equal(from_array.tokens_BxT, from_lists.tokens_BxT)
    assert from_lists.completions(stop_ids=[EOS]) == [
        r[: r.index(EOS)] if EOS in r else r for r in from_lists.generated_BxN.tolist()
    ]


def test_bad_inputs_are_rejected(golden_model):
    config = SamplingConfig(steps=4, max_new_tokens=8)
    with pytest.raises(ValueError, match="at least one token"):
        generate(golden_model, [[5], []], config)
    with pytest.raises(ValueError, match="outside"):
        generate(golden_model, [[5, 999]], config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(golden_model, [[5] * 600], config)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_config_validation():
    # "original" is what the release's generation_config.json says.
    assert SamplingConfig(alg="original").alg == "origin"
    assert SamplingConfig(blockLength=8, maxNewTokens=16, steps=4).block_length == 8
    with pytest.raises(ValidationError, match="multiple of block_length"):
        SamplingConfig(max_new_tokens=16, block_length=5)
    with pytest.raises(ValidationError, match="multiple of the number of blocks"):
        SamplingConfig(max_new_tokens=16, block_length=4, steps=6)
    with pytest.raises(ValidationError, match="confidence alg"):
        SamplingConfig(alg="origin", threshold=0.9)
    with pytest.raises(ValidationError):
        SamplingConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        SamplingConfig(cache="full")
    with pytest.raises(ValidationError):
        SamplingConfig(temperature=-1)


def test_a_rows_draws_depend_on_its_own_key_only(golden_model):
    """Per-row keys: a sampled row is the same alone, at another row, among other rows and in
    another prompt bucket (different compiled shapes: equal here, though float rounding could
    break a near-tie differently)."""
    from coda_trainer.sampling import row_keys

    config = SamplingConfig(steps=8, max_new_tokens=8, temperature=1.0, alg_temp=0.5)
    row = [5, 6, 7]
    alone = generate(golden_model, [row], config, rng=row_keys([7], [3])).generated_BxN[0]
    others = [[9, 10], [11], [12, 13, 14, 15]]
    batch = generate(
        golden_model, [*others, row], config, rng=row_keys([1, 2, 3, 7], [0, 0, 0, 3]),
        pad_to_multiple_of=32,
    ).generated_BxN  # fmt: skip
    assert batch[3].tolist() == alone.tolist()
    copies = generate(golden_model, [row] * 4, config, rng=row_keys([7] * 4, [3] * 4))
    assert all(r.tolist() == alone.tolist() for r in copies.generated_BxN)
    other_stream = generate(golden_model, [row], config, rng=row_keys([7], [4])).generated_BxN[0]
    assert other_stream.tolist() != alone.tolist()


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_finished_blocks_reach_the_listener_as_they_finish(golden_model, cache):
    """report_blocks: after block b the first (b+1)·block tokens are final; tokens unchanged."""
    from coda_trainer.sampling import block_listener

    config = SamplingConfig(
        steps=8, max_new_tokens=16, block_length=4, alg="entropy", cache=cache, temperature=1.0
    )
    prompts = [[5, 6, 7], [8, 9]]
    plain = generate(golden_model, prompts, config, rng=3)
    seen: list[tuple[int, np.ndarray]] = []
    with block_listener(lambda b, gen: seen.append((b, gen.copy()))):
        reported = generate(golden_model, prompts, config, rng=3, report_blocks=True)
        quiet = generate(golden_model, prompts, config, rng=3)  # not a report_blocks program
    np.testing.assert_array_equal(reported.generated_BxN, plain.generated_BxN)
    assert [b for b, _ in seen] == [0, 1, 2, 3]
    for b, gen in seen:
        upto = (b + 1) * 4
        np.testing.assert_array_equal(gen[:, :upto], plain.generated_BxN[:, :upto])
        assert (gen[:, upto:] == MASK).all()  # later blocks not started yet
    np.testing.assert_array_equal(quiet.generated_BxN, plain.generated_BxN)


def test_whole_sequence_decoding_reports_its_settled_prefix_while_it_runs(golden_model):
    """One block is the whole answer: report_blocks then reports inside it (16 steps → every
    step); the leading revealed run of each report is already the final answer's start."""
    from coda_trainer.sampling import block_listener

    config = SamplingConfig(steps=16, max_new_tokens=16, alg="entropy", temperature=1.0)
    prompts = [[5, 6, 7], [8, 9]]
    plain = generate(golden_model, prompts, config, rng=3)
    seen: list[np.ndarray] = []
    with block_listener(lambda _b, gen: seen.append(gen.copy())):
        reported = generate(golden_model, prompts, config, rng=3, report_blocks=True)
    np.testing.assert_array_equal(reported.generated_BxN, plain.generated_BxN)
    final = np.asarray(plain.generated_BxN)
    assert len(seen) == 16  # one per step, before the program returns
    revealed = [int((gen != MASK).sum()) for gen in seen]
    assert revealed == sorted(revealed) and revealed[0] < revealed[-1] == final.size
    for gen in seen:
        shown = gen != MASK
        np.testing.assert_array_equal(gen[shown], final[shown])  # revealed tokens never change
