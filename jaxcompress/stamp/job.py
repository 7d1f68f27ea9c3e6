"""The `stamp` job: reference pretraining -> meta-training -> target deployment + baselines.

    python -m launch.main --config=configs/bench/stamp_cifar10.py --workdir=workdirs/stamp_cifar10

1. Reference network (`config.data` restricted to `stamp.reference_classes`) trained
   with `fit` into `<workdir>/pretrain` (or loaded from `stamp.pretrained`).
2. Meta-training of the set encoder and mask generator (`jaxcompress.stamp.meta`)
   into `<workdir>/meta` (or loaded from `stamp.meta_checkpoint`); resumable.
3. On the target (`stamp.target`): STAMP and the baselines of
   `jaxcompress.stamp.deploy`, each fine-tuned for `stamp.finetune_epochs` into
   `<workdir>/target/<method>`.
4. `summary.json`: per method accuracy, % params, % FLOPs, target-side and total
   wall time; `accuracy_vs_time.png`.

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

from jaxcompress import cost
from jaxcompress.data import (channel_stats, load_dataset, normalize, select_classes, split_validation,
                              stratified_subset)
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import criteria as C
from jaxcompress.stamp import deploy as D
from jaxcompress.stamp.encoder import SetEncoder, pretrained_features
from jaxcompress.stamp.generator import GroupLayout, MaskGenerator, SparsityObjective, check_budget
from jaxcompress.stamp.meta import ALGORITHMS, Stamp, TaskSampler, meta_train
from jaxcompress.train.experiment import Experiment
from jaxcompress.train.loop import fit, load_trained, make_eval_fn
from jaxcompress.latency import measured_latency
from jaxcompress.train.metrics import write_json
from jaxcompress.train.optim import make_optimizer
from jaxcompress.train.state import create_train_state
from jaxcompress.train.steps import make_mesh

BUDGET_PENALTIES = ("target", "hinge")
METHODS = ("stamp", "dense", "magnitude", "snip_pretrained", "snip_init", "random", "bbdropout", "scratch")


def check_stamp_config(config) -> None:
    """Every check that needs no data: fails with one line before any work."""
    s = config.stamp
    if s.set_size <= 0:
        raise ConfigError(f"stamp.set_size must be positive, got {s.set_size}; the set encoder needs examples")
    if s.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown stamp.algorithm '{s.algorithm}'; choose one of {', '.join(ALGORITHMS)}")
    if s.pooling not in ("pma", "mean"):
        raise ConfigError(f"unknown stamp.pooling '{s.pooling}'; choose pma or mean")
    if s.instance not in ("pretrained", "stem"):
        raise ConfigError(f"unknown stamp.instance '{s.instance}'; choose pretrained or stem")
    if s.budget_penalty not in BUDGET_PENALTIES:
        raise ConfigError(f"unknown stamp.budget_penalty '{s.budget_penalty}'; "
                          f"choose {' or '.join(BUDGET_PENALTIES)}")
    if s.mask_mode not in ("threshold", "budget"):
        raise ConfigError(f"unknown stamp.mask_mode '{s.mask_mode}'; choose threshold or budget")
    unknown = sorted(set(s.methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown stamp.methods {unknown}; choose from {', '.join(METHODS)}")
    if not s.reference_classes:
        raise ConfigError("stamp.reference_classes is empty; name the reference classes, e.g. (0, 1, 2, 3, 4)")
    target_name = s.target.name or config.data.name
    if target_name == config.data.name and not s.allow_overlap:
        overlap = sorted(set(s.reference_classes) & set(s.target.classes or ()))
        if overlap or not s.target.classes:
            raise ConfigError(f"reference and target share classes {overlap or 'all'} of {target_name}; "
                              f"choose disjoint stamp.target.classes or set stamp.allow_overlap=True")
    head = s.head_classes or len(s.reference_classes)
    if s.target.classes and len(s.target.classes) > head:
        raise ConfigError(f"the target has {len(s.target.classes)} classes but the network head supports {head}; "
                          f"use at most {head} target classes or raise stamp.head_classes")


def _split(name, data_dir, image_size, channels, classes, max_train, val_size, seed):
    ds = load_dataset(name, data_dir=data_dir or None, image_size=image_size or None, channels=channels or None)
    (xtr, ytr), (xte, yte), k = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), ds.num_classes
    if classes:
        xtr, ytr = select_classes(xtr, ytr, classes)
        xte, yte = select_classes(xte, yte, classes)
        k = len(classes)
    (xtr, ytr), (xva, yva) = split_validation(xtr, ytr, val_size, seed=seed)
    xtr, ytr = stratified_subset(xtr, ytr, max_train, seed)
    return (xtr, ytr.astype(np.int32)), (xva, yva.astype(np.int32)), (xte, yte.astype(np.int32)), k


def _experiment(split, model, table, mesh):
    train, val, test, k = split
    mean, std = channel_stats(train[0])
    return Experiment(train=train, val=val, test=test, num_classes=k, mean=mean, std=std, model=model, table=table,
                      mesh=mesh)


def _features(model, variables, x, mean, std, num_convs, chunk=500):
    fn = jax.jit(lambda v, x: pretrained_features(model, v, normalize(x, mean, std), num_convs))
    return np.concatenate([np.asarray(fn(variables, x[i:i + chunk])) for i in range(0, len(x), chunk)])


def _stage_time(path, fn):
    """Runs fn() and records its wall time in `path`; a later resumed run reads the first record."""
    start = time.time()
    out = fn()
    elapsed = time.time() - start
    if os.path.exists(path):
        with open(path) as f:
            elapsed = max(elapsed, json.load(f)["time_s"])
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


def run(config, workdir: str) -> dict:
    wall_start = time.time()
    check_stamp_config(config)
    s = config.stamp
    get_spec(config.model.name)
    mesh = make_mesh()
    t = s.target
    ref_split = _split(config.data.name, config.data.data_dir, config.data.image_size, config.data.channels,
                       tuple(s.reference_classes), s.reference_train_size, s.val_size, config.seed)
    same = not t.name or t.name == config.data.name  # the target's images are prepared like the reference's
    tgt_split = _split(t.name or config.data.name, t.data_dir or config.data.data_dir,
                       t.image_size or (config.data.image_size if same else 0),
                       t.channels or (config.data.channels if same else 0),
                       tuple(t.classes), s.target_train_size, s.val_size, config.seed)
    head = s.head_classes or ref_split[3]
    if tgt_split[3] > head:
        raise ConfigError(f"the target has {tgt_split[3]} classes but the network head supports {head}; "
                          f"select at most {head} stamp.target.classes or raise stamp.head_classes")
    if ref_split[0][0].shape[1:] != tgt_split[0][0].shape[1:]:
        raise ConfigError(f"reference images {ref_split[0][0].shape[1:]} and target images "
                          f"{tgt_split[0][0].shape[1:]} differ; set stamp.target.image_size / channels")
    model = create_model(config.model.name, head, config.model.width_multiplier)
    input_shape = tuple(ref_split[0][0].shape[1:])
    table = describe(model, input_shape)
    layout = GroupLayout(table, tuple(C.prunable_groups(table, s.scope)))
    check_budget(layout, s.budget, s.budget_metric, config.prune.multiple)
    ref_exp, tgt_exp = _experiment(ref_split, model, table, mesh), _experiment(tgt_split, model, table, mesh)

    # 1. reference network
    pre_dir = s.pretrained or os.path.join(workdir, "pretrain")

    def pretrain():
        if s.pretrained:
            return None
        tx = make_optimizer(config.train, max(1, len(ref_exp.train[0]) // config.train.batch_size))
        state = create_train_state(model, tx, input_shape, config.seed)
        return fit(config, ref_exp, state, pre_dir)

    _, pretrain_time = _stage_time(os.path.join(pre_dir, "stage_time.json"), pretrain)
    pretrained = load_trained(config, ref_exp, pre_dir)
    variables = {k: v for k, v in pretrained.variables().items() if k in ("params", "batch_stats", "masks")}
    ref_acc = make_eval_fn(ref_exp, config.train.eval_batch_size)(pretrained, ref_exp.test)["accuracy"]
    logging.info("stamp: reference network %s, test accuracy %.4f on reference classes", config.model.name, ref_acc)

    # 2. meta-training
    def sparsity(num_examples):  # STAMP's outer regulariser; BBDropout's on the target
        return SparsityObjective(alpha=s.prior_alpha, kl_weight=s.kl_weight, num_examples=num_examples,
                                 budget=s.budget, budget_metric=s.budget_metric, budget_weight=s.budget_weight,
                                 penalty=s.budget_penalty)

    objective = sparsity(len(ref_exp.train[0]))
    stamp = Stamp(layout=layout, net_variables=variables, mean=ref_exp.mean, std=ref_exp.std, objective=objective,
                  encoder=SetEncoder(dim=s.embed_dim, num_labels=head, pooling=s.pooling, num_heads=s.num_heads),
                  generator=MaskGenerator(group_widths=layout.widths, hidden=s.embed_dim, a_init=s.a_init),
                  inner_steps=s.inner_steps, inner_lr=s.inner_lr, temperature=s.temperature,
                  algorithm=s.algorithm, reptile_lr=s.reptile_lr, meta_weights=s.meta_weights)
    meta_dir = s.meta_checkpoint or os.path.join(workdir, "meta")

    def metatrain():
        feats = (_features(model, variables, ref_exp.train[0], ref_exp.mean, ref_exp.std, s.feature_convs)
                 if s.instance == "pretrained" else None)
        ways = tuple(s.task_ways) if s.task_ways else (ref_exp.num_classes, ref_exp.num_classes)
        sampler = TaskSampler(*ref_exp.train, ways=ways, set_size=s.set_size, inner_steps=s.inner_steps,
                              inner_batch=s.inner_batch, query_size=s.query_size, seed=config.seed,
                              set_inputs=feats)
        return meta_train(stamp, sampler, num_steps=s.meta_steps, tasks_per_step=s.tasks_per_step,
                          learning_rate=s.meta_learning_rate, workdir=meta_dir, seed=config.seed,
                          checkpoint_every=s.checkpoint_every)[0]

    meta_state, meta_time = _stage_time(os.path.join(meta_dir, "stage_time.json"), metatrain)

    # 3. target side
    results = {}
    tx_, ty_ = tgt_exp.train
    ft = dict(epochs=s.finetune_epochs, learning_rate=s.finetune_learning_rate, seed=config.seed)
    scratch_ft = dict(epochs=s.finetune_epochs, learning_rate=s.scratch_learning_rate, seed=config.seed)
    dense_cost = cost.count(table)

    def record(name, test, val, small_model, target_time, base_time, extra=None):
        widths = tuple(small_model.widths)
        c = cost.count(table, widths)
        results[name] = dict(accuracy=test["accuracy"], val_accuracy=val["accuracy"],
                             params_pct=100 * float(c["params"] / dense_cost["params"]),
                             flops_pct=100 * float(c["flops"] / dense_cost["flops"]), widths=list(widths),
                             target_time_s=target_time, total_time_s=target_time + base_time,
                             val_curve=D.val_curve(D.method_dir(workdir, name), target_time, time.time()),
                             **(extra or {}))
        write_json(os.path.join(workdir, "target", "results.json"), results)  # partial results as we go
        logging.info("stamp target %-16s acc %.4f params %.1f%% flops %.1f%% target %.1fs", name,
                     test["accuracy"], results[name]["params_pct"], results[name]["flops_pct"], target_time)

    # STAMP: encode a target sample -> hard mask -> shrink -> fine-tune
    start = time.time()
    set_x, set_y = D.sample_set(tx_, ty_, s.set_size, config.seed)
    set_in = (_features(model, variables, set_x, tgt_exp.mean, tgt_exp.std, s.feature_convs)
              if s.instance == "pretrained" else set_x)
    group_masks, probs = D.stamp_masks(stamp, meta_state.params, set_in, set_y, mode=s.mask_mode,
                                       threshold=s.threshold, budget=s.budget, metric=s.budget_metric,
                                       multiple=config.prune.multiple)
    net_vars = {**variables, "params": meta_state.params.get("net", variables["params"])}
    small_model, small_vars = D.prune_to(layout, net_vars, layout.layer_masks(group_masks, variables.get("masks")))
    mask_time = time.time() - start
    test, val, _ = D.finetune(config, tgt_exp, small_model, small_vars, D.method_dir(workdir, "stamp"), **ft)
    record("stamp", test, val, small_model, time.time() - start, pretrain_time + meta_time,
           dict(mask_time_s=mask_time, keep_prob_mean=[float(p.mean()) for p in probs]))
    stamp_widths = tuple(small_model.widths)
    fraction = results["stamp"][f"{s.budget_metric}_pct"] / 100
    counts = (list(stamp_widths) if s.baseline_widths == "stamp"
              else D.uniform_counts_for(layout, fraction, s.budget_metric, config.prune.multiple))
    snip_batch = D.sample_set(*tgt_exp.train, s.snip_batch, config.seed)
    snip_batch = (np.asarray(normalize(snip_batch[0], tgt_exp.mean, tgt_exp.std)), snip_batch[1])
    methods = [m for m in s.methods if m != "stamp"]

    def pruned(name, source_vars, criterion, base_time, lr_cfg, extra_time=0.0, batch=None):
        start = time.time()
        masks = D.criterion_masks(layout, source_vars, criterion, counts, batch=batch, seed=config.seed)
        small, small_v = D.prune_to(layout, source_vars, masks)
        test, val, _ = D.finetune(config, tgt_exp, small, small_v, D.method_dir(workdir, name), **lr_cfg)
        record(name, test, val, small, time.time() - start + extra_time, base_time)

    dense_vars, dense_time = None, 0.0
    if "dense" in methods or "magnitude" in methods:
        start = time.time()
        test, val, dstate = D.finetune(config, tgt_exp, model, variables, D.method_dir(workdir, "dense"), **ft)
        dense_time = time.time() - start
        dense_vars = {k: v for k, v in dstate.variables().items() if k in ("params", "batch_stats", "masks")}
        if "dense" in methods:
            record("dense", test, val, model, dense_time, pretrain_time)
    if "magnitude" in methods:  # fine-tune the dense net on the target, L1-prune it, fine-tune the small net
        pruned("magnitude", dense_vars, "l1", pretrain_time, ft, extra_time=dense_time)
    if "snip_pretrained" in methods:
        pruned("snip_pretrained", variables, "snip", pretrain_time, ft, batch=snip_batch)
    if "random" in methods:
        pruned("random", variables, "random", pretrain_time, ft)
    if "snip_init" in methods:
        init_vars = jax.jit(lambda k: model.init(k, jnp.zeros((1, *input_shape)), train=False))(
            jax.random.key(config.seed + 1))
        pruned("snip_init", dict(init_vars), "snip", 0.0, scratch_ft, batch=snip_batch)
    if "bbdropout" in methods:
        start = time.time()
        bprobs, bvars = D.train_bbdropout(config, tgt_exp, layout, variables, sparsity(len(tx_)),
                                          epochs=s.bbdropout_epochs, learning_rate=s.finetune_learning_rate,
                                          temperature=s.temperature, seed=config.seed)
        bmasks = D.hard_group_masks(layout, bprobs, "budget", s.threshold, fraction, s.budget_metric,
                                    config.prune.multiple)
        small, small_v = D.prune_to(layout, bvars, layout.layer_masks(bmasks, variables.get("masks")))
        test, val, _ = D.finetune(config, tgt_exp, small, small_v, D.method_dir(workdir, "bbdropout"), **ft)
        record("bbdropout", test, val, small, time.time() - start, pretrain_time)
    if "scratch" in methods:
        start = time.time()
        small = model.clone(widths=stamp_widths)
        test, val, _ = D.finetune(config, tgt_exp, small, None, D.method_dir(workdir, "scratch"), **scratch_ft)
        record("scratch", test, val, small, time.time() - start, 0.0)

    from jaxcompress.stamp.report import plot_accuracy_vs_time
    plot_accuracy_vs_time(os.path.join(workdir, "accuracy_vs_time.png"), results,
                          f"{config.model.name} x{config.model.width_multiplier:g}: "
                          f"{config.data.name}{list(s.reference_classes)} -> "
                          f"{t.name or config.data.name}{list(t.classes) if t.classes else ''}")
    summary = dict(job=config.job, model=config.model.name, width_multiplier=config.model.width_multiplier,
                   reference=dict(dataset=config.data.name, classes=list(s.reference_classes),
                                  train_examples=len(ref_exp.train[0]), test_accuracy=ref_acc),
                   target=dict(dataset=t.name or config.data.name, classes=list(t.classes),
                               train_examples=len(tx_), num_classes=tgt_exp.num_classes),
                   budget=s.budget, budget_metric=s.budget_metric, algorithm=s.algorithm, pooling=s.pooling,
                   meta_steps=s.meta_steps, finetune_epochs=s.finetune_epochs,
                   pretrain_time_s=pretrain_time, meta_train_time_s=meta_time, methods=results,
                   params_dense=float(dense_cost["params"]), flops_dense=float(dense_cost["flops"]),
                   groups=[table.group_names[g] for g in layout.groups], device_kind=jax.devices()[0].device_kind,
                   latency_s=measured_latency({"dense": model, "stamp": model.clone(widths=stamp_widths)},
                                              input_shape, config.prune.latency_batch),
                   latency_batch=config.prune.latency_batch,
                   wall_time_s=time.time() - wall_start)
    summary.update({f"accuracy_{k}": v["accuracy"] for k, v in results.items()})
    summary.update(stamp_time_ratios(results))
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
