"""Wall-clock timing of jitted functions: warm-up, interleaved rounds, medians."""
from __future__ import annotations

import time
from typing import Callable, Mapping

import jax
import numpy as np


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved_medians(fns: Mapping[str, Callable[[], object]], rounds: int = 7, calls: int = 5,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, timing them in alternation so that drift of
    the machine's speed affects all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            time_call(fn)
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].extend(time_call(fn) for _ in range(calls))
    return {k: float(np.median(v)) for k, v in samples.items()}


def apply_latencies(nets: Mapping[str, tuple], input_shape, batch_size: int = 128, rounds: int = 5,
                    seed: int = 0) -> dict[str, float]:
    """Median inference seconds per batch of each `name -> (apply, variables)` (`apply(variables,
    x, train=False)`), jitted, on the same random batch, timed in alternation; {} when
    `batch_size` is 0 (off)."""
    if not batch_size:
        return {}
    x = jax.random.normal(jax.random.key(seed), (batch_size, *input_shape))
    fns = {}
    for name, (apply, variables) in nets.items():
        forward = jax.jit(lambda v, x, f=apply: f(v, x, train=False))
        fns[name] = (lambda f=forward, v=variables: f(v, x))
    return interleaved_medians(fns, rounds=rounds, calls=3)


def forward_latencies(nets: Mapping[str, tuple], input_shape, batch_size: int = 128, rounds: int = 5,
                      seed: int = 0) -> dict[str, float]:
    """`apply_latencies` of each `name -> (model, variables)`'s `model.apply`."""
    return apply_latencies({k: (model.apply, v) for k, (model, v) in nets.items()}, input_shape, batch_size,
                           rounds, seed)
