"""Several hosts as one trainer: `jax.distributed` start-up from the pod's environment, and stopping
every process at the same step.

- `maybe_initialize_distributed` calls `jax.distributed.initialize()` when the environment says
  multi-host (`JAX_COORDINATOR_ADDRESS`, or a multi-host TPU slice: `TPU_WORKER_HOSTNAMES` with
  several hosts, `MEGASCALE_*`), with the process id from the operator's pod env
  (`distributed_settings`, pure), bounded heartbeat/shutdown timeouts (a dead peer fails the others
  instead of hanging them) and gloo collectives when the devices are CPUs.
- `StopFlag` records SIGTERM/SIGINT for the training loop; `StopVote` makes one host's signal stop
  every host after the same step, so that all of them save the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from coda_trainer.config import ConfigError
from coda_trainer.contract import ENV_HOST_ID, ENV_HOSTS_PER_SLICE, ENV_NUM_SLICES, ENV_SLICE_ID

__all__ = [
    "HEARTBEAT_TIMEOUT_S",
    "INITIALIZATION_TIMEOUT_S",
    "SHUTDOWN_TIMEOUT_S",
    "StopFlag",
    "StopVote",
    "cpu_only",
    "distributed_settings",
    "maybe_initialize_distributed",
    "multihost_env",
]

log = logging.getLogger(__name__)


def multihost_env(env: dict[str, str]) -> bool:
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


# How the distributed runtime notices a dead process. The coordination service (hosted by process
# 0) declares a process dead when its heartbeats (sent by a C++ thread, so a long compile or a busy
# Python thread does not delay them) stop for HEARTBEAT_TIMEOUT_S, and then aborts every other
# process: without this, survivors of a kill -9 / lost VM wait in their next collective forever
# (gloo and the TPU/GPU collectives have no useful timeout of their own). JAX's default is 100 s;
# 60 s still rides out a network blip or a stalled host, and on GKE the JobSet restarts the whole
# group anyway as soon as the dead pod's Job fails, so this only bounds how long survivors linger.
# Measured (tests/trainer/test_multihost.py, 2 CPU processes, kill -9 of process 1): gloo reports
# the reset connection at once, and the survivor aborts (SIGABRT) 33-41 s after the kill, at the
# runtime's shutdown barrier, once the heartbeat timeout has marked its peer dead.
HEARTBEAT_TIMEOUT_S = 60
# A process that exits (done, exit 75, or a Python error on that host only) waits at most this
# long for the others at the runtime's shutdown barrier, then fails instead of hanging (JAX: 300).
SHUTDOWN_TIMEOUT_S = 60
# How long processes wait for each other to connect at start: pods of one JobSet can start minutes
# apart (image pulls on fresh nodes). JAX's default.
INITIALIZATION_TIMEOUT_S = 300


def distributed_settings(env: dict[str, str]) -> dict[str, Any]:
    """`jax.distributed.initialize` arguments from a trainer pod's environment (pure).

    The operator renders `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and the contract's
    `ENV_SLICE_ID` (JobSet job index), `ENV_NUM_SLICES`, `ENV_HOST_ID` (the Job's completion index:
    the host within its slice) and `ENV_HOSTS_PER_SLICE`; its launch line exports `JAX_PROCESS_ID`
    = slice_id * hosts_per_slice + host_id, so the processes of slice 0 come first. The id is
    computed here from the same variables (so the trainer does not depend on the shell step) and
    must agree with `JAX_PROCESS_ID` when both are set. Without `ENV_HOST_ID`: `JAX_PROCESS_ID`,
    or `JOB_COMPLETION_INDEX` (one slice); without any of them (a TPU slice without our env) JAX
    detects the cluster itself.
    """
    kwargs: dict[str, Any] = {
        "initialization_timeout": INITIALIZATION_TIMEOUT_S,
        "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
        "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S,
    }
    if not env.get("JAX_COORDINATOR_ADDRESS"):
        return kwargs
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    num = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
    if num is not None:
        kwargs["num_processes"] = num
    if env.get(ENV_HOST_ID):
        hosts, host = int(env.get(ENV_HOSTS_PER_SLICE) or 1), int(env[ENV_HOST_ID])
        slice_id, slices = int(env.get(ENV_SLICE_ID) or 0), int(env.get(ENV_NUM_SLICES) or 1)
        if not (0 <= host < hosts and 0 <= slice_id < slices):
            raise ConfigError(
                f"host {host} of slice {slice_id} is outside {slices} slice(s) × {hosts} host(s)"
            )
        if num is not None and num != slices * hosts:
            raise ConfigError(
                f"JAX_NUM_PROCESSES={num} but the job has {slices} slice(s) × {hosts} host(s)"
            )
        kwargs["process_id"] = slice_id * hosts + host
        if env.get("JAX_PROCESS_ID") and int(env["JAX_PROCESS_ID"]) != kwargs["process_id"]:
            raise ConfigError(
                f"JAX_PROCESS_ID={env['JAX_PROCESS_ID']} but host {host} of slice {slice_id} "
                f"({hosts} host(s) per slice) is process {kwargs['process_id']}"
            )
    elif pid := env.get("JAX_PROCESS_ID") or env.get("JOB_COMPLETION_INDEX"):
        kwargs["process_id"] = int(pid)
    return kwargs


def _accelerator_plugins() -> list[str]:
    """Installed JAX accelerator backends (PJRT plugins, libtpu), found without initialising JAX."""
    import importlib.util
    import pkgutil
    from importlib.metadata import entry_points

    found = [ep.name for ep in entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # namespace package of the CUDA/ROCm/TPU plugins

        found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def cpu_only(platforms: str | None, accelerator_plugins: Sequence[str]) -> bool:
    """Whether JAX will run on CPU devices only (pure): `JAX_PLATFORMS`/`jax_platforms` if set,
    else whether no accelerator backend is installed."""
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not accelerator_plugins


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize()` on multi-host jobs; returns whether it did."""
    import jax

    env = dict(os.environ if env is None else env)
    if not multihost_env(env):
        return False
    kwargs = distributed_settings(env)
    if cpu_only(env.get("JAX_PLATFORMS") or jax.config.jax_platforms, _accelerator_plugins()):
        # Cross-process collectives of CPU devices (several processes on one machine in the tests,
        # CPU-only pods) go through gloo over TCP; the choice is read when the CPU backend is
        # created, so it is made before `initialize`. TPU/GPU devices use their own interconnect.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service would catch SIGTERM in C++, but our handler (`StopFlag`, installed
    # later) replaces it; the processes agree on the step to stop at with `StopVote` instead.
    jax.config.update("jax_enable_preemption_service", False)
    log.info(
        "jax.distributed.initialize(%s)",
        ", ".join(f"{k}={v}" for k, v in kwargs.items()),
    )
    jax.distributed.initialize(**kwargs)
    return True


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops without saving
        self.signal = signum
        log.warning(
            "received %s: finishing this step, saving a checkpoint (every process, at the step "
            "they agree on), then exiting",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopVote:
    """Every process learns whether any process wants to stop, at the same step.

    SIGTERM reaches one host (GKE preempts one VM; `kubectl delete` signals pods one by one), but a
    checkpoint is collective: every process must save the same step, and a process that left the
    loop alone would leave the others blocked in the next step's collectives. So after every step
    each process casts its stop flag and all of them take the maximum: one int32 all-reduce over all
    devices (each device holds its process's flag). The vote cast after step s is read after step
    s+1 has been dispatched, so the host never waits for the step it just dispatched (it stays one
    step ahead of the devices) and every process decides on the same vote: a SIGTERM received
    during step s stops every process after step s+1 (or s+2 if it arrives after the vote of s was
    cast). `seconds` counts the host time the loop spends in it, logged at the end ("stop votes");
    measured on CPU (2 processes × 2 devices, gloo on loopback, 2 shared cores): 1–3 ms per step.
    """

    def __init__(self, mesh: Any):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = np.asarray(mesh.devices).reshape(-1)
        voters = Mesh(devices, ("voter",))
        self._sharding = NamedSharding(voters, PartitionSpec("voter"))
        self._local = len([d for d in devices if d.process_index == jax.process_index()])
        self._shape = (len(devices),)
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(voters, PartitionSpec()))
        # Compiled (and the collective proven to work) before training starts, not in step 1.
        jax.block_until_ready(self._max(self._flags(False)))
        self._cast: Any = None  # the vote cast after the previous step, not read yet
        self.seconds = 0.0

    def _flags(self, stop_here: bool) -> Any:
        import jax
        import numpy as np

        flags = np.full((self._local,), int(stop_here), np.int32)
        return jax.make_array_from_process_local_data(self._sharding, flags, self._shape)

    def __call__(self, stop_here: bool) -> bool:
        """Cast this process's flag for the step just dispatched; return the previous vote."""
        import jax

        t0 = time.perf_counter()
        cast = self._max(self._flags(stop_here))
        previous, self._cast = self._cast, cast
        agreed = previous is not None and bool(jax.device_get(previous))
        self.seconds += time.perf_counter() - t0
        return agreed
