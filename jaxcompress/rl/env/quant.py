"""`QuantEnv` (stage 2, HAQ / Zhan et al. Sec. 4): weight bits per conv / dense layer.

One step per conv / dense layer; the action is a weight bit width b in
[b_min, b_max] (rounded to an integer). At the end of the episode HAQ's back-off
(Wang et al. 2019, Sec. 3.2) lowers bits one at a time from the last layer
backwards, cyclically, until the weight storage meets the budget; it is a
`lax.while_loop`, so it runs in-graph for every actor.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable
from jaxcompress.rl.env.common import CompressionEnv, EnvState, static_observations


class QuantEnv(CompressionEnv):
    """Stage 2: weight bits per conv / dense layer under an average-bits budget (HAQ back-off).

    Args:
      table: the (pruned) network's `ModelTable`.
      bits_budget: average weight bits the episode must end within (storage budget
        = bits_budget x number of weights).
      b_min, b_max: bit bounds, integers in 1..8.
      weights: the number of weights stored per layer (default every weight; the
        nonzero ones of an element-pruned network, which is all its storage holds).
    """

    kind = "quant"

    def __init__(self, table: ModelTable, bits_budget: float, b_min: int = 2, b_max: int = 8,
                 weights: Sequence[float] | None = None):
        check_bits_bounds(bits_budget, b_min, b_max)
        self.table = table
        self.paths = tuple(layer.path for layer in table.layers)
        T = self.num_steps = len(self.paths)
        counts = cost.layer_counts(table)
        self.weights = np.asarray(counts["weights"] if weights is None else weights, np.float64)
        macs = np.asarray(counts["macs"], np.float64)
        self.b_min, self.b_max = int(b_min), int(b_max)
        self.low = np.full(T, float(b_min), np.float32)
        self.high = np.full(T, float(b_max), np.float32)
        self.bits_dense = float(32 * self.weights.sum())
        self.budget = float(bits_budget) * float(self.weights.sum())
        self.static_obs = static_observations(table, range(T), self.b_min, self.b_max, 2 * macs)

    def initial_values(self):
        return np.full(self.num_steps, float(self.b_max), np.float32)

    def weight_bits(self, bits):
        return jnp.sum(jnp.asarray(self.weights, jnp.float32) * bits)

    def reduced(self, bits):
        # Bits removed so far relative to 32-bit storage (undecided layers count at b_max).
        return (self.bits_dense - self.weight_bits(bits)) / self.bits_dense

    def step(self, state: EnvState, a_norm) -> EnvState:
        t = state.t
        bits = jnp.round(self.to_units(t, a_norm))
        return EnvState(t=t + 1, values=state.values.at[t].set(bits), actions=state.actions.at[t].set(bits),
                        prev_action=self.normalised(t, bits))

    def finalize(self, state: EnvState) -> EnvState:
        bits = backoff(state.values, self.weights, self.budget, self.b_min)
        return state.replace(values=bits, actions=bits)

    def result(self, state: EnvState) -> dict:
        wb = self.weight_bits(state.values)
        return dict(values=state.values, actions=state.actions, cost=wb, cost_ratio=wb / self.bits_dense,
                    avg_bits=wb / float(self.weights.sum()))

    def cost_bounds(self) -> tuple[float, float]:
        """Lowest and highest weight bits an episode can end with (R_FLOPs's bounds)."""
        total = float(self.weights.sum())
        return self.b_min * total, min(self.budget, self.b_max * total)

    def quant_tree(self, bits, bits_a: float | None = None) -> dict:
        """The `quant` collection for a (traced) per-layer bits vector."""
        flat = {}
        for i, path in enumerate(self.paths):
            key = tuple(path.split("/"))
            flat[key + ("bits_w",)] = bits[i]
            if bits_a:
                flat[key + ("bits_a",)] = jnp.asarray(bits_a, jnp.float32)
        return traverse_util.unflatten_dict(flat)


def backoff(bits, weights, budget: float, b_min: int):
    """HAQ's back-off: lower bits by one at a time, from the last layer backwards and
    cyclically, skipping layers at `b_min`, until sum(weights * bits) <= budget.
    Jittable and vmappable (a `lax.while_loop`)."""
    w = jnp.asarray(weights, jnp.float32)
    L = w.shape[0]
    max_iter = L * 32

    def size(b):
        return jnp.sum(w * b)

    def cond(carry):
        b, i = carry
        return (size(b) > budget * (1 + 1e-6)) & (i < max_iter)

    def body(carry):
        b, i = carry
        pos = L - 1 - (i % L)
        b = b.at[pos].set(jnp.where(b[pos] > b_min, b[pos] - 1.0, b[pos]))
        return b, i + 1

    out, _ = jax.lax.while_loop(cond, body, (jnp.asarray(bits, jnp.float32), jnp.zeros((), jnp.int32)))
    return out


def check_bits_bounds(bits_budget: float, b_min: int, b_max: int) -> None:
    for name, b in (("b_min", b_min), ("b_max", b_max)):
        if not (float(b).is_integer() and 1 <= b <= 8):
            raise ConfigError(f"search.quant.{name}={b:g} must be an integer number of bits in 1..8")
    if b_min > b_max:
        raise ConfigError(f"search.quant.b_min={b_min} > search.quant.b_max={b_max}")
    if bits_budget < b_min:
        raise ConfigError(f"search.quant.bits_budget={bits_budget:g} average bits cannot be met: every layer "
                          f"at b_min={b_min} already uses {b_min} bits per weight")
