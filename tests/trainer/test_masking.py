"""Invariants of the forward noising (S1/S2/S3, SFT prompt ramp) and of the masking curriculum."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from coda_trainer import curriculum
from coda_trainer.config import PAPER_TABLE_3, MaskingConfig, MaskingProbs, ModelConfig
from coda_trainer.loss import diffusion_loss
from coda_trainer.masking import (
    NoisePlan,
    NoiseSpec,
    apply_plan,
    noise_pretrain,
    noise_sft,
    prompt_keep_mask,
    sample_plan,
)
from hypothesis import given, settings
from hypothesis import strategies as st

MASK, PAD = 255, 0
SPEC = NoiseSpec(mask_token_id=MASK, pad_token_id=PAD, sampling_eps=1e-3, block_sizes=(2, 4, 8))
B, L, V = 8, 32, 256
PROPS = settings(max_examples=20, deadline=None)


def _tokens(seed: int, batch: int = B, seq_len: int = L) -> jax.Array:
    # Never the mask or pad id, so any pad/mask in an output was put there by the noising.
    return jax.random.randint(jax.random.key(seed + 1), (batch, seq_len), 4, MASK, jnp.int32)


@functools.partial(jax.jit, static_argnames="spec")
def _plan_and_noise(rng, tokens_BxL, probs_3, valid_BxL, spec):
    k_plan, k_mask = jax.random.split(rng)
    batch, seq_len = tokens_BxL.shape
    plan = sample_plan(k_plan, batch, seq_len, probs_3, spec)
    return plan, apply_plan(k_mask, tokens_BxL, plan, spec, valid_BxL=valid_BxL)


_noise_pretrain = jax.jit(noise_pretrain, static_argnames="spec")
_noise_sft = jax.jit(noise_sft, static_argnames="spec")
_apply_plan = jax.jit(apply_plan, static_argnames="spec")


@jax.jit
def _loss_grad_wrt_logits(logits_BxLxV, noised):
    return jax.grad(lambda lg: diffusion_loss(lg, noised)[0])(logits_BxLxV)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


prob = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
valid_rows = st.lists(st.integers(0, L), min_size=B, max_size=B)  # packing padding at row ends
holes = st.lists(st.booleans(), min_size=B * L, max_size=B * L)


def _valid(valid_len: list[int], hole: list[bool]) -> np.ndarray:
    pos = np.arange(L)[None, :]
    return (pos < np.asarray(valid_len)[:, None]) & ~np.asarray(hole).reshape(B, L)


# ---------------------------------------------------------------------------------------- pretrain


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    probs=st.tuples(prob, prob, prob),
    valid_len=valid_rows,
    hole=holes,
)
def test_pretrain_invariants(seed, probs, valid_len, hole):
    valid = _valid(valid_len, hole)
    tokens = _tokens(seed)
    rng = jax.random.key(seed)
    probs_3 = jnp.asarray(probs, jnp.float32)
    plan, noised = _np(_plan_and_noise(rng, tokens, probs_3, jnp.asarray(valid), SPEC))
    tokens = np.asarray(tokens)
    pos = np.arange(L)[None, :]

    # The public entry point is exactly plan + apply.
    public = _np(
        _noise_pretrain(rng, jnp.asarray(tokens), probs_3, SPEC, valid_BxL=jnp.asarray(valid))
    )
    for got, want in zip(public, noised, strict=True):
        np.testing.assert_array_equal(got, want)

    assert np.all((plan.sigma_B >= SPEC.sampling_eps) & (plan.sigma_B <= 1.0))
    prefixed, cut = plan.prefix_len_B > 0, plan.cut_B < L
    assert np.all(
        (plan.prefix_len_B == 0) | ((plan.prefix_len_B >= 1) & (plan.prefix_len_B <= L - 1))
    )
    assert np.all((plan.cut_B == L) | ((plan.cut_B >= 1) & (plan.cut_B <= L - 1)))
    assert not np.any(prefixed & cut), "S1 and S2 must be exclusive per row"
    assert set(np.unique(plan.block_B)) <= {1, *SPEC.block_sizes}
    # Probability 0 never applies a strategy; probability 1 always does (S2 only where S1 did not).
    for p, applied in ((probs[0], prefixed), (probs[2], plan.block_B > 1)):
        if p == 0.0:
            assert not applied.any()
        if p == 1.0:
            assert applied.all()
    if probs[1] == 0.0:
        assert not cut.any()
    if probs[1] == 1.0:
        assert np.all(cut | prefixed)

    prefix = pos < plan.prefix_len_B[:, None]
    tail = pos >= plan.cut_B[:, None]
    # S1: the prefix is never masked and reaches the model unchanged.
    assert not np.any(noised.masked_BxL & prefix)
    np.testing.assert_array_equal(noised.noisy_BxL[prefix], tokens[prefix])
    # S2: the tail is pad in input and targets, and never masked.
    assert np.all(noised.targets_BxL[tail] == PAD) and np.all(noised.noisy_BxL[tail] == PAD)
    assert not np.any(noised.masked_BxL & tail)
    np.testing.assert_array_equal(noised.targets_BxL[~tail], tokens[~tail])
    # Padding is never masked; masked positions and only they hold <|mask|>.
    assert not np.any(noised.masked_BxL & ~valid)
    np.testing.assert_array_equal(
        noised.noisy_BxL, np.where(noised.masked_BxL, MASK, noised.targets_BxL)
    )

    # Loss: only logits that predict a masked token (position i for masked i+1) get gradient, so
    # the prefix, the truncated tail and padding carry no loss.
    logits = jax.random.normal(jax.random.key(seed + 2), (B, L, V))
    grad = np.asarray(_loss_grad_wrt_logits(logits, jax.tree.map(jnp.asarray, noised)))
    carries = np.zeros((B, L), bool)
    carries[:, :-1] = noised.masked_BxL[:, 1:]
    assert np.all(np.abs(grad[~carries]) == 0.0)
    assert np.all(np.abs(grad[carries]).sum(-1) > 0.0)
    shifted_tail = np.zeros((B, L), bool)
    shifted_tail[:, :-1] = tail[:, 1:]
    assert np.all(grad[shifted_tail] == 0.0)


def test_probs_zero_is_plain_sigma_masking():
    batch, seq_len = 1024, 64
    tokens = _tokens(0, batch, seq_len)
    valid = np.arange(seq_len)[None, :] < np.random.default_rng(0).integers(
        1, seq_len + 1, (batch, 1)
    )
    plan, noised = _np(
        _plan_and_noise(jax.random.key(3), tokens, jnp.zeros(3), jnp.asarray(valid), SPEC)
    )
    assert np.all(plan.prefix_len_B == 0) and np.all(plan.cut_B == seq_len)
    assert np.all(plan.block_B == 1)
    np.testing.assert_array_equal(noised.targets_BxL, np.asarray(tokens))
    assert not np.any(noised.masked_BxL & ~valid)
    # Token-wise Bernoulli(σ_b): masked count matches Σ σ_b·valid_b (relative sd here ≈ 0.3%).
    expected = (plan.sigma_B[:, None] * valid).sum()
    assert abs(noised.masked_BxL.sum() / expected - 1.0) < 0.02
    # σ = (1−ε)u + ε is uniform on [ε, 1): mean ≈ 0.5.
    assert abs(plan.sigma_B.mean() - 0.5) < 0.03


def test_strategy_rolls_follow_probabilities():
    batch = 20_000
    plan = _np(
        jax.jit(sample_plan, static_argnums=(1, 2, 4))(
            jax.random.key(7), batch, L, jnp.asarray([0.3, 0.5, 0.2]), SPEC
        )
    )
    prefixed, cut, blocked = plan.prefix_len_B > 0, plan.cut_B < L, plan.block_B > 1
    assert abs(prefixed.mean() - 0.3) < 0.02
    # SPEC has the default paper shares: 50% of all rows are cut, all of them among the 70% without
    # a prefix (test_strategy_shares_match_table_3 pins both readings).
    assert abs(cut.mean() - 0.5) < 0.02 and not np.any(prefixed & cut)
    assert abs(blocked.mean() - 0.2) < 0.02
    # Block size uniform over the set; prefix length and cut uniform over 1..L−1.
    sizes = plan.block_B[blocked]
    for k in SPEC.block_sizes:
        assert abs((sizes == k).mean() - 1 / 3) < 0.04
    assert set(np.unique(plan.prefix_len_B[prefixed])) == set(range(1, L))
    assert set(np.unique(plan.cut_B[cut])) == set(range(1, L))
    assert abs(plan.prefix_len_B[prefixed].mean() - L / 2) < 0.5


# --------------------------------------------------------------------------------- S3 block masking


def _fixed_plan(sigma_B: np.ndarray, k: int, seq_len: int) -> NoisePlan:
    batch = sigma_B.shape[0]
    return NoisePlan(
        sigma_B=jnp.asarray(sigma_B, jnp.float32),
        prefix_len_B=jnp.zeros((batch,), jnp.int32),
        cut_B=jnp.full((batch,), seq_len, jnp.int32),
        block_B=jnp.full((batch,), k, jnp.int32),
    )


def _interior_runs(mask_L: np.ndarray) -> list[int]:
    """Lengths of maximal runs of True that touch neither end of the row."""
    runs, start = [], None
    for i, m in enumerate(mask_L):
        if m and start is None:
            start = i
        if not m and start is not None:
            if start > 0:
                runs.append(i - start)
            start = None
    return runs


@pytest.mark.parametrize("k", [2, 4, 8])
def test_block_masking_marginal_rate_is_sigma(k):
    """Statistical test: with blocks of k, every position is masked with probability σ."""
    per_sigma, seq_len = 1024, 64
    sigmas = (0.1, 0.5, 0.9)
    sigma_B = np.repeat(np.asarray(sigmas, np.float32), per_sigma)
    tokens = _tokens(k, sigma_B.shape[0], seq_len)
    noised = _np(
        _apply_plan(jax.random.key(100 + k), tokens, _fixed_plan(sigma_B, k, seq_len), SPEC)
    )
    masked = noised.masked_BxL.reshape(len(sigmas), per_sigma, seq_len)
    for sigma, m in zip(sigmas, masked, strict=True):
        # Overall: 1024·64/k independent blocks → sd ≤ 0.006 at k=8; per position: 1024 independent
        # rows → sd ≤ 0.016. Tolerances are ≥ 4 sd, so the fixed-seed test is not flaky.
        assert abs(m.mean() - sigma) < 0.025, (k, sigma, m.mean())
        per_pos = m.mean(axis=0)
        assert np.max(np.abs(per_pos - sigma)) < 0.075, (k, sigma, per_pos)
        # Masks really come in blocks: interior runs are unions of whole k-blocks.
        runs = [r for row in m[:64] for r in _interior_runs(row)]
        assert runs and all(r % k == 0 for r in runs)
    # Block masking is correlated within a block: P(i+1 masked | i masked) ≫ σ at σ = 0.1.
    m = masked[0]
    both = (m[:, :-1] & m[:, 1:]).sum() / m[:, :-1].sum()
    assert both > 0.1 + 0.5 * (1 - 1 / k) - 0.05


@PROPS
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([2, 4, 8]), sigma=st.floats(0.05, 1.0))
def test_block_masking_is_blockwise(seed, k, sigma):
    tokens = _tokens(seed)
    noised = _np(
        _apply_plan(jax.random.key(seed), tokens, _fixed_plan(np.full(B, sigma), k, L), SPEC)
    )
    block_id = {o: (np.arange(L) + o) // k for o in range(k)}
    for row in noised.masked_BxL:
        assert all(r % k == 0 for r in _interior_runs(row))
        # Some grid offset makes the row's mask constant on every block of that grid.
        assert any(
            all(len(set(row[ids == j])) == 1 for j in np.unique(ids)) for ids in block_id.values()
        )


@pytest.mark.parametrize("epoch", [0, 4])
@pytest.mark.parametrize("shares", ["paper", "release"])
def test_strategy_shares_match_table_3(shares, epoch):
    """Fidelity: the measured share of rows with S1/S2/S3 is Table 3's value (`paper`, the default)
    or the release's S2 share truncate·(1−prefix) (`release`), within 5 binomial sd."""
    rows = 200_000
    probs = PAPER_TABLE_3[epoch]
    p1, p2, p3 = probs.prefix_prob, probs.truncate_prob, probs.block_prob
    spec = NoiseSpec(MASK, PAD, block_sizes=(2, 4, 8), strategy_shares=shares)
    plan = _np(
        jax.jit(sample_plan, static_argnums=(1, 2, 4))(
            jax.random.key(17 + epoch), rows, 16, jnp.asarray([p1, p2, p3], jnp.float32), spec
        )
    )
    prefixed, cut, blocked = plan.prefix_len_B > 0, plan.cut_B < 16, plan.block_B > 1
    assert not np.any(prefixed & cut)  # exclusive per row in both modes
    want_cut = p2 if shares == "paper" else p2 * (1 - p1)
    for name, got, want in (("S1", prefixed, p1), ("S2", cut, want_cut), ("S3", blocked, p3)):
        tolerance = 5 * np.sqrt(want * (1 - want) / rows)
        assert abs(got.mean() - want) < tolerance, (shares, epoch, name, got.mean(), want)
    if shares == "release" and epoch == 4:
        # The two readings differ by far more than the tolerance: 16% vs Table 3's 20%.
        assert cut.mean() < 0.2 - 10 * np.sqrt(0.2 * 0.8 / rows)


def test_strategy_shares_default_and_validation():
    assert MaskingConfig().strategy_shares == "paper"
    assert (
        NoiseSpec.from_configs(ModelConfig.preset("test-micro"), MaskingConfig()).strategy_shares
        == "paper"
    )
    release = MaskingConfig(strategy_shares="release", prefix_prob=0.8, truncate_prob=0.5)
    assert (
        NoiseSpec.from_configs(ModelConfig.preset("test-micro"), release).strategy_shares
        == "release"
    )
    with pytest.raises(ValueError, match="must not exceed 1"):
        MaskingConfig(prefix_prob=0.8, truncate_prob=0.5)
    with pytest.raises(ValueError, match="must not exceed 1"):
        MaskingConfig(curriculum="linear", ramp_to=MaskingProbs(prefix_prob=0.6, truncate_prob=0.6))
    with pytest.raises(ValueError, match="strategy_shares"):
        NoiseSpec(MASK, PAD, strategy_shares="batch")
    # Survives the operator's dump → trainer validate round trip (defaults spelled out).
    for cfg in (MaskingConfig(), release):
        dumped = cfg.model_dump(by_alias=True)
        assert MaskingConfig.model_validate(dumped) == cfg


# --------------------------------------------------------------------------------------------- SFT


def _keep_reference(prompt_L: np.ndarray, frac: float) -> np.ndarray:
    keep = np.zeros_like(prompt_L)
    i = 0
    while i < len(prompt_L):
        if prompt_L[i]:
            j = i
            while j < len(prompt_L) and prompt_L[j]:
                j += 1
            n_keep = int(np.floor(np.float32(frac) * np.float32(j - i)))
            keep[i : i + n_keep] = True
            i = j
        else:
            i += 1
    return keep


_prompt_keep_mask = jax.jit(prompt_keep_mask)


@PROPS
@given(
    prompt=st.lists(st.booleans(), min_size=B * L, max_size=B * L),
    frac=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
)
def test_prompt_keep_mask_keeps_leading_fraction_of_each_prompt_run(prompt, frac):
    prompt = np.asarray(prompt).reshape(B, L)
    keep = np.asarray(_prompt_keep_mask(jnp.asarray(prompt), jnp.float32(frac)))
    for row, got in zip(prompt, keep, strict=True):
        np.testing.assert_array_equal(got, _keep_reference(row, frac))
    if frac == 1.0:
        np.testing.assert_array_equal(keep, prompt)
    if frac == 0.0:
        assert not keep.any()


def _sft_rows(seed: int, batch: int, seq_len: int):
    """Rows like the SFT pipeline makes: prompt, answer, pads (valid), then packing padding."""
    r = np.random.default_rng(seed)
    prompt_len = r.integers(1, seq_len // 2, batch)
    answer_end = prompt_len + r.integers(1, seq_len // 4, batch)
    valid_end = np.minimum(answer_end + r.integers(0, seq_len // 4, batch), seq_len)
    pos = np.arange(seq_len)[None, :]
    prompt = pos < prompt_len[:, None]
    valid = pos < valid_end[:, None]
    tokens = np.where(pos < answer_end[:, None], r.integers(4, MASK, (batch, seq_len)), PAD)
    return tokens.astype(np.int32), prompt, valid, prompt_len, answer_end


@PROPS
@given(seed=st.integers(0, 2**31 - 1))
def test_sft_prompt_never_masked_after_ramp(seed):
    tokens, prompt, valid, *_ = _sft_rows(seed, B, L)
    noised = _np(
        _noise_sft(
            jax.random.key(seed),
            tokens,
            jnp.asarray(prompt),
            jnp.float32(1.0),
            SPEC,
            valid_BxL=jnp.asarray(valid),
        )
    )
    assert not np.any(noised.masked_BxL & prompt)
    assert not np.any(noised.masked_BxL & ~valid)
    np.testing.assert_array_equal(noised.targets_BxL, tokens)  # SFT never truncates
    np.testing.assert_array_equal(noised.noisy_BxL, np.where(noised.masked_BxL, MASK, tokens))


def test_sft_ramp_and_answer_pads():
    batch, seq_len = 2048, 32
    tokens, prompt, valid, prompt_len, answer_end = _sft_rows(1, batch, seq_len)
    pos = np.arange(seq_len)[None, :]
    answer_pads = valid & (pos >= answer_end[:, None])
    rates = {}
    for frac in (0.0, 0.5, 1.0):
        noised = _np(
            _noise_sft(
                jax.random.key(2),
                tokens,
                jnp.asarray(prompt),
                jnp.float32(frac),
                SPEC,
                valid_BxL=jnp.asarray(valid),
            )
        )
        kept = pos < np.floor(np.float32(frac) * prompt_len.astype(np.float32))[:, None]
        assert not np.any(noised.masked_BxL & kept), frac
        free_prompt = prompt & ~kept
        sigma = noised.sigma_B[:, None]
        if free_prompt.any():
            # The prompt tokens the ramp released are masked at rate σ, like the answer.
            rate = (
                noised.masked_BxL[free_prompt].sum()
                / np.broadcast_to(sigma, free_prompt.shape)[free_prompt].sum()
            )
            assert abs(rate - 1.0) < 0.05, (frac, rate)
            # ...and a masked prompt token carries loss (it is in masked_BxL, which the loss scores).
        rates[frac] = noised.masked_BxL[prompt].mean()
        # Pads after the answer are maskable (the model learns to stop) at rate σ.
        pad_rate = (
            noised.masked_BxL[answer_pads].sum()
            / np.broadcast_to(sigma, answer_pads.shape)[answer_pads].sum()
        )
        assert abs(pad_rate - 1.0) < 0.05, (frac, pad_rate)
    assert rates[0.0] > rates[0.5] > rates[1.0] == 0.0


def test_prompt_keep_frac_at_ramps_over_fraction_of_steps():
    total = 1000
    assert curriculum.prompt_keep_frac_at(0, total, 0.05) == 0.0
    assert curriculum.prompt_keep_frac_at(25, total, 0.05) == pytest.approx(0.5)
    assert curriculum.prompt_keep_frac_at(50, total, 0.05) == 1.0
    assert curriculum.prompt_keep_frac_at(999, total, 0.05) == 1.0
    assert (
        curriculum.prompt_keep_frac_at(0, total, 0.0) == 1.0
    )  # no ramp: full prompt from the start
    assert (
        curriculum.prompt_keep_frac_at(0, total, 1.0) == 0.0
        and curriculum.prompt_keep_frac_at(500, total, 1.0) == 0.5
    )


# ------------------------------------------------------------------------------------ spec & config


def test_noise_spec_from_configs_and_static_hashing():
    cfg = ModelConfig.preset("test-micro")
    spec = NoiseSpec.from_configs(cfg, MaskingConfig(block_sizes=[4, 8, 16, 32], sampling_eps=0.01))
    assert spec == NoiseSpec(
        mask_token_id=255, pad_token_id=0, sampling_eps=0.01, block_sizes=(4, 8, 16, 32)
    )
    assert hash(spec) == hash(NoiseSpec(255, 0, 0.01, (4, 8, 16, 32)))
    with pytest.raises(ValueError):
        NoiseSpec(mask_token_id=1, pad_token_id=0, block_sizes=())
    with pytest.raises(ValueError, match="≥ 2"):
        noise_pretrain(jax.random.key(0), jnp.zeros((2, 1), jnp.int32), jnp.zeros(3), spec)


def test_curriculum_change_does_not_recompile():
    traces = []

    @jax.jit
    def step(rng, tokens_BxL, probs_3):
        traces.append(probs_3)  # runs once per trace, i.e. per compilation
        return noise_pretrain(rng, tokens_BxL, probs_3, SPEC)

    tokens = _tokens(0)
    for probs in ([0.0, 0.0, 0.0], [0.01, 0.01, 0.05], [0.2, 0.2, 0.25]):
        step(jax.random.key(0), tokens, jnp.asarray(probs, jnp.float32))
    assert len(traces) == 1


def _tuple(p: MaskingProbs) -> tuple[float, float, float]:
    return (p.prefix_prob, p.truncate_prob, p.block_prob)


def test_paper_table_3_schedule_at_chosen_steps():
    m = MaskingConfig(curriculum="paper-table-3")
    total = 1000  # 5 epochs of 200 steps
    expected = [
        (0.01, 0.01, 0.05),
        (0.05, 0.05, 0.10),
        (0.10, 0.10, 0.15),
        (0.15, 0.15, 0.20),
        (0.20, 0.20, 0.25),
    ]
    for step, want in [
        (0, 0),
        (199, 0),
        (200, 1),
        (399, 1),
        (400, 2),
        (600, 3),
        (799, 3),
        (800, 4),
        (999, 4),
        (5000, 4),
    ]:
        assert _tuple(curriculum.probs_at(m, step, total)) == pytest.approx(expected[want]), step


@settings(max_examples=50, deadline=None)
@given(total=st.integers(5, 10**6), data=st.data())
def test_paper_table_3_epoch_index(total, data):
    step = data.draw(st.integers(0, total - 1))
    m = MaskingConfig(curriculum="paper-table-3")
    assert curriculum.probs_at(m, step, total) == PAPER_TABLE_3[step * 5 // total]


def test_constant_and_linear_schedules():
    const = MaskingConfig(prefix_prob=0.01, truncate_prob=0.01, block_prob=0.01)
    for step in (0, 500, 999):
        assert _tuple(curriculum.probs_at(const, step, 1000)) == (0.01, 0.01, 0.01)
    lin = MaskingConfig(
        curriculum="linear",
        prefix_prob=0.0,
        truncate_prob=0.0,
        block_prob=0.1,
        ramp_to=MaskingProbs(prefix_prob=0.2, truncate_prob=0.1, block_prob=0.3),
    )
    assert _tuple(curriculum.probs_at(lin, 0, 101)) == pytest.approx((0.0, 0.0, 0.1))
    assert _tuple(curriculum.probs_at(lin, 50, 101)) == pytest.approx((0.1, 0.05, 0.2))
    assert _tuple(curriculum.probs_at(lin, 100, 101)) == pytest.approx((0.2, 0.1, 0.3))
    assert _tuple(curriculum.probs_at(lin, 10_000, 101)) == pytest.approx((0.2, 0.1, 0.3))


# ------------------------------------------------------------------------------ block-size phases


def test_block_size_phases_split_the_stage_equally():
    m = MaskingConfig(block_size_phases=[[2], [2, 4], [2, 4, 8]])
    assert m.all_block_sizes() == (2, 4, 8)
    assert MaskingConfig.model_validate(m.model_dump()) == m  # survives the trip to the trainer
    total = 300
    for step, want in [(0, [2]), (99, [2]), (100, [2, 4]), (199, [2, 4]), (200, [2, 4, 8]),
                       (299, [2, 4, 8]), (10_000, [2, 4, 8])]:  # fmt: skip
        assert curriculum.block_sizes_at(m, step, total) == want, step
    flat = MaskingConfig(block_sizes=[4, 8])
    assert (
        curriculum.block_sizes_at(flat, 0, 10) == curriculum.block_sizes_at(flat, 9, 10) == [4, 8]
    )
    assert flat.all_block_sizes() == (4, 8)


@pytest.mark.parametrize(
    "fields",
    [
        {"block_size_phases": []},
        {"block_size_phases": [[2], []]},
        {"block_size_phases": [[0, 2]]},
        {"block_size_phases": [[2]], "block_sizes": [4, 8]},
    ],
)
def test_block_size_phases_reject_bad_input(fields):
    with pytest.raises(ValueError):
        MaskingConfig(**fields)


def test_phase_weights_restrict_the_drawn_block_size_without_recompiling():
    traces = []

    @jax.jit
    def plan(rng, weights_C):
        traces.append(weights_C)
        return sample_plan(rng, 20_000, L, jnp.asarray([0.0, 0.0, 1.0]), SPEC, weights_C)

    for allowed in ([2], [2, 4], [2, 4, 8]):
        sizes = np.asarray(plan(jax.random.key(3), SPEC.block_weights(allowed)).block_B)
        counts = {k: (sizes == k).mean() for k in SPEC.block_sizes}
        for k in SPEC.block_sizes:
            want = 1 / len(allowed) if k in allowed else 0.0
            assert abs(counts[k] - want) < 0.02, (allowed, counts)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="subset"):
        SPEC.block_weights([16])
