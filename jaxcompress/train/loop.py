"""The `train` and `evaluate` jobs (Flax-examples style: small named functions).

`train_and_evaluate` resumes from the latest checkpoint in `<workdir>/checkpoints`
(parameters, masks, quant, optimizer, step, RNG and the data iterator's position),
so a killed run restarted with the same workdir ends with the same final metrics.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import logging
from tqdm.auto import tqdm

from jaxcompress import cost
from jaxcompress.timing import forward_latencies
from jaxcompress.data import BatchIterator, iterate_eval, shard_batch
from jaxcompress.train import steps as S
from jaxcompress.train.checkpoint import Checkpointer, CheckpointError
from jaxcompress.train.experiment import Experiment, Teacher, setup_experiment
from jaxcompress.train.metrics import MetricWriter, write_json
from jaxcompress.train.optim import make_optimizer
from jaxcompress.train.recipe import Recipe
from jaxcompress.train.state import TrainState, create_train_state


def evaluate_split(eval_step, state: TrainState, x, y, batch_size: int, mesh) -> dict[str, float]:
    """Accuracy and mean loss over every example of (x, y)."""
    totals = None
    for batch in iterate_eval(x, y, batch_size):
        sums = eval_step(state, shard_batch(batch, S.batch_sharded(mesh)))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / n, "loss": float(totals["loss"]) / n}


def make_eval_fn(exp: Experiment, batch_size: int):
    step = jax.jit(S.make_eval_step(exp.mean, exp.std),
                   in_shardings=(S.replicated(exp.mesh), S.batch_sharded(exp.mesh)),
                   out_shardings=S.replicated(exp.mesh))
    return lambda state, split: evaluate_split(step, state, *split, batch_size, exp.mesh)


def cost_report(exp: Experiment, state: TrainState) -> dict:
    return cost.summarize(exp.table, state.masks or None, state.quant or None)


def _summary(config, exp, state, wall_start, **extra) -> dict:
    """The train / evaluate summary: cost report, devices, measured forward latency of
    the network (`latency_s`, at `prune.latency_batch` as every job reports; 0: off)."""
    report = cost_report(exp, state)
    batch = config.hardware.latency_batch
    latency = forward_latencies({"trained": (exp.model, state.variables())}, exp.input_shape, batch)
    return dict(job=config.job, model=config.model.name, dataset=config.data.name,
                num_classes=exp.num_classes, steps=int(jax.device_get(state.step)),
                params=report["totals"]["params"], nonzero_params=report["totals"]["nonzero_params"],
                macs=report["totals"]["macs"], flops=report["totals"]["flops"], bytes=report["totals"]["bytes"],
                widths=report["widths"], devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
                latency_s=latency, latency_batch=batch, wall_time_s=time.time() - wall_start, **extra)


def fit(state: TrainState, exp: Experiment, recipe: Recipe, workdir: str, *, teacher: Teacher | None = None
        ) -> tuple[TrainState, dict]:
    """Trains `state` (from its step 0, with a new optimiser built from `recipe`) on
    `exp.train` for `recipe.num_epochs` epochs, data-parallel over `exp.mesh`.

    Checkpoints go to `<workdir>/checkpoints` (latest, resumed from if present) and
    `<workdir>/best` (best validation accuracy); metrics to `<workdir>/metrics.jsonl`.
    With a `teacher` and `recipe.distill_weight` > 0 the loss distils from it. `state`'s
    `apply_fn` is kept (QAT trains a quantized apply). Returns the final state and
    `{"best_val_accuracy", "train_time_s"}`.
    """
    it = BatchIterator(*exp.train, batch_size=recipe.batch_size, seed=recipe.seed)
    spe = it.steps_per_epoch
    tx = make_optimizer(recipe, spe)
    state = state.replace(step=jnp.zeros((), jnp.int32), tx=tx, opt_state=tx.init(state.params))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), recipe.max_to_keep)
    best_ckpt = Checkpointer(os.path.join(workdir, "best"), 1)
    meta = {"iterator": it.get_state(), "best_val_accuracy": -1.0}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        it.set_state(meta["iterator"])
        logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    # The jitted step donates the state: copy it so arrays the caller still holds (or
    # that alias other states' leaves, e.g. after surgery) are never invalidated.
    state = jax.device_put(state, S.replicated(exp.mesh), may_alias=False)
    train_step, teacher_args = _train_step(exp, recipe, teacher)
    evaluate = make_eval_fn(exp, recipe.eval_batch_size)
    writer = MetricWriter(workdir)
    step = int(jax.device_get(state.step))
    train_time = 0.0
    while step < recipe.num_epochs * spe:
        epoch = step // spe
        epoch_start, sums, n = time.time(), None, 0
        with tqdm(total=spe, initial=step % spe, desc=f"epoch {epoch + 1}/{recipe.num_epochs}",
                  disable=None, leave=False) as bar:
            while step < (epoch + 1) * spe:
                state, m = train_step(state, shard_batch(next(it), S.batch_sharded(exp.mesh)), *teacher_args)
                sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
                step, n = step + 1, n + 1
                bar.update()
                if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step % spe:
                    ckpt.save(state, {**meta, "iterator": it.get_state()})
        train_metrics = {k: float(v) / n for k, v in jax.device_get(sums).items()}
        train_time += time.time() - epoch_start
        val = evaluate(state, exp.val)
        meta = {**meta, "iterator": it.get_state()}
        if val["accuracy"] > meta["best_val_accuracy"]:
            meta["best_val_accuracy"] = val["accuracy"]
            best_ckpt.save(state, meta)
        ckpt.save(state, meta)
        writer.write(step, epoch=epoch + 1, train=train_metrics, val=val, epoch_time_s=time.time() - epoch_start)
        logging.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.1fs)", epoch + 1,
                     recipe.num_epochs, train_metrics["loss"], train_metrics["accuracy"], val["loss"],
                     val["accuracy"], time.time() - epoch_start)
    ckpt.close()
    best_ckpt.close()
    return state, {"best_val_accuracy": meta["best_val_accuracy"], "train_time_s": train_time}


def _train_step(exp: Experiment, recipe: Recipe, teacher: Teacher | None):
    """The jitted data-parallel step and its extra replicated arguments (the teacher's
    variables when distilling)."""
    if teacher is None or recipe.distill_weight <= 0:
        teacher, teacher_args = None, ()
    else:
        logging.info("distilling from the reference network (weight %g, temperature %g)", recipe.distill_weight,
                     recipe.distill_temperature)
        teacher_args = (jax.device_put(teacher.variables, S.replicated(exp.mesh)),)
    step_fn = S.make_train_step(exp.mean, exp.std, recipe.augment, recipe.label_smoothing,
                                teacher.apply_fn if teacher else None, recipe.distill_weight,
                                recipe.distill_temperature)
    return S.jit_data_parallel(step_fn, exp.mesh, replicated_args=len(teacher_args)), teacher_args


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config.model` on `config.data`; returns (and writes) summary.json."""
    wall_start = time.time()
    exp = setup_experiment(config)
    recipe = Recipe.from_config(config)
    state = create_train_state(exp.model, make_optimizer(recipe, 1), exp.input_shape, config.seed)
    state, info = fit(state, exp, recipe, workdir)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    test, val = evaluate(state, exp.test), evaluate(state, exp.val)
    summary = _summary(config, exp, state, wall_start, test_accuracy=test["accuracy"], test_loss=test["loss"],
                       val_accuracy=val["accuracy"], epochs=config.train.num_epochs, **info)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def load_trained(exp: Experiment, directory: str, recipe: Recipe, variables=None) -> TrainState:
    """Restores the latest TrainState in `directory` (a `checkpoints/` or `best/` folder,
    or a run's workdir, in which case its `best/` checkpoint is used), saved by `fit`
    with `recipe`'s optimiser. `variables`: a template of the saved collections where
    they differ from `exp.model.init`'s (e.g. element masks)."""
    if os.path.isdir(os.path.join(directory, "best")):
        directory = os.path.join(directory, "best")
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; train first (job 'train' with "
                              f"that --workdir) or point the config at an existing checkpoint directory")
    template = create_train_state(exp.model, make_optimizer(recipe, 1), exp.input_shape, recipe.seed,
                                  variables=variables)
    ckpt = Checkpointer(directory)
    try:
        state, _ = ckpt.restore(template)
    finally:
        ckpt.close()
    return state


def restore_for_eval(config, exp: Experiment, workdir: str) -> TrainState:
    """Restores the checkpoint named by `config.eval.checkpoint` ('best', 'last' or a path)."""
    which = config.eval.checkpoint
    directory = {"best": os.path.join(workdir, "best"),
                 "last": os.path.join(workdir, "checkpoints")}.get(which, which)
    return load_trained(exp, directory, Recipe.from_config(config))


def evaluate(config, workdir: str) -> dict:
    """Evaluates a trained checkpoint on the validation and test splits."""
    wall_start = time.time()
    exp = setup_experiment(config)
    state = jax.device_put(restore_for_eval(config, exp, workdir), S.replicated(exp.mesh))
    evaluate_fn = make_eval_fn(exp, config.train.eval_batch_size)
    test, val = evaluate_fn(state, exp.test), evaluate_fn(state, exp.val)
    summary = _summary(config, exp, state, wall_start, test_accuracy=test["accuracy"], test_loss=test["loss"],
                       val_accuracy=val["accuracy"], checkpoint=config.eval.checkpoint)
    write_json(os.path.join(workdir, "eval_summary.json"), summary)
    return summary
