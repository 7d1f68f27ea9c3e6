"""The `prune` job: trained network -> criterion -> masks -> surgery -> fine-tune.

Writes `summary.json` (accuracy of the dense, masked and fine-tuned pruned network;
params, FLOPs, bytes; widths per group; measured CPU/GPU latency of the dense,
masked-but-not-shrunk and shrunk networks; wall time) and `widths.png`.
An interrupted fine-tune resumes from `<workdir>/finetune/checkpoints`.
"""
from __future__ import annotations

import os
import time

import jax
from absl import logging

from jaxcompress import cost, pipeline, schema
from jaxcompress.latency import latency_model
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.allocate import device_latency_counts
from jaxcompress.pruning.plan import PrunePlan
from jaxcompress.pruning.surgery import without_masks
from jaxcompress.report import plot_layer_bars
from jaxcompress.timing import forward_latencies
from jaxcompress.train import Recipe, Teacher, setup_experiment
from jaxcompress.train.loop import make_eval_fn
from jaxcompress.train.metrics import write_json

CRITERIA = C.CHANNEL_CRITERIA + ("lasso", "variational")


def latency_keep_ratio(table, budget: float, scope: str, multiple: int | None, batch: int) -> tuple[float, float]:
    """`(keep_ratio, predicted latency fraction)`: the largest uniform keep ratio whose
    aligned widths meet `budget` of the dense latency on this device at this batch
    size, by a `LatencyModel` (jaxcompress.latency) fitted on this network."""
    groups = C.prunable_groups(table, scope)
    model = latency_model(table, batch, groups, C.lowest_counts(table, groups, multiple))
    ratio = C.keep_ratio_for_budget(table, budget, model.fraction, groups, multiple, what="latency")
    return ratio, model.fraction(C.keep_counts(table, ratio, groups, multiple))


def latency_allocation(table, flops_budget: float, scope: str, multiple: int | None, batch: int
                       ) -> tuple[dict[str, float], float]:
    """`({group name: keep ratio}, predicted latency fraction)`: the per-group widths within
    `flops_budget` of the dense MACs that this device's measured layer table rates fastest
    at this batch size (`allocate.device_latency_counts`; the prediction is the layer
    table's sum)."""
    groups = C.prunable_groups(table, scope)
    counts, predict = device_latency_counts(table, flops_budget, groups, multiple, batch)
    ratios = {table.group_names[g]: counts[g] / table.widths[g] for g in groups}
    return ratios, predict(counts) / predict(list(table.widths))


def budget_plan(config, table) -> tuple[PrunePlan, float | None]:
    """`(plan, predicted latency fraction or None)`: `config.prune`'s plan with the keep
    ratio (`budget_keep_ratio`) or, for `prune.allocation=latency`, the per-group keep
    ratios (`latency_allocation`) that meet its budget. An unreachable budget is a
    ConfigError, raised before any training."""
    p, hw = config.prune, config.hardware
    if p.allocation == "latency":
        ratios, predicted = latency_allocation(table, p.flops_budget, p.scope, hw.multiple, hw.latency_batch)
        logging.info("latency allocation within %.0f%% FLOPs: %s (predicted %.1f%% of the dense latency)",
                     100 * p.flops_budget, ratios, 100 * predicted)
        return PrunePlan.from_config(config).replace(keep_ratios=ratios), predicted
    keep_ratio, predicted = budget_keep_ratio(table, p, hw.multiple, hw.latency_batch)
    return PrunePlan.from_config(config, keep_ratio), predicted


def budget_keep_ratio(table, p, multiple: int | None, latency_batch: int) -> tuple[float, float | None]:
    """`(keep_ratio, predicted latency fraction or None)` meeting `prune.flops_budget` or
    `prune.latency_budget` (`prune.keep_ratio` without one). An unreachable budget is a
    ConfigError, raised before any training."""
    if p.latency_budget:
        ratio, predicted = latency_keep_ratio(table, p.latency_budget, p.scope, multiple, latency_batch)
        logging.info("latency budget %.0f%%: keep ratio %.3f (predicted %.1f%% of the dense latency)",
                     100 * p.latency_budget, ratio, 100 * predicted)
        return ratio, predicted
    if p.flops_budget:
        return C.keep_ratio_for_flops(table, p.flops_budget, C.prunable_groups(table, p.scope), multiple), None
    return float(p.keep_ratio), None


def prune_recipes(config) -> tuple[Recipe, Recipe]:
    """(the gradual steps' masked fine-tune, the shrunk network's fine-tune)."""
    p = config.prune
    recipe = Recipe.from_config(config).replace(learning_rate=p.finetune_learning_rate)
    return recipe.replace(num_epochs=p.iteration_epochs), recipe.replace(num_epochs=p.finetune_epochs)


def prune_and_finetune(config, workdir: str) -> dict:
    """The `prune` job: reference -> plan (criterion, budget) -> gradual pruning -> shrink
    -> fine-tune -> report."""
    wall_start = time.time()
    p, hw = config.prune, config.hardware
    schema.validate(config)  # called directly (not through jaxcompress.jobs.run): still checked first
    exp = setup_experiment(config)
    plan, predicted = budget_plan(config, exp.table)  # an infeasible budget fails here
    state = pipeline.reference(config, exp, p.checkpoint, workdir, "prune.checkpoint")
    teacher = Teacher.of(state)  # fine-tunes distil from the reference when train.distill_weight > 0
    step_recipe, ft_recipe = prune_recipes(config)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    dense = evaluate(state, exp.test)
    prune_start = time.time()
    state = pipeline.gradual_prune(exp, state, plan, step_recipe, workdir, iterations=p.iterations, teacher=teacher)
    prune_time = time.time() - prune_start
    masked = evaluate(state, exp.test)
    small_exp, small_state = pipeline.shrink_and_finetune(exp, state.variables(), ft_recipe,
                                                          os.path.join(workdir, "finetune"), teacher=teacher)
    small_eval = make_eval_fn(small_exp, config.train.eval_batch_size)
    final, final_val = small_eval(small_state, small_exp.test), small_eval(small_state, small_exp.val)
    nets = {"dense": (exp.model, without_masks(state.variables())), "masked": (exp.model, state.variables()),
            "shrunk": (small_exp.model, without_masks(small_state.variables()))}
    latency = forward_latencies(nets, exp.input_shape, hw.latency_batch)
    summary = prune_summary(config, exp, state, plan, dense=dense["accuracy"], masked=masked["accuracy"],
                            pruned=final["accuracy"], val_pruned=final_val["accuracy"], latency=latency,
                            predicted=predicted)
    summary.update(prune_time_s=prune_time, wall_time_s=time.time() - wall_start)
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_layer_bars(os.path.join(workdir, "widths.png"), exp.table.group_names,
                    {"dense": exp.table.widths, "pruned": summary["widths_pruned"]}, "channels",
                    f"{config.model.name}: {p.criterion} pruning, kept channels per group")
    logging.info("pruned %s: acc %.4f -> %.4f (masked %.4f), params removed %.1f%%, FLOPs left %.1f%%",
                 config.model.name, dense["accuracy"], final["accuracy"], masked["accuracy"],
                 100 * summary["params_removed"], 100 * summary["flops_left"])
    return summary


def prune_summary(config, exp, state, plan: PrunePlan, *, dense: float, masked: float, pruned: float,
                  val_pruned: float, latency: dict, predicted: float | None) -> dict:
    """summary.json of the prune job: accuracies, exact costs before / after, latencies."""
    p = config.prune
    dense_cost = cost.summarize(exp.table)["totals"]
    pruned_report = cost.summarize(exp.table, state.masks, state.quant or None)
    pruned_cost = pruned_report["totals"]
    summary = dict(
        job=config.job, model=config.model.name, dataset=config.data.name, criterion=p.criterion,
        allocation=p.allocation, keep_ratios=dict(plan.keep_ratios),
        keep_ratio=plan.keep_ratio, element_rate=p.element_rate, iterations=p.iterations,
        accuracy_dense=dense, accuracy_masked=masked, accuracy_pruned=pruned, val_accuracy_pruned=val_pruned,
        params_dense=dense_cost["params"], params_pruned=pruned_cost["nonzero_params"],
        params_pruned_structural=pruned_cost["params"],
        flops_dense=dense_cost["flops"], flops_pruned=2 * pruned_cost["sparse_macs"],
        flops_pruned_structural=pruned_cost["flops"],
        bytes_dense=dense_cost["bytes"], bytes_pruned=pruned_cost["bytes"],
        widths_dense=list(exp.table.widths), widths_pruned=pruned_report["widths"],
        groups=list(exp.table.group_names),
        latency_s=latency, latency_batch=config.hardware.latency_batch,
        flops_budget=p.flops_budget or None, latency_budget=p.latency_budget or None,
        latency_predicted_fraction=predicted,
        speedup_shrunk=latency["dense"] / latency["shrunk"] if latency else None,
        speedup_masked=latency["dense"] / latency["masked"] if latency else None,
        device_kind=jax.devices()[0].device_kind)
    summary["params_removed"] = 1.0 - summary["params_pruned"] / summary["params_dense"]
    summary["flops_left"] = summary["flops_pruned"] / summary["flops_dense"]
    return summary
