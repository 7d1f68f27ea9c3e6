"""Bit allocation under a budget: HAQ-style enforcement and a sensitivity heuristic.

`SizeModel` gives the exact bytes (`jaxcompress.cost.summarize`, so export-exact) of a
network for any per-layer weight bit widths, precomputed per layer and bit width.

`enforce_budget` is HAQ's rule (Wang et al. 2019, Sec. 3.3): after the policy has set
every layer's bits, lower them one bit at a time from the last layer back to the
first, sweep after sweep, until the budget holds; the first and last layers keep at
least `first_last_min` bits (8 by default), the others `min_bits`. The sequence of
lowerings does not depend on the budget, so a larger budget stops earlier: the
result is monotone (elementwise non-decreasing bits in the budget).

`allocate_by_sensitivity` is the simple heuristic of the benchmarks: measure how much
each layer alone hurts the validation loss at each bit width, then repeatedly lower
the layer with the smallest loss increase per byte saved until the budget holds, and
finally raise layers again (largest loss decrease per byte first) while it still holds.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.quant.policy import make_quant
from jaxcompress.quant.quantizers import FLOAT_BITS, WeightQuantizer

CANDIDATE_BITS = tuple(range(1, 9)) + (FLOAT_BITS,)


def lower(bits: int) -> int:
    """The next lower supported weight width (32 -> 8 -> 7 ... -> 1)."""
    return 8 if bits >= FLOAT_BITS else bits - 1


class SizeModel:
    """Exact bytes as a function of {layer: bits_w}, for fixed masks and activation bits.

    `bits_a` ({layer: bits} or a number) matters only through the calibrated ranges
    (4 bytes per layer with quantized inputs), which are counted.
    """

    def __init__(self, table, masks=None, bits_a=None, quantizer: WeightQuantizer | None = None,
                 index_bits: Mapping[str, int] | None = None):
        self.table = table
        self.paths = [layer.path for layer in table.layers]
        self.layer_bytes: dict[str, dict[int, float]] = {p: {} for p in self.paths}
        self.fixed = None
        for b in CANDIDATE_BITS:
            quant = make_quant(table, bits_w=b, bits_a=bits_a)
            if bits_a is not None:  # a calibrated range per quantized input
                quant = _with_ranges(quant)
            report = cost.summarize(table, masks, quant, quantizer=quantizer, index_bits=index_bits)
            for row in report["layers"]:
                self.layer_bytes[row["layer"]][b] = row["bytes"]
            if self.fixed is None:
                self.fixed = report["totals"]["bytes"] - sum(r["bytes"] for r in report["layers"])

    def __call__(self, bits_w: Mapping[str, int]) -> float:
        return self.fixed + sum(self.layer_bytes[p][int(bits_w[p])] for p in self.paths)


def _with_ranges(quant):
    flat = dict(traverse_util.flatten_dict(quant))
    for k, v in list(flat.items()):
        if k[-1] == "bits_a" and float(v) < FLOAT_BITS:
            flat[k[:-1] + ("range_a",)] = jnp.asarray(1.0, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def bitops(table, masks=None):
    """BitOps(bits_w, bits_a) = sum over layers of MACs x bits_w x bits_a (HAQ's
    computation measure); returns the function of two {layer: bits} dicts."""
    report = cost.summarize(table, masks)
    macs = {row["layer"]: row["sparse_macs"] for row in report["layers"]}
    return lambda bits_w, bits_a: float(sum(macs[p] * bits_w[p] * bits_a[p] for p in macs))


def floors(paths: Sequence[str], bits: Mapping[str, int], min_bits: int = 2, first_last_min: int = 8
           ) -> dict[str, int]:
    """The lowest bits each layer may reach: `first_last_min` for the first and last layer,
    `min_bits` for the others, never above the layer's own starting bits."""
    ends = {paths[0], paths[-1]}
    return {p: min(int(bits[p]), first_last_min if p in ends else min_bits) for p in paths}


def enforce_budget(bits_w: Mapping[str, int], cost_fn: Callable[[Mapping[str, int]], float], budget: float,
                   min_bits: int = 2, first_last_min: int = 8, what: str = "size") -> dict[str, int]:
    """HAQ: lower bits from the last layer back, one bit per layer per sweep, until
    `cost_fn(bits) <= budget`. ConfigError (before any work) if even the all-minimum
    allocation exceeds the budget."""
    paths = list(bits_w)
    bits = {p: int(b) for p, b in bits_w.items()}
    low = floors(paths, bits, min_bits, first_last_min)
    if cost_fn(low) > budget:
        raise ConfigError(f"the {what} budget {budget:,.0f} cannot be met: with every layer at its minimum bits "
                          f"(first/last {first_last_min}, others {min_bits}) the network needs "
                          f"{cost_fn(low):,.0f}; raise the budget or lower quant.min_bits_w / "
                          f"quant.first_last_min_bits")
    while cost_fn(bits) > budget:
        for p in reversed(paths):
            if cost_fn(bits) <= budget:
                break
            if bits[p] > low[p]:
                bits[p] = lower(bits[p])
    return bits


def allocate_by_sensitivity(start: Mapping[str, int], sensitivity: Mapping[str, Mapping[int, float]],
                            cost_fn: Callable[[Mapping[str, int]], float], budget: float, min_bits: int = 2,
                            first_last_min: int = 8) -> dict[str, int]:
    """Greedy: from `start`, lower (by one bit) the layer with the smallest increase of
    `sensitivity[layer][bits]` per unit of cost saved, until `cost_fn(bits) <= budget`.
    `sensitivity[layer]` must hold every width the layer can reach (missing: +inf)."""
    paths = list(start)
    bits = {p: int(b) for p, b in start.items()}
    low = floors(paths, bits, min_bits, first_last_min)
    if cost_fn(low) > budget:
        raise ConfigError(f"the size budget {budget:,.0f} cannot be met even with every layer at its minimum "
                          f"bits ({cost_fn(low):,.0f})")
    while cost_fn(bits) > budget:
        now = cost_fn(bits)
        best, best_score = None, np.inf
        for p in paths:
            if bits[p] <= low[p]:
                continue
            nxt = lower(bits[p])
            saved = now - cost_fn({**bits, p: nxt})
            if saved <= 0:
                continue
            s = sensitivity[p]
            increase = max(s.get(nxt, np.inf) - s.get(bits[p], 0.0), 0.0)
            score = (increase + 1e-9) / saved
            if score < best_score:
                best, best_score = p, score
        if best is None:  # nothing saves bytes any more: fall back to HAQ's order
            return enforce_budget(bits, cost_fn, budget, min_bits, first_last_min)
        bits[best] = lower(bits[best])
    # The last step may have saved more than needed: give bits back (largest sensitivity
    # decrease per byte first) while the budget still holds.
    while True:
        now = cost_fn(bits)
        best, best_gain = None, -np.inf
        for p in paths:
            if bits[p] >= start[p]:
                continue
            up = FLOAT_BITS if bits[p] >= 8 else bits[p] + 1
            extra = cost_fn({**bits, p: up}) - now
            if now + extra > budget:
                continue
            s = sensitivity[p]
            gain = (s.get(bits[p], np.inf) - s.get(up, 0.0)) / max(extra, 1e-9)
            if gain > best_gain:
                best, best_gain = p, gain
        if best is None:
            return bits
        bits[best] = FLOAT_BITS if bits[best] >= 8 else bits[best] + 1
