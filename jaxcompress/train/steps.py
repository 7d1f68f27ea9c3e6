"""Jitted training and evaluation steps, data-parallel over a ('data',) mesh.

This is the successor of `jax.pmap` data parallelism in current JAX: the state is
replicated (`P()`), the global batch is split over the mesh axis `'data'`
(`P('data')`), and `jax.jit` partitions the single-device program. The loss is the
mean over the *global* batch and BatchNorm statistics are global-batch statistics,
so a step on 8 devices computes the same numbers as on one.

Mixed precision (`compute_dtype="bfloat16"`): the state keeps float32 master weights,
optimizer state and BatchNorm statistics; inside the step the floating parameters and
the normalised input are cast to bfloat16 for the forward and backward pass, the loss is
computed on float32 logits, and the gradients come back float32 through the cast. Flax's
BatchNorm (`force_float32_reductions=True`, the default) computes batch statistics in
float32 from bfloat16 inputs, so the `batch_stats` collection, never cast, stays float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcompress.data import augment_cifar, normalize
from jaxcompress.train.state import TrainState


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over all devices (all hosts, after jax.distributed.initialize)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), (jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def split_rows(tree, mesh, axis: int = 0):
    """Host arrays (the same on every process) split along `axis` over `mesh`'s 'data'
    axis, each process putting only its own devices' rows (`jax.device_put` of a host
    array onto a multi-host sharding would first check across hosts that they agree)."""
    sharding = NamedSharding(mesh, P(*([None] * axis + ["data"])))
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i, x=x: np.asarray(x)[i]),
                        tree)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def distillation_loss(logits, teacher_logits, temperature: float):
    """Per-example knowledge-distillation loss (Hinton et al. 2015, "Distilling the
    Knowledge in a Neural Network", Sec. 2): T^2 KL(softmax(z_t / T) || softmax(z_s / T)),
    the T^2 keeping its gradients on the scale of the hard-label loss as T changes."""
    t = temperature
    return t * t * optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits / t),
                                                             jax.nn.log_softmax(teacher_logits / t))


COMPUTE_DTYPES = ("float32", "bfloat16")  # `train.dtype`: the forward / backward pass's floating dtype


def compute_dtype_of(name) -> jnp.dtype:
    """The dtype named `name` (one of `COMPUTE_DTYPES`, or a dtype)."""
    dtype = jnp.dtype(name)
    if dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={name!r}: must be one of {', '.join(COMPUTE_DTYPES)}")
    return dtype


def cast_floating(tree, dtype):
    """`tree` with its floating leaves in `dtype` (integer and boolean leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _compute_variables(variables: dict, dtype) -> dict:
    """A `model.apply` variables dict for computing in `dtype`: its `params` cast, every
    other collection (BatchNorm statistics, masks, quant) as it is."""
    return {**variables, "params": cast_floating(variables["params"], dtype)}


def _inputs(batch, mean, std):
    return normalize(batch["image"], mean, std)


def make_train_step(mean, std, augment: bool = False, label_smoothing: float = 0.0, teacher_apply=None,
                    distill_weight: float = 0.0, temperature: float = 4.0, compute_dtype="float32"):
    """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    With `teacher_apply` (a model's `apply`) the step is `train_step(state, batch,
    teacher_variables)` and minimises (1 - w) CE + w `distillation_loss` against the
    teacher's inference-mode logits on the same (augmented) inputs, w = `distill_weight`.

    `compute_dtype` ("float32" or "bfloat16", `COMPUTE_DTYPES`): the dtype of the forward
    and backward pass (the student's and the teacher's); parameters, optimizer state and
    BatchNorm statistics stay float32 and the losses are computed in float32 (module
    docstring). "float32" is the plain float32 step.
    """
    dtype = compute_dtype_of(compute_dtype)

    def train_step(state: TrainState, batch, teacher_variables=None):
        x = _inputs(batch, mean, std)
        if augment:
            x = augment_cifar(jax.random.fold_in(state.rng, state.step), x)
        x = x.astype(dtype)
        if teacher_apply is not None:
            teacher_logits = jax.lax.stop_gradient(
                teacher_apply(_compute_variables(teacher_variables, dtype), x, train=False).astype(jnp.float32))

        def loss_fn(params):
            logits, updates = state.apply_fn(state.variables(cast_floating(params, dtype)), x, train=True,
                                             mutable=["batch_stats"])
            logits = logits.astype(jnp.float32)
            loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
            if teacher_apply is not None:
                kd = distillation_loss(logits, teacher_logits, temperature).mean()
                loss = (1.0 - distill_weight) * loss + distill_weight * kd
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, opt_updates),
                                  opt_state=opt_state, batch_stats=updates.get("batch_stats", state.batch_stats))
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


def make_eval_step(mean, std, compute_dtype="float32"):
    """Returns `eval_step(state, batch) -> sums` honouring the batch's padding mask; the
    forward pass in `compute_dtype` (as `make_train_step`), the loss in float32."""
    dtype = compute_dtype_of(compute_dtype)

    def eval_step(state: TrainState, batch):
        x = _inputs(batch, mean, std).astype(dtype)
        logits = state.apply_fn(_compute_variables(state.variables(), dtype), x, train=False).astype(jnp.float32)
        weight = batch.get("mask", jnp.ones(batch["label"].shape, bool)).astype(jnp.float32)
        loss = cross_entropy(logits, batch["label"])
        correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        return {"loss": (loss * weight).sum(), "correct": (correct * weight).sum(), "count": weight.sum()}

    return eval_step


def all_finite(tree) -> jax.Array:
    """True (a device scalar) when no floating leaf of `tree` holds a NaN or an inf."""
    checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def with_finite_check(step_fn):
    """`step_fn` (state, batch, ...) -> (state, metrics) with `metrics["finite"]`: whether
    the loss and the updated parameters and BatchNorm statistics are all finite. Computed
    in the step's own program, so checking it costs no host sync (`accumulate_metrics`)."""

    def step(state, batch, *args):
        new_state, metrics = step_fn(state, batch, *args)
        finite = all_finite((metrics["loss"], new_state.params, new_state.batch_stats))
        return new_state, {**metrics, "finite": finite}

    return step


@jax.jit
def accumulate_metrics(sums, metrics, step):
    """Running per-epoch sums of a step's `metrics` (from `with_finite_check`), on device.
    `sums["first_nonfinite"]`: the first `step` (the step count after it) whose metrics
    were not finite, 0 while none was. Start from `zero_sums(metrics)`."""
    out = {k: sums[k] + v for k, v in metrics.items() if k != "finite"}
    first = sums["first_nonfinite"]
    out["first_nonfinite"] = jnp.where((first == 0) & ~metrics["finite"], jnp.asarray(step, jnp.int32), first)
    return out


def zero_sums(metrics) -> dict:
    """Empty running sums for `accumulate_metrics` with the keys and dtypes of `metrics`."""
    sums = {k: jnp.zeros_like(v) for k, v in metrics.items() if k != "finite"}
    return {**sums, "first_nonfinite": jnp.zeros((), jnp.int32)}


def replicated_copy(tree, mesh):
    """`tree` replicated over `mesh` in buffers no other array holds, for a step that
    donates it. `jax.device_put(x, replicated, may_alias=False)` is not enough: the shard
    of a single-device `x` on its own device keeps `x`'s buffer (JAX 0.10), so donating
    the result deletes the caller's `x` on a multi-device mesh (one device copies)."""
    return jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), tree), replicated(mesh))


def jit_data_parallel(step_fn, mesh, donate: bool = True, replicated_args: int = 0):
    """jit with state replicated and batch split over 'data'; donates the state.
    `replicated_args`: how many further (replicated) arguments follow the batch."""
    in_shardings = (replicated(mesh), batch_sharded(mesh)) + (replicated(mesh),) * replicated_args
    return jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=(replicated(mesh), replicated(mesh)) if donate else replicated(mesh),
                   donate_argnums=(0,) if donate else ())
