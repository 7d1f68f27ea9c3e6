"""The `bench_single_layer` job: the two-stage paper's Section 5.5 experiment.

Zhan, Lin, Cao (2021), Sec. 5.5 / Figure 6: a small 4-layer CNN (2 conv + 2 fc) on
CIFAR-10, one layer pruned at a time, error increase of weight-magnitude channel
pruning, LASSO channel pruning (He et al. 2017) and variational pruning. Here:

1. the dense network (`config.model`, e.g. `cnn4`) is loaded from `bench.pretrained`
   or trained on `config.data` with `config.train` into `<workdir>/pretrain`
   (resumable; a finished pretraining is not repeated);
2. for every layer in `bench.layers` (channel-group names; () = every prunable group),
   every rate in `bench.rates` (fraction of that group's channels *removed*) and every
   method in `bench.methods`, ONLY that group is pruned, from the same dense network:
   - `magnitude`: L1 norm of each output channel's kernel (`prune.criterion=l1`,
     through `jaxcompress.pruning.plan.pruning_masks`);
   - `lasso`: He et al.'s LASSO selection of the group's channels on the consumer
     layer's reconstruction, then least-squares refit of the consumer
     (`prune.criterion=lasso`, same function; `bench.lasso_sample_size` images,
     10 positions per image);
   - `variational`: information-dropout noise on the group's output channels only
     (`jaxcompress.pruning.variational.fit_variational`, `bench.variational`), fitted
     once per layer; the channels with the largest learned noise are removed. With
     `bench.variational.learning_rate=0` (default) the weights stay fixed while the
     noise is fitted, so every method gets exactly the same weight training (the
     fine-tune below);
3. every pruned network is shrunk physically and fine-tuned for the same
   `bench.finetune_steps` SGD steps (`pipeline.shrink_and_finetune`; one epoch over
   a fixed random subset of finetune_steps * batch_size training images, or whole
   epochs if more steps are asked than one epoch has), then evaluated on the test set.
   A control cell (`bench.finetune_dense`) fine-tunes the dense network the same way.

Reported per cell: test error before and after the fine-tune and their increase over
the dense network's test error (percentage points), kept channels, params / FLOPs
left. Each finished cell is appended to `<workdir>/results.jsonl` at once; a restarted
run skips the cells found there (with the same settings) and resumes an interrupted
fine-tune from `<workdir>/cells/<cell>/checkpoints`. Writes `summary.json`,
`results.md` (Markdown tables) and `single_layer.png` (error increase against the
rate, one panel per layer, one line per method; second row: before fine-tuning).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from benchmarks.resume import append_row, read_rows
from jaxcompress import cost
from jaxcompress.data import BatchIterator
from jaxcompress.distributed import process_slice
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import criteria as C
from jaxcompress.pipeline import shrink_and_finetune
from jaxcompress.pruning.plan import PrunePlan, pruning_masks
from jaxcompress.train import Recipe, create_train_state, make_optimizer, setup_experiment
from jaxcompress.train.loop import fit, load_trained, make_eval_fn
from jaxcompress.train.metrics import write_json

METHODS = ("magnitude", "lasso", "variational")
DENSE = "dense_finetuned"

DEFAULTS = dict(
    pretrained="",  # a trained run's workdir (its best/); "" trains config.model into <workdir>/pretrain
    layers=(),  # channel-group names to prune one at a time; () = every prunable group
    rates=(0.25, 0.5, 0.75),  # fraction of the group's channels removed
    methods=METHODS,
    finetune_steps=100, finetune_learning_rate=0.01,  # identical for every method
    finetune_dense=True,  # control cell: the dense network fine-tuned the same way
    eval_before_finetune=True,
    lasso_sample_size=1000,  # training images sampled for LASSO (10 positions each for a conv consumer)
    variational=dict(num_steps=150, beta=1.0, learning_rate=0.0, noise_learning_rate=0.02, init_alpha=0.05,
                     batch_size=128),
)


# ------------------------------------------------------------------------------------ config

def settings(config) -> dict:
    """`config.bench` merged over DEFAULTS; unknown fields are an error."""
    if "bench" not in config:
        raise ConfigError("job bench_single_layer reads config.bench (layers, rates, methods, ...); start from "
                          "benchmarks/configs/single_layer_cifar10.py")
    given = config.bench.to_dict()
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config.bench fields {unknown}; bench_single_layer reads "
                          f"{', '.join(sorted(DEFAULTS))}")
    var = dict(given.get("variational") or {})
    bad = sorted(set(var) - set(DEFAULTS["variational"]))
    if bad:
        raise ConfigError(f"unknown config.bench.variational fields {bad}; choose among "
                          f"{', '.join(sorted(DEFAULTS['variational']))}")
    out = {**DEFAULTS, **given, "variational": {**DEFAULTS["variational"], **var}}
    out["layers"], out["rates"], out["methods"] = (tuple(out["layers"]), tuple(float(r) for r in out["rates"]),
                                                   tuple(out["methods"]))
    return out


def check_config(config) -> tuple[dict, list[tuple[str, str, float]]]:
    """Validates `config.bench` against the model's channel groups, before any data is
    loaded or anything compiled; returns (settings, cells) with cells (method, layer, rate)."""
    b = settings(config)
    unknown = [m for m in b["methods"] if m not in METHODS]
    if unknown or not b["methods"]:
        raise ConfigError(f"unknown bench.methods {unknown or '()'}; choose among {', '.join(METHODS)}")
    if not b["rates"]:
        raise ConfigError("bench.rates is empty; give fractions of channels to remove, e.g. (0.25, 0.5, 0.75)")
    for r in b["rates"]:
        if not 0.0 < r < 1.0:
            raise ConfigError(f"bench.rates: {r:g} is outside (0, 1); a rate is the fraction of a layer's "
                              f"channels removed")
    if b["finetune_steps"] < 0 or b["finetune_learning_rate"] < 0:
        raise ConfigError("bench.finetune_steps and bench.finetune_learning_rate must be >= 0")
    if b["lasso_sample_size"] < 1:
        raise ConfigError(f"bench.lasso_sample_size must be >= 1, got {b['lasso_sample_size']}")
    v = b["variational"]
    if v["num_steps"] < 1 or v["batch_size"] < 1 or v["beta"] < 0 or v["learning_rate"] < 0:
        raise ConfigError("bench.variational needs num_steps >= 1, batch_size >= 1, beta >= 0, learning_rate >= 0")
    spec = get_spec(config.model.name)
    table = describe(create_model(config.model.name, 10, config.model.width_multiplier), spec.input_shape)
    names = table.group_names
    prunable = [names[g] for g in C.prunable_groups(table, "all")]
    layers = b["layers"] or tuple(prunable)
    bad = [l for l in layers if l not in prunable]
    if bad:
        raise ConfigError(f"unknown bench.layers {bad} for {config.model.name}; its prunable channel groups "
                          f"are: {', '.join(prunable)}")
    if "lasso" in b["methods"]:
        from jaxcompress.pruning.lasso import lasso_groups
        eligible = [names[g] for g in lasso_groups(table)]
        bad = [l for l in layers if l not in eligible]
        if bad:
            raise ConfigError(f"bench.layers {bad} cannot be pruned by LASSO (no consumer, or a depthwise "
                              f"consumer); LASSO can prune: {', '.join(eligible)}")
    for layer in layers:
        for r in b["rates"]:
            C.keep_counts(table, {layer: 1.0 - r})  # ConfigError if no channel would be left
    b["layers"] = layers
    cells = [(m, layer, r) for layer in layers for m in b["methods"] for r in b["rates"]]
    return b, cells


def _fingerprint(config, b) -> str:
    """Settings a cell's result depends on (not the list of cells)."""
    keep = {k: v for k, v in b.items() if k not in ("layers", "rates", "methods", "finetune_dense",
                                                      "eval_before_finetune")}
    blob = json.dumps(dict(bench=keep, model=config.model.to_dict(), data=config.data.to_dict(),
                           train=config.train.to_dict(), seed=config.seed), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def cell_key(method: str, layer: str | None, rate: float) -> str:
    return DENSE if method == DENSE else f"{method}/{layer}/{rate:g}"


# ------------------------------------------------------------------------------------ pieces

def reference_network(config, exp, b, workdir):
    """The dense network: `bench.pretrained`, or trained into <workdir>/pretrain (resumable).
    Returns (state, pretrain wall time in s, summed over runs; None when loaded)."""
    recipe = Recipe.from_config(config)
    if b["pretrained"]:
        return load_trained(exp, b["pretrained"], recipe), None
    pre_dir = os.path.join(workdir, "pretrain")
    time_path = os.path.join(pre_dir, "pretrain_time.json")
    spent = 0.0
    if os.path.exists(time_path):
        with open(time_path) as f:
            spent = json.load(f)["time_s"]
    start = time.time()
    state = create_train_state(exp.model, make_optimizer(recipe, 1), exp.input_shape, config.seed)
    logging.info("bench_single_layer: training the dense %s into %s (%d epochs; resumes if interrupted)",
                 config.model.name, pre_dir, config.train.num_epochs)
    _, info = fit(state, exp, recipe, pre_dir)
    if info["train_time_s"] > 0:  # epochs were run in this call
        spent += time.time() - start
        write_json(time_path, {"time_s": spent})
    return load_trained(exp, pre_dir, recipe), spent


def finetune_split(exp, steps: int, batch_size: int, seed: int):
    """(exp with the fine-tune's training split, epochs): one epoch over a fixed random subset of
    steps * batch_size images, or whole epochs over the training split if that is not enough."""
    n = len(exp.train[0])
    per_epoch = n // batch_size
    if steps <= per_epoch:
        idx = np.sort(np.random.default_rng(seed + 1).choice(n, steps * batch_size, replace=False))
        return dataclasses.replace(exp, train=(exp.train[0][idx], exp.train[1][idx])), (1 if steps else 0)
    return exp, math.ceil(steps / per_epoch)


def variational_fit(exp, variables, group: int, v: dict, seed: int):
    """Information-dropout noise on the output channels of `group`'s producer layers only,
    fitted on the training split; returns the VariationalResult."""
    from jaxcompress.pruning.variational import CHANNEL, fit_variational, init_noise_logits
    table = exp.table
    noise = init_noise_logits(table, include_dense=True, init_alpha=float(v["init_alpha"]))
    producers = [l.path for l in table.layers if l.out_group == group and l.path in noise]
    noise = {p: {CHANNEL: noise[p][CHANNEL]} for p in producers}
    process_index, process_count = process_slice()  # this process's rows of each global batch
    it = BatchIterator(*exp.train, batch_size=int(v["batch_size"]), seed=seed, process_index=process_index,
                       process_count=process_count)
    return fit_variational(table, variables, it, exp.mean, exp.std, int(v["num_steps"]), float(v["learning_rate"]),
                           float(v["beta"]), seed, noise_learning_rate=float(v["noise_learning_rate"]),
                           num_train=len(exp.train[0]), noise_logits=noise, mesh=exp.mesh)


def prune_one_layer(config, exp, state, method: str, layer: str, rate: float, b: dict, var_cache: dict):
    """(masks, params) of the dense `state` with `rate` of group `layer`'s channels removed by
    `method`; every other group untouched."""
    table = exp.table
    g = table.group_names.index(layer)
    keep = C.keep_counts(table, {layer: 1.0 - rate})[g]
    variables = state.variables()
    if method in ("magnitude", "lasso"):
        plan = PrunePlan(criterion="l1" if method == "magnitude" else "lasso", keep_ratios={layer: 1.0 - rate},
                         scope="all", multiple=1, sample_size=int(b["lasso_sample_size"]), seed=config.seed)
        masks, params = pruning_masks(exp, variables, plan)
    elif method == "variational":
        from jaxcompress.pruning.variational import variational_masks
        if layer not in var_cache:
            start = time.time()
            var_cache[layer] = (variational_fit(exp, variables, g, b["variational"], config.seed),
                                time.time() - start)
        result, _ = var_cache[layer]
        width = table.widths[g]
        masks = variational_masks(table, result.log_alpha, 0.0, {layer: (width - keep) / width},
                                  masks=variables["masks"], groups=[g])
        params = result.variables["params"]
    else:
        raise ConfigError(f"unknown method '{method}'")
    kept = np.flatnonzero(np.asarray(table.group_masks(masks)[g]) > 0)
    if kept.size != keep:
        raise RuntimeError(f"{method} kept {kept.size} channels of {layer}, expected {keep}")
    return masks, params


def _error(evaluate, state, split) -> float:
    return 1.0 - evaluate(state, split)["accuracy"]


# ------------------------------------------------------------------------------------ report

def ordering(rows: list[dict], b: dict) -> dict:
    """Per (layer, rate): does variational <= lasso <= magnitude hold (error increase after fine-tune)?"""
    by = {(r["method"], r["layer"], r["rate"]): r["error_increase"] for r in rows if r["method"] in METHODS}
    checks = []
    for layer in b["layers"]:
        for rate in b["rates"]:
            vals = [by.get((m, layer, rate)) for m in ("variational", "lasso", "magnitude")]
            if None in vals:
                continue
            checks.append(dict(layer=layer, rate=rate, variational=vals[0], lasso=vals[1], magnitude=vals[2],
                               holds=bool(vals[0] <= vals[1] <= vals[2]),
                               variational_le_lasso=bool(vals[0] <= vals[1]), lasso_le_magnitude=bool(vals[1] <= vals[2])))
    n = len(checks)
    return dict(cells=checks, holds=sum(c["holds"] for c in checks), total=n,
                variational_le_lasso=sum(c["variational_le_lasso"] for c in checks),
                lasso_le_magnitude=sum(c["lasso_le_magnitude"] for c in checks))


def markdown(rows: list[dict], b: dict, dense_error: float, control: dict | None) -> str:
    rates = b["rates"]
    by = {(r["method"], r["layer"], r["rate"]): r for r in rows}
    head = "| layer | method | " + " | ".join(f"{100 * r:g}% removed" for r in rates) + " |"
    sep = "|---|---|" + "---|" * len(rates)
    lines = [f"Test error increase over the dense network ({100 * dense_error:.2f}% error), percentage points, "
             f"after the fine-tune (before it in parentheses):", "", head, sep]
    for layer in b["layers"]:
        for m in b["methods"]:
            cells = []
            for r in rates:
                row = by.get((m, layer, r))
                if row is None:
                    cells.append("n/m")
                    continue
                before = row.get("error_increase_before_finetune")
                cells.append(f"{100 * row['error_increase']:+.2f}"
                             + (f" ({100 * before:+.2f})" if before is not None else ""))
            lines.append(f"| {layer} | {m} | " + " | ".join(cells) + " |")
    if control is not None:
        lines += ["", f"Control: the dense network fine-tuned the same way: {100 * control['error_finetuned']:.2f}% "
                      f"error ({100 * control['error_increase']:+.2f} points)."]
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict], b: dict, title: str) -> str:
    from jaxcompress.report import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt
    layers, with_before = b["layers"], any(r.get("error_increase_before_finetune") is not None for r in rows)
    nrows = 2 if with_before else 1
    fig, axes = plt.subplots(nrows, len(layers), figsize=(3.6 * len(layers), 3.2 * nrows), squeeze=False,
                             sharex=True)
    for j, layer in enumerate(layers):
        for i, key in enumerate(("error_increase", "error_increase_before_finetune")[:nrows]):
            ax = axes[i][j]
            for m in b["methods"]:
                pts = sorted((r["rate"], r[key]) for r in rows if r["method"] == m and r["layer"] == layer
                             and r.get(key) is not None)
                if pts:
                    ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=m)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_title(f"{layer}" + ("" if i == 0 else " (before fine-tune)"), fontsize=9)
            if j == 0:
                ax.set_ylabel("test error increase (points)")
            if i == nrows - 1:
                ax.set_xlabel("channels removed (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ the job

def run(config, workdir: str) -> dict:
    wall_start = time.time()
    b, cells = check_config(config)
    exp = setup_experiment(config)
    fp = _fingerprint(config, b)
    state, pretrain_time = reference_network(config, exp, b, workdir)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    dense_error = _error(evaluate, state, exp.test)
    logging.info("bench_single_layer: dense %s %s, test error %.2f%%", config.model.name, exp.table.widths,
                 100 * dense_error)

    ft_exp, ft_epochs = finetune_split(exp, int(b["finetune_steps"]), config.train.batch_size, config.seed)
    ft_recipe = Recipe.from_config(config).replace(warmup_epochs=0.0, num_epochs=ft_epochs,
                                                   learning_rate=float(b["finetune_learning_rate"]))
    ft_steps = ft_epochs * ft_recipe.steps_per_epoch(len(ft_exp.train[0]))
    dense_cost = cost.count(exp.table)

    results_path = os.path.join(workdir, "results.jsonl")
    done = read_rows(results_path, fp)
    todo = ([(DENSE, None, 0.0)] if b["finetune_dense"] else []) + cells
    var_cache: dict = {}
    names = exp.table.group_names
    if done:
        logging.info("bench_single_layer: %d of %d cells already in %s", sum(cell_key(*c) in done for c in todo),
                     len(todo), results_path)
    with tqdm(todo, desc="single-layer cells", disable=None) as bar:
        for i, (method, layer, rate) in enumerate(bar):
            key = cell_key(method, layer, rate)
            if key in done:
                continue
            bar.set_postfix_str(key)
            start = time.time()
            if method == DENSE:
                masks, params, counts = state.masks, state.params, list(exp.table.widths)
                kept = None
            else:
                masks, params = prune_one_layer(config, exp, state, method, layer, rate, b, var_cache)
                counts = [int(np.sum(np.asarray(m) > 0)) for m in exp.table.group_masks(masks)]
                kept = np.flatnonzero(np.asarray(exp.table.group_masks(masks)[names.index(layer)]) > 0).tolist()
            prune_time = time.time() - start
            pruned_state = state.replace(params=params, masks=masks)
            before = (_error(evaluate, pruned_state, exp.test) if b["eval_before_finetune"] and method != DENSE
                      else None)
            ft_start = time.time()
            cell_dir = os.path.join(workdir, "cells", f"{key.replace('/', '_')}_{fp}")
            small_exp, small_state = shrink_and_finetune(ft_exp, pruned_state.variables(), ft_recipe, cell_dir)
            after = _error(make_eval_fn(small_exp, config.train.eval_batch_size), small_state, exp.test)
            left = cost.count(exp.table, counts)
            row = dict(key=key, fingerprint=fp, method=method, layer=layer, rate=rate,
                       kept=kept, widths=counts, error_dense=dense_error,
                       error_before_finetune=before, error_finetuned=after,
                       error_increase=after - dense_error,
                       error_increase_before_finetune=None if before is None else before - dense_error,
                       params_left=float(left["params"] / dense_cost["params"]),
                       flops_left=float(left["macs"] / dense_cost["macs"]),
                       prune_time_s=prune_time, finetune_time_s=time.time() - ft_start,
                       noise_fit_time_s=var_cache[layer][1] if method == "variational" else None,
                       time_s=time.time() - start)
            append_row(results_path, row)
            done[key] = row
            logging.info("[%d/%d] %-28s error %.2f%% -> %s%.2f%% after %d fine-tune steps (%+.2f points), %.1fs",
                         i + 1, len(todo), key, 100 * dense_error,
                         "" if before is None else f"{100 * before:.2f}% (pruned) -> ", 100 * after, ft_steps,
                         100 * (after - dense_error), row["time_s"])

    rows = [done[cell_key(*c)] for c in cells]
    control = done.get(DENSE) if b["finetune_dense"] else None
    order = ordering(rows, b)
    table = {m: {layer: {f"{r:g}": done[cell_key(m, layer, r)]["error_increase"] for r in b["rates"]}
                 for layer in b["layers"]} for m in b["methods"]}
    md = markdown(rows, b, dense_error, control)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(md)
    title = (f"{config.model.name} {tuple(exp.table.widths)} on {config.data.name}: one layer pruned, "
             f"{ft_steps} fine-tune steps")
    plot(os.path.join(workdir, "single_layer.png"), rows, b, title)
    summary = dict(
        job=config.job, model=config.model.name, widths=list(exp.table.widths), dataset=config.data.name,
        groups=list(names), layers=list(b["layers"]), rates=list(b["rates"]), methods=list(b["methods"]),
        error_dense=dense_error, accuracy_dense=1.0 - dense_error,
        error_dense_finetuned=None if control is None else control["error_finetuned"],
        finetune_steps=ft_steps, finetune_epochs=ft_epochs, finetune_examples=len(ft_exp.train[0]),
        finetune_learning_rate=b["finetune_learning_rate"], lasso_sample_size=b["lasso_sample_size"],
        variational=b["variational"], table=table, cells=rows, control=control, ordering=order,
        pretrain_time_s=pretrain_time, cells_time_s=sum(r["time_s"] for r in rows) + (control or {}).get("time_s", 0.0),
        wall_time_s=time.time() - wall_start, fingerprint=fp, device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    logging.info("\n%s", md)
    logging.info("ordering variational <= lasso <= magnitude held in %d of %d (layer, rate) cells",
                 order["holds"], order["total"])
    return summary
