"""TPU slice arithmetic: (type, topology) → GKE node labels, machine type, chips and hosts.

Facts (GKE "Plan TPUs" tables; xpk's system characteristics agree):

| type | accelerator label      | chips/VM (multi-host) | TensorCores/chip | slice name counts |
|------|------------------------|-----------------------|------------------|-------------------|
| v4   | tpu-v4-podslice        | 4 (ct4p-hightpu-4t)   | 2                | TensorCores       |
| v5p  | tpu-v5p-slice          | 4 (ct5p-hightpu-4t)   | 2                | TensorCores       |
| v5e  | tpu-v5-lite-podslice   | 4 (ct5lp-hightpu-4t)  | 1                | chips             |
| v6e  | tpu-v6e-slice          | 4 (ct6e-standard-4t)  | 1                | chips             |

- v4/v5p topologies are 3-D (AxBxC). 2x2x1 is one host of 4 chips; 2x2x2, 2x2x4 and 2x4x4 are the
  small multi-host shapes; anything larger has every dimension a multiple of 4, written A ≤ B ≤ C.
- v5e/v6e topologies are 2-D. 1x1 (1 chip), 2x2 (4 chips) and 2x4 (8 chips on one
  `-8t` machine) are single-host; 4x4 … 16x16 are multi-host slices of 4-chip VMs.
- The naming trap: "v5p-8" (and "v4-8") counts TensorCores, so it is 4 chips = 2x2x1, one host;
  "v5litepod-8"/"v6e-8" count chips (8 chips = 2x4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "TPU_TYPES",
    "TopologyError",
    "TpuSlice",
    "TpuType",
    "canonical_topology",
    "multislice_error",
    "parse_slice_name",
    "tpu_slice",
    "valid_topologies_hint",
]

TpuType = Literal["v4", "v5e", "v5p", "v6e"]


class TopologyError(ValueError):
    """An impossible (type, topology) combination; the message says what would be valid."""


@dataclass(frozen=True)
class _Family:
    accelerator: str
    dims: int
    tensorcores_per_chip: int
    # machine type by chips per host
    machines: dict[int, str]
    max_chips: int
    # single-host topologies → chips on that one host
    single_host: dict[str, int]
    # multi-host topologies allowed explicitly (besides the "multiples of 4" rule for 3-D types)
    multi_host: tuple[str, ...]
    slice_prefix: str


_FAMILIES: dict[str, _Family] = {
    "v4": _Family(
        accelerator="tpu-v4-podslice",
        dims=3,
        tensorcores_per_chip=2,
        machines={4: "ct4p-hightpu-4t"},
        max_chips=4096,
        single_host={"2x2x1": 4},
        multi_host=("2x2x2", "2x2x4", "2x4x4"),
        slice_prefix="v4",
    ),
    "v5p": _Family(
        accelerator="tpu-v5p-slice",
        dims=3,
        tensorcores_per_chip=2,
        machines={4: "ct5p-hightpu-4t"},
        max_chips=8960,
        single_host={"2x2x1": 4},
        multi_host=("2x2x2", "2x2x4", "2x4x4"),
        slice_prefix="v5p",
    ),
    "v5e": _Family(
        accelerator="tpu-v5-lite-podslice",
        dims=2,
        tensorcores_per_chip=1,
        machines={1: "ct5lp-hightpu-1t", 4: "ct5lp-hightpu-4t", 8: "ct5lp-hightpu-8t"},
        max_chips=256,
        single_host={"1x1": 1, "2x2": 4, "2x4": 8},
        multi_host=("4x4", "4x8", "8x8", "8x16", "16x16"),
        slice_prefix="v5litepod",
    ),
    "v6e": _Family(
        accelerator="tpu-v6e-slice",
        dims=2,
        tensorcores_per_chip=1,
        machines={1: "ct6e-standard-1t", 4: "ct6e-standard-4t", 8: "ct6e-standard-8t"},
        max_chips=256,
        single_host={"1x1": 1, "2x2": 4, "2x4": 8},
        multi_host=("4x4", "4x8", "8x8", "8x16", "16x16"),
        slice_prefix="v6e",
    ),
}

TPU_TYPES: tuple[str, ...] = tuple(_FAMILIES)
_TOPOLOGY = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$")
_SLICE_NAME = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-([1-9][0-9]*)$")


@dataclass(frozen=True)
class TpuSlice:
    """One TPU slice as GKE schedules it: a node pool of `hosts` VMs with `chips_per_host` each."""

    type: str
    topology: str
    accelerator: str  # value of the cloud.google.com/gke-tpu-accelerator node label
    machine_type: str
    chips: int
    hosts: int
    chips_per_host: int
    tensorcores: int

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1

    @property
    def name(self) -> str:
        """The Cloud TPU slice name (v5p-8, v5litepod-16, ...): TensorCores for v4/v5p, chips otherwise."""
        return f"{_FAMILIES[self.type].slice_prefix}-{self.tensorcores}"


def valid_topologies_hint(tpu_type: str) -> str:
    fam = _FAMILIES[tpu_type]
    small = ", ".join([*fam.single_host, *fam.multi_host])
    if fam.dims == 3:
        return (
            f"{small}, or AxBxC with A ≤ B ≤ C all multiples of 4 and at most {fam.max_chips} chips "
            f"(e.g. 4x4x4, 4x8x8, 8x8x8)"
        )
    return small


def tpu_slice(tpu_type: str, topology: str) -> TpuSlice:
    """Resolve a (type, topology) pair; raises TopologyError naming what would be valid."""
    if tpu_type not in _FAMILIES:
        hint = ""
        m = _SLICE_NAME.match(tpu_type)
        if m:
            name_slice = parse_slice_name(tpu_type)
            hint = (
                f" ({tpu_type!r} is a slice name: use type: {name_slice.type}, "
                f"topology: {name_slice.topology})"
            )
        raise TopologyError(f"unknown TPU type {tpu_type!r}; known: {', '.join(TPU_TYPES)}{hint}")
    fam = _FAMILIES[tpu_type]
    if not _TOPOLOGY.match(topology):
        raise TopologyError(
            f"malformed TPU topology {topology!r} for {tpu_type}: expected "
            f"{'AxBxC' if fam.dims == 3 else 'AxB'}, valid: {valid_topologies_hint(tpu_type)}"
        )
    dims = [int(d) for d in topology.split("x")]
    if len(dims) != fam.dims:
        raise TopologyError(
            f"{tpu_type} topologies are {fam.dims}-D, got {topology!r}; valid: {valid_topologies_hint(tpu_type)}"
        )
    chips = math.prod(dims)
    if topology in fam.single_host:
        per_host = fam.single_host[topology]
        return TpuSlice(
            type=tpu_type,
            topology=topology,
            accelerator=fam.accelerator,
            machine_type=fam.machines[per_host],
            chips=chips,
            hosts=1,
            chips_per_host=per_host,
            tensorcores=chips * fam.tensorcores_per_chip,
        )
    ok = topology in fam.multi_host or (
        fam.dims == 3
        and all(d % 4 == 0 for d in dims)
        and dims == sorted(dims)
        and chips <= fam.max_chips
    )
    if not ok:
        why = ""
        if fam.dims == 3 and all(d % 4 == 0 for d in dims):
            if dims != sorted(dims):
                why = f" (write it as {'x'.join(map(str, sorted(dims)))})"
            elif chips > fam.max_chips:
                why = (
                    f" ({chips} chips exceeds the largest {tpu_type} slice, {fam.max_chips} chips)"
                )
        raise TopologyError(
            f"topology {topology!r} is not a valid {tpu_type} slice{why}; valid: {valid_topologies_hint(tpu_type)}"
        )
    return TpuSlice(
        type=tpu_type,
        topology=topology,
        accelerator=fam.accelerator,
        machine_type=fam.machines[4],
        chips=chips,
        hosts=chips // 4,
        chips_per_host=4,
        tensorcores=chips * fam.tensorcores_per_chip,
    )


# Canonical topology per chip count (the shapes GKE documents first for that size).
_CANONICAL_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    768: "8x8x12",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_CANONICAL_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


def parse_slice_name(name: str) -> TpuSlice:
    """Cloud TPU slice names → slice: 'v5p-8' is 8 TensorCores = 4 chips = 2x2x1 (one host)."""
    m = _SLICE_NAME.match(name)
    if not m:
        raise TopologyError(
            f"not a TPU slice name: {name!r} (expected e.g. v5p-8, v4-32, v5litepod-16, v6e-8)"
        )
    prefix, count = m.group(1), int(m.group(2))
    tpu_type = {"v5litepod": "v5e"}.get(prefix, prefix)
    fam = _FAMILIES[tpu_type]
    if count % fam.tensorcores_per_chip:
        raise TopologyError(
            f"{name}: {tpu_type} slice names count TensorCores ({fam.tensorcores_per_chip} per chip), "
            f"so the number must be even"
        )
    chips = count // fam.tensorcores_per_chip
    table = _CANONICAL_3D if fam.dims == 3 else _CANONICAL_2D
    if chips not in table:
        raise TopologyError(f"{name}: no standard {tpu_type} topology has {chips} chips")
    return tpu_slice(tpu_type, table[chips])


def canonical_topology(tpu_type: str, chips: int) -> str | None:
    """The standard topology of a `tpu_type` slice with `chips` chips, if there is one."""
    table = _CANONICAL_3D if _FAMILIES[tpu_type].dims == 3 else _CANONICAL_2D
    return table.get(chips)


def multislice_error(tpu: TpuSlice, slices: int) -> str | None:
    """Why `slices` copies of `tpu` cannot form a Multislice, or None when they can.

    GKE runs Multislice on multi-host TPU node pools only: single-host slices (one VM each) are
    not joined over DCN, so such a JobSet would never start as one job.
    """
    if slices <= 1 or tpu.multi_host:
        return None
    total = tpu.chips * slices
    one = canonical_topology(tpu.type, total)
    instead = f"one {tpu.type} {one} slice ({total} chips)" if one else "one larger slice"
    return (
        f"{slices} slices of {tpu.type} {tpu.topology}: Multislice joins multi-host slices only "
        f"(GKE schedules it on multi-host TPU node pools) and {tpu.topology} is a single host; "
        f"use {instead}, or a multi-host topology per slice"
    )
