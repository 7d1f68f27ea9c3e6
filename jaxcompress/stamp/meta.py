"""Meta-training of the STAMP set encoder and mask generator over reference tasks.

STAMP (Song et al., arXiv:2006.12139): tasks are random subsets of the reference
dataset (a random subset of its classes, relabelled, and a random subsample of
their examples). For each task the encoder embeds a sample of the task, the
generator gives Beta-Bernoulli channel gates, the masked pretrained network takes
K SGD steps on the task (inner loop, `lax.scan`), and the post-adaptation loss on
held-out task examples (plus the KL and budget terms) trains encoder and generator
(outer loop). Outer algorithms (`algorithm`):

* `fomaml`: first-order MAML (Finn et al. 2017): the inner trajectory is treated
  as constant; the query loss is differentiated through the gates at the adapted
  weights;
* `maml`: second-order, back-propagating through the K inner steps;
* `reptile` (Nichol et al. 2018): the inner loop also updates the encoder and
  generator (SGD, `reptile_lr`), and the meta-gradient is phi - phi_K.

Tasks of one outer step are `jax.vmap`ped; the whole step is one jitted program.
With `meta_weights=True` the network weights are meta-learned as well (FOMAML /
MAML / Reptile update of the initial weights); by default they stay at the
pretrained values. Meta-training is resumable from Orbax checkpoints
(`<workdir>/checkpoints`); the task sampler is a pure function of (seed, step).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError, NonFiniteError
from jaxcompress.stamp import channel_stats as CS
from jaxcompress.stamp import kumaraswamy as K
from jaxcompress.stamp.encoder import SetEncoder
from jaxcompress.stamp.generator import GroupLayout, MaskGenerator, SparsityObjective
from jaxcompress.train.checkpoint import Checkpointer
from jaxcompress.train.metrics import MetricWriter
from jaxcompress.train.steps import all_finite, batch_sharded, cross_entropy, replicated, replicated_copy

ALGORITHMS = ("fomaml", "maml", "reptile")


class MetaState(struct.PyTreeNode):
    step: jax.Array
    params: Any  # {"encoder", "generator"[, "net"]}
    opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Stamp:
    """Everything STAMP needs about the network, the gates and the meta-learning setup.

    `net_variables` are the frozen pretrained variables (params, batch_stats, masks);
    `mean`, `std` normalise uint8 task images.
    """

    layout: GroupLayout
    net_variables: dict
    mean: np.ndarray
    std: np.ndarray
    objective: SparsityObjective
    encoder: SetEncoder
    generator: MaskGenerator
    inner_steps: int = 5
    inner_lr: float = 0.01
    temperature: float = 0.1
    algorithm: str = "fomaml"
    reptile_lr: float = 0.01
    meta_weights: bool = False
    channel_stats: bool = False  # the generator reads per-channel statistics of the set's images
    keep_counts: tuple[int, ...] | None = None  # per prunable group: straight-through top-k gates

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown stamp.algorithm '{self.algorithm}'; choose one of {', '.join(ALGORITHMS)}")

    @property
    def model(self):
        return self.layout.table.model

    # ---- pieces -----------------------------------------------------------------
    def _inputs(self, x):
        return normalize(x, self.mean, self.std) if x.dtype == jnp.uint8 else x

    def init(self, rng, set_x, set_y, set_images=None) -> dict:
        """Meta-parameters from one example set (set_x: (N, D) features or uint8 images;
        `set_images`: the set's uint8 images, needed with `channel_stats`)."""
        k_enc, k_gen = jax.random.split(rng)
        enc = self.encoder.init(k_enc, self._inputs(jnp.asarray(set_x)), jnp.asarray(set_y))
        z = self.encoder.apply(enc, self._inputs(jnp.asarray(set_x)), jnp.asarray(set_y))
        params = {"encoder": enc}
        if self.meta_weights:
            params["net"] = self.net_variables["params"]
        stats = self.set_statistics(params, set_images, jnp.asarray(set_y))
        params["generator"] = self.generator.init(k_gen, z, stats)
        return params

    def set_statistics(self, meta_params, set_images, set_y):
        """Standardised per-channel statistics of the set's images through the (meta-learned
        or pretrained) network, per prunable group; None without `channel_stats`."""
        if not self.channel_stats:
            return None
        if set_images is None:
            raise ValueError("this Stamp reads per-channel statistics (channel_stats=True): pass the set's images")
        net = {**self.net_variables, "params": meta_params.get("net", self.net_variables["params"])}
        return CS.standardized(CS.channel_statistics(self.layout, net, self._inputs(jnp.asarray(set_images)), set_y))

    def kumaraswamy_params(self, meta_params, set_x, set_y, set_images=None):
        z = self.encoder.apply(meta_params["encoder"], self._inputs(set_x), set_y)
        return self.generator.apply(meta_params["generator"], z, self.set_statistics(meta_params, set_images, set_y))

    def keep_probabilities(self, meta_params, set_x, set_y, set_images=None) -> list[jax.Array]:
        """Test-time E[pi] per prunable group for a set (one forward pass)."""
        a, b = self.kumaraswamy_params(meta_params, set_x, set_y, set_images)
        return [K.kumaraswamy_mean(ai, bi) for ai, bi in zip(a, b)]

    def sample_masks(self, rng, a_list, b_list) -> dict:
        """Layer masks of relaxed Bernoulli gates; with `keep_counts`, each group's gates
        become a straight-through top-k: exactly its count of ones forward (the highest
        sampled gates), the relaxed gates' gradient backward."""
        keys = jax.random.split(rng, len(a_list))
        gates = [K.sample_gates(k, a, b, self.temperature) for k, a, b in zip(keys, a_list, b_list)]
        if self.keep_counts is not None:
            gates = [straight_through_top_k(g, k) for g, k in zip(gates, self.keep_counts)]
        return self.layout.layer_masks(gates, self.net_variables.get("masks"))

    def apply_net(self, params, batch_stats, masks, x, train: bool):
        variables = {"params": params, "masks": masks}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train:
            logits, upd = self.model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, upd.get("batch_stats", batch_stats)
        return self.model.apply(variables, x, train=False), batch_stats

    def adapt(self, params, batch_stats, masks, xs, ys):
        """K inner SGD steps (lax.scan) of the masked network on batches xs (K, B, ...)."""
        def step(carry, batch):
            p, s = carry
            x, y = batch

            def loss_fn(p):
                logits, s2 = self.apply_net(p, s, masks, self._inputs(x), train=True)
                return cross_entropy(logits, y).mean(), s2

            (loss, s2), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            return (jax.tree.map(lambda w, d: w - self.inner_lr * d, p, g), s2), loss

        (p, s), losses = jax.lax.scan(step, (params, batch_stats), (xs, ys))
        return p, s, losses

    # ---- per-task objectives ------------------------------------------------------
    def task_loss(self, meta_params, task, rng):
        """Post-adaptation query loss + sparsity terms for one task (FOMAML / MAML)."""
        a, b = self.kumaraswamy_params(meta_params, task["set_x"], task["set_y"], task.get("set_images"))
        masks = self.sample_masks(rng, a, b)
        p0 = meta_params.get("net", self.net_variables["params"])
        s0 = self.net_variables.get("batch_stats", {})
        first = self.algorithm == "fomaml"
        inner_masks = jax.lax.stop_gradient(masks) if first else masks
        pk, sk, inner = self.adapt(jax.lax.stop_gradient(p0) if first else p0, s0, inner_masks,
                                   task["inner_x"], task["inner_y"])
        if first:  # FOMAML: d loss / d p0 := d loss / d p_K
            pk = jax.tree.map(lambda w0, wk: w0 + jax.lax.stop_gradient(wk - w0), p0, pk)
        logits, _ = self.apply_net(pk, sk, masks, self._inputs(task["query_x"]), train=True)
        query = cross_entropy(logits, task["query_y"]).mean()
        reg, info = self.objective(self.layout, a, b)
        acc = (logits.argmax(-1) == task["query_y"]).mean()
        return query + reg, dict(query_loss=query, query_accuracy=acc, inner_first=inner[0],
                                 inner_last=inner[-1], **info)

    def reptile_direction(self, meta_params, task, rng):
        """phi - phi_K after K joint SGD steps on (gates, weights): Reptile's meta-gradient."""
        s0 = self.net_variables.get("batch_stats", {})
        phi0 = {k: v for k, v in meta_params.items() if k != "net"}
        w0 = meta_params.get("net", self.net_variables["params"])

        def step(carry, batch):
            phi, w, s, key = carry
            x, y = batch
            key, sub = jax.random.split(key)

            def loss_fn(phi, w):
                a, b = self.kumaraswamy_params({**phi, "net": w0}, task["set_x"], task["set_y"],
                                               task.get("set_images"))
                logits, s2 = self.apply_net(w, s, self.sample_masks(sub, a, b), self._inputs(x), train=True)
                ce = cross_entropy(logits, y).mean()
                return ce + self.objective(self.layout, a, b)[0], (ce, s2)

            (_, (ce, s2)), (g_phi, g_w) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(phi, w)
            phi = jax.tree.map(lambda p, g: p - self.reptile_lr * g, phi, g_phi)
            w = jax.tree.map(lambda p, g: p - self.inner_lr * g, w, g_w)
            return (phi, w, s2, key), ce

        (phik, wk, sk, _), inner = jax.lax.scan(step, (phi0, w0, s0, rng), (task["inner_x"], task["inner_y"]))
        a, b = self.kumaraswamy_params({**phik, "net": w0}, task["set_x"], task["set_y"], task.get("set_images"))
        logits, _ = self.apply_net(wk, sk, self.sample_masks(rng, a, b), self._inputs(task["query_x"]), True)
        query = cross_entropy(logits, task["query_y"]).mean()
        _, info = self.objective(self.layout, a, b)
        direction = jax.tree.map(lambda p, q: p - q, phi0, phik)
        if "net" in meta_params:
            direction["net"] = jax.tree.map(lambda p, q: p - q, w0, wk)
        acc = (logits.argmax(-1) == task["query_y"]).mean()
        return direction, dict(query_loss=query, query_accuracy=acc, inner_first=inner[0],
                               inner_last=inner[-1], **info)

    # ---- the outer step -----------------------------------------------------------
    def create_state(self, rng, set_x, set_y, tx, set_images=None) -> MetaState:
        k_init, k_state = jax.random.split(rng)
        params = self.init(k_init, set_x, set_y, set_images)
        return MetaState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         rng=k_state, tx=tx)

    def meta_step(self, state: MetaState, tasks):
        """One outer update from a batch of tasks (leading axis T, vmapped)."""
        num_tasks = tasks["query_y"].shape[0]
        keys = jax.random.split(jax.random.fold_in(state.rng, state.step), num_tasks)
        if self.algorithm == "reptile":
            dirs, info = jax.vmap(self.reptile_direction, in_axes=(None, 0, 0))(state.params, tasks, keys)
            grads = jax.tree.map(lambda d: d.mean(0), dirs)
        else:
            def outer(params):
                losses, info = jax.vmap(self.task_loss, in_axes=(None, 0, 0))(params, tasks, keys)
                return losses.mean(), info
            (_, info), grads = jax.value_and_grad(outer, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, jax.tree.map(jnp.mean, info)

    def post_adaptation_loss(self, meta_params, task, rng):
        """Query loss after the inner loop for one task (no sparsity terms): what meta-training lowers."""
        return self.task_loss(meta_params, task, rng)[1]["query_loss"]


def straight_through_top_k(gates: jax.Array, k: int) -> jax.Array:
    """Exactly `k` ones at the `k` largest `gates` (ties: lower index) in the forward pass,
    d/d gates = identity in the backward pass."""
    hard = jnp.zeros_like(gates).at[jax.lax.top_k(gates, k)[1]].set(1.0)
    return hard + (gates - jax.lax.stop_gradient(gates))  # exactly 0 or 1 forward


class TaskSampler:
    """Random tasks from a labelled reference set: a class subset (relabelled in random
    order) and subsamples for the set encoder, the K inner batches and the query.

    `set_inputs` (default `x`) is what the encoder sees per example (precomputed
    pretrained features, or the images). Tasks of step s are a pure function of
    (seed, s), which makes meta-training resumable without saving sampler state.
    """

    def __init__(self, x, y, *, ways: tuple[int, int], set_size: int, inner_steps: int, inner_batch: int,
                 query_size: int, seed: int = 0, set_inputs=None, set_images: bool = False):
        self.x, self.y = x, np.asarray(y)
        self.set_inputs = x if set_inputs is None else set_inputs
        self.classes = np.unique(self.y)
        lo, hi = ways
        if set_size < 1:
            raise ConfigError(f"stamp.set_size must be >= 1, got {set_size}")
        if not 1 <= lo <= hi <= len(self.classes):
            raise ConfigError(f"stamp.task_ways={ways} must lie within 1..{len(self.classes)} reference classes")
        self.ways, self.set_size, self.inner_steps = (lo, hi), set_size, inner_steps
        self.inner_batch, self.query_size, self.seed = inner_batch, query_size, seed
        self.set_images = set_images
        self.by_class = {int(c): np.flatnonzero(self.y == c) for c in self.classes}

    def _task(self, rng):
        ways = int(rng.integers(self.ways[0], self.ways[1] + 1))
        classes = rng.choice(self.classes, ways, replace=False)
        pool = np.concatenate([self.by_class[int(c)] for c in classes])
        relabel = np.zeros(int(self.classes.max()) + 1, np.int32)
        relabel[classes] = np.arange(ways)
        n_train = self.inner_steps * self.inner_batch
        need = n_train + self.query_size
        drawn = rng.choice(pool, need, replace=need > len(pool))
        set_idx = rng.choice(pool, self.set_size, replace=self.set_size > len(pool))
        inner, query = drawn[:n_train], drawn[n_train:]
        shape = (self.inner_steps, self.inner_batch)
        task = dict(set_x=self.set_inputs[set_idx], set_y=relabel[self.y[set_idx]],
                    inner_x=self.x[inner].reshape(shape + self.x.shape[1:]),
                    inner_y=relabel[self.y[inner]].reshape(shape),
                    query_x=self.x[query], query_y=relabel[self.y[query]])
        if self.set_images:  # for the per-channel statistics (`Stamp.channel_stats`)
            task["set_images"] = self.x[set_idx]
        return task

    def sample(self, step: int, num_tasks: int) -> dict:
        rng = np.random.default_rng([self.seed, int(step)])
        tasks = [self._task(rng) for _ in range(num_tasks)]
        return {k: np.stack([t[k] for t in tasks]) for k in tasks[0]}


def _tree(state: MetaState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


META_CHECKPOINTS = "checkpoints"  # meta-training's checkpoints, under its workdir


BEST_CHECKPOINT = "best"  # the meta-parameters that scored best on the validation tasks, under its workdir


class MetaValidation:
    """Held-out validation tasks (a dict of stacked tasks, `TaskSampler.sample`) that pick
    the meta-checkpoint deployed: at every checkpoint the meta-parameters' mean
    post-adaptation query accuracy on them (fixed gate samples) is computed, and the best
    so far is kept in `directory` (resumable: its score is read back)."""

    def __init__(self, stamp: Stamp, tasks: dict, directory: str, seed: int = 0):
        keys = jax.random.split(jax.random.key(seed), len(tasks["query_y"]))
        tasks = jax.tree.map(jnp.asarray, tasks)
        self._score = jax.jit(lambda p: jax.vmap(stamp.task_loss, in_axes=(None, 0, 0))(
            p, tasks, keys)[1]["query_accuracy"].mean())
        self.ckpt = Checkpointer(directory, max_to_keep=1)
        self.best = self.ckpt.read_meta()["val_accuracy"] if self.ckpt.latest_step() is not None else -np.inf

    def update(self, step: int, params, settings: dict) -> float:
        """Scores `params` (meta step `step`); keeps them if they are the best so far."""
        score = float(self._score(params))
        if score > self.best:
            self.ckpt.save_tree(step, {"params": params}, {"val_accuracy": score, "settings": settings})
            self.best = score
        return score

    def best_params(self, template):
        """The best meta-parameters kept, in the structure of `template`."""
        return self.ckpt.restore_tree({"params": template})[0]["params"]

    def close(self):
        self.ckpt.close()


def meta_train(stamp: Stamp, sampler: TaskSampler, *, num_steps: int, tasks_per_step: int, learning_rate: float,
               workdir: str, seed: int = 0, checkpoint_every: int = 50, log_every: int = 10,
               settings: dict | None = None, validation_tasks: dict | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[MetaState, dict]:
    """Runs (or resumes) meta-training into `workdir`; returns the final state and timing.
    Each checkpoint (checksummed, `jaxcompress.train.Checkpointer`) records `settings`
    (JSON: what shaped the meta-parameters), which a later run checks before any work.
    With `validation_tasks` (`MetaValidation`), the returned state's params are the
    checkpoint that scored best on them (kept in `<workdir>/best`), and the timing dict
    gives its step and score. On a `mesh` whose size divides `tasks_per_step`, each meta
    step's tasks are split over its devices (`task_devices` in the timing dict; the
    meta-parameters replicated, their gradient all-reduced by XLA).

    The logged metrics are summed on device and read every `log_every` steps. A NaN or
    inf loss, metric or meta-parameter stops meta-training with a `NonFiniteError` naming
    the first such step; the flag is checked on device and read with the logged sums and
    before every checkpoint, which is therefore saved only when all steps so far were finite.
    """
    tx = optax.adam(learning_rate)
    probe = sampler.sample(0, 1)
    state = stamp.create_state(jax.random.key(seed), probe["set_x"][0], probe["set_y"][0], tx,
                               probe["set_images"][0] if "set_images" in probe else None)
    validation = (MetaValidation(stamp, validation_tasks, os.path.join(workdir, BEST_CHECKPOINT), seed)
                  if validation_tasks is not None else None)
    try:
        with Checkpointer(os.path.join(workdir, META_CHECKPOINTS), max_to_keep=2) as ckpt:
            state, start, devices = _meta_train_steps(stamp, sampler, state, ckpt, num_steps, tasks_per_step,
                                                      workdir, checkpoint_every, log_every, dict(settings or {}),
                                                      validation, mesh)
        info = {"meta_train_time_s": time.time() - start, "task_devices": devices}
        if validation is not None and validation.ckpt.latest_step() is not None:
            state = state.replace(params=validation.best_params(state.params))
            info.update(best_step=int(validation.ckpt.latest_step()), val_accuracy=validation.best)
            logging.info("stamp: meta-checkpoint of step %d deployed (validation query accuracy %.4f)",
                         info["best_step"], validation.best)
    finally:
        if validation is not None:
            validation.close()
    return state, info


def _checked_meta_step(stamp: Stamp):
    """`stamp.meta_step` plus the first non-finite step (0: none so far), kept on device."""

    def step(state: MetaState, tasks, first_bad):
        state, info = stamp.meta_step(state, tasks)
        finite = all_finite((info, state.params))
        return state, info, jnp.where((first_bad == 0) & ~finite, state.step, first_bad)

    return step


def meta_step_fn(stamp: Stamp, mesh: jax.sharding.Mesh | None, tasks_per_step: int):
    """(jitted meta step `(state, tasks, first_bad) -> (state, info, first_bad)`, devices):
    on a `mesh` whose size divides `tasks_per_step`, the tasks are split over its devices
    (`P('data')` on their leading axis) and everything else is replicated; else one device."""
    devices = mesh.size if mesh is not None and tasks_per_step % mesh.size == 0 else 1
    if devices == 1:
        return jax.jit(_checked_meta_step(stamp), donate_argnums=(0,)), 1
    rep = replicated(mesh)
    return jax.jit(_checked_meta_step(stamp), in_shardings=(rep, batch_sharded(mesh), rep),
                   out_shardings=(rep, rep, rep), donate_argnums=(0,)), devices


def _meta_train_steps(stamp, sampler, state, ckpt: Checkpointer, num_steps, tasks_per_step, workdir,
                      checkpoint_every, log_every, settings: dict, validation: MetaValidation | None = None,
                      mesh: jax.sharding.Mesh | None = None):
    if mesh is not None:
        state = replicated_copy(state, mesh)
    if ckpt.latest_step() is not None:
        restored, _ = ckpt.restore_tree(_tree(state))
        state = state.replace(**restored)
        logging.info("stamp: resumed meta-training at step %d", int(state.step))
    step_fn, devices = meta_step_fn(stamp, mesh, tasks_per_step)
    writer = MetricWriter(workdir)
    step = int(state.step)
    last_saved = ckpt.latest_step()
    first_bad = jnp.zeros((), jnp.int32)
    start, sums, n = time.time(), None, 0

    def check():
        bad = int(jax.device_get(first_bad))
        if bad:
            kept = (f"the last good checkpoint, step {last_saved} in {ckpt.directory}, is kept"
                    if last_saved is not None else "no checkpoint was saved")
            raise NonFiniteError(f"STAMP meta-training into {workdir} stopped: a loss or the meta-parameters became "
                                 f"NaN or inf at meta step {bad}/{num_steps}; {kept}; lower stamp.meta_learning_rate"
                                 f" or stamp.inner_lr")

    while step < num_steps:
        state, info, first_bad = step_fn(state, sampler.sample(step, tasks_per_step), first_bad)
        step += 1
        sums = info if sums is None else jax.tree.map(jnp.add, sums, info)
        n += 1
        if step % log_every == 0 or step == num_steps:
            check()
            avg = {k: float(v) / n for k, v in jax.device_get(sums).items()}
            writer.write(step, **avg, elapsed_s=time.time() - start)
            logging.info("stamp meta step %d/%d: query loss %.4f acc %.3f, E[%s] %.3f, inner %.3f -> %.3f", step,
                         num_steps, avg["query_loss"], avg["query_accuracy"], stamp.objective.budget_metric,
                         avg["expected_fraction"], avg["inner_first"], avg["inner_last"])
            sums, n = None, 0
        if step % checkpoint_every == 0 or step == num_steps:
            check()
            if validation is not None:  # scored (and kept if best) first: a crash after it redoes the step
                score = validation.update(step, state.params, settings)
                writer.write(step, val_query_accuracy=score)
                logging.info("stamp meta step %d: validation query accuracy %.4f (best %.4f)", step, score,
                             validation.best)
            ckpt.save_tree(step, _tree(state), {"settings": settings})
            last_saved = step
    check()
    writer.close()
    return state, start, devices
