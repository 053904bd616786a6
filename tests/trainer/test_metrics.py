"""MFU needs the device's peak: every chip the operator schedules has one, CPU has none."""

from __future__ import annotations

import pytest
from coda_trainer.metrics import mfu, peak_flops_per_device


@pytest.mark.parametrize(
    ("device_kind", "peak"),
    [
        ("TPU v4", 275e12),
        ("TPU v5", 459e12),  # v5p reports itself as plain "TPU v5" (real and compile-only devices)
        ("TPU v5p", 459e12),
        ("TPU v5 lite", 197e12),  # v5e
        ("TPU v6 lite", 918e12),  # v6e
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
    ],
)
def test_peak_flops_of_every_scheduled_chip(device_kind: str, peak: float):
    assert peak_flops_per_device(device_kind) == peak


def test_unknown_devices_have_no_peak_and_no_mfu():
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("TPU v7") is None  # not "TPU v5"/"v6" by substring accident
    assert mfu(1e9, 1e4, "cpu", 1) is None


def test_mfu_counts_all_devices():
    # 4 v5p chips at 459 TFLOP/s; 1.2e9 FLOPs/token at 1.53e5 tokens/s → 10% MFU
    assert mfu(1.2e9, 1.53e5, "TPU v5", 4) == pytest.approx(0.1)
