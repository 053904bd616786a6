"""Arithmetic admission: the shape rules a stage would break at step 0 on its slice, without JAX.

A stage's devices are its slice(s): TPU chips (one JAX device per chip: v4/v5p run in megacore
mode) or GPUs; its JAX processes are the hosts (TPU VMs, GPU nodes). The trainer lays the global
batch over the mesh's `data` × `fsdp` axes and reads `batch.sequences / processes` rows per host,
so a shape that does not divide fails only after the slice was provisioned — hours of queueing
for an exit 78. These rules refuse it before anything is created:

- the mesh (`stage.mesh`, -1 resolved) multiplies out to the stage's devices;
- on a Multislice, `mesh.data` is a multiple of the slices (only data parallelism crosses DCN);
- every micro-batch (`batch.sequences / batch.gradAccum`) divides over the data-parallel devices
  (mesh data × fsdp) and over the hosts;
- `batch.seqLen` fits the model's positions, and every S3 block size fits `batch.seqLen`.

Each problem is one line naming the field, the numbers and a fix. Memory is not arithmetic:
`coda_trainer.preflight` compiles the step for the slice to answer "does it fit".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coda_trainer.config import MeshConfig, ModelConfig, StageConfig

from coda_operator.topology import TpuSlice

__all__ = ["StageDevices", "gpu_devices", "mesh_shape", "stage_problems", "tpu_devices"]


@dataclass(frozen=True)
class StageDevices:
    """The JAX devices and processes of a stage's pods."""

    devices: int  # TPU chips or GPUs, over all slices
    processes: int  # hosts: TPU VMs or GPU nodes, over all slices
    slices: int
    what: str  # for messages: "v5p 4x4x4 (64 chips)"


def tpu_devices(tpu: TpuSlice, slices: int = 1) -> StageDevices:
    count = f"{slices} × " if slices > 1 else ""
    return StageDevices(
        devices=tpu.chips * slices,
        processes=tpu.hosts * slices,
        slices=slices,
        what=f"{count}{tpu.type} {tpu.topology} ({tpu.chips * slices} chips)",
    )


def gpu_devices(gpu_type: str, gpus_per_node: int, nodes: int) -> StageDevices:
    return StageDevices(
        devices=gpus_per_node * nodes,
        processes=nodes,
        slices=1,
        what=f"{nodes} × {gpus_per_node} {gpu_type} ({gpus_per_node * nodes} GPUs)",
    )


def _batch_fix(sequences: int, grad_accum: int, shards: int) -> str:
    """How to make sequences / grad_accum a multiple of `shards`: the nearest batch sizes, and
    grad_accum values that divide the batch as it is."""
    step = shards * grad_accum
    lower, upper = (sequences // step) * step, (sequences // step + 1) * step
    sizes = f"{lower} or {upper}" if lower else f"{upper}"
    fix = f"use {sizes} sequences"
    accums = [
        a for a in range(1, sequences + 1) if sequences % a == 0 and (sequences // a) % shards == 0
    ]
    if accums:
        near = sorted(accums, key=lambda a: (abs(a - grad_accum), a))[:2]
        fix += f", or gradAccum {' or '.join(map(str, sorted(near)))}"
    return fix


def stage_problems(
    stage: StageConfig, model: ModelConfig, devices: StageDevices | None, *, field: str
) -> list[str]:
    """Every shape rule `stage` breaks on `devices` (None: model rules only, e.g. a local run).

    `field` is the stage's path in messages, e.g. "spec.stages[2]".
    """
    problems: list[str] = []
    sequences, seq_len, accum = stage.batch.sequences, stage.batch.seq_len, stage.batch.grad_accum
    if seq_len > model.max_position_embeddings:
        problems.append(
            f"{field}.batch.seqLen: {seq_len} exceeds the model's maxPositionEmbeddings "
            f"({model.max_position_embeddings})"
        )
    if stage.kind in ("pretrain", "midtrain"):
        sizes = stage.masking.all_block_sizes()
        if max(sizes) > seq_len:
            name = "blockSizePhases" if stage.masking.block_size_phases else "blockSizes"
            problems.append(
                f"{field}.masking.{name}: block size {max(sizes)} exceeds batch.seqLen ({seq_len}); "
                f"use sizes ≤ {seq_len}"
            )
    if devices is None:
        return problems
    mesh = stage.mesh
    try:
        data, fsdp, _ = mesh.resolve(devices.devices)
    except ValueError:
        given = f"data={mesh.data}, fsdp={mesh.fsdp}, tensor={mesh.tensor}"
        problems.append(
            f"{field}.mesh: {given} does not multiply out to the {devices.devices} devices of "
            f"{devices.what}; set one axis to -1 (it takes the devices left) and make the others "
            f"divide {devices.devices}, e.g. {{data: {devices.slices}, fsdp: -1, tensor: 1}}"
        )
        return problems
    if devices.slices > 1 and data % devices.slices:
        problems.append(
            f"{field}.mesh.data: {data} is not a multiple of the {devices.slices} slices of "
            f"{devices.what} (data parallelism is the only axis that crosses slices, over DCN); "
            f"set mesh.data: {devices.slices}"
        )
    micro = sequences // accum
    per = f"{sequences} sequences"
    if accum > 1:
        per += f" / gradAccum {accum} = {micro} per micro-batch"
    shards = data * fsdp
    if micro % shards:
        problems.append(
            f"{field}.batch.sequences: {per} cannot be split over the {shards} data-parallel "
            f"devices (mesh data×fsdp = {data}×{fsdp} on {devices.what}); "
            f"{_batch_fix(sequences, accum, shards)}"
        )
    elif micro % devices.processes:
        problems.append(
            f"{field}.batch.sequences: {per} cannot be split over the {devices.processes} hosts "
            f"of {devices.what} (each host reads an equal share); "
            f"{_batch_fix(sequences, accum, math.lcm(shards, devices.processes))}"
        )
    readers = stage.batch.readers
    if readers is not None and readers % devices.processes:
        problems.append(
            f"{field}.batch.readers: {readers} data readers cannot be split over the "
            f"{devices.processes} hosts of {devices.what} (each host runs an equal number); "
            f"use a multiple of {devices.processes}"
        )
    return problems


def mesh_shape(mesh: MeshConfig, devices: int) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) of `mesh` on `devices`, or None when it does not resolve."""
    try:
        return mesh.resolve(devices)
    except ValueError:
        return None
