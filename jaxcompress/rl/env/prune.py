"""`PruneEnv` (stage 1, AMC / Zhan et al. Sec. 2): pruning rates per channel group.

One step per prunable channel *group* (a group is pruned as a unit: residual
streams, conv + BatchNorm, ...), in network order (the order of each group's first
producing layer). The action is a pruning rate a in [a_min, a_max]; the group keeps
k = round(W (1 - a) / m) m channels (m = `multiple`), at least
max(m, round(W (1 - a_max) / m) m) and at most W. AMC's *action wall* (He et al. 2018,
Sec. 3.3) caps k so that, with every later group at its lowest count, the network's
FLOPs can still reach the budget: FLOPs are affine in one group's width given the
others, F = A + B k, so k <= (budget - A) / B exactly. Every episode therefore ends
within the budget (tested as a property over random actions).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.latency import LatencyGrid, check_latency_budget
from jaxcompress.models.table import ModelTable
from jaxcompress.pruning import align
from jaxcompress.rl.env.common import (EnvState, PruningEnv, check_prune_bounds, check_reachable,
                                       static_observations)


class PruneEnv(PruningEnv):
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
        check_prune_bounds(flops_budget, a_min, a_max, multiple, params_budget)
        self.table = table
        first_producer = self._init_steps(groups, a_min, a_max, multiple)
        macs = np.asarray(cost.layer_counts(table)["macs"], np.float64)
        self.flops_dense = float(2 * macs.sum())
        self.params_dense = float(self.params(self.widths))
        self.set_budgets(flops_budget, params_budget, self.min_widths, a_max)
        self._check_affine()
        self.latency = None
        if latency_budget:
            self.add_latency_budget(latency_model, latency_budget)
        self._init_observations(first_producer, macs)

    def _init_steps(self, groups, a_min: float, a_max: float, multiple) -> dict[int, int]:
        """The searched groups in network order, their kept-count bounds and the lowest /
        highest widths; returns {group: its first producing layer}."""
        table = self.table
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
        return first_producer

    def _init_observations(self, first_producer: dict[int, int], macs: np.ndarray) -> None:
        """Static features (geometry of each group's first producer, bounds, the group's
        FLOPs, the rest) and `later[t, g]`: group g is decided after step t (assumed at
        its lowest count by the wall)."""
        group_flops = np.zeros(self.table.num_groups)
        for i, layer in enumerate(self.table.layers):
            if layer.out_group >= 0:
                group_flops[layer.out_group] += 2 * macs[i]
        self.step_flops = group_flops[self.groups]
        self.static_obs = static_observations(self.table, [first_producer[g] for g in self.groups], self.a_min,
                                              self.a_max, self.step_flops)
        T = self.num_steps
        self.later = (self.step_of_group[None, :] > np.arange(T)[:, None]) & (self.step_of_group[None, :] < T)

    def add_latency_budget(self, model, budget: float) -> "PruneEnv":
        """Adds the latency wall: `budget` of the dense latency predicted by `model` (a
        `LatencyModel`, e.g. fitted on this env's `min_widths`); infeasible = ConfigError."""
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
        check_reachable("latency", budget, float(self.latency(self.min_widths)) / self.latency_dense, self.a_max)
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
