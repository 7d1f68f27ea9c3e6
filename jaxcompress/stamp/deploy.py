"""Target-side deployment of STAMP and of the baselines it is compared with.

STAMP (Song et al., arXiv:2006.12139): one forward pass of the meta-trained set
encoder and mask generator on a sample of the target training data gives the
keep probabilities E[pi]; they are turned into a hard structural mask
(`hard_group_masks`), the pretrained network is shrunk physically and only the
small network is fine-tuned (`deploy`: `jaxcompress.pipeline.shrink_and_finetune`).

Baselines (same target data, same fine-tune epochs, same final size):
SNIP at initialisation and from the pretrained weights (Lee et al. 2019), random
structured pruning, magnitude (L1) pruning of the dense network fine-tuned on the
target (Li et al. 2017; the conventional train-prune-fine-tune pipeline), BBDropout
trained on the target without meta-learning (Lee et al. 2018, `train_bbdropout`),
a dense network of STAMP's widths trained from scratch, and the full dense
pretrained network fine-tuned (accuracy / time reference).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxcompress import pipeline
from jaxcompress.data import BatchIterator, augment_cifar, normalize
from jaxcompress.errors import ConfigError
from jaxcompress.pruning import criteria as C
from jaxcompress.stamp import kumaraswamy as K
from jaxcompress.stamp.generator import FreeGates, GroupLayout, SparsityObjective, hard_group_masks
from jaxcompress.train.experiment import Experiment
from jaxcompress.train.metrics import read_metrics
from jaxcompress.train.recipe import Recipe
from jaxcompress.train.state import TrainState
from jaxcompress.train.steps import cross_entropy

NET_COLLECTIONS = ("params", "batch_stats", "masks")  # what a deployed network carries (no quant)


def sample_set(x, y, size: int, seed: int):
    """A random (stratification-free) sample of `size` training pairs for the set encoder."""
    idx = np.random.default_rng(seed).choice(len(x), size, replace=size > len(x))
    return x[idx], np.asarray(y[idx], np.int32)


@functools.lru_cache(maxsize=8)
def _keep_probabilities_fn(stamp):
    """`stamp.keep_probabilities`, jitted once per Stamp (cached on its identity), so that the
    target sets of one deployment (`stamp_masks` per set) share one compiled forward pass."""
    return jax.jit(stamp.keep_probabilities)


def stamp_masks(stamp, meta_params, set_inputs, set_labels, *, mode: str, threshold: float,
                budget: float, metric: str, multiple: int | None = 1, set_images=None
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(hard prunable-group masks, E[pi]) for one target set (one forward pass; `set_images`:
    the set's uint8 images, for a Stamp reading per-channel statistics). A Stamp with
    `keep_counts` keeps that many channels of each group, the highest E[pi] (its
    straight-through top-k at test time); otherwise `hard_group_masks` (mode, budget)."""
    images = None if set_images is None else jnp.asarray(set_images)
    probs = _keep_probabilities_fn(stamp)(meta_params, jnp.asarray(set_inputs), jnp.asarray(set_labels), images)
    probs = [np.asarray(p) for p in probs]
    if stamp.keep_counts is not None:
        return [np.asarray(m) for m in C.masks_from_scores(probs, stamp.keep_counts)], probs
    return hard_group_masks(stamp.layout, probs, mode, threshold, budget, metric, multiple), probs


def undecided_share(probs, low: float = 0.1, high: float = 0.9) -> float:
    """The share of channels whose E[pi] lies strictly between `low` and `high`."""
    flat = np.concatenate([np.ravel(p) for p in probs])
    return float(np.mean((flat > low) & (flat < high)))


def keep_prob_variation(prob_sets, mask_sets) -> dict:
    """How much STAMP's output depends on the target set: E[pi] of the same channels
    for S sets (`prob_sets[s][group]`) and their hard masks (`mask_sets`, same shape).

    `across_sets`: the mean over channels of E[pi]'s standard deviation across the sets;
    `across_channels`: the standard deviation across channels (within each group, then
    averaged over groups, weighted by width) of E[pi] averaged over the sets; `ratio`:
    the first over the second (near 0: one fixed mask whatever the set);
    `mask_agreement`: the mean, over pairs of sets, of the share of kept channels the two
    masks have in common (intersection over union; 1: the same mask for every set)."""
    probs = np.stack([np.concatenate([np.ravel(p) for p in ps]) for ps in prob_sets])  # (S, channels)
    widths = [np.size(p) for p in prob_sets[0]]
    bounds = np.cumsum([0] + widths)
    mean = probs.mean(0)
    across_channels = float(sum(w * mean[a:b].std() for w, a, b in zip(widths, bounds[:-1], bounds[1:]))
                            / sum(widths))
    across_sets = float(probs.std(0).mean())
    masks = np.stack([np.concatenate([np.ravel(m) for m in ms]) for ms in mask_sets]) > 0.5
    pairs = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    agreement = [float((masks[i] & masks[j]).sum() / max((masks[i] | masks[j]).sum(), 1)) for i, j in pairs]
    return dict(sets=len(prob_sets), across_sets=across_sets, across_channels=across_channels,
                ratio=across_sets / across_channels if across_channels > 0 else float("inf"),
                mask_agreement=float(np.mean(agreement)) if agreement else 1.0)


def uniform_counts_for(layout: GroupLayout, fraction: float, metric: str, multiple: int | None = 1) -> list[int]:
    """Per-table-group channel counts of the largest uniform keep ratio whose `metric`
    fraction is at most `fraction` (`criteria.keep_ratio_for_budget`, aligned counts)."""
    table, groups = layout.table, list(layout.groups)
    cost = lambda counts: float(layout.cost_fraction([counts[g] for g in groups], metric))
    try:
        ratio = C.keep_ratio_for_budget(table, fraction, cost, groups, multiple, what=metric)
    except ConfigError as e:  # below what a uniform ratio reaches: the smallest uniform widths
        logging.warning("%s; the uniform baselines use the smallest widths", e)
        return C.lowest_counts(table, groups, multiple)
    return C.keep_counts(table, ratio, groups, multiple)


def criterion_masks(layout: GroupLayout, variables, criterion: str, counts, *, batch=None, seed=0) -> dict:
    """Layer masks keeping `counts` channels per group by a `criteria` score."""
    table = layout.table
    scores = C.channel_scores(table, variables, criterion, batch=batch, seed=seed)
    return table.layer_masks(C.masks_from_scores(scores, counts), variables.get("masks"))


def net_variables(variables) -> dict:
    """The `NET_COLLECTIONS` of a network's variables."""
    return {k: v for k, v in variables.items() if k in NET_COLLECTIONS}


def deploy(exp: Experiment, variables, masks, recipe: Recipe, workdir: str) -> tuple[Experiment, TrainState]:
    """One method's network on the target: `variables` (of `exp.model`) pruned by the
    layer `masks`, shrunk and fine-tuned with `recipe` into `workdir`
    (`pipeline.shrink_and_finetune`). Returns `(small_exp, small_state)`."""
    return pipeline.shrink_and_finetune(exp, {**net_variables(variables), "masks": masks}, recipe, workdir)


def train_bbdropout(exp: Experiment, layout: GroupLayout, variables, objective: SparsityObjective, recipe: Recipe, *,
                    gate_learning_rate: float = 0.01, temperature: float = 0.1):
    """BBDropout on the target without meta-learning (Lee et al. 2018): the full
    network is trained jointly with free per-channel Kumaraswamy gates (relaxed
    Bernoulli, KL to Beta(alpha, 1), budget penalty) for `recipe.num_epochs` epochs of
    its batch size, augmentation and seed; the network by SGD (momentum 0.9, cosine
    decay from `recipe.learning_rate`), the gates by Adam. Returns (E[pi] per group,
    variables)."""
    model = layout.table.model
    gates = FreeGates(layout.widths)
    params = {"net": variables["params"], "gates": gates.init(jax.random.key(recipe.seed))}
    epochs, steps = recipe.num_epochs, recipe.steps_per_epoch(len(exp.train[0]))
    tx = optax.multi_transform(
        {"net": optax.sgd(optax.cosine_decay_schedule(recipe.learning_rate, epochs * steps), momentum=0.9),
         "gates": optax.adam(gate_learning_rate)}, {"net": "net", "gates": "gates"})
    opt_state = tx.init(params)
    base_masks = variables.get("masks")

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, key):
        x = normalize(x, exp.mean, exp.std)
        if recipe.augment:
            x = augment_cifar(jax.random.fold_in(key, 1), x)

        def loss_fn(params):
            a, b = gates.apply(params["gates"])
            keys = jax.random.split(key, len(a))
            masks = layout.layer_masks([K.sample_gates(k, ai, bi, temperature) for k, ai, bi in zip(keys, a, b)],
                                       base_masks)
            logits, upd = model.apply({"params": params["net"], "batch_stats": batch_stats, "masks": masks}, x,
                                      train=True, mutable=["batch_stats"])
            reg, info = objective(layout, a, b)
            return cross_entropy(logits, y).mean() + reg, (upd.get("batch_stats", {}), info)

        (loss, (bs, info)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), bs, opt_state, loss, info

    it = BatchIterator(*exp.train, batch_size=recipe.batch_size, seed=recipe.seed)
    batch_stats = variables.get("batch_stats", {})  # {}: a network without BatchNorm (e.g. LeNet-5)
    key = jax.random.key(recipe.seed)
    for i in range(epochs * steps):
        batch = next(it)
        params, batch_stats, opt_state, loss, info = step(params, batch_stats, opt_state, batch["image"],
                                                          batch["label"], jax.random.fold_in(key, i))
    a, b = gates.apply(params["gates"])
    probs = [np.asarray(K.kumaraswamy_mean(ai, bi)) for ai, bi in zip(a, b)]
    trained = {**variables, "params": params["net"]}
    if batch_stats:
        trained["batch_stats"] = batch_stats
    return probs, trained


def method_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "target", name)


def val_curve(directory: str, target_time: float, end: float) -> list[list[float]]:
    """`[target-side seconds, validation accuracy]` after each fine-tune epoch logged
    in `<directory>/metrics.jsonl`, for a method whose target side took `target_time`
    seconds and ended at wall-clock `end` (so what came before its fine-tune, e.g.
    the dense fine-tune of magnitude pruning, counts). Epochs of an earlier,
    interrupted run (before this method's start) are left out."""
    points = [[target_time - (end - r["time"]), r["val"]["accuracy"]] for r in read_metrics(directory)
              if "val" in r]
    return [p for p in points if p[0] >= 0.0]


def time_to_accuracy(curve: list[list[float]], accuracy: float) -> float | None:
    """First target-side time at which the curve reaches `accuracy`; None if never."""
    return next((t for t, a in curve if a >= accuracy), None)
