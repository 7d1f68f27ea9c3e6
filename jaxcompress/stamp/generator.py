"""Mask generator: set embedding -> Beta-Bernoulli gates for every prunable channel.

STAMP (Song et al., arXiv:2006.12139): for each prunable channel group g (the
model's channel groups, `jaxcompress.pruning.criteria.prunable_groups`) and each
channel c, the generator outputs Kumaraswamy parameters a_gc, b_gc = softplus(.)
of the keep probability pi_gc (BBDropout, arXiv:1805.10896). Training uses
relaxed Bernoulli gates (`kumaraswamy.sample_gates`), test time the thresholded
expectation E[pi] (`hard_group_masks`).

`SparsityObjective` holds what the outer loss adds to the task loss: the KL to the
sparse Beta(alpha, 1) prior and a penalty on the expected FLOPs or parameter fraction's
distance to the budget (two-sided by default, or a hinge),
computed by `jaxcompress.cost.count` on expected widths (sum of E[pi] per group),
which is differentiable.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable
from jaxcompress.pruning import align
from jaxcompress.stamp import kumaraswamy as K

BUDGET_METRICS = ("params", "flops")


class MaskGenerator(nn.Module):
    """z (dim,) -> ([a_g], [b_g]) for each prunable group width in `group_widths`.

    a = softplus(W_a h + bias_a), bias_a initialised to `a_init` (b likewise): the
    bias is the task-independent part (plain BBDropout when the set is ignored),
    W h the task-dependent one (initialised small).

    `stat_features` > 0: `stats`, per group a (width, stat_features) array of
    per-channel statistics of the target sample (`jaxcompress.stamp.channel_stats`,
    standardised), enter too: per channel, a small MLP (weights shared within the
    group) of [the channel's statistics, a projection of h] adds to a and b, so the
    generator can rank channels by what the target does to them (e.g. copy SNIP).
    """

    group_widths: tuple[int, ...]
    hidden: int = 64
    a_init: float = 2.0
    b_init: float = 0.5413  # softplus^-1(1): b = 1, pi ~ Beta(a, 1) at start
    task_scale: float = 0.1
    stat_features: int = 0
    stat_hidden: int = 16

    @nn.compact
    def __call__(self, z, stats=None):
        if self.stat_features and (stats is None or len(stats) != len(self.group_widths)):
            raise ValueError(f"this MaskGenerator reads per-channel statistics: pass stats, one "
                             f"(width, {self.stat_features}) array per group ({len(self.group_widths)} groups)")
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
        init = nn.initializers.variance_scaling(self.task_scale ** 2, "fan_in", "normal")
        a_list, b_list = [], []
        for g, w in enumerate(self.group_widths):
            out = nn.Dense(2 * w, kernel_init=init, use_bias=False, name=f"group{g}")(h)
            if self.stat_features:
                u = nn.Dense(self.stat_hidden, name=f"stats{g}_in")(stats[g]) + nn.Dense(
                    self.stat_hidden, use_bias=False, name=f"stats{g}_task")(h)
                per_channel = nn.Dense(2, kernel_init=init, use_bias=False, name=f"stats{g}_out")(nn.relu(u))
                out = out + jnp.concatenate([per_channel[..., 0], per_channel[..., 1]], -1)
            bias_a = self.param(f"a{g}", nn.initializers.constant(self.a_init), (w,))
            bias_b = self.param(f"b{g}", nn.initializers.constant(self.b_init), (w,))
            a_list.append(jax.nn.softplus(jnp.clip(out[..., :w] + bias_a, -10.0, 50.0)) + 1e-4)
            b_list.append(jax.nn.softplus(jnp.clip(out[..., w:] + bias_b, -10.0, 50.0)) + 1e-4)
        return a_list, b_list


class FreeGates(nn.Module):
    """Task-independent Kumaraswamy parameters (plain BBDropout, the baseline)."""

    group_widths: tuple[int, ...]
    a_init: float = 2.0
    b_init: float = 0.5413

    @nn.compact
    def __call__(self):
        a = [jax.nn.softplus(jnp.clip(self.param(f"a{g}", nn.initializers.constant(self.a_init), (w,)),
                                      -10.0, 50.0)) + 1e-4 for g, w in enumerate(self.group_widths)]
        b = [jax.nn.softplus(jnp.clip(self.param(f"b{g}", nn.initializers.constant(self.b_init), (w,)),
                                      -10.0, 50.0)) + 1e-4 for g, w in enumerate(self.group_widths)]
        return a, b


@dataclasses.dataclass(frozen=True, eq=False)
class GroupLayout:
    """Which channel groups of a `ModelTable` the gates control."""

    table: ModelTable
    groups: tuple[int, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.table.widths[g] for g in self.groups)

    def full_group_masks(self, gates: Sequence[jax.Array]) -> list[jax.Array]:
        """Gates of the prunable groups, ones elsewhere (one mask per table group)."""
        out = [jnp.ones((w,), jnp.float32) for w in self.table.widths]
        for g, m in zip(self.groups, gates):
            out[g] = m
        return out

    def layer_masks(self, gates, base_masks) -> dict:
        return self.table.layer_masks(self.full_group_masks(gates), base_masks)

    def widths_vector(self, per_group_counts) -> jax.Array:
        w = jnp.asarray(self.table.widths, jnp.float32)
        for g, c in zip(self.groups, per_group_counts):
            w = w.at[g].set(c)
        return w

    def cost_fraction(self, per_group_counts, metric: str) -> jax.Array:
        """cost.count(widths)[metric] / dense; differentiable in the counts."""
        key = "flops" if metric == "flops" else "params"
        return cost.count(self.table, self.widths_vector(per_group_counts))[key] / cost.count(self.table)[key]

    def min_counts(self, multiple: int | None = 1) -> list[int]:
        """The fewest channels each group can keep: one, or its channel multiple
        (`jaxcompress.pruning.align`) when counts are aligned."""
        mults = align.group_multiples(self.table.widths, list(self.groups), multiple)
        return [min(mults[g], w) for g, w in zip(self.groups, self.widths)]

    def min_fraction(self, metric: str, multiple: int | None = 1) -> float:
        return float(self.cost_fraction(self.min_counts(multiple), metric))


@dataclasses.dataclass(frozen=True)
class SparsityObjective:
    """kl_weight * sum KL / num_examples + budget_weight * penalty(E[cost fraction] - budget).

    `penalty="hinge"`: relu(.), a ceiling only; the sparse prior's KL may then shrink
    the expected network far below the budget (to ~1% of the parameters in our CIFAR-10
    run), so the inner loop adapts a much smaller network than the one deployed.
    `"target"`: |.|, the expected network is held at the budget, the size deployed.
    `"counts"` (with `counts`, the channels each group keeps under per-layer selection):
    the mean over groups of |sum of E[pi] - count| / width, each group's expected
    kept channels held at its count, so E[pi] cannot collapse to one value.
    """

    alpha: float = 1e-4
    kl_weight: float = 1.0
    num_examples: int = 10000
    budget: float = 0.3
    budget_metric: str = "params"
    budget_weight: float = 5.0
    penalty: str = "target"
    counts: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.penalty == "counts" and self.counts is None:
            raise ConfigError("stamp.budget_penalty=counts holds each group at its per-layer count: set "
                              "stamp.selection=per_layer")

    def __call__(self, layout: GroupLayout, a_list, b_list):
        kl = sum(K.kl_kumaraswamy_beta(a, b, self.alpha).sum() for a, b in zip(a_list, b_list))
        expected = [K.kumaraswamy_mean(a, b).sum() for a, b in zip(a_list, b_list)]
        frac = layout.cost_fraction(expected, self.budget_metric)
        gap = frac - self.budget
        if self.penalty == "counts":
            penalty = sum(jnp.abs(e - k) / w for e, k, w in zip(expected, self.counts, layout.widths)) / len(expected)
        else:
            penalty = jnp.abs(gap) if self.penalty == "target" else jax.nn.relu(gap)
        reg = self.kl_weight * kl / self.num_examples + self.budget_weight * penalty
        return reg, {"kl": kl, "expected_fraction": frac}


def check_budget(layout: GroupLayout, budget: float, metric: str, multiple: int | None = 1) -> None:
    """ConfigError when no mask (>= 1 channel, or the group's channel multiple, per
    group) can meet `budget`."""
    if metric not in BUDGET_METRICS:
        raise ConfigError(f"unknown stamp.budget_metric '{metric}'; choose one of {', '.join(BUDGET_METRICS)}")
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"stamp.budget={budget:g} is outside (0, 1]")
    low = layout.min_fraction(metric, multiple)
    if low > budget:
        fewest = "one channel" if multiple == 1 else "the fewest aligned channels"
        raise ConfigError(f"a {metric} budget of {budget:.1%} is below reach: {fewest} per prunable group "
                          f"already leaves {low:.1%}; raise stamp.budget, prune more groups (stamp.scope=all)"
                          + ("" if multiple == 1 else " or set hardware.multiple=1 (unaligned counts)"))


def hard_group_masks(layout: GroupLayout, keep_prob: Sequence[np.ndarray], mode: str = "threshold",
                     threshold: float = 1e-3, budget: float | None = None, metric: str = "params",
                     multiple: int | None = 1) -> list[np.ndarray]:
    """Binary masks of the prunable groups from test-time keep probabilities E[pi].

    `threshold`: keep E[pi] >= threshold (BBDropout's rule). `budget`: keep the
    globally highest E[pi] such that the network's `metric` fraction, after
    alignment, is at most `budget` (largest such set, by bisection over the global
    ranking). Either way each group keeps at least its most probable channel; then,
    unless `multiple` is 1, kept counts are aligned (`align_masks`).
    """
    keep_prob = [np.asarray(p, np.float64) for p in keep_prob]
    if mode == "threshold":
        masks = [(p >= threshold).astype(np.float32) for p in keep_prob]
    elif mode == "budget":
        if budget is None:
            raise ConfigError("mask mode 'budget' needs a budget")
        flat = np.concatenate(keep_prob)
        owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(keep_prob)])
        index = np.concatenate([np.arange(len(p)) for p in keep_prob])
        forced = np.zeros(len(flat), bool)
        start = 0
        for p in keep_prob:
            forced[start + int(np.argmax(p))] = True
            start += len(p)
        order = np.concatenate([np.flatnonzero(forced), np.flatnonzero(~forced)[np.argsort(-flat[~forced],
                                                                                             kind="stable")]])

        def masks_for(k):  # the k globally most probable channels, aligned (monotone in k)
            ms = [np.zeros(len(p), np.float32) for p in keep_prob]
            for j in order[:k]:
                ms[owner[j]][index[j]] = 1.0
            return ms if multiple == 1 else align_masks(layout, keep_prob, ms, multiple)

        frac = lambda k: float(layout.cost_fraction([m.sum() for m in masks_for(k)], metric))
        lo, hi = len(keep_prob), len(flat)
        if frac(lo) > budget:
            raise ConfigError(f"a {metric} budget of {budget:.1%} is below reach (the fewest channels per group "
                              f"leave {frac(lo):.1%})")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if frac(mid) <= budget else (lo, mid - 1)
        masks = masks_for(lo)
    else:
        raise ConfigError(f"unknown stamp.mask_mode '{mode}'; choose threshold or budget")
    for m, p in zip(masks, keep_prob):
        if m.sum() == 0:
            m[int(np.argmax(p))] = 1.0
    return masks if multiple == 1 else align_masks(layout, keep_prob, masks, multiple)


def align_masks(layout: GroupLayout, keep_prob: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                multiple: int | None) -> list[np.ndarray]:
    """Each group's kept count rounded *down* to its channel multiple
    (`jaxcompress.pruning.align`; never below the multiple, a full group stays full),
    keeping the most probable channels: aligned masks never exceed a budget the
    unaligned ones met, except where a group is raised to the multiple."""
    widths = layout.table.widths
    mults = align.group_multiples(widths, list(layout.groups), multiple)
    out = []
    for g, m, p in zip(layout.groups, masks, keep_prob):
        k, w, step = int(m.sum()), widths[g], mults[g]
        k = k if k == w else max(step, (k // step) * step)
        keep = np.zeros(w, np.float32)
        keep[np.argsort(-np.asarray(p), kind="stable")[:k]] = 1.0
        out.append(keep)
    return out
