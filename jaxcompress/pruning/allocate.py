"""Hardware-aware allocation: per-group kept channel counts within a FLOPs budget that
a latency model rates fastest.

One uniform keep ratio spends the budget evenly, but a device does not run every layer
equally well: on XLA:CPU a ResNet-56's 3x3 convolutions at 32x32 pixels and 8-16
channels do a third of the work per second that the 8x8-pixel, 64-channel ones do
(`benchmarks/configs/peer_torch_pruning.py`, allocation "latency"). So at the same
MACs, removing channels where the device is slow buys more time.

`latency_counts` prices a MAC in units of the dense network's predicted latency and,
for a price lam, minimises `latency / dense latency - lam * MACs / dense MACs` by
coordinate descent from the full widths (each group in turn takes its best aligned
count, `align.candidates`, the others fixed, until none moves); a bisection on lam
finds the largest-MACs network within the FLOPs budget, and a last greedy pass
spends what is left of the budget on the groups that add the most MACs per
predicted second. The latency is any function of the widths, normally a
`jaxcompress.latency.LatencyModel`'s `layer_sum` (the measured per-layer table of
this device); each distinct width vector is priced once. A heuristic, like
NetAdapt's (Yang et al. 2018) greedy steps, but one that moves a group by several
steps at once: on ResNet-56 at 50% MACs it finds a network predicted (and measured)
faster than the best stage-uniform one an exhaustive search finds.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress import latency as lat
from jaxcompress.models.table import ModelTable
from jaxcompress.pruning import align
from jaxcompress.pruning import criteria as C


def latency_counts(table: ModelTable, flops_budget: float, latency: Callable[[list[int]], float],
                   groups: Sequence[int], multiple: int | None = None, iters: int = 16,
                   measure: Callable[[list[list[int]]], Sequence[float]] | None = None,
                   measured: int = 6) -> list[int]:
    """Kept channels per group (groups outside `groups` whole, counts aligned to each
    group's multiple, `align.group_multiples`) with MACs <= `flops_budget` of the dense
    network's, chosen to minimise `latency(counts)` (module docstring; `iters` bisection
    steps on the price of a MAC).

    With `measure` (widths vectors -> measured seconds of each whole network, e.g.
    `jaxcompress.latency.measure_networks`), the `measured` best-predicted candidates
    (`latency_allocations`) are timed and the fastest measured one is returned: a
    layer table misses what happens between layers, a whole network does not.

    A budget that every group at its smallest count cannot meet is a one-line
    ConfigError, raised before any latency is measured.
    """
    candidates = latency_allocations(table, flops_budget, latency, groups, multiple, iters)
    if measure is None or len(candidates) == 1:
        return candidates[0]
    candidates = candidates[:measured]
    return candidates[int(np.argmin(measure(candidates)))]


def device_latency_counts(table: ModelTable, flops_budget: float, groups: Sequence[int], multiple: int | None,
                          batch: int, path: str | None = None) -> tuple[list[int], Callable]:
    """`(counts, predict)`: `latency_counts` on this device at this batch size, where this
    device's cached layer table (`jaxcompress.latency.LatencyTable`, at `path` or the
    default cache) predicts (`predict(widths)`: its sum over the layers, seconds) and the
    best-predicted candidates measured as whole networks decide."""
    predict = lat.LatencyModel(lat.LatencyTable.load(path), table, batch).layer_sum
    counts = latency_counts(table, flops_budget, predict, groups, multiple,
                            measure=lambda ws: lat.measure_networks(table, ws, batch))
    return counts, predict


def latency_allocations(table: ModelTable, flops_budget: float, latency: Callable[[list[int]], float],
                        groups: Sequence[int], multiple: int | None = None, iters: int = 16) -> list[list[int]]:
    """Every distinct allocation `latency_counts` reaches (one per price of a MAC tried,
    each filled up to the budget) that keeps at least the MACs of the uniform keep ratio
    meeting the budget (`criteria.keep_ratio_for_flops`), and that uniform allocation
    itself: the lowest predicted latency first."""
    if not 0.0 < flops_budget <= 1.0:
        raise ConfigError(f"flops_budget={flops_budget:g} must be a fraction of the dense MACs in (0, 1]")
    groups = list(groups)
    mults = align.group_multiples(table.widths, groups, multiple)
    steps = {g: align.candidates(table.widths[g], mults[g]) for g in groups}
    count_macs = jax.jit(lambda w: cost.count(table, w)["macs"])
    dense = float(count_macs(np.asarray(table.widths, np.float32)))

    macs_memo: dict[tuple, float] = {}

    def macs(counts) -> float:
        key = tuple(counts)
        if key not in macs_memo:
            macs_memo[key] = float(count_macs(np.asarray(key, np.float32))) / dense
        return macs_memo[key]

    lowest = list(table.widths)
    for g in groups:
        lowest[g] = int(steps[g][0])
    if macs(lowest) > flops_budget:
        raise ConfigError(f"a FLOPs budget of {flops_budget:.1%} cannot be met: every prunable group at its "
                          f"smallest count leaves {macs(lowest):.1%}; prune more groups (prune.scope=all), lower "
                          f"the channel multiple, or raise the budget")
    priced: dict[tuple, float] = {}

    def seconds(counts) -> float:
        key = tuple(counts)
        if key not in priced:
            priced[key] = float(latency(list(key)))
        return priced[key]

    def descend(lam: float) -> list[int]:
        """Coordinate descent on latency - lam * MACs (both relative to dense) from the
        full widths: each group in turn takes its best count, the others fixed."""
        counts, changed = list(table.widths), True
        while changed:
            changed = False
            for g in groups:
                trial = lambda k: counts[:g] + [int(k)] + counts[g + 1:]  # noqa: B023 (used at once)
                k = int(min(steps[g], key=lambda k: seconds(trial(k)) / dense_s - lam * macs(trial(k))))
                if k != counts[g]:
                    counts[g], changed = k, True
        return counts

    dense_s = seconds(list(table.widths))
    best, lo, hi = lowest, 0.0, 1.0  # lam, the price of a MAC in dense-latency units: 0 prunes all
    while macs(descend(hi)) <= flops_budget and hi < 1e6:
        lo, hi = hi, hi * 4
    found = {tuple(_fill(best, flops_budget, steps, macs, seconds))}
    for lam in [lo] + [None] * iters:
        if lam is None:
            lam = (lo + hi) / 2
        counts = descend(lam)
        if macs(counts) <= flops_budget:  # lam -> MACs need not be monotone: bisect on what each gives
            lo = lam
            found.add(tuple(_fill(counts, flops_budget, steps, macs, seconds)))
        else:
            hi = lam
    # Never fewer MACs than one uniform keep ratio keeps at this budget: a candidate must not
    # buy its speed by pruning more than the allocation it replaces, which is one candidate.
    uniform = C.keep_counts(table, C.keep_ratio_for_flops(table, flops_budget, groups, multiple), groups, multiple)
    found.add(tuple(uniform))
    return [list(c) for c in sorted(found, key=seconds) if macs(c) >= macs(uniform)]


def _fill(counts: list[int], flops_budget: float, steps: dict, macs, seconds) -> list[int]:
    """Spends what the descent's last step left of the budget: raises, one aligned step at
    a time, the group that adds the most MACs per predicted second while the network
    stays within the budget."""
    while True:
        now_macs, now_s = macs(counts), seconds(counts)
        best, best_rate = None, -np.inf
        for g, ks in steps.items():
            higher = ks[ks > counts[g]]
            if not len(higher):
                continue
            cand = list(counts)
            cand[g] = int(higher[0])
            added = macs(cand) - now_macs
            if added <= 0 or macs(cand) > flops_budget:
                continue
            rate = added / max(seconds(cand) - now_s, 1e-12)
            if rate > best_rate:
                best, best_rate = cand, rate
        if best is None:
            return counts
        counts = best
