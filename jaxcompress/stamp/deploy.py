"""Target-side deployment of STAMP and of the baselines it is compared with.

STAMP (Song et al., arXiv:2006.12139): one forward pass of the meta-trained set
encoder and mask generator on a sample of the target training data gives the
keep probabilities E[pi]; they are turned into a hard structural mask
(`hard_group_masks`), the pretrained network is shrunk physically
(`jaxcompress.pruning.shrink`) and only the small network is fine-tuned
(`jaxcompress.train.loop.fit`).

Baselines (same target data, same fine-tune epochs, same final size):
SNIP at initialisation and from the pretrained weights (Lee et al. 2019), random
structured pruning, magnitude (L1) pruning of the dense network fine-tuned on the
target (Li et al. 2017; the conventional train-prune-fine-tune pipeline), BBDropout
trained on the target without meta-learning (Lee et al. 2018, `train_bbdropout`),
a dense network of STAMP's widths trained from scratch, and the full dense
pretrained network fine-tuned (accuracy / time reference).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxcompress.data import BatchIterator, augment_cifar, normalize
from jaxcompress.errors import ConfigError
from jaxcompress.models import describe
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.surgery import shrink
from jaxcompress.stamp import kumaraswamy as K
from jaxcompress.stamp.generator import FreeGates, GroupLayout, SparsityObjective, hard_group_masks
from jaxcompress.train.loop import fit, make_eval_fn
from jaxcompress.train.metrics import read_metrics
from jaxcompress.train.optim import make_optimizer
from jaxcompress.train.state import create_train_state
from jaxcompress.train.steps import cross_entropy


def sample_set(x, y, size: int, seed: int):
    """A random (stratification-free) sample of `size` training pairs for the set encoder."""
    idx = np.random.default_rng(seed).choice(len(x), size, replace=size > len(x))
    return x[idx], np.asarray(y[idx], np.int32)


def stamp_masks(stamp, meta_params, set_inputs, set_labels, *, mode: str, threshold: float,
                budget: float, metric: str, multiple: int | None = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(hard prunable-group masks, E[pi]) for one target set (one forward pass)."""
    probs = jax.jit(stamp.keep_probabilities)(meta_params, jnp.asarray(set_inputs), jnp.asarray(set_labels))
    probs = [np.asarray(p) for p in probs]
    return hard_group_masks(stamp.layout, probs, mode, threshold, budget, metric, multiple), probs


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


def finetune(config, exp, model, variables, workdir: str, *, epochs: int, learning_rate: float, seed: int):
    """Trains (model, variables) on `exp.train` with `fit`; variables=None: from scratch.

    Returns (test metrics, val metrics, state). The training cost is in the caller's timer.
    """
    small_exp = dataclasses.replace(exp, model=model, table=describe(model, exp.input_shape))
    ft = config.copy_and_resolve_references()
    ft.train.num_epochs = max(1, epochs)
    ft.train.learning_rate = learning_rate
    tx = make_optimizer(ft.train, max(1, len(exp.train[0]) // ft.train.batch_size))
    if variables is not None:
        variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats", "masks")}
    state = create_train_state(model, tx, exp.input_shape, seed, variables=variables)
    if epochs > 0:
        state, _ = fit(ft, small_exp, state, workdir)
    evaluate = make_eval_fn(small_exp, ft.train.eval_batch_size)
    return evaluate(state, exp.test), evaluate(state, exp.val), state


def train_bbdropout(config, exp, layout: GroupLayout, variables, objective: SparsityObjective, *, epochs: int,
                    learning_rate: float, gate_learning_rate: float = 0.01, temperature: float = 0.1,
                    seed: int = 0):
    """BBDropout on the target without meta-learning (Lee et al. 2018): the full
    network is trained jointly with free per-channel Kumaraswamy gates (relaxed
    Bernoulli, KL to Beta(alpha, 1), budget penalty). Returns (E[pi] per group, variables)."""
    model = layout.table.model
    gates = FreeGates(layout.widths)
    params = {"net": variables["params"], "gates": gates.init(jax.random.key(seed))}
    steps = max(1, len(exp.train[0]) // config.train.batch_size)
    tx = optax.multi_transform(
        {"net": optax.sgd(optax.cosine_decay_schedule(learning_rate, epochs * steps), momentum=0.9),
         "gates": optax.adam(gate_learning_rate)}, {"net": "net", "gates": "gates"})
    opt_state = tx.init(params)
    base_masks = variables.get("masks")

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, key):
        x = normalize(x, exp.mean, exp.std)
        if config.data.augment:
            x = augment_cifar(jax.random.fold_in(key, 1), x)

        def loss_fn(params):
            a, b = gates.apply(params["gates"])
            keys = jax.random.split(key, len(a))
            masks = layout.layer_masks([K.sample_gates(k, ai, bi, temperature) for k, ai, bi in zip(keys, a, b)],
                                       base_masks)
            logits, upd = model.apply({"params": params["net"], "batch_stats": batch_stats, "masks": masks}, x,
                                      train=True, mutable=["batch_stats"])
            reg, info = objective(layout, a, b)
            return cross_entropy(logits, y).mean() + reg, (upd["batch_stats"], info)

        (loss, (bs, info)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), bs, opt_state, loss, info

    it = BatchIterator(*exp.train, batch_size=config.train.batch_size, seed=seed)
    batch_stats = variables["batch_stats"]
    key = jax.random.key(seed)
    for i in range(epochs * steps):
        batch = next(it)
        params, batch_stats, opt_state, loss, info = step(params, batch_stats, opt_state, batch["image"],
                                                          batch["label"], jax.random.fold_in(key, i))
    a, b = gates.apply(params["gates"])
    probs = [np.asarray(K.kumaraswamy_mean(ai, bi)) for ai, bi in zip(a, b)]
    return probs, {**variables, "params": params["net"], "batch_stats": batch_stats}


def prune_to(layout: GroupLayout, variables, masks):
    """Physical surgery of (variables, masks): (small model, small variables)."""
    return shrink(layout.table, {**{k: v for k, v in variables.items() if k != "quant"}, "masks": masks})


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
