"""The unmasking schedule, bit-exact with the release's float32 arithmetic.

Dream/CoDA reveal k = int(masked · (1 − s/t)) tokens at step i, where (t, s) are consecutive entries
of `torch.linspace(1, eps, steps + 1)` in float32, and everything that is left at the last step. A
one-ulp difference in a timestep can move k by one, so the timesteps are rebuilt here with the same
formula torch uses (first half counted up from `start`, second half down from `end`, each entry one
fused multiply-add, i.e. rounded once: verified equal to torch 2.x on CPU for steps 1..600) and the
ratio 1 − s/t is formed in float32 exactly as torch does. The sampler then only multiplies the (integer)
number of masks by that float32 ratio and truncates, which is one IEEE multiply on every backend.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reveal_counts", "timesteps_f32", "transfer_ratios"]


def timesteps_f32(eps: float, steps: int) -> np.ndarray:
    """`torch.linspace(1, eps, steps + 1)` (float32), reproduced bit for bit."""
    n = steps + 1
    start, end = np.float32(1.0), np.float32(eps)
    if n == 1:
        return np.array([start], dtype=np.float32)
    step = np.float32((end - start) / np.float32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    # start + step·i with a single rounding (an FMA): exact in float64, then rounded to float32.
    up = (np.float64(start) + np.float64(step) * idx).astype(np.float32)
    down = (np.float64(end) - np.float64(step) * (n - 1 - idx)).astype(np.float32)
    return np.where(idx < n // 2, up, down).astype(np.float32)


def transfer_ratios(eps: float, steps: int) -> np.ndarray:
    """Per-step float32 ratio 1 − s/t; the last entry is 1 (reveal everything left)."""
    ts = timesteps_f32(eps, steps)
    ratios = np.float32(1.0) - ts[1:] / ts[:-1]
    ratios[-1] = np.float32(1.0)
    return ratios.astype(np.float32)


def reveal_counts(num_masks: int, eps: float, steps: int) -> list[int]:
    """k per step for a row that starts with `num_masks` masks and reveals exactly k each step."""
    ratios = transfer_ratios(eps, steps)
    left, counts = num_masks, []
    for i, r in enumerate(ratios):
        k = left if i == steps - 1 else int(np.float32(left) * r)
        counts.append(k)
        left -= k
    return counts
