"""`ElementEnv` (stage 1 at element granularity, `search.granularity=element`): one
step per conv / dense layer; the action is the fraction of the layer's weights
removed by magnitude; sparse FLOPs and parameters, walled exactly as in `PruneEnv`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxcompress import cost
from jaxcompress.models.table import ModelTable
from jaxcompress.rl.env.common import EnvState, PruningEnv, check_prune_bounds, static_observations


class ElementEnv(PruningEnv):
    """Stage 1 at element granularity: a magnitude pruning rate per conv / dense layer
    under a FLOPs budget (and optionally a parameter budget), counting what a sparse
    kernel costs (`cost.summarize`'s `sparse_macs` and `nonzero_params`).

    The paper's variational pruning removes kernel *elements* (Zhan et al. Sec. 3.2),
    and its LeNet-5 row (90.1% of the parameters removed at 16.4% FLOPs) is a
    fine-grained one, as AMC's fine-grained mode (He et al. 2018, Sec. 3.4). One step
    per layer in network order; the action is the rate a in [a_min, a_max] of the
    layer's weights removed; the layer keeps k = round(n (1 - a)) of its n weights
    (at least round(n (1 - a_max)), at least 1). Layers are independent (no shape
    changes), so FLOPs = 2 sum_l positions_l k_l and parameters = sum_l k_l + biases +
    BatchNorm are affine in each k and the action wall is exact as in `PruneEnv`:
    k_t <= (budget - cost of the rest at its lowest - cost decided) / slope_t.
    `values` are the kept weight counts per layer.

    Args:
      table: the trained network's `ModelTable`.
      flops_budget: fraction of the dense FLOPs the episode must end within.
      a_min, a_max: element pruning-rate bounds per layer.
      params_budget: optional fraction of the dense parameters, walled alike.
    """

    kind = "element"

    def __init__(self, table: ModelTable, flops_budget: float, a_min: float = 0.0, a_max: float = 0.95,
                 params_budget: float | None = None):
        check_prune_bounds(flops_budget, a_min, a_max, params_budget=params_budget)
        self.table = table
        self.paths = tuple(layer.path for layer in table.layers)
        T = self.num_steps = len(self.paths)
        counts = cost.layer_counts(table)
        n = self.weights = np.asarray(counts["weights"], np.float64)
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.low = np.full(T, self.a_min, np.float32)
        self.high = np.full(T, self.a_max, np.float32)
        self.k_lo = np.maximum(np.round(n * (1 - a_max)), 1.0)
        self.k_hi = np.maximum(np.round(n * (1 - a_min)), self.k_lo)
        self.flops_per_weight = 2.0 * np.asarray(counts["macs"], np.float64) / n
        self.fixed_params = float(cost.count(table)["params"]) - float(n.sum())  # biases + BatchNorm
        self.flops_dense = float(self.flops(n))
        self.params_dense = float(self.params(n))
        self.set_budgets(flops_budget, params_budget, self.k_lo, a_max)
        self.static_obs = static_observations(table, range(T), self.a_min, self.a_max, self.flops_per_weight * n)

    # -- cost ----------------------------------------------------------------------
    def flops(self, kept):
        """FLOPs of the sparse network keeping `kept` weights per layer (jnp; jittable)."""
        return jnp.sum(jnp.asarray(self.flops_per_weight, jnp.float32) * jnp.asarray(kept, jnp.float32))

    def params(self, kept):
        return self.fixed_params + jnp.sum(jnp.asarray(kept, jnp.float32))

    def cost_bounds(self) -> tuple[float, float]:
        return float(self.flops(self.k_lo)), min(self.budget, float(self.flops(self.k_hi)))

    def initial_values(self):
        return self.weights.astype(np.float32)

    # -- one step ------------------------------------------------------------------
    def wall(self, state: EnvState, t, k):
        """The largest count <= `k` that keeps the budget(s) reachable with every later
        layer at its lowest count."""
        later = jnp.arange(self.num_steps) > t
        assumed = jnp.where(later, jnp.asarray(self.k_lo, jnp.float32), state.values).at[t].set(0.0)

        def cap(fn, budget, slope):
            return jnp.floor((budget - fn(assumed)) / slope * (1.0 - 1e-6))

        k_max = cap(self.flops, self.budget, jnp.asarray(self.flops_per_weight, jnp.float32)[t])
        if self.params_budget is not None:
            k_max = jnp.minimum(k_max, cap(self.params, self.params_budget, 1.0))
        return jnp.maximum(jnp.minimum(k, k_max), jnp.asarray(self.k_lo, jnp.float32)[t])

    def step(self, state: EnvState, a_norm) -> EnvState:
        t = state.t
        n = jnp.asarray(self.weights, jnp.float32)[t]
        k = jnp.clip(jnp.round(n * (1.0 - self.to_units(t, a_norm))), jnp.asarray(self.k_lo, jnp.float32)[t],
                     jnp.asarray(self.k_hi, jnp.float32)[t])
        k = self.wall(state, t, k)
        rate = 1.0 - k / n
        return EnvState(t=t + 1, values=state.values.at[t].set(k), actions=state.actions.at[t].set(rate),
                        prev_action=self.normalised(t, rate))

    def result(self, state: EnvState) -> dict:
        f, p = self.flops(state.values), self.params(state.values)
        return dict(values=state.values, actions=state.actions, cost=f, params=p, cost_ratio=f / self.flops_dense,
                    params_ratio=p / self.params_dense)

    def rates(self, kept) -> dict[str, float]:
        """{layer path: fraction of its weights removed} for kept counts (Python floats)."""
        return {path: 1.0 - float(k) / float(n) for path, k, n in zip(self.paths, np.asarray(kept), self.weights)}
