"""Many processes, one per host: JAX's multi-controller runtime (`jax.distributed`).

`initialize_once(...)` connects this process to the others exactly once, however many
jobs it runs (a prune job trains its reference first, each through `jobs.run`);
`jobs.run` calls it from `config.distributed` before any other work. Left empty, the
connection settings come from JAX's cluster auto-detection (SLURM, TPU VM pods, GKE).

`process_slice()` is this process's (index, count) for reading its rows of each global
batch (`jaxcompress.data.BatchIterator`); `is_primary()` says whether this process
writes the run's files (metrics, summaries, configs, plots): only process 0 does.
Checkpoints are the exception: every process takes part in Orbax's multi-host save
and restore.
"""
from __future__ import annotations

import jax

from jaxcompress.errors import ConfigError

_connected: tuple | None = None  # the settings of this process's one jax.distributed.initialize call


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def initialize_once(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """`jax.distributed.initialize` with these settings ("" / 0 / -1: auto-detected),
    on the first call in this process only; later calls with the same settings do
    nothing, other settings are a one-line `ConfigError` (a process joins one run).

    On CPU the cross-process collectives are gloo's (`jax_cpu_collectives_implementation`,
    JAX's default since 0.5; set here for JAX versions whose default is none). A failure to
    connect or to detect the cluster is a one-line `ConfigError` saying what to set."""
    global _connected
    settings = (coordinator_address or None, num_processes or None, None if process_id < 0 else process_id)
    if _connected is not None:
        if settings != _connected:
            raise ConfigError(f"this process already joined the run at {_describe(_connected)}; it cannot join "
                              f"{_describe(settings)} too: run each multi-process job in its own processes")
        return
    if jax.distributed.is_initialized():  # the caller's own code connected: keep its connection
        _connected = settings
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(*settings)
    except (RuntimeError, ValueError) as e:
        hint = ("no cluster was detected (SLURM, TPU VM, GKE): set --config.distributed.coordinator_address, "
                "num_processes and process_id" if settings[0] is None
                else "check that every process got the same coordinator address and process count, and that "
                     "process 0 runs and its port is free")
        raise ConfigError(f"cannot connect the processes ({_describe(settings)}): {_first_line(e).rstrip('.')}; "
                          f"{hint}") from None
    _connected = settings


def _describe(settings: tuple) -> str:
    address, count, pid = settings
    if address is None and count is None and pid is None:
        return "auto-detected settings"
    return f"coordinator {address or '(auto)'}, {count or '(auto)'} processes, process id " \
           f"{'(auto)' if pid is None else pid}"


def initialize_from_config(config) -> bool:
    """`initialize_once` from `config.distributed` when `distributed.enabled`; returns
    whether it did (a config without the section runs as one process)."""
    d = config.get("distributed", None)
    if d is None or not d.get("enabled", False):
        return False
    initialize_once(d.get("coordinator_address", ""), d.get("num_processes", 0), d.get("process_id", -1))
    return True


def process_slice() -> tuple[int, int]:
    """(this process's index, the number of processes): which rows of each global batch
    this process reads."""
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files: process 0, or the only process
    (checked without starting a JAX backend when `jax.distributed` is not connected)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0
