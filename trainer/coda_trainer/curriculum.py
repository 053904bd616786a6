"""The training curriculum: what changes with the step inside one stage, on the host.

Three schedules, each a pure function of (config, step, the stage's total steps) with Python
numbers in and out, so the operator-side checks, the CLI and the tests can evaluate them without
JAX; `coda_trainer.step.stage_knobs` turns their values into the traced `StepKnobs` of the jitted
step (a curriculum change never recompiles):

- `probs_at`: the masking-strategy probabilities (S1 unmaskable prefix, S2 truncated suffix, S3
  block) — constant, a linear ramp, or the paper's Table 3 per epoch;
- `block_sizes_at`: the S3 block sizes in force (the release's equal-length phases);
- `prompt_keep_frac_at`: the SFT prompt ramp, the share of each prompt kept unmaskable.
"""

from __future__ import annotations

from coda_trainer.config import PAPER_TABLE_3, MaskingConfig, MaskingProbs

__all__ = ["block_sizes_at", "probs_at", "prompt_keep_frac_at"]


def probs_at(masking: MaskingConfig, step: int, total_steps: int) -> MaskingProbs:
    """The strategy probabilities in force at `step`."""
    if masking.curriculum == "constant":
        return MaskingProbs(
            prefix_prob=masking.prefix_prob,
            truncate_prob=masking.truncate_prob,
            block_prob=masking.block_prob,
        )
    if masking.curriculum == "paper-table-3":
        epoch = min(int(step * masking.epochs / max(total_steps, 1)), masking.epochs - 1)
        return PAPER_TABLE_3[
            min(epoch * len(PAPER_TABLE_3) // masking.epochs, len(PAPER_TABLE_3) - 1)
        ]
    assert masking.ramp_to is not None  # the config's validator guarantees it for "linear"
    frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)

    def lerp(start: float, end: float) -> float:
        return start + (end - start) * frac

    return MaskingProbs(
        prefix_prob=lerp(masking.prefix_prob, masking.ramp_to.prefix_prob),
        truncate_prob=lerp(masking.truncate_prob, masking.ramp_to.truncate_prob),
        block_prob=lerp(masking.block_prob, masking.ramp_to.block_prob),
    )


def block_sizes_at(masking: MaskingConfig, step: int, total_steps: int) -> list[int]:
    """The S3 block sizes in force at `step` (the release's equal-length phases)."""
    if masking.block_size_phases is None:
        return list(masking.block_sizes)
    n = len(masking.block_size_phases)
    return list(masking.block_size_phases[min(step * n // max(total_steps, 1), n - 1)])


def prompt_keep_frac_at(step: int, total_steps: int, ramp_fraction: float) -> float:
    """The SFT prompt-ramp progress at `step` (the jitted step gets it as f32).

    Grows linearly from 0 at step 0 to 1 at `ramp_fraction · total_steps`, then stays 1 (release:
    `progress_src_mask`). `ramp_fraction == 0` disables the ramp: the full prompt is kept from step 0.
    """
    if ramp_fraction <= 0:
        return 1.0
    ramp_steps = max(1.0, float(total_steps) * ramp_fraction)
    return float(min(max(step / ramp_steps, 0.0), 1.0))
