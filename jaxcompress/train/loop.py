"""The `train` and `evaluate` jobs (Flax-examples style: small named functions).

`train_and_evaluate` resumes from the latest checkpoint in `<workdir>/checkpoints`
(parameters, masks, quant, optimizer, step, RNG and the data iterator's position),
so a killed run restarted with the same workdir ends with the same final metrics.

On many processes (`jaxcompress.distributed`) each reads only its rows of every global
batch, checkpoints restore straight into the mesh's replicated shardings, and only
process 0 writes metrics.jsonl and the summaries (`write_json`, `MetricWriter`).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from jaxcompress import cost, files
from jaxcompress.timing import forward_latencies
from jaxcompress.data import BatchIterator, DevicePrefetcher, iterate_eval, shard_batch
from jaxcompress.distributed import process_slice
from jaxcompress.errors import NonFiniteError
from jaxcompress.train import steps as S
from jaxcompress.train.checkpoint import Checkpointer, CheckpointError
from jaxcompress.train.experiment import Experiment, Teacher, setup_experiment
from jaxcompress.train.metrics import MetricWriter, write_json
from jaxcompress.train.optim import OPTIMIZER_FIELDS, learning_rate_schedule, make_optimizer
from jaxcompress.train.recipe import Recipe
from jaxcompress.train.state import TrainState, create_train_state


def evaluate_split(eval_step, state: TrainState, x, y, batch_size: int, mesh) -> dict[str, float]:
    """Accuracy and mean loss over every example of (x, y) (each process reading its rows
    of every global batch of `batch_size`)."""
    totals = None
    for batch in iterate_eval(x, y, batch_size, *process_slice()):
        sums = eval_step(state, shard_batch(batch, S.batch_sharded(mesh)))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / n, "loss": float(totals["loss"]) / n}


def make_eval_fn(exp: Experiment, batch_size: int, compute_dtype: str = "float32"):
    """`evaluate(state, (x, y)) -> {"loss", "accuracy"}`, data-parallel over `exp.mesh`, the
    forward pass in `compute_dtype` (`train.dtype`); the jitted step is the experiment's one
    for that dtype (`Experiment.shared`)."""
    step = exp.shared(("eval", compute_dtype),
                      lambda: jax.jit(S.make_eval_step(exp.mean, exp.std, compute_dtype=compute_dtype),
                                      in_shardings=(S.replicated(exp.mesh), S.batch_sharded(exp.mesh)),
                                      out_shardings=S.replicated(exp.mesh)))
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
    A mid-epoch checkpoint (`recipe.checkpoint_every`) carries the epoch's running metric
    sums, so a resumed epoch reports its train metrics over all of its steps. The steps
    compute in `recipe.dtype` (float32 weights either way) and the next `recipe.prefetch`
    batches are placed on the devices while a step runs (`DevicePrefetcher`; checkpoints
    record the position of the batches trained on, not of those prefetched). With a
    `teacher` and `recipe.distill_weight` > 0 the loss distils from it. `state`'s
    `apply_fn` is kept (QAT trains a quantized apply); the caller's `state` stays valid
    (the jitted step donates a copy). Returns the final state and
    `{"best_val_accuracy", "train_time_s", "examples_read_per_process"}`, the last being the
    training examples each process read in this call (from the resumed step on): with N
    processes, each 1/N of the steps' global batches.

    A NaN or inf loss (or parameter) stops training with a `NonFiniteError` naming the
    epoch and step where it first appeared. The check runs on device; its flag is read
    where the host waits anyway (epoch ends, mid-epoch checkpoints), and every checkpoint
    is saved only after it passed, so the last one on disk is good.
    """
    process_index, process_count = process_slice()
    it = BatchIterator(*exp.train, batch_size=recipe.batch_size, seed=recipe.seed, process_index=process_index,
                       process_count=process_count)  # this process's rows of each global batch
    spe = it.steps_per_epoch
    # one optimiser object per settings: it is static in the state, so an equal one keeps the
    # jitted steps' compiled programs (a new object would recompile them)
    tx = exp.shared(("optimizer", spe) + tuple(getattr(recipe, f) for f in OPTIMIZER_FIELDS),
                    lambda: make_optimizer(recipe, spe))
    state = state.replace(step=jnp.zeros((), jnp.int32), tx=tx, opt_state=tx.init(state.params))
    with Checkpointer(os.path.join(workdir, "checkpoints"), recipe.max_to_keep) as ckpt, \
            Checkpointer(os.path.join(workdir, "best"), 1) as best_ckpt:
        return _fit_epochs(state, exp, recipe, workdir, teacher, it, ckpt, best_ckpt)


def _fit_epochs(state, exp, recipe, workdir, teacher, it, ckpt, best_ckpt) -> tuple[TrainState, dict]:
    """`fit`'s loop (resume, epochs, checkpoints, metrics) with its checkpointers open."""
    spe = it.steps_per_epoch
    meta = {"iterator": it.get_state(), "best_val_accuracy": -1.0}
    epoch_sums, epoch_steps = None, 0  # running metric sums of a resumed mid-epoch checkpoint
    # The jitted step donates the state: a copy in fresh buffers, so that arrays the caller
    # still holds (or that alias other states' leaves, e.g. after surgery) stay valid. It is
    # also the restore's template: Orbax reads straight into its replicated mesh shardings
    # (on many hosts, no single-device round trip).
    state = S.replicated_copy(state, exp.mesh)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        it.set_state(meta["iterator"])
        saved = meta.pop(EPOCH_SUMS, None)
        if saved is not None and int(jax.device_get(state.step)) % spe:
            epoch_sums, epoch_steps = saved["sums"], int(saved["steps"])
        logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    train_step, teacher_args = _train_step(exp, recipe, teacher)
    evaluate = make_eval_fn(exp, recipe.eval_batch_size, recipe.dtype)
    writer = MetricWriter(workdir)
    schedule = learning_rate_schedule(recipe, spe)
    step = int(jax.device_get(state.step))
    # the batches of the steps left, on the devices `recipe.prefetch` steps ahead; its position
    # (`get_state`) is that of the last batch handed to a step, so checkpoints never run ahead
    batches = DevicePrefetcher(it, S.batch_sharded(exp.mesh), recipe.prefetch,
                               limit=recipe.num_epochs * spe - step)
    last_saved = ckpt.latest_step()
    train_time = 0.0

    def checked(sums) -> dict:
        """The running sums on the host, after checking that every step was finite."""
        sums = jax.device_get(sums)
        if int(sums["first_nonfinite"]):
            raise _nonfinite(int(sums["first_nonfinite"]), spe, recipe.num_epochs, workdir, ckpt, last_saved)
        return sums

    while step < recipe.num_epochs * spe:
        epoch = step // spe
        epoch_start, sums, n = time.time(), None, 0
        if epoch_sums is not None:  # the steps of this epoch run before the restart
            sums, n = _resumed_sums(epoch_sums, exp.mesh), epoch_steps
            epoch_sums = None
        resumed_steps = n
        with tqdm(total=spe, initial=step % spe, desc=f"epoch {epoch + 1}/{recipe.num_epochs}",
                  disable=None, leave=False) as bar:
            try:
                while step < (epoch + 1) * spe:
                    state, m = train_step(state, next(batches), *teacher_args)
                    sums = S.accumulate_metrics(S.zero_sums(m) if sums is None else sums, m, state.step)
                    step, n = step + 1, n + 1
                    bar.update()
                    if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step % spe:
                        host = checked(sums)  # the save waits for the step anyway
                        ckpt.save(state, {**meta, "iterator": batches.get_state(),
                                          EPOCH_SUMS: {"sums": _plain_sums(host), "steps": n}})
                        last_saved = step
            except KeyboardInterrupt:
                _save_at_interrupt(ckpt, state, meta, sums, n, spe, last_saved)
                raise
        sums = checked(sums)
        train_metrics = {k: float(v) / n for k, v in sums.items() if k != "first_nonfinite"}
        epoch_train_s = time.time() - epoch_start
        train_time += epoch_train_s
        ran = n - resumed_steps  # throughput of the steps this process ran (global batch)
        throughput = dict(steps_per_s=ran / epoch_train_s, examples_per_s=ran * recipe.batch_size / epoch_train_s,
                          learning_rate=float(schedule(step - 1)))
        val = evaluate(state, exp.val)
        meta = {**meta, "iterator": batches.get_state()}
        if val["accuracy"] > meta["best_val_accuracy"]:
            meta["best_val_accuracy"] = val["accuracy"]
            best_ckpt.save(state, meta)
        ckpt.save(state, meta)
        last_saved = step
        writer.write(step, epoch=epoch + 1, train=train_metrics, val=val, epoch_time_s=time.time() - epoch_start,
                     **throughput)
        logging.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.1fs)", epoch + 1,
                     recipe.num_epochs, train_metrics["loss"], train_metrics["accuracy"], val["loss"],
                     val["accuracy"], time.time() - epoch_start)
    writer.close()
    return state, {"best_val_accuracy": meta["best_val_accuracy"], "train_time_s": train_time,
                   "examples_read_per_process": _per_process(batches.examples_read)}


def _save_at_interrupt(ckpt: Checkpointer, state, meta: dict, sums, n: int, spe: int, last_saved) -> None:
    """Ctrl-C mid-epoch: saves the steps run since the last checkpoint, so a rerun resumes
    where the run stopped. The interrupt may land anywhere in the loop, so the position
    is derived from the state's own step (one batch drawn but not trained on is drawn
    again), and the epoch's running sums are kept only when they match that step. A
    state whose buffers the interrupted step had already donated is not saved: the
    last checkpoint stands."""
    try:
        step = int(jax.device_get(state.step))
        if (last_saved is not None and step <= last_saved) or step % spe == 0:
            return  # nothing new, or an epoch not yet evaluated: resume redoes it from the last checkpoint
        extra = {}
        if sums is not None and n == step % spe:
            host = jax.device_get(sums)
            if not int(host["first_nonfinite"]):
                extra = {EPOCH_SUMS: {"sums": _plain_sums(host), "steps": n}}
            else:
                return  # a non-finite step since the last checkpoint: keep that one
        ckpt.save(state, {**meta, "iterator": {"epoch": step // spe, "index": step % spe}, **extra})
        logging.info("interrupted: saved step %d in %s", step, ckpt.directory)
    except Exception as e:  # noqa: BLE001 - a donated or half-written state: the last checkpoint stands
        logging.info("interrupted: no checkpoint at the interrupt (%s: %s); the last one stands",
                      type(e).__name__, e)


def _per_process(count: int) -> list[int]:
    """`count` of every process, in process order (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [int(count)]
    from jax.experimental import multihost_utils
    return [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int32(count))).reshape(-1)]


EPOCH_SUMS = "epoch_metric_sums"  # the meta key of a mid-epoch checkpoint's running sums


def _plain_sums(sums) -> dict:
    """JSON-safe running sums: float32 sums as Python floats (exact), counts as ints."""
    return {k: (float(v) if np.issubdtype(np.asarray(v).dtype, np.floating) else int(v))
            for k, v in sums.items() if k != "first_nonfinite"}


def _resumed_sums(saved: dict, mesh) -> dict:
    """Device running sums (float32, as the step's metrics) from a checkpoint's `_plain_sums`."""
    sums = {k: jnp.asarray(v, jnp.float32 if isinstance(v, float) else jnp.int32) for k, v in saved.items()}
    sums["first_nonfinite"] = jnp.zeros((), jnp.int32)
    return jax.device_put(sums, S.replicated(mesh))


def _nonfinite(bad_step: int, spe: int, num_epochs: int, workdir: str, ckpt: Checkpointer, last_saved
               ) -> NonFiniteError:
    epoch, in_epoch = (bad_step - 1) // spe + 1, (bad_step - 1) % spe + 1
    kept = (f"the last good checkpoint, step {last_saved} in {ckpt.directory}, is kept" if last_saved is not None
            else "no checkpoint was saved")
    return NonFiniteError(
        f"training into {workdir} stopped: the loss or the parameters became NaN or inf at epoch {epoch}/"
        f"{num_epochs}, step {in_epoch}/{spe} (step {bad_step} of {num_epochs * spe}); {kept}; lower this "
        f"phase's learning rate or check the input data")


def _train_step(exp: Experiment, recipe: Recipe, teacher: Teacher | None):
    """The jitted data-parallel step and its extra replicated arguments (the teacher's
    variables when distilling)."""
    if teacher is None or recipe.distill_weight <= 0:
        teacher, teacher_args = None, ()
    else:
        logging.info("distilling from the reference network (weight %g, temperature %g)", recipe.distill_weight,
                     recipe.distill_temperature)
        teacher_args = (jax.device_put(teacher.variables, S.replicated(exp.mesh)),)
    teacher_fn = teacher.apply_fn if teacher else None
    settings = (recipe.augment, recipe.label_smoothing, teacher_fn, recipe.distill_weight, recipe.distill_temperature)

    def build():
        step_fn = S.with_finite_check(S.make_train_step(exp.mean, exp.std, *settings, compute_dtype=recipe.dtype))
        return S.jit_data_parallel(step_fn, exp.mesh, replicated_args=len(teacher_args))

    return exp.shared(("train",) + settings + (recipe.dtype,), build), teacher_args


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
    if files.is_dir(os.path.join(directory, "best")):
        directory = os.path.join(directory, "best")
    if not files.is_dir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; train first (job 'train' with "
                              f"that --workdir) or point the config at an existing checkpoint directory")
    template = create_train_state(exp.model, make_optimizer(recipe, 1), exp.input_shape, recipe.seed,
                                  variables=variables)
    template = jax.device_put(template, S.replicated(exp.mesh))  # restored straight into these shardings
    with Checkpointer(directory) as ckpt:
        return ckpt.restore(template)[0]


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
