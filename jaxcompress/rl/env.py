"""The layer-wise compression environment: pure `reset` / `observe` / `step` / `finalize`.

Hand-written (no RL library models a network being compressed). An environment
object holds only static numpy constants (the network's geometry, the bounds and
the budget); everything that changes lives in an explicit `EnvState` pytree, so an
episode is a `lax.scan` over the steps and N parallel actors a `jax.vmap` over keys
(see `jaxcompress.rl.search.rollout`). Agents act in a *normalised* action space
[0, 1]; the environment maps it onto its own range.

`PruneEnv` (stage 1, AMC / Zhan et al. Sec. 2): one step per prunable channel
*group* (a group is pruned as a unit: residual streams, conv + BatchNorm, ...), in
network order (the order of each group's first producing layer). The action is a
pruning rate a in [a_min, a_max]; the group keeps k = round(W (1 - a) / m) m
channels (m = `multiple`), at least max(m, round(W (1 - a_max) / m) m) and at most W.
AMC's *action wall* (He et al. 2018, Sec. 3.3) caps k so that, with every later
group at its lowest count, the network's FLOPs can still reach the budget:
FLOPs are affine in one group's width given the others, F = A + B k, so
k <= (budget - A) / B exactly. Every episode therefore ends within the budget
(tested as a property over random actions).

`ElementEnv` (stage 1 at element granularity, `search.granularity=element`): one
step per conv / dense layer; the action is the fraction of the layer's weights
removed by magnitude; sparse FLOPs and parameters, walled exactly as above.

`QuantEnv` (stage 2, HAQ / Zhan et al. Sec. 4): one step per conv / dense layer;
the action is a weight bit width b in [b_min, b_max] (rounded to an integer). At the
end of the episode HAQ's back-off (Wang et al. 2019, Sec. 3.2) lowers bits one at a
time from the last layer backwards, cyclically, until the weight storage meets the
budget; it is a `lax.while_loop`, so it runs in-graph for every actor.

Observation of step t (`FEATURES`, 12 numbers): layer index, output channels, input
channels (of the group's first producer; a dense layer fed by a flattened map counts
every input row), kernel height and width, stride, the step's action bounds (lower
and upper: rate bounds for pruning, bit bounds for quantization), the step's FLOPs
(all producers of the group), the FLOPs of all later steps ("rest"), each min-max
normalised over the steps (a constant feature is 0); then the FLOPs (pruning) or
weight bits (quantization) removed so far as a fraction of the dense network's, and
the previous step's executed action normalised to [0, 1] (0 at the first step).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable
from jaxcompress.pruning import align

FEATURES = ("index", "c_out", "c_in", "kernel_h", "kernel_w", "stride", "bound_lo", "bound_hi", "flops",
            "flops_rest", "reduced", "prev_action")
OBS_DIM = len(FEATURES)


class EnvState(struct.PyTreeNode):
    """What changes during an episode.

    `values` holds the decisions so far: kept channels per *group* (undecided groups
    at full width) for pruning, bits per *layer* (undecided at b_max) for quantization.
    `actions` the executed actions in the environment's units (rate or bits), per step.
    """

    t: jax.Array
    values: jax.Array
    actions: jax.Array
    prev_action: jax.Array


def minmax(x) -> np.ndarray:
    """Min-max normalisation over the first axis; a constant column becomes 0."""
    x = np.asarray(x, np.float64)
    lo, hi = x.min(0), x.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (x - lo) / span, 0.0)


def _layer_geometry(table: ModelTable, layer_index: int, widths) -> list[float]:
    layer = table.layers[layer_index]
    c_out = widths[layer.out_group] if layer.out_group >= 0 else layer.out_fixed
    c_in = widths[layer.in_group] * layer.in_repeat if layer.in_group >= 0 else layer.in_fixed
    return [float(c_out), float(c_in), float(layer.kernel_size[0]), float(layer.kernel_size[1]),
            float(layer.strides[0])]


class CompressionEnv:
    """Shared machinery: static features, the normalised action map, the episode API."""

    num_steps: int
    low: np.ndarray  # (T,) action lower bounds in environment units
    high: np.ndarray  # (T,) action upper bounds
    static_obs: np.ndarray  # (T, 10) normalised static features

    def to_units(self, t, a_norm):
        a_norm = jnp.clip(a_norm, 0.0, 1.0)
        low, high = jnp.asarray(self.low)[t], jnp.asarray(self.high)[t]
        return low + (high - low) * a_norm

    def normalised(self, t, a):
        low, high = jnp.asarray(self.low)[t], jnp.asarray(self.high)[t]
        return jnp.where(high > low, (a - low) / jnp.where(high > low, high - low, 1.0), 0.0)

    def initial_values(self) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> EnvState:
        return EnvState(t=jnp.zeros((), jnp.int32), values=jnp.asarray(self.initial_values(), jnp.float32),
                        actions=jnp.zeros((self.num_steps,), jnp.float32), prev_action=jnp.zeros((), jnp.float32))

    def reduced(self, values):
        raise NotImplementedError

    def observe(self, state: EnvState) -> jax.Array:
        t = jnp.minimum(state.t, self.num_steps - 1)
        static = jnp.asarray(self.static_obs, jnp.float32)[t]
        return jnp.concatenate([static, jnp.stack([self.reduced(state.values), state.prev_action])])

    def step(self, state: EnvState, a_norm) -> EnvState:
        raise NotImplementedError

    def finalize(self, state: EnvState) -> EnvState:
        return state

    def result(self, state: EnvState) -> dict:
        raise NotImplementedError


class PruneEnv(CompressionEnv):
    """Stage 1: pruning rates per channel group under a FLOPs budget (AMC action wall).

    Args:
      table: the trained network's `ModelTable`.
      flops_budget: fraction of the dense network's FLOPs the episode must end within.
      a_min, a_max: pruning-rate bounds (fractions of a group's channels removed).
      groups: the groups to prune (steps), default every group; taken in network order.
      multiple: kept channel counts are multiples of this (or the full width); None:
        the backend's multiple per group (`jaxcompress.pruning.align`).
      params_budget: optional second budget, a fraction of the dense parameters; the
        wall then caps each action by both (each is affine in one group's width).
      latency_model, latency_budget: optional third budget, a fraction of the dense
        network's latency predicted by this `jaxcompress.latency.LatencyModel`. Latency
        is not affine in a width (alignment!), so its wall tries every allowed count
        of the group (later groups at their lowest) on the model's in-graph
        `LatencyGrid` and keeps the largest that fits.
    """

    kind = "prune"

    def __init__(self, table: ModelTable, flops_budget: float, a_min: float = 0.0, a_max: float = 0.8,
                 groups: Sequence[int] | None = None, multiple: int | None = 1, params_budget: float | None = None,
                 latency_model=None, latency_budget: float | None = None):
        check_prune_bounds(flops_budget, a_min, a_max, multiple)
        if params_budget is not None and not 0.0 < params_budget <= 1.0:
            raise ConfigError(f"search.params_budget={params_budget:g} must be a fraction of the dense "
                              f"parameters in (0, 1] (or 0 for none)")
        self.table = table
        first_producer = {}
        for i, layer in enumerate(table.layers):
            if layer.out_group >= 0 and not layer.depthwise:
                first_producer.setdefault(layer.out_group, i)
        groups = range(table.num_groups) if groups is None else groups
        self.groups = np.asarray(sorted((g for g in groups if g in first_producer), key=first_producer.get),
                                 np.int32)
        if self.groups.size == 0:
            raise ConfigError("no prunable channel group in this network; choose another model or scope")
        self.num_steps = T = int(self.groups.size)
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.widths = np.asarray(table.widths, np.float32)
        W = self.widths[self.groups].astype(np.float64)
        self.multiples = m = np.asarray(align.group_multiples(table.widths, self.groups, multiple),
                                        np.float64)[self.groups]  # (T,)
        self.k_lo = np.clip(np.round(W * (1 - a_max) / m) * m, np.minimum(m, W), W)
        self.k_hi = np.clip(np.round(W * (1 - a_min) / m) * m, self.k_lo, W)
        self.low = np.full(T, self.a_min, np.float32)
        self.high = np.full(T, self.a_max, np.float32)
        self.step_of_group = np.full(table.num_groups, T, np.int32)  # T: not a step (stays at full width)
        self.step_of_group[self.groups] = np.arange(T)
        self.min_widths = self.widths.copy()
        self.min_widths[self.groups] = self.k_lo
        self.max_widths = self.widths.copy()
        self.max_widths[self.groups] = self.k_hi

        dense = cost.layer_counts(table)
        macs = np.asarray(dense["macs"], np.float64)
        self.flops_dense = float(2 * macs.sum())
        self.budget = float(flops_budget) * self.flops_dense
        _check_reachable("FLOPs", flops_budget, float(self.flops(self.min_widths)) / self.flops_dense, a_max)
        self.params_dense = float(self.params(self.widths))
        self.params_budget = None if params_budget is None else float(params_budget) * self.params_dense
        if self.params_budget is not None:
            _check_reachable("parameter", params_budget, float(self.params(self.min_widths)) / self.params_dense,
                             a_max)
        self._check_affine()
        self.latency = None
        if latency_budget:
            self.add_latency_budget(latency_model, latency_budget)
        # Static features: geometry of each group's first producer, bounds, the group's FLOPs, the rest.
        group_flops = np.zeros(table.num_groups)
        for i, layer in enumerate(table.layers):
            if layer.out_group >= 0:
                group_flops[layer.out_group] += 2 * macs[i]
        step_flops = group_flops[self.groups]
        rest = np.asarray([step_flops[t + 1:].sum() for t in range(T)])
        rows = [[float(t)] + _layer_geometry(table, first_producer[g], table.widths)
                + [self.a_min, self.a_max, step_flops[t], rest[t]] for t, g in enumerate(self.groups)]
        self.static_obs = minmax(np.asarray(rows)).astype(np.float32)
        self.step_flops = step_flops
        # later[t, g]: group g is decided after step t (assumed at its lowest count by the wall).
        self.later = (self.step_of_group[None, :] > np.arange(T)[:, None]) & (self.step_of_group[None, :] < T)

    def add_latency_budget(self, model, budget: float) -> "PruneEnv":
        """Adds the latency wall: `budget` of the dense latency predicted by `model` (a
        `LatencyModel`, e.g. fitted on this env's `min_widths`); infeasible = ConfigError."""
        from jaxcompress.latency import LatencyGrid, check_latency_budget
        budget = float(budget)
        check_latency_budget(budget, "search.latency_budget")
        if model is None:
            raise ValueError("PruneEnv: a latency_budget needs a latency_model (jaxcompress.latency.latency_model)")
        counts = [[int(w)] for w in self.table.widths]
        for t, g in enumerate(self.groups):
            counts[g] = align.candidates(int(self.widths[g]), int(self.multiples[t]), int(self.k_lo[t])).tolist()
        self.latency = LatencyGrid(model, counts)
        # the wall tries every allowed count of the step's group: (T, K) padded with -1
        K = max(len(counts[g]) for g in self.groups)
        self.cands = np.full((self.num_steps, K), -1.0, np.float32)
        for t, g in enumerate(self.groups):
            self.cands[t, :len(counts[g])] = counts[g]
        self.latency_dense = float(self.latency(self.widths))
        self.latency_budget = budget * self.latency_dense
        _check_reachable("latency", budget, float(self.latency(self.min_widths)) / self.latency_dense, self.a_max)
        return self

    # -- cost ----------------------------------------------------------------------
    def flops(self, widths):
        """Exact FLOPs of the network with these group widths (jnp; jittable, vmappable)."""
        return cost.count(self.table, widths)["flops"]

    def params(self, widths):
        return cost.count(self.table, widths)["params"]

    def cost_bounds(self) -> tuple[float, float]:
        """Lowest and highest FLOPs an episode can end with (R_FLOPs's bounds)."""
        return float(self.flops(self.min_widths)), min(self.budget, float(self.flops(self.max_widths)))

    def _check_affine(self):
        for g in self.groups:
            w = self.widths.copy()
            for fn in (self.flops, self.params):
                f = [float(fn(np.where(np.arange(len(w)) == g, v, w))) for v in (0.0, 1.0, 2.0)]
                if abs((f[2] - f[1]) - (f[1] - f[0])) > 1e-3 * max(1.0, abs(f[2])):
                    raise ConfigError(f"group {self.table.group_names[g]}: costs are not affine in its width "
                                  f"(a layer reads and writes the same group); the action wall needs affine "
                                  f"costs: leave it out of the search (search.scope=inner)")

    def initial_values(self):
        return self.widths

    def reduced(self, widths):
        return (self.flops_dense - self.flops(widths)) / self.flops_dense

    # -- one step ------------------------------------------------------------------
    def keep_count(self, t, rate):
        """Channels kept by group step t at pruning `rate` (rounded, clipped to the bounds)."""
        W = jnp.asarray(self.widths[self.groups])[t]
        m = jnp.asarray(self.multiples, jnp.float32)[t]
        k = jnp.round(W * (1.0 - rate) / m) * m
        return jnp.clip(k, jnp.asarray(self.k_lo, jnp.float32)[t], jnp.asarray(self.k_hi, jnp.float32)[t])

    def wall(self, state: EnvState, t, k):
        """AMC's action wall: the largest k <= `k` that keeps the budget(s) reachable."""
        g = jnp.asarray(self.groups)[t]
        assumed = jnp.where(jnp.asarray(self.later)[t], jnp.asarray(self.min_widths), state.values)

        def cap(fn, budget):  # cost = c0 + slope * k  <=  budget
            c0 = fn(assumed.at[g].set(0.0))
            slope = fn(assumed.at[g].set(1.0)) - c0
            return jnp.floor((budget - c0) / jnp.maximum(slope, 1e-12) * (1.0 - 1e-6))

        k_max = cap(self.flops, self.budget)
        if self.params_budget is not None:
            k_max = jnp.minimum(k_max, cap(self.params, self.params_budget))
        m = jnp.asarray(self.multiples, jnp.float32)[t]
        k_wall = jnp.floor(k_max / m) * m
        if self.latency is not None:
            cands = jnp.asarray(self.cands)[t]
            lat = jax.vmap(lambda c: self.latency(assumed.at[g].set(c)))(cands)
            fits = (cands > 0) & (lat <= self.latency_budget * (1.0 - 1e-6))
            k_wall = jnp.minimum(k_wall, jnp.max(jnp.where(fits, cands, 0.0)))
        return jnp.maximum(jnp.minimum(k, k_wall), jnp.asarray(self.k_lo, jnp.float32)[t])

    def step(self, state: EnvState, a_norm) -> EnvState:
        t = state.t
        g = jnp.asarray(self.groups)[t]
        k = self.wall(state, t, self.keep_count(t, self.to_units(t, a_norm)))
        rate = jnp.clip(1.0 - k / jnp.asarray(self.widths)[g], 0.0, 1.0)
        return EnvState(t=t + 1, values=state.values.at[g].set(k), actions=state.actions.at[t].set(rate),
                        prev_action=self.normalised(t, rate))

    def result(self, state: EnvState) -> dict:
        c = cost.count(self.table, state.values)
        out = dict(values=state.values, actions=state.actions, cost=c["flops"], params=c["params"],
                   cost_ratio=c["flops"] / self.flops_dense, params_ratio=c["params"] / self.params_dense)
        if self.latency is not None:
            out["latency_ratio"] = self.latency(state.values) / self.latency_dense
        return out

    # -- masks ---------------------------------------------------------------------
    def group_masks(self, ranks: Sequence[np.ndarray], widths) -> list[jax.Array]:
        """Channel masks from (traced) kept counts: channel c of group g is kept iff
        rank_g[c] < widths[g] (rank 0 = most important)."""
        return [(jnp.asarray(r) < widths[g]).astype(jnp.float32) for g, r in enumerate(ranks)]


class ElementEnv(CompressionEnv):
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
        check_prune_bounds(flops_budget, a_min, a_max)
        if params_budget is not None and not 0.0 < params_budget <= 1.0:
            raise ConfigError(f"search.params_budget={params_budget:g} must be a fraction of the dense "
                              f"parameters in (0, 1] (or 0 for none)")
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
        self.budget = float(flops_budget) * self.flops_dense
        _check_reachable("FLOPs", flops_budget, float(self.flops(self.k_lo)) / self.flops_dense, a_max)
        self.params_budget = None if params_budget is None else float(params_budget) * self.params_dense
        if self.params_budget is not None:
            _check_reachable("parameter", params_budget, float(self.params(self.k_lo)) / self.params_dense, a_max)
        flops = self.flops_per_weight * n
        rest = np.asarray([flops[t + 1:].sum() for t in range(T)])
        rows = [[float(t)] + _layer_geometry(table, t, table.widths) + [self.a_min, self.a_max, flops[t], rest[t]]
                for t in range(T)]
        self.static_obs = minmax(np.asarray(rows)).astype(np.float32)

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

    def reduced(self, kept):
        return (self.flops_dense - self.flops(kept)) / self.flops_dense

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
        rest = np.asarray([2 * macs[t + 1:].sum() for t in range(T)])
        rows = [[float(t)] + _layer_geometry(table, t, table.widths) + [self.b_min, self.b_max, 2 * macs[t], rest[t]]
                for t in range(T)]
        self.static_obs = minmax(np.asarray(rows)).astype(np.float32)

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


def _check_reachable(what: str, budget: float, lowest: float, a_max: float) -> None:
    """One-line error when every searched group at its lowest count (a_max) still
    leaves more than `budget` of the dense network's `what` (both fractions)."""
    if lowest > budget * (1 + 1e-6):
        field = {"parameter": "params"}.get(what, what.lower())
        raise ConfigError(
            f"a {what} budget of {budget:.1%} cannot be met: pruning every searched group at the maximum rate "
            f"a_max={a_max:g} leaves {lowest:.1%} of the dense network's {what}; raise search.a_max or "
            f"search.{field}_budget, or search more groups (search.scope=all)")


def check_prune_bounds(flops_budget: float, a_min: float, a_max: float, multiple: int | None = 1) -> None:
    if not 0.0 < flops_budget <= 1.0:
        raise ConfigError(f"search.flops_budget={flops_budget:g} must be a fraction of the dense FLOPs in (0, 1]")
    if not 0.0 <= a_min < 1.0 or not 0.0 <= a_max < 1.0:
        raise ConfigError(f"pruning-rate bounds must lie in [0, 1): got a_min={a_min:g}, a_max={a_max:g}")
    if a_min > a_max:
        raise ConfigError(f"search.a_min={a_min:g} > search.a_max={a_max:g}; the lower pruning-rate bound must "
                          f"not exceed the upper one")
    if multiple is not None and multiple < 1:
        raise ConfigError(f"search.multiple={multiple} must be >= 1 (or None: the backend's)")


def check_bits_bounds(bits_budget: float, b_min: int, b_max: int) -> None:
    for name, b in (("b_min", b_min), ("b_max", b_max)):
        if not (float(b).is_integer() and 1 <= b <= 8):
            raise ConfigError(f"search.quant.{name}={b:g} must be an integer number of bits in 1..8")
    if b_min > b_max:
        raise ConfigError(f"search.quant.b_min={b_min} > search.quant.b_max={b_max}")
    if bits_budget < b_min:
        raise ConfigError(f"search.quant.bits_budget={bits_budget:g} average bits cannot be met: every layer "
                          f"at b_min={b_min} already uses {b_min} bits per weight")


def play(env: CompressionEnv, actions) -> EnvState:
    """Final state of one episode with the given normalised actions (T,) (jittable; vmap
    it over a batch of action sequences)."""
    final, _ = jax.lax.scan(lambda s, a: (env.step(s, a), None), env.reset(), jnp.asarray(actions, jnp.float32))
    return env.finalize(final)
