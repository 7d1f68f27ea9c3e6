"""The `stamp` job: reference pretraining -> meta-training -> target deployment + baselines.

    python -m benchmarks.run --config=benchmarks/configs/stamp_cifar10.py --workdir=workdirs/stamp_cifar10

Stages (the functions `run` calls in turn):

1. `pretrain_reference`: the reference network (`config.data` restricted to
   `stamp.reference_classes`, `load_experiments`) trained with the `Recipe` of
   `config.train` into `<workdir>/pretrain` (or loaded from `stamp.pretrained`).
2. `meta_train_stamp`: the set encoder and mask generator (`jaxcompress.stamp.meta`)
   meta-trained into `<workdir>/meta` (or loaded from `stamp.meta_checkpoint`); resumable.
3. `deploy_stamp`, `run_baselines`: on the target (`stamp.target`), STAMP and the
   baselines of `jaxcompress.stamp.deploy`, each fine-tuned for `stamp.finetune_epochs`
   into `<workdir>/target/<method>` (`TargetSide` evaluates and records them).
4. `stamp_summary`: `summary.json` (per method accuracy, % params, % FLOPs,
   target-side and total wall time) and `accuracy_vs_time.png`.

Bad input (target with more classes than the head, empty set, unreachable budget,
reference/target class overlap when forbidden) raises `ConfigError` before any work.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcompress import cost, files, pipeline, schema
from jaxcompress.data import (channel_stats, load_dataset, normalize, split_validation,
                              stratified_subset)
from jaxcompress.config import STAMP_METHODS
from jaxcompress.errors import ConfigError
from jaxcompress.latency import measured_latency
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import criteria as C
from jaxcompress.stamp import channel_stats as CS
from jaxcompress.stamp import deploy as D
from jaxcompress.stamp.encoder import SetEncoder, pretrained_features
from jaxcompress.stamp.generator import GroupLayout, MaskGenerator, SparsityObjective, check_budget
from jaxcompress.stamp.meta import META_CHECKPOINTS, MetaState, Stamp, TaskSampler, meta_train
from jaxcompress.train.checkpoint import Checkpointer
from jaxcompress.train.experiment import Experiment, pick_classes
from jaxcompress.train.loop import load_trained, make_eval_fn
from jaxcompress.train.metrics import write_json
from jaxcompress.train.recipe import Recipe
from jaxcompress.train.state import TrainState
from jaxcompress.train.steps import make_mesh

BUDGET_PENALTIES = ("target", "hinge", "counts")
METHODS = STAMP_METHODS  # the schema's list of `stamp.methods`


def _split(name, data_dir, image_size, channels, classes, field, max_train, val_size, seed):
    ds = load_dataset(name, data_dir=data_dir or None, image_size=image_size or None, channels=channels or None)
    (xtr, ytr), (xte, yte), k = pick_classes(ds, classes, field)
    (xtr, ytr), (xva, yva) = split_validation(xtr, ytr, val_size, seed=seed)
    xtr, ytr = stratified_subset(xtr, ytr, max_train, seed)
    return (xtr, ytr.astype(np.int32)), (xva, yva.astype(np.int32)), (xte, yte.astype(np.int32)), k


def _experiment(split, model, table, mesh):
    train, val, test, k = split
    mean, std = channel_stats(train[0])
    return Experiment(train=train, val=val, test=test, num_classes=k, mean=mean, std=std, model=model, table=table,
                      mesh=mesh)


def _features(exp: Experiment, variables, x, num_convs: int, chunk: int = 500) -> np.ndarray:
    """`pretrained_features` of the images `x` (normalised with `exp`'s statistics)."""
    fn = jax.jit(lambda v, x: pretrained_features(exp.model, v, normalize(x, exp.mean, exp.std), num_convs))
    return np.concatenate([np.asarray(fn(variables, x[i:i + chunk])) for i in range(0, len(x), chunk)])


def _stage_time(path, fn):
    """Runs fn() and records its wall time in `path`; a later resumed run reads the first record."""
    start = time.time()
    out = fn()
    elapsed = time.time() - start
    if files.exists(path):
        elapsed = max(elapsed, json.loads(files.read_text(path))["time_s"])
    write_json(path, {"time_s": elapsed})
    return out, elapsed


def stamp_time_ratios(results: dict) -> dict:
    """The paper's time claim, per method: target-side seconds until its validation
    accuracy (after an epoch) first reaches STAMP's final one, and that time over
    STAMP's target-side time (None: never reached within its fine-tune budget)."""
    goal, stamp_time = results["stamp"]["val_accuracy"], results["stamp"]["target_time_s"]
    reach = {k: D.time_to_accuracy(r["val_curve"], goal) for k, r in results.items() if k != "stamp"}
    return dict(stamp_val_accuracy=goal, time_to_stamp_val_accuracy_s=reach,
                time_ratio_to_stamp={k: (t / stamp_time if t is not None else None) for k, t in reach.items()})


def load_experiments(config) -> tuple[Experiment, Experiment]:
    """The reference (`config.data` restricted to `stamp.reference_classes`) and target
    (`stamp.target`) experiments, sharing one model with `stamp.head_classes` outputs
    (0: one per reference class); a target the head or the model cannot take fails here."""
    s, d, t = config.stamp, config.data, config.stamp.target
    get_spec(config.model.name)
    mesh = make_mesh()
    ref_split = _split(d.name, d.data_dir, d.image_size, d.channels, tuple(s.reference_classes),
                       "stamp.reference_classes", s.reference_train_size, s.val_size, config.seed)
    same = not t.name or t.name == d.name  # the target's images are prepared like the reference's
    tgt_split = _split(t.name or d.name, t.data_dir or d.data_dir, t.image_size or (d.image_size if same else 0),
                       t.channels or (d.channels if same else 0), tuple(t.classes), "stamp.target.classes", s.target_train_size,
                       s.val_size, config.seed)
    head = s.head_classes or ref_split[3]
    if tgt_split[3] > head:
        raise ConfigError(f"the target has {tgt_split[3]} classes but the network head supports {head}; "
                          f"select at most {head} stamp.target.classes or raise stamp.head_classes")
    if ref_split[0][0].shape[1:] != tgt_split[0][0].shape[1:]:
        raise ConfigError(f"reference images {ref_split[0][0].shape[1:]} and target images "
                          f"{tgt_split[0][0].shape[1:]} differ; set stamp.target.image_size / channels")
    model = create_model(config.model.name, head, config.model.width_multiplier)
    table = describe(model, tuple(ref_split[0][0].shape[1:]))
    return _experiment(ref_split, model, table, mesh), _experiment(tgt_split, model, table, mesh)


def pretrain_reference(exp: Experiment, recipe: Recipe, directory: str, *, train: bool
                       ) -> tuple[dict, float, float]:
    """Stage 1: the reference network, trained with `recipe` into `directory` (resumable;
    `train=False`: already there, `stamp.pretrained`) and its best checkpoint loaded.
    Returns (its `D.net_variables`, the stage's wall time, its test accuracy)."""
    def pretrain():
        if train:
            pipeline.finetune(exp, None, recipe, directory)  # None: from a fresh initialisation

    _, seconds = _stage_time(os.path.join(directory, "stage_time.json"), pretrain)
    state = load_trained(exp, directory, recipe)
    accuracy = make_eval_fn(exp, recipe.eval_batch_size)(state, exp.test)["accuracy"]
    logging.info("stamp: reference network %s, test accuracy %.4f on reference classes", type(exp.model).__name__,
                 accuracy)
    return D.net_variables(state.variables()), seconds, accuracy


def sparsity_objective(s, num_examples: int, counts: tuple[int, ...] | None = None,
                       penalty: str | None = None) -> SparsityObjective:
    """The `stamp` section's sparsity regulariser over `num_examples` training examples:
    STAMP's outer one (the reference set, per-layer `counts` under `selection=per_layer`),
    BBDropout's (the target set, `penalty` overriding `budget_penalty`)."""
    return SparsityObjective(alpha=s.prior_alpha, kl_weight=s.kl_weight, num_examples=num_examples,
                             budget=s.budget, budget_metric=s.budget_metric, budget_weight=s.budget_weight,
                             penalty=penalty or s.budget_penalty, counts=counts)


# the fields that shape STAMP's meta-parameters (and what they were trained on): a meta checkpoint
# written with other values cannot be resumed or deployed with these
META_SETTINGS = ("data.name", "data.image_size", "data.channels", "model.name", "model.width_multiplier",
                 "stamp.reference_classes", "stamp.head_classes", "stamp.scope", "stamp.instance",
                 "stamp.feature_convs", "stamp.pooling", "stamp.embed_dim", "stamp.num_heads", "stamp.meta_weights",
                 "stamp.channel_stats", "stamp.selection", "stamp.meta_val_size")


def meta_settings(config) -> dict:
    """{field: value} of `META_SETTINGS`, as JSON values (recorded in every meta checkpoint)."""
    return {path: list(v) if isinstance(v, tuple) else v
            for path, v in ((p, schema.get(config, p)) for p in META_SETTINGS)}


def check_meta_checkpoint(directory: str, settings: dict) -> None:
    """A one-line ConfigError, before any work, when the meta-training in `directory`
    (if any) was written with other `meta_settings` than `settings`."""
    ckpt_dir = os.path.join(directory, META_CHECKPOINTS)
    if not any(n.isdigit() for n in files.list_names(ckpt_dir)):
        return
    with Checkpointer(ckpt_dir) as ckpt:
        saved = ckpt.read_meta().get("settings", {})
    for path, value in settings.items():
        if path in saved and saved[path] != value:
            raise ConfigError(f"{path}={schema.show(value)}: must be {schema.show(saved[path])}, as in the "
                              f"meta-training in {directory}; set --config.{path}={schema.show(saved[path])}, or "
                              f"meta-train afresh into a new --workdir (or stamp.meta_checkpoint)")


def selection_counts(s, layout: GroupLayout, multiple: int | None) -> tuple[int, ...] | None:
    """Channels each prunable group keeps with `stamp.selection=per_layer` (the uniform
    widths at the budget, `D.uniform_counts_for`: the baselines' widths); None: global."""
    if s.selection != "per_layer":
        return None
    counts = D.uniform_counts_for(layout, s.budget, s.budget_metric, multiple)
    return tuple(int(counts[g]) for g in layout.groups)


def meta_train_stamp(s, layout: GroupLayout, exp: Experiment, variables: dict, directory: str, seed: int,
                     settings: dict, keep_counts: tuple[int, ...] | None = None
                     ) -> tuple[Stamp, MetaState, float, dict]:
    """Stage 2: the set encoder and mask generator (the `stamp` section `s`) meta-trained
    on tasks of the reference experiment `exp` into `directory` (resumable), with
    straight-through top-`keep_counts` gates when given (`selection_counts`). Returns
    (the Stamp, its meta-trained state, the stage's wall time, `meta_train`'s info)."""
    stamp = Stamp(layout=layout, net_variables=variables, mean=exp.mean, std=exp.std,
                  objective=sparsity_objective(s, len(exp.train[0]), keep_counts),
                  encoder=SetEncoder(dim=s.embed_dim, num_labels=exp.model.num_classes, pooling=s.pooling,
                                     num_heads=s.num_heads),
                  generator=MaskGenerator(group_widths=layout.widths, hidden=s.embed_dim, a_init=s.a_init,
                                          stat_features=len(CS.STATISTICS) if s.channel_stats else 0),
                  inner_steps=s.inner_steps, inner_lr=s.inner_lr, temperature=s.temperature,
                  algorithm=s.algorithm, reptile_lr=s.reptile_lr, meta_weights=s.meta_weights,
                  channel_stats=s.channel_stats, keep_counts=keep_counts)

    def sampler(x, y, sampler_seed):
        feats = _features(exp, variables, x, s.feature_convs) if s.instance == "pretrained" else None
        ways = tuple(s.task_ways) if s.task_ways else (exp.num_classes, exp.num_classes)
        return TaskSampler(x, y, ways=ways, set_size=s.set_size, inner_steps=s.inner_steps, inner_batch=s.inner_batch,
                           query_size=s.query_size, seed=sampler_seed, set_inputs=feats, set_images=s.channel_stats)

    def metatrain():
        train, validation_tasks = exp.train, None
        if s.meta_val_size:  # reference examples the meta-learner never trains on: its validation tasks
            train, held_out = split_validation(*exp.train, s.meta_val_size, seed=seed)
            validation_tasks = sampler(*held_out, seed + 1).sample(0, s.meta_val_tasks)
        return meta_train(stamp, sampler(*train, seed), num_steps=s.meta_steps, tasks_per_step=s.tasks_per_step,
                          learning_rate=s.meta_learning_rate, workdir=directory, seed=seed,
                          checkpoint_every=s.checkpoint_every, settings=settings, validation_tasks=validation_tasks,
                          mesh=exp.mesh)

    (meta_state, info), seconds = _stage_time(os.path.join(directory, "stage_time.json"), metatrain)
    info = {k: v for k, v in info.items() if k != "meta_train_time_s"}
    logging.info("stamp: meta-training %s", info)
    return stamp, meta_state, seconds, info


class TargetSide:
    """What the methods on the target share: its experiment `exp`, the prunable groups,
    the pretrained network's `variables`, the `seed` of samples and criteria, and the
    results so far (`results`, written to `<workdir>/target/results.json` as each
    method ends)."""

    def __init__(self, exp: Experiment, layout: GroupLayout, variables: dict, workdir: str, seed: int,
                 eval_batch_size: int):
        self.exp, self.layout, self.variables, self.workdir, self.seed = exp, layout, variables, workdir, seed
        self.evaluate = make_eval_fn(exp, eval_batch_size)
        self.dense_cost = cost.count(layout.table)
        self.results = {}

    def directory(self, name: str) -> str:
        return D.method_dir(self.workdir, name)

    def record(self, name: str, state: TrainState, widths, start: float, base_time: float, **extra) -> None:
        """Evaluates `state` (a network of `widths`) for method `name`, whose target side
        began at wall-clock `start` and reuses `base_time` seconds of earlier stages."""
        test, val = self.evaluate(state, self.exp.test), self.evaluate(state, self.exp.val)
        end = time.time()
        target_time, c = end - start, cost.count(self.layout.table, tuple(widths))
        r = dict(accuracy=test["accuracy"], val_accuracy=val["accuracy"],
                 params_pct=100 * float(c["params"] / self.dense_cost["params"]),
                 flops_pct=100 * float(c["flops"] / self.dense_cost["flops"]), widths=list(widths),
                 target_time_s=target_time, total_time_s=target_time + base_time,
                 val_curve=D.val_curve(self.directory(name), target_time, end), **extra)
        self.results[name] = r
        write_json(os.path.join(self.workdir, "target", "results.json"), self.results)  # partial results as we go
        logging.info("stamp target %-16s acc %.4f params %.1f%% flops %.1f%% target %.1fs", name, r["accuracy"],
                     r["params_pct"], r["flops_pct"], target_time)

    def deploy(self, name: str, variables, masks, recipe: Recipe, start: float, base_time: float,
               **extra) -> tuple[int, ...]:
        """`D.deploy` (prune by layer `masks`, shrink, fine-tune) then `record`; returns the widths."""
        small_exp, state = D.deploy(self.exp, variables, masks, recipe, self.directory(name))
        widths = tuple(small_exp.model.widths)
        self.record(name, state, widths, start, base_time, **extra)
        return widths


def deploy_stamp(target: TargetSide, stamp: Stamp, meta_params, s, recipe: Recipe, multiple: int | None,
                 base_time: float) -> tuple[int, ...]:
    """Stage 3: STAMP on the target: one forward pass on a sample of its training set
    gives E[pi] and the hard mask (the `stamp` section `s`: mask mode, budget), the
    network is shrunk and fine-tuned with `recipe`. Returns STAMP's widths."""
    exp, variables = target.exp, target.variables

    def masks_for(seed):
        set_x, set_y = D.sample_set(*exp.train, s.set_size, seed)
        set_in = _features(exp, variables, set_x, s.feature_convs) if s.instance == "pretrained" else set_x
        return D.stamp_masks(stamp, meta_params, set_in, set_y, mode=s.mask_mode, threshold=s.threshold,
                             budget=s.budget, metric=s.budget_metric, multiple=multiple,
                             set_images=set_x if s.channel_stats else None)

    start = time.time()
    group_masks, probs = masks_for(target.seed)
    net_vars = {**variables, "params": meta_params.get("net", variables["params"])}
    masks = target.layout.layer_masks(group_masks, variables.get("masks"))
    mask_time = time.time() - start
    # diagnostics, left out of STAMP's target time: the same on other target sets
    diagnostics_start = time.time()
    sets = [masks_for(target.seed + 1 + i) for i in range(s.diagnostic_sets)]
    variation = D.keep_prob_variation([probs] + [p for _, p in sets], [group_masks] + [m for m, _ in sets])
    logging.info("stamp: E[pi] varies %.4f across %d target sets, %.4f across channels; masks agree %.3f",
                 variation["across_sets"], variation["sets"], variation["across_channels"],
                 variation["mask_agreement"])
    start += time.time() - diagnostics_start
    return target.deploy("stamp", net_vars, masks, recipe, start, base_time,
                         mask_time_s=mask_time, keep_prob_mean=[float(p.mean()) for p in probs],
                         keep_prob_undecided=D.undecided_share(probs), keep_prob_variation=variation)


def criterion_baselines(target: TargetSide, methods, counts, recipe: Recipe, scratch_recipe: Recipe,
                        snip_size: int, base_time: float) -> None:
    """Stage 4a, those of `methods` among: dense (the pretrained network fine-tuned),
    magnitude (L1 pruning of that, its fine-tune counted), SNIP from the pretrained
    weights (on `snip_size` target images) and random pruning, each pruned to `counts`
    channels per group and fine-tuned with `recipe`; SNIP at initialisation with
    `scratch_recipe`. `base_time`: the pretraining they reuse."""
    exp, seed = target.exp, target.seed
    x, y = D.sample_set(*exp.train, snip_size, seed)
    snip_batch = (np.asarray(normalize(x, exp.mean, exp.std)), y)

    def pruned(name, variables, criterion, recipe, start, base_time, batch=None):
        masks = D.criterion_masks(target.layout, variables, criterion, counts, batch=batch, seed=seed)
        target.deploy(name, variables, masks, recipe, start, base_time)

    if "dense" in methods or "magnitude" in methods:
        start = time.time()
        dense = pipeline.finetune(exp, target.variables, recipe, target.directory("dense"))
        dense_time = time.time() - start
        if "dense" in methods:
            target.record("dense", dense, exp.model.widths, start, base_time)
    if "magnitude" in methods:  # fine-tune the dense net on the target, L1-prune it, fine-tune the small net
        pruned("magnitude", D.net_variables(dense.variables()), "l1", recipe, time.time() - dense_time, base_time)
    if "snip_pretrained" in methods:
        pruned("snip_pretrained", target.variables, "snip", recipe, time.time(), base_time, batch=snip_batch)
    if "random" in methods:
        pruned("random", target.variables, "random", recipe, time.time(), base_time)
    if "snip_init" in methods:
        init_vars = jax.jit(lambda k: exp.model.init(k, jnp.zeros((1, *exp.input_shape)), train=False))(
            jax.random.key(seed + 1))
        pruned("snip_init", dict(init_vars), "snip", scratch_recipe, time.time(), 0.0, batch=snip_batch)


def run_baselines(target: TargetSide, s, recipe: Recipe, stamp_widths, multiple: int | None,
                  pretrain_time: float) -> None:
    """Stage 4: the baselines of `stamp.methods`, at STAMP's size: the uniform widths of
    its `budget_metric` fraction (`baseline_widths` uniform) or its widths (stamp);
    `random_stamp_widths` always at STAMP's widths;
    fine-tuned with `recipe` (trained from scratch: at `scratch_learning_rate`)."""
    methods = [m for m in s.methods if m != "stamp"]
    fraction = target.results["stamp"][f"{s.budget_metric}_pct"] / 100
    counts = (list(stamp_widths) if s.baseline_widths == "stamp"
              else D.uniform_counts_for(target.layout, fraction, s.budget_metric, multiple))
    scratch_recipe = recipe.replace(learning_rate=s.scratch_learning_rate)
    criterion_baselines(target, methods, counts, recipe, scratch_recipe, s.snip_batch, pretrain_time)
    if "random_stamp_widths" in methods:  # random channels inside STAMP's widths: its channel choice, isolated
        start = time.time()
        masks = D.criterion_masks(target.layout, target.variables, "random", list(stamp_widths), seed=target.seed)
        target.deploy("random_stamp_widths", target.variables, masks, recipe, start, pretrain_time)
    if "bbdropout" in methods:
        start, layout = time.time(), target.layout
        probs, variables = D.train_bbdropout(target.exp, layout, target.variables,
                                             sparsity_objective(s, len(target.exp.train[0]), penalty=(
                                                 "target" if s.budget_penalty == "counts" else None)),
                                             recipe.replace(num_epochs=s.bbdropout_epochs), temperature=s.temperature)
        masks = D.hard_group_masks(layout, probs, "budget", s.threshold, fraction, s.budget_metric, multiple)
        target.deploy("bbdropout", variables, layout.layer_masks(masks, target.variables.get("masks")), recipe,
                      start, pretrain_time)
    if "scratch" in methods:
        start, small = time.time(), target.exp.model.clone(widths=stamp_widths)
        state = pipeline.finetune(target.exp, None, scratch_recipe, target.directory("scratch"), model=small)
        target.record("scratch", state, stamp_widths, start, 0.0)


def stamp_summary(config, ref_exp: Experiment, target: TargetSide, *, ref_accuracy: float, pretrain_time: float,
                  meta_time: float, stamp_widths, wall_start: float, meta_info: dict | None = None) -> dict:
    """Stage 5: summary.json's content (per method accuracy, sizes, times; the time
    ratios to STAMP's accuracy) and `accuracy_vs_time.png`."""
    from jaxcompress.stamp.report import plot_accuracy_vs_time
    s, t, results, model = config.stamp, config.stamp.target, target.results, ref_exp.model
    target_name = t.name or config.data.name
    plot_accuracy_vs_time(os.path.join(target.workdir, "accuracy_vs_time.png"), results,
                          f"{config.model.name} x{config.model.width_multiplier:g}: "
                          f"{config.data.name}{list(s.reference_classes)} -> "
                          f"{target_name}{list(t.classes) if t.classes else ''}")
    summary = dict(job=config.job, model=config.model.name, width_multiplier=config.model.width_multiplier,
                   reference=dict(dataset=config.data.name, classes=list(s.reference_classes),
                                  train_examples=len(ref_exp.train[0]), test_accuracy=ref_accuracy),
                   target=dict(dataset=target_name, classes=list(t.classes),
                               train_examples=len(target.exp.train[0]), num_classes=target.exp.num_classes),
                   budget=s.budget, budget_metric=s.budget_metric, algorithm=s.algorithm, pooling=s.pooling,
                   meta_steps=s.meta_steps, meta=meta_info or {}, finetune_epochs=s.finetune_epochs,
                   pretrain_time_s=pretrain_time, meta_train_time_s=meta_time, methods=results,
                   params_dense=float(target.dense_cost["params"]), flops_dense=float(target.dense_cost["flops"]),
                   groups=[ref_exp.table.group_names[g] for g in target.layout.groups],
                   device_kind=jax.devices()[0].device_kind,
                   latency_s=measured_latency({"dense": model, "stamp": model.clone(widths=stamp_widths)},
                                              ref_exp.input_shape, config.hardware.latency_batch),
                   latency_batch=config.hardware.latency_batch,
                   wall_time_s=time.time() - wall_start)
    summary.update({f"accuracy_{k}": v["accuracy"] for k, v in results.items()})
    summary.update(stamp_time_ratios(results))
    return summary


def run(config, workdir: str) -> dict:
    """The `stamp` job (module docstring): returns (and writes) summary.json."""
    wall_start = time.time()
    schema.validate(config)  # called directly (not through jaxcompress.jobs.run): still checked first
    s, multiple = config.stamp, config.hardware.multiple
    meta_dir = s.meta_checkpoint or os.path.join(workdir, "meta")
    check_meta_checkpoint(meta_dir, meta_settings(config))
    ref_exp, tgt_exp = load_experiments(config)
    layout = GroupLayout(ref_exp.table, tuple(C.prunable_groups(ref_exp.table, s.scope)))
    check_budget(layout, s.budget, s.budget_metric, multiple)
    keep_counts = selection_counts(s, layout, multiple)
    recipe = Recipe.from_config(config)
    variables, pretrain_time, ref_accuracy = pretrain_reference(
        ref_exp, recipe, s.pretrained or os.path.join(workdir, "pretrain"), train=not s.pretrained)
    stamp, meta_state, meta_time, meta_info = meta_train_stamp(s, layout, ref_exp, variables, meta_dir, config.seed,
                                                    meta_settings(config), keep_counts)
    target = TargetSide(tgt_exp, layout, variables, workdir, config.seed, recipe.eval_batch_size)
    ft = recipe.replace(num_epochs=s.finetune_epochs, learning_rate=s.finetune_learning_rate)
    stamp_widths = deploy_stamp(target, stamp, meta_state.params, s, ft, multiple, pretrain_time + meta_time)
    run_baselines(target, s, ft, stamp_widths, multiple, pretrain_time)
    summary = stamp_summary(config, ref_exp, target, ref_accuracy=ref_accuracy, pretrain_time=pretrain_time,
                            meta_time=meta_time, stamp_widths=stamp_widths, wall_start=wall_start,
                            meta_info=meta_info)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
