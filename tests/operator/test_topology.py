"""TPU slice arithmetic against GKE's tables."""

from __future__ import annotations

import pytest
from coda_operator.topology import TopologyError, parse_slice_name, tpu_slice

# (type, topology) → (accelerator label, machine type, chips, hosts, chips per host)
TABLE = [
    ("v4", "2x2x1", "tpu-v4-podslice", "ct4p-hightpu-4t", 4, 1, 4),
    ("v4", "2x2x2", "tpu-v4-podslice", "ct4p-hightpu-4t", 8, 2, 4),
    ("v4", "4x4x8", "tpu-v4-podslice", "ct4p-hightpu-4t", 128, 32, 4),
    ("v5p", "2x2x1", "tpu-v5p-slice", "ct5p-hightpu-4t", 4, 1, 4),
    ("v5p", "2x2x2", "tpu-v5p-slice", "ct5p-hightpu-4t", 8, 2, 4),
    ("v5p", "2x4x4", "tpu-v5p-slice", "ct5p-hightpu-4t", 32, 8, 4),
    ("v5p", "8x8x8", "tpu-v5p-slice", "ct5p-hightpu-4t", 512, 128, 4),
    ("v5p", "16x20x28", "tpu-v5p-slice", "ct5p-hightpu-4t", 8960, 2240, 4),
    ("v5e", "1x1", "tpu-v5-lite-podslice", "ct5lp-hightpu-1t", 1, 1, 1),
    ("v5e", "2x2", "tpu-v5-lite-podslice", "ct5lp-hightpu-4t", 4, 1, 4),
    ("v5e", "2x4", "tpu-v5-lite-podslice", "ct5lp-hightpu-8t", 8, 1, 8),
    ("v5e", "4x4", "tpu-v5-lite-podslice", "ct5lp-hightpu-4t", 16, 4, 4),
    ("v5e", "16x16", "tpu-v5-lite-podslice", "ct5lp-hightpu-4t", 256, 64, 4),
    ("v6e", "1x1", "tpu-v6e-slice", "ct6e-standard-1t", 1, 1, 1),
    ("v6e", "2x2", "tpu-v6e-slice", "ct6e-standard-4t", 4, 1, 4),
    ("v6e", "2x4", "tpu-v6e-slice", "ct6e-standard-8t", 8, 1, 8),
    ("v6e", "4x4", "tpu-v6e-slice", "ct6e-standard-4t", 16, 4, 4),
    ("v6e", "8x16", "tpu-v6e-slice", "ct6e-standard-4t", 128, 32, 4),
]


@pytest.mark.parametrize(("tpu", "topo", "label", "machine", "chips", "hosts", "per_host"), TABLE)
def test_gke_table(
    tpu: str, topo: str, label: str, machine: str, chips: int, hosts: int, per_host: int
) -> None:
    s = tpu_slice(tpu, topo)
    assert (s.accelerator, s.machine_type, s.chips, s.hosts, s.chips_per_host) == (
        label,
        machine,
        chips,
        hosts,
        per_host,
    )
    assert s.hosts * s.chips_per_host == s.chips
    assert s.multi_host == (hosts > 1)


def test_v5p_naming_trap() -> None:
    # v5p-8 counts TensorCores: 4 chips, one host, 2x2x1 — not 8 chips
    s = parse_slice_name("v5p-8")
    assert (s.type, s.topology, s.chips, s.hosts) == ("v5p", "2x2x1", 4, 1)
    assert tpu_slice("v5p", "2x2x2").name == "v5p-16"
    assert parse_slice_name("v4-32").topology == "2x2x4"
    # v5e/v6e names count chips
    assert parse_slice_name("v5litepod-16").topology == "4x4"
    assert parse_slice_name("v6e-8").topology == "2x4"
    assert tpu_slice("v6e", "4x4").name == "v6e-16"
    with pytest.raises(TopologyError, match="must be even"):
        parse_slice_name("v5p-7")
    with pytest.raises(TopologyError, match="use type: v5p, topology: 2x2x1"):
        tpu_slice("v5p-8", "2x2x1")


@pytest.mark.parametrize(
    ("tpu", "topo", "why"),
    [
        ("v5p", "4x4", "3-D"),
        ("v5e", "2x2x1", "2-D"),
        ("v5p", "8x4x4", "write it as 4x4x8"),
        ("v5p", "2x2x3", "not a valid v5p slice"),
        ("v5p", "4x4x6", "not a valid v5p slice"),
        ("v4", "16x16x32", "exceeds the largest v4 slice"),
        ("v6e", "3x3", "not a valid v6e slice"),
        ("v5e", "4x2", "not a valid v5e slice"),
        ("v5e", "32x32", "not a valid v5e slice"),
        ("v6e", "0x4", "malformed"),
        ("v7", "2x2", "unknown TPU type"),
    ],
)
def test_impossible_combinations_have_clear_errors(tpu: str, topo: str, why: str) -> None:
    with pytest.raises(TopologyError, match=why) as exc:
        tpu_slice(tpu, topo)
    if tpu != "v7":
        assert "valid:" in str(exc.value)  # the message lists what would work
