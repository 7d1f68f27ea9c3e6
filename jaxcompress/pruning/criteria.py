"""Pruning criteria: channel and element importance scores, and keep counts.

Every criterion scores whole *channel groups* (see `jaxcompress.models.table`):
the score of a channel sums over every layer that produces it, so residual
streams, depthwise convs and BatchNorms are pruned consistently by construction.
An attention head is one channel of its layer's heads group, produced by the
query, key and value projections: its score sums their kernels' slices
(d, head_dim) of that head; a transformer MLP neuron is a Dense output channel.

* `l1` / `l2`: norm of each output channel's kernel slice (Li et al. 2017; the
  two-stage paper's "weight magnitude" baseline).
* `bn`: |gamma| of the BatchNorms in the group (network slimming, Liu et al. 2017);
  groups without BatchNorm fall back to `l1`.
* `snip`: connection sensitivity |g * w| on a batch (Lee et al. 2019), summed per
  output channel; at initialisation or from a trained network. The loss is the mean
  cross-entropy over every labelled position (per image, or per token of an LM).
* `random`: uniform scores (the random-pruning baseline).
LASSO channel selection lives in the `lasso/` package, variational pruning in `variational.py`.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable
from jaxcompress.pruning import align

CHANNEL_CRITERIA = ("l1", "l2", "bn", "snip", "random")
SCOPES = ("all", "inner")


def _kernel(params_flat, path: str):
    return params_flat[tuple(path.split("/")) + ("kernel",)]


def _per_channel(x, order: int, channel_axis: int = -1):
    """l1 or l2 norm of every slice of `x` along `channel_axis` (all other axes reduced)."""
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    return jnp.sum(jnp.abs(x), axes) if order == 1 else jnp.sqrt(jnp.sum(x * x, axes))


def snip_saliency(apply_fn, variables: Mapping, images, labels):
    """|dL/dw * w| for every parameter on one batch (Lee et al. 2019, Eq. 6). L is the
    mean cross-entropy over every labelled position: labels (batch,) for a classifier's
    logits (batch, classes), (batch, tokens) for a language model's (batch, tokens, vocab)."""
    return _snip_saliency(apply_fn, dict(variables), images, labels)


@functools.partial(jax.jit, static_argnums=0)  # one compile per model (and shapes), not op-by-op dispatch
def _snip_saliency(apply_fn, variables, images, labels):
    def loss(params):
        logits = apply_fn({**variables, "params": params}, images, train=False)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"snip: labels of shape {labels.shape} do not label the logits of shape "
                             f"{logits.shape} (one label per position of all but the last axis)")
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    grads = jax.grad(loss)(variables["params"])
    return jax.tree.map(lambda g, w: jnp.abs(g * w), grads, variables["params"])


def channel_scores(table: ModelTable, variables: Mapping, criterion: str, *, batch=None,
                   seed: int = 0) -> list[np.ndarray]:
    """One importance score per channel of every group (higher = keep).

    `batch` = (inputs, labels) is needed by `snip`: normalised float images and class
    ids (batch,), or a language model's token ids and next-token targets (batch, tokens).
    """
    if criterion not in CHANNEL_CRITERIA:
        raise ConfigError(f"unknown pruning criterion '{criterion}'; choose one of "
                          f"{', '.join(CHANNEL_CRITERIA + ('lasso', 'variational'))}")
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return [rng.random(w) for w in table.widths]
    params = variables["params"]
    if criterion == "snip":
        if batch is None:
            raise ConfigError("the snip criterion needs a batch of (images, labels)")
        params = snip_saliency(table.model.apply, variables, *batch)
    flat = traverse_util.flatten_dict(dict(params))
    scores = [np.zeros(w, np.float64) for w in table.widths]
    if criterion == "bn":
        for path, g in table.norm_groups:
            scores[g] += np.abs(np.asarray(flat[tuple(path.split("/")) + ("scale",)]))
    order = 2 if criterion == "l2" else 1
    for layer in table.layers:
        g = layer.out_group
        if g < 0 or (criterion == "bn" and np.any(scores[g])):
            continue
        scores[g] += np.asarray(_per_channel(_kernel(flat, layer.path), order, table.out_axis(layer)))
    return scores


def prunable_groups(table: ModelTable, scope: str = "all") -> list[int]:
    """`all` groups, or `inner` ones: produced by a single layer (residual streams,
    which several layers add into, are left whole). An attention layer's query, key
    and value projections produce its heads together: one producer."""
    if scope not in SCOPES:
        raise ConfigError(f"unknown prune scope '{scope}'; choose one of {', '.join(SCOPES)}")
    heads = {a.path: a.heads_group for a in table.attention}
    producers = [set() for _ in range(table.num_groups)]
    for layer in table.layers:
        if layer.out_group >= 0 and not layer.depthwise:
            parent = layer.path.rpartition("/")[0]
            unit = parent if heads.get(parent, -1) == layer.out_group else layer.path
            producers[layer.out_group].add(unit)
    return [g for g in range(table.num_groups) if scope == "all" or len(producers[g]) == 1]


def keep_counts(table: ModelTable, keep_ratio: float | Mapping[str, float], groups: Sequence[int] | None = None,
                multiple: int | None = 1) -> list[int]:
    """Channels to keep per group: round(width * ratio), aligned to the group's channel
    multiple (`align.group_multiples`: an integer for every group, or None for the
    backend's), never 0 and never above the width.

    `keep_ratio` is one fraction in (0, 1] for every group in `groups` (default all)
    or a {group name: fraction} dict; groups not named keep every channel.
    """
    names = table.group_names
    groups = range(table.num_groups) if groups is None else groups
    if isinstance(keep_ratio, Mapping):
        unknown = sorted(set(keep_ratio) - set(names))
        if unknown:
            raise ConfigError(f"keep ratios name unknown groups {unknown}; groups are: {', '.join(names)}")
        ratios = {names.index(k): float(v) for k, v in keep_ratio.items()}
    else:
        ratios = {g: float(keep_ratio) for g in groups}
    mults = align.group_multiples(table.widths, sorted(ratios), multiple)
    counts = list(table.widths)
    for g, r in ratios.items():
        if not 0.0 < r <= 1.0:
            raise ConfigError(f"keep ratio {r:g} for group {names[g]} is outside (0, 1]")
        w = table.widths[g]
        if int(round(w * r)) < 1:
            raise ConfigError(f"keep ratio {r:g} would remove every channel of group {names[g]} "
                              f"(width {w}); raise the ratio")
        counts[g] = align.aligned(w, w * r, mults[g])
    return counts


def masks_from_scores(scores: Sequence[np.ndarray], counts: Sequence[int]) -> list[jnp.ndarray]:
    """Keeps the `counts[g]` highest-scoring channels of every group (ties: lower index)."""
    masks = []
    for s, k in zip(scores, counts):
        order = np.argsort(-np.asarray(s), kind="stable")
        m = np.zeros(len(s), np.float32)
        m[order[:k]] = 1.0
        masks.append(jnp.asarray(m))
    return masks


def global_counts(table: ModelTable, scores: Sequence[np.ndarray], keep_ratio: float,
                  groups: Sequence[int] | None = None, multiple: int | None = 1) -> list[int]:
    """Global allocation: one threshold over every group's scores, each normalised by
    its group's mean, keeping `keep_ratio` of all prunable channels; each group's count
    is then aligned to its channel multiple (`align.aligned`, >= 1 per group)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep ratio {keep_ratio:g} is outside (0, 1]")
    groups = list(range(table.num_groups)) if groups is None else list(groups)
    normed = np.concatenate([np.asarray(scores[g]) / (np.mean(scores[g]) + 1e-12) for g in groups])
    owner = np.concatenate([np.full(table.widths[g], g) for g in groups])
    keep = np.argsort(-normed, kind="stable")[:max(len(groups), int(round(keep_ratio * normed.size)))]
    mults = align.group_multiples(table.widths, groups, multiple)
    counts = list(table.widths)
    for g in groups:
        counts[g] = align.aligned(table.widths[g], int(np.sum(owner[keep] == g)), mults[g])
    return counts


def element_masks(table: ModelTable, variables: Mapping, rate: float | Mapping[str, float],
                  masks: Mapping | None = None) -> dict:
    """Adds magnitude element masks (`masks/<layer>/kernel`) removing `rate` of the
    weights each layer keeps after channel pruning (one rate, or {layer path: rate}).
    Weights of pruned channels, and weights an existing element mask in `masks`
    already removed, are zero in the mask as well."""
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    out = traverse_util.flatten_dict(dict(masks or {}))
    group_masks = [np.asarray(m) for m in table.group_masks(masks or {})]
    layers = {l.path: l for l in table.layers}
    rates = dict(rate) if isinstance(rate, Mapping) else {p: float(rate) for p in layers}
    unknown = sorted(set(rates) - set(layers))
    if unknown:
        raise ConfigError(f"element rates name unknown layers {unknown}; layers are: {', '.join(layers)}")
    for path, r in rates.items():
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"element pruning rate {r:g} for layer {path} is outside [0, 1)")
        keep = table.kernel_keep(layers[path], group_masks).reshape(-1)
        existing = out.get(tuple(path.split("/")) + ("kernel",))
        alive = keep & (np.asarray(existing).reshape(-1) > 0) if existing is not None else keep
        w = np.abs(np.asarray(_kernel(flat, path))).reshape(-1)
        order = np.argsort(np.where(alive, w, -1.0), kind="stable")  # already removed first
        m = np.ones(w.size, np.float32)
        n_removed = max(int(keep.size - alive.sum()), int(keep.size - keep.sum()) + int(round(r * keep.sum())))
        m[order[:n_removed]] = 0.0
        out[tuple(path.split("/")) + ("kernel",)] = jnp.asarray(m.reshape(flat[tuple(path.split("/")) + ("kernel",)].shape))
    return traverse_util.unflatten_dict(out)


def lowest_counts(table: ModelTable, groups: Sequence[int], multiple: int | None = 1) -> list[int]:
    """Every group in `groups` at its smallest allowed (aligned) count."""
    return keep_counts(table, max(1.0 / table.widths[g] for g in groups), groups, multiple)


def keep_ratio_for_budget(table: ModelTable, fraction: float, cost_fraction: Callable[[list[int]], float],
                          groups: Sequence[int] | None = None, multiple: int | None = 1, iters: int = 40,
                          what: str = "FLOPs") -> float:
    """Largest uniform keep ratio whose aligned counts (`keep_counts`) have
    `cost_fraction(counts) <= fraction` (bisection; each distinct count vector is
    costed once, so an expensive cost such as measured latency is cheap to search).
    A budget that the smallest allowed widths cannot meet is a clear error."""
    groups = list(range(table.num_groups)) if groups is None else list(groups)
    memo = {}

    def cost(r):
        counts = tuple(keep_counts(table, r, groups, multiple))
        if counts not in memo:
            memo[counts] = float(cost_fraction(list(counts)))
        return memo[counts]

    lowest = max(1.0 / table.widths[g] for g in groups)  # every group at its smallest allowed count
    if cost(lowest) > fraction:
        raise ConfigError(f"a {what} budget of {fraction:.1%} cannot be met: pruning every prunable group "
                          f"to its minimum leaves {cost(lowest):.1%}; prune more groups (prune.scope=all), "
                          f"lower the channel multiple, or raise the budget")
    lo, hi = lowest, 1.0
    if cost(hi) <= fraction:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cost(mid) <= fraction else (lo, mid)
    return lo


def keep_ratio_for_flops(table: ModelTable, flops_fraction: float, groups: Sequence[int] | None = None,
                         multiple: int | None = 1, iters: int = 40) -> float:
    """Largest uniform keep ratio whose aligned widths meet `flops_fraction` of the dense
    FLOPs (bisection over the exact cost model)."""
    dense = float(cost.count(table)["macs"])
    return keep_ratio_for_budget(table, flops_fraction, lambda c: float(cost.count(table, c)["macs"]) / dense,
                                 groups, multiple, iters, "FLOPs")
