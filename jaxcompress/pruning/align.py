"""Hardware-aligned channel counts: kept widths are multiples of a per-backend number.

FLOPs are not time. On XLA:CPU a ResNet-56 pruned to 50% of its MACs at widths
11/23/46 runs *slower* than the dense 16/32/64 one, while 8/16/32 runs twice as fast
(`benchmarks/configs/width_alignment.py` measures this table). So every pruning path
(`criteria.keep_counts`, `criteria.global_counts`, the RL environment's action
rounding) rounds kept channel counts to a multiple m of the backend's vector width:
8 on CPU (AVX2/AVX-512 float lanes) and GPU (tensor-core tiles), 128 on TPU (lanes).
A group keeps k in {m, 2m, ..., floor(W/m) m} or its full width W, never 0.

`multiple=None` (the configs' default) means "the backend's multiple, capped per group
at the largest power of two <= W/2" so a narrow group (LeNet-5's 6-channel conv1)
can still be pruned; an explicit integer applies to every pruned group as given and
must not exceed any pruned group's width.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxcompress.errors import ConfigError

BACKEND_MULTIPLE = {"cpu": 8, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 128}


def backend_multiple(backend: str | None = None) -> int:
    """The channel multiple that pays on `backend` (default: JAX's default backend)."""
    return BACKEND_MULTIPLE.get(backend or jax.default_backend(), 8)


def group_multiples(widths: Sequence[int], groups: Sequence[int], multiple: int | None) -> list[int]:
    """Channel multiple per group (1 for groups not in `groups`).

    `multiple=None`: `backend_multiple()` capped per group at the largest power of two
    <= W/2 (at least 1). An integer: that multiple for every group in `groups`; a
    clear error if it is below 1 or above a pruned group's width.
    """
    out = [1] * len(widths)
    if multiple is None:
        m = backend_multiple()
        for g in groups:
            half = max(1, int(widths[g]) // 2)
            out[g] = max(1, min(m, 1 << (half.bit_length() - 1)))
        return out
    if int(multiple) != multiple or multiple < 1:
        raise ConfigError(f"channel multiple must be an integer >= 1 (or None for the backend's), got {multiple}")
    for g in groups:
        if multiple > widths[g]:
            raise ConfigError(f"channel multiple {multiple} is larger than group {g}'s width {widths[g]}; "
                              f"choose a multiple <= {widths[g]}, None (the backend's), or leave the group "
                              f"out of the pruned scope")
        out[g] = int(multiple)
    return out


def aligned(width: int, count: float, multiple: int) -> int:
    """The allowed count (`candidates(width, multiple)`: multiples of `multiple` and the
    full width) nearest to `count`; a tie goes to the larger count."""
    ks = candidates(width, multiple)
    return int(ks[np.argmin(np.abs(ks - count) - 1e-9 * ks)])


def candidates(width: int, multiple: int, lowest: int | None = None) -> np.ndarray:
    """Every count a group of `width` channels may keep at this multiple (ascending),
    from `lowest` (default `multiple`) to `width`."""
    lo = multiple if lowest is None else lowest
    ks = [k for k in range(multiple, width + 1, multiple) if k >= lo]
    if not ks or ks[-1] != width:
        ks.append(width)
    return np.asarray(ks, np.int64)
