"""The `prune` job: trained network -> criterion -> masks -> surgery -> fine-tune.

Writes `summary.json` (accuracy of the dense, masked and fine-tuned pruned network;
params, FLOPs, bytes; widths per group; measured CPU/GPU latency of the dense,
masked-but-not-shrunk and shrunk networks; wall time) and `widths.png`.
An interrupted fine-tune resumes from `<workdir>/finetune/checkpoints`.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from absl import logging

from jaxcompress import cost
from jaxcompress.bench.timing import forward_latencies
from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.latency import check_latency_budget, latency_model
from jaxcompress.models import describe
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.surgery import shrink, without_masks
from jaxcompress.report import plot_layer_bars
from jaxcompress.train import create_train_state, make_optimizer, setup_experiment, with_teacher
from jaxcompress.train.loop import fit, make_eval_fn, reference_state, steps_per_epoch
from jaxcompress.train.metrics import write_json

CRITERIA = C.CHANNEL_CRITERIA + ("lasso", "variational")


def check_prune_config(cfg) -> None:
    if cfg.criterion not in CRITERIA:
        raise ConfigError(f"unknown prune.criterion '{cfg.criterion}'; choose one of {', '.join(CRITERIA)}")
    if cfg.allocation not in ("uniform", "global"):
        raise ConfigError(f"unknown prune.allocation '{cfg.allocation}'; choose uniform or global")
    if not 0.0 < cfg.keep_ratio <= 1.0:
        raise ConfigError(f"prune.keep_ratio={cfg.keep_ratio:g} is outside (0, 1]")
    if cfg.flops_budget and cfg.latency_budget:
        raise ConfigError("set at most one of prune.flops_budget and prune.latency_budget")
    if cfg.flops_budget and not 0.0 < cfg.flops_budget <= 1.0:
        raise ConfigError(f"prune.flops_budget={cfg.flops_budget:g} must be a fraction of the dense FLOPs in (0, 1]")
    if cfg.latency_budget:
        check_latency_budget(cfg.latency_budget, "prune.latency_budget")
    if (cfg.flops_budget or cfg.latency_budget) and (cfg.keep_ratios or cfg.allocation != "uniform"):
        raise ConfigError("a prune budget sets one uniform keep ratio: leave prune.keep_ratios empty and use "
                          "prune.allocation=uniform")
    if cfg.latency_budget and cfg.latency_batch < 1:
        raise ConfigError("prune.latency_budget needs prune.latency_batch >= 1 (the batch it is measured at)")
    if cfg.iterations < 1:
        raise ConfigError(f"prune.iterations must be >= 1, got {cfg.iterations}")
    if cfg.iterations > 1 and cfg.criterion in ("lasso", "variational"):
        raise ConfigError(f"gradual pruning (prune.iterations > 1) needs a score criterion, not "
                          f"'{cfg.criterion}'; set --config.prune.iterations=1")


def latency_keep_ratio(table, budget: float, scope: str, multiple: int | None, batch: int) -> tuple[float, float]:
    """`(keep_ratio, predicted latency fraction)`: the largest uniform keep ratio whose
    aligned widths meet `budget` of the dense latency on this device at this batch
    size, by a `LatencyModel` (jaxcompress.latency) fitted on this network."""
    groups = C.prunable_groups(table, scope)
    model = latency_model(table, batch, groups, C.lowest_counts(table, groups, multiple))
    ratio = C.keep_ratio_for_budget(table, budget, model.fraction, groups, multiple, what="latency")
    return ratio, model.fraction(C.keep_counts(table, ratio, groups, multiple))


def sample_batch(exp, size: int, seed: int):
    """A normalised (images, labels) sample of the training split (for SNIP, LASSO)."""
    idx = np.random.default_rng(seed).choice(len(exp.train[0]), min(size, len(exp.train[0])), replace=False)
    return np.asarray(normalize(exp.train[0][idx], exp.mean, exp.std)), exp.train[1][idx].astype(np.int32)


def pruning_masks(config, exp, variables, fraction: float = 1.0) -> tuple[dict, dict]:
    """Masks (and possibly updated params) for `variables` under `config.prune`.

    `fraction` in (0, 1] is how far along a gradual schedule this step is: keep ratio
    r becomes r**fraction and element rate e becomes 1 - (1 - e)**fraction. Channels
    and weights already pruned in `variables["masks"]` stay pruned.
    """
    p = config.prune
    table = exp.table
    groups = C.prunable_groups(table, p.scope)
    ratios = ({k: v ** fraction for k, v in p.keep_ratios.items()} if p.keep_ratios
              else p.keep_ratio ** fraction)
    params = variables["params"]
    if p.criterion == "lasso":
        from jaxcompress.pruning.lasso import lasso_groups, lasso_prune
        eligible = set(lasso_groups(table))  # groups with a depthwise consumer are left whole
        groups = [g for g in groups if g in eligible]
        counts = C.keep_counts(table, ratios, groups, p.multiple)
        # Groups left at their current width (not named in keep_ratios) are not touched: LASSO
        # would otherwise refit their consumers too.
        alive = [int(np.sum(np.asarray(m) > 0)) for m in table.group_masks(variables["masks"])]
        groups = [g for g in groups if counts[g] < alive[g]]
        images, _ = sample_batch(exp, p.sample_size, config.seed)
        group_masks, new_vars = lasso_prune(table, variables, images, counts, groups=groups, seed=config.seed)
        params = new_vars["params"]
        masks = table.layer_masks(group_masks, variables["masks"])
    elif p.criterion == "variational":
        from jaxcompress.pruning.variational import variational_prune
        masks, params = variational_prune(config, exp, variables, groups)
    else:
        batch = sample_batch(exp, p.sample_size, config.seed) if p.criterion == "snip" else None
        scores = C.channel_scores(table, variables, p.criterion, batch=batch, seed=config.seed)
        scores = [s * (np.asarray(m) > 0) for s, m in zip(scores, table.group_masks(variables["masks"]))]
        if p.allocation == "global" and not p.keep_ratios:
            counts = C.global_counts(table, scores, p.keep_ratio ** fraction, groups, p.multiple)
        else:
            counts = C.keep_counts(table, ratios, groups, p.multiple)
        masks = table.layer_masks(C.masks_from_scores(scores, counts), variables["masks"])
    if p.element_rate or p.element_rates:
        rates = {layer.path: p.element_rate for layer in table.layers}
        rates.update(dict(p.element_rates))
        rates = {k: 1.0 - (1.0 - v) ** fraction for k, v in rates.items()}
        masks = C.element_masks(table, {"params": params}, rates, masks)
    return masks, params


def gradual_prune(config, exp, state, workdir: str):
    """`state` pruned under `config.prune` in `prune.iterations` steps (gradual pruning,
    Han et al. 2015: prune part of the way, fine-tune the masked network
    `prune.iteration_epochs` epochs at `prune.finetune_learning_rate`, repeat; each
    step's fine-tune resumes from `<workdir>/iteration<i>`). One step = one-shot."""
    p = config.prune
    ft = config.copy_and_resolve_references()
    ft.train.learning_rate = p.finetune_learning_rate
    for i in range(p.iterations):
        masks, params = pruning_masks(config, exp, state.variables(), (i + 1) / p.iterations)
        state = state.replace(params=params, masks=masks)
        if i + 1 < p.iterations and p.iteration_epochs > 0:
            ft.train.num_epochs = p.iteration_epochs
            tx = make_optimizer(ft.train, steps_per_epoch(ft, exp))
            step_state = create_train_state(exp.model, tx, exp.input_shape, config.seed, variables=state.variables())
            state, _ = fit(ft, exp, step_state, os.path.join(workdir, f"iteration{i + 1}"))
    return state


def shrink_and_finetune(config, exp, variables, workdir: str, num_epochs: int, learning_rate: float):
    """Surgery, then fine-tuning: the masked network `variables` is rebuilt with its kept
    widths (`shrink`) and trained `num_epochs` epochs on `exp.train` at `learning_rate`
    (schedule, optimiser and batch size from `config.train`), resumable from
    `<workdir>/checkpoints`. Returns `(small_exp, small_state)`, `small_exp` being `exp`
    with the smaller model and its table."""
    small_model, small_vars = shrink(exp.table, variables)
    small_exp = dataclasses.replace(exp, model=small_model, table=describe(small_model, exp.input_shape))
    ft = config.copy_and_resolve_references()
    ft.train.learning_rate = learning_rate
    ft.train.num_epochs = num_epochs
    tx = make_optimizer(ft.train, steps_per_epoch(ft, small_exp))
    small_state = create_train_state(small_model, tx, exp.input_shape, config.seed, variables=small_vars)
    if num_epochs > 0:
        small_state, _ = fit(ft, small_exp, small_state, workdir)
    return small_exp, small_state


def prune_and_finetune(config, workdir: str) -> dict:
    wall_start = time.time()
    check_prune_config(config.prune)
    exp = setup_experiment(config)
    predicted = None
    if config.prune.latency_budget or config.prune.flops_budget:  # before any training: infeasible fails here
        config = config.copy_and_resolve_references()
        p = config.prune
        if p.latency_budget:
            p.keep_ratio, predicted = latency_keep_ratio(exp.table, p.latency_budget, p.scope, p.multiple,
                                                         p.latency_batch)
            logging.info("latency budget %.0f%%: keep ratio %.3f (predicted %.1f%% of the dense latency)",
                         100 * p.latency_budget, p.keep_ratio, 100 * predicted)
        else:
            p.keep_ratio = C.keep_ratio_for_flops(exp.table, p.flops_budget, C.prunable_groups(exp.table, p.scope),
                                                  p.multiple)
    p = config.prune
    state = reference_state(config, exp, p.checkpoint, workdir, "prune.checkpoint")
    exp = with_teacher(exp, state)  # fine-tunes distil from the reference when train.distill_weight > 0
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    dense = evaluate(state, exp.test)
    prune_start = time.time()
    state = gradual_prune(config, exp, state, workdir)
    masks = state.masks
    prune_time = time.time() - prune_start
    masked = evaluate(state, exp.test)
    dense_cost = cost.summarize(exp.table)
    pruned_cost = cost.summarize(exp.table, masks, state.quant or None)

    small_exp, small_state = shrink_and_finetune(config, exp, state.variables(), os.path.join(workdir, "finetune"),
                                                 p.finetune_epochs, p.finetune_learning_rate)
    small_model = small_exp.model
    small_eval = make_eval_fn(small_exp, config.train.eval_batch_size)
    final, final_val = small_eval(small_state, small_exp.test), small_eval(small_state, small_exp.val)

    nets = {"dense": (exp.model, without_masks(state.variables())), "masked": (exp.model, state.variables()),
            "shrunk": (small_model, without_masks(small_state.variables()))}
    latency = forward_latencies(nets, exp.input_shape, p.latency_batch)

    names = exp.table.group_names
    plot_layer_bars(os.path.join(workdir, "widths.png"), names,
                    {"dense": exp.table.widths, "pruned": pruned_cost["widths"]}, "channels",
                    f"{config.model.name}: {p.criterion} pruning, kept channels per group")
    summary = dict(
        job=config.job, model=config.model.name, dataset=config.data.name, criterion=p.criterion,
        keep_ratio=p.keep_ratio, element_rate=p.element_rate, iterations=p.iterations,
        accuracy_dense=dense["accuracy"], accuracy_masked=masked["accuracy"], accuracy_pruned=final["accuracy"],
        val_accuracy_pruned=final_val["accuracy"],
        params_dense=dense_cost["totals"]["params"], params_pruned=pruned_cost["totals"]["nonzero_params"],
        params_pruned_structural=pruned_cost["totals"]["params"],
        flops_dense=dense_cost["totals"]["flops"], flops_pruned=2 * pruned_cost["totals"]["sparse_macs"],
        flops_pruned_structural=pruned_cost["totals"]["flops"],
        bytes_dense=dense_cost["totals"]["bytes"], bytes_pruned=pruned_cost["totals"]["bytes"],
        widths_dense=list(exp.table.widths), widths_pruned=pruned_cost["widths"], groups=list(names),
        latency_s=latency, latency_batch=p.latency_batch,
        flops_budget=p.flops_budget or None, latency_budget=p.latency_budget or None,
        latency_predicted_fraction=predicted,
        speedup_shrunk=latency["dense"] / latency["shrunk"] if latency else None,
        speedup_masked=latency["dense"] / latency["masked"] if latency else None,
        prune_time_s=prune_time, wall_time_s=time.time() - wall_start,
        device_kind=jax.devices()[0].device_kind)
    summary["params_removed"] = 1.0 - summary["params_pruned"] / summary["params_dense"]
    summary["flops_left"] = summary["flops_pruned"] / summary["flops_dense"]
    write_json(os.path.join(workdir, "summary.json"), summary)
    logging.info("pruned %s: acc %.4f -> %.4f (masked %.4f), params removed %.1f%%, FLOPs left %.1f%%",
                 config.model.name, dense["accuracy"], final["accuracy"], masked["accuracy"],
                 100 * summary["params_removed"], 100 * summary["flops_left"])
    return summary
