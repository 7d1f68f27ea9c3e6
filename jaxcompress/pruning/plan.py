"""PrunePlan: a pruning decision as data, and the masks it gives a network.

The `prune` job reads its plan from `config.prune` (`PrunePlan.from_config`); the RL
search builds one from its searched policy (kept channel counts per group or element
rates per layer, `PrunePlan.for_counts` / `for_element_rates`). Both reach surgery
through `pruning_masks`, one step of a (possibly gradual) schedule.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from jaxcompress.data import normalize
from jaxcompress.models import ModelTable
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.lasso import lasso_groups, lasso_prune
from jaxcompress.pruning.variational import variational_prune


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Which channels and weights to remove. Channels: `criterion` keeps `keep_ratio`
    of every group in `scope` (or `keep_ratios[group name]`), counts multiples of
    `multiple`; then `element_rate` (or `element_rates[layer path]`) of each layer's
    weights by magnitude. `sample_size` training images feed SNIP / LASSO;
    `variational` holds the variational criterion's settings (`variational_prune`)."""

    criterion: str = "l1"
    keep_ratio: float = 1.0
    keep_ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    allocation: str = "uniform"  # uniform | global
    scope: str = "inner"
    multiple: int | None = 1
    element_rate: float = 0.0
    element_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
    sample_size: int = 256
    variational: Mapping = dataclasses.field(default_factory=dict)
    learning_rate: float = 0.01  # the variational criterion's joint weight training
    batch_size: int = 128
    seed: int = 0

    @classmethod
    def from_config(cls, config, keep_ratio: float | None = None) -> "PrunePlan":
        """`config.prune` (with `hardware.multiple`); `keep_ratio` overrides it (a budget's)."""
        p = config.prune
        return cls(criterion=p.criterion, keep_ratio=float(p.keep_ratio if keep_ratio is None else keep_ratio),
                   keep_ratios=dict(p.keep_ratios), allocation=p.allocation, scope=p.scope,
                   multiple=config.hardware.multiple, element_rate=float(p.element_rate),
                   element_rates=dict(p.element_rates), sample_size=int(p.sample_size),
                   variational=dict(p.variational), learning_rate=float(p.finetune_learning_rate),
                   batch_size=int(config.train.batch_size), seed=int(config.seed))

    @classmethod
    def for_counts(cls, table: ModelTable, counts: Mapping[int, int], criterion: str, **settings) -> "PrunePlan":
        """Keep exactly `counts[g]` channels of each group g (unaligned: the counts are the decision)."""
        ratios = {table.group_names[g]: float(c) / table.widths[g] for g, c in counts.items()}
        return cls(criterion=criterion, keep_ratios=ratios, scope="all", multiple=1, **settings)

    @classmethod
    def for_element_rates(cls, rates: Mapping[str, float], **settings) -> "PrunePlan":
        """Magnitude-prune `rates[layer path]` of each layer's weights, no channels."""
        return cls(criterion="l1", element_rates=dict(rates), scope="all", multiple=1, **settings)

    def replace(self, **changes) -> "PrunePlan":
        return dataclasses.replace(self, **changes)


def sample_batch(exp, size: int, seed: int):
    """A normalised (images, labels) sample of the training split (for SNIP, LASSO)."""
    idx = np.random.default_rng(seed).choice(len(exp.train[0]), min(size, len(exp.train[0])), replace=False)
    return np.asarray(normalize(exp.train[0][idx], exp.mean, exp.std)), exp.train[1][idx].astype(np.int32)


def pruning_masks(exp, variables, plan: PrunePlan, fraction: float = 1.0) -> tuple[dict, dict]:
    """Masks (and possibly updated params) for `variables` under `plan`.

    `fraction` in (0, 1] is how far along a gradual schedule this step is: keep ratio
    r becomes r**fraction and element rate e becomes 1 - (1 - e)**fraction. Channels
    and weights already pruned in `variables["masks"]` stay pruned.
    """
    table = exp.table
    groups = C.prunable_groups(table, plan.scope)
    ratios = ({k: v ** fraction for k, v in plan.keep_ratios.items()} if plan.keep_ratios
              else plan.keep_ratio ** fraction)
    if plan.criterion == "lasso":
        masks, params = _lasso_masks(exp, variables, plan, groups, ratios)
    elif plan.criterion == "variational":
        rate = ({k: 1.0 - v for k, v in ratios.items()} if isinstance(ratios, dict) else 1.0 - ratios)
        masks, params = variational_prune(exp, variables, rate, groups=groups, settings=plan.variational,
                                          learning_rate=plan.learning_rate, batch_size=plan.batch_size,
                                          seed=plan.seed, multiple=plan.multiple)
    else:
        masks, params = _score_masks(exp, variables, plan, groups, ratios, fraction), variables["params"]
    if plan.element_rate or plan.element_rates:
        rates = {layer.path: plan.element_rate for layer in table.layers}
        rates.update(dict(plan.element_rates))
        rates = {k: 1.0 - (1.0 - v) ** fraction for k, v in rates.items()}
        masks = C.element_masks(table, {"params": params}, rates, masks)
    return masks, params


def _lasso_masks(exp, variables, plan: PrunePlan, groups, ratios):
    table = exp.table
    eligible = set(lasso_groups(table))  # groups with a depthwise consumer are left whole
    groups = [g for g in groups if g in eligible]
    counts = C.keep_counts(table, ratios, groups, plan.multiple)
    # Groups left at their current width (not named in keep_ratios) are not touched: LASSO
    # would otherwise refit their consumers too.
    alive = [int(np.sum(np.asarray(m) > 0)) for m in table.group_masks(variables["masks"])]
    groups = [g for g in groups if counts[g] < alive[g]]
    images, _ = sample_batch(exp, plan.sample_size, plan.seed)
    group_masks, new_vars = lasso_prune(table, variables, images, counts, groups=groups, seed=plan.seed,
                                        mesh=getattr(exp, "mesh", None))  # data parallel over the run's devices
    return table.layer_masks(group_masks, variables["masks"]), new_vars["params"]


def _score_masks(exp, variables, plan: PrunePlan, groups, ratios, fraction: float):
    table = exp.table
    batch = sample_batch(exp, plan.sample_size, plan.seed) if plan.criterion == "snip" else None
    scores = C.channel_scores(table, variables, plan.criterion, batch=batch, seed=plan.seed)
    scores = [s * (np.asarray(m) > 0) for s, m in zip(scores, table.group_masks(variables["masks"]))]
    if plan.allocation == "global" and not plan.keep_ratios:
        counts = C.global_counts(table, scores, plan.keep_ratio ** fraction, groups, plan.multiple)
    else:
        counts = C.keep_counts(table, ratios, groups, plan.multiple)
    return table.layer_masks(C.masks_from_scores(scores, counts), variables["masks"])
