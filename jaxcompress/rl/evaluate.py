"""In-graph evaluation of N candidate networks with shared parameters.

Pruning candidates (`make_prune_evaluator`): candidate n keeps channel c of group g
iff rank_g[c] < k_{n,g} (ranks precomputed from a magnitude criterion, so masks of
traced kept counts are built inside jit). Two exact ways to run N masked networks:

* ``mode="stacked"`` (default): the N actors' copies of the validation batch are
  stacked along the batch axis and the *unmasked, shared* weights are applied once,
  each compressed layer's output multiplied by the actor's channel mask (a Flax
  method interceptor; the network code is unchanged). This equals the masked
  network: our layers compute (conv(x, K * m) + b) * m = (conv(x, K) + b) * m for a
  0/1 channel mask m, and BatchNorm masks after normalising. The first layer sees the
  same images for every actor, so it runs once on B images and is broadcast to the
  N x B stack at its output. Every conv stays an ordinary (ungrouped) conv, which
  XLA:CPU runs several times faster than the grouped convs `jax.vmap` makes of a
  conv whose kernel and input are both batched. Models must not reuse their input
  after the first compressed layer (no zoo model does).
* ``mode="vmap"``: `jax.vmap` of `model.apply` over the masks (grouped convs; fine on
  GPU / TPU).

Either way the actors are processed in chunks of `chunk` (0: all at once) with
`lax.map`, to bound memory.

Element candidates (`make_element_evaluator`, for `ElementEnv`): magnitude masks of
each layer's kernel from precomputed ranks; the model vmapped over the masks.

Quantization candidates (`make_quant_evaluator`): every actor's fake-quantized
kernels differ, so there is nothing to share; `lax.map` over actors in chunks of
`chunk` (vmap inside a chunk).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.layers import BatchNorm, Conv, Dense
from jaxcompress.train.steps import cross_entropy

EVAL_MODES = ("stacked", "vmap")


def correct_fraction(logits, labels):
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis=-1)


def _path_groups(table) -> dict[str, int]:
    out = {}
    for g in range(table.num_groups):
        for p in table.mask_paths(g):
            out["/".join(p[:-1])] = g
    return out


def batch_norm_batch_stats(mod, x, n: int = 1):
    """`mod` (a BatchNorm) applied to `x` normalised with its own batch statistics
    instead of the running ones, separately for each of `n` equal slices of the batch
    axis (the stacked actors), no channel mask applied. Adaptive BatchNorm (Li et al.
    2020, EagleEye, Sec. 3.2): after pruning, the running statistics of later layers
    no longer match their inputs; recomputing them makes an unfine-tuned candidate's
    accuracy track its fine-tuned accuracy."""
    xs = x.reshape((n, x.shape[0] // n) + x.shape[1:])
    axes = tuple(range(1, xs.ndim - 1))
    mean = xs.mean(axes, keepdims=True)
    var = jnp.square(xs - mean).mean(axes, keepdims=True)
    y = (xs - mean) * jax.lax.rsqrt(var + mod.epsilon)
    if mod.use_scale:
        y = y * mod.get_variable("params", "scale")
    if mod.use_bias:
        y = y + mod.get_variable("params", "bias")
    return y.reshape(x.shape).astype(x.dtype)


def adaptive_bn(model):
    """`apply(variables, x)`: `model`'s inference forward with every BatchNorm on the
    batch's own statistics (`batch_norm_batch_stats`), channel masks applied."""

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, BatchNorm):
            return next_fun(*args, **kwargs)
        mask = mod.get_variable("masks", "channel") if mod.has_variable("masks", "channel") else None
        y = batch_norm_batch_stats(mod, args[0])
        return y if mask is None else y * mask.astype(y.dtype)

    def apply(variables, x):
        with nn.intercept_methods(intercept):
            return model.apply(variables, x, train=False)

    return apply


def stack_actors(x, N: int, B: int, mask=None):
    """(B | N*B, ...) -> (N*B, ...): the N actors' copies of `x` (broadcast when `x` is
    not stacked yet), each multiplied by its row of `mask` (N, W), a channel mask, if given."""
    rest = x.shape[1:]
    stacked = x.reshape((N, B) + rest) if x.shape[0] == N * B else jnp.broadcast_to(x, (N, B) + rest)
    if mask is not None:
        repeat = rest[-1] // mask.shape[1]  # a Dense reading a flattened map: channel index fastest
        m = jnp.tile(mask, (1, repeat)) if repeat > 1 else mask
        stacked = stacked * m.reshape((N,) + (1,) * (len(rest) - 1) + (1, rest[-1])).astype(x.dtype)
    return stacked.reshape((N * B,) + rest)


def stacked_logits(model, table, variables, images, group_masks, defer: bool = True, bn_adapt: bool = False):
    """Logits (N, B, classes) of N masked networks sharing `variables`.

    `group_masks`: one (N, W_g) 0/1 array per channel group. Exact for channel masks
    (see the module doc); element masks in `variables["masks"]` still apply. With
    `defer`, the first layer's group (and its BatchNorms) stay unstacked and their
    mask is applied where a layer reads that group, so pooling between the first two
    layers also runs once; this needs every use of that group to go through a layer
    (a residual add of the first layer's output to a stacked tensor fails to trace,
    and `make_prune_evaluator` then falls back to `defer=False`). With `bn_adapt`,
    every BatchNorm normalises each actor's slice of the stack with that slice's own
    statistics (`batch_norm_batch_stats`).
    """
    N = group_masks[0].shape[0]
    B = images.shape[0]
    path_group = _path_groups(table)
    in_group = {layer.path: layer.in_group for layer in table.layers}
    g0 = table.layers[0].out_group if defer else -1
    ones = table.layer_masks([jnp.ones((w,), jnp.float32) for w in table.widths], variables.get("masks"))

    def stack(x, g):
        """(B | N*B, ...) -> (N*B, ...), multiplied by group g's per-actor mask."""
        return stack_actors(x, N, B, group_masks[g] if g is not None and g >= 0 else None)

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (Conv, Dense, BatchNorm)):
            return next_fun(*args, **kwargs)
        path = "/".join(mod.path)
        g = path_group.get(path)
        x = args[0]
        if bn_adapt and isinstance(mod, BatchNorm):
            y = batch_norm_batch_stats(mod, x, N if x.shape[0] == N * B else 1)
            if g is None or (g == g0 and x.shape[0] != N * B):
                return y  # unmasked here, or the deferred first group (masked where it is read)
            return stack(y, g)
        if g0 >= 0 and (x.shape[0] != N * B or N == 1):
            if g == g0:
                return next_fun(*args, **kwargs)  # the first group stays unstacked ...
            if in_group.get(path, g) == g0:
                width = group_masks[g0].shape[1]
                if isinstance(mod, (Conv, Dense)) and getattr(mod, "feature_group_count", 1) == 1 \
                        and width < N:  # cheaper than N masked copies
                    out = channel_expansion(next_fun, x, group_masks[g0])
                    return out if g is None else stack(out, g)
                args = (stack(x, g0),) + tuple(args[1:])  # ... and is masked where a layer reads it
        out = next_fun(*args, **kwargs)
        return out if g is None else stack(out, g)

    with nn.intercept_methods(intercept):
        logits = model.apply({**variables, "masks": ones}, images, train=False)
    if logits.shape[0] != N * B:
        logits = jnp.broadcast_to(logits, (N,) + logits.shape)
    return logits.reshape((N, B) + logits.shape[1:])


def channel_expansion(layer_fn, x, group_mask):
    """N masked inputs through one linear layer for the price of C: by linearity,
    layer(x * m_n) = layer(0) + sum_c m_n[c] (layer(x * e_c) - layer(0)), where e_c
    keeps input channel c (feature index % C == c: conv channels, or a Dense reading a
    flattened NHWC map). Runs the layer once on B * C single-channel inputs instead of
    on N * B masked ones; returns the stacked (N * B, ...) output."""
    N, C = group_mask.shape
    B = x.shape[0]
    features = x.shape[-1]
    onehot = (jnp.arange(features)[None, :] % C == jnp.arange(C)[:, None]).astype(x.dtype)  # (C, F)
    xe = (x[None] * onehot.reshape((C,) + (1,) * (x.ndim - 1) + (features,))).reshape((C * B,) + x.shape[1:])
    y = layer_fn(jnp.concatenate([jnp.zeros((1,) + x.shape[1:], x.dtype), xe], 0))  # one call: compact modules
    zero, contrib = y[:1], y[1:] - y[:1]
    # (N, C) @ (C, B * out): one plain GEMM (C-major rows need no transpose)
    out = zero + (group_mask.astype(x.dtype) @ contrib.reshape(C, -1)).reshape((N * B,) + y.shape[1:])
    return out


def _chunked(fn, values, chunk: int):
    """fn over (c, ...) slices of `values` (N, ...) with `lax.map`; pads N to a multiple of c."""
    N = values.shape[0]
    c = N if not chunk or chunk >= N else int(chunk)
    pad = (-N) % c
    v = jnp.concatenate([values, jnp.repeat(values[-1:], pad, 0)], 0) if pad else values
    out = jax.lax.map(fn, v.reshape((-1, c) + values.shape[1:]))
    return out.reshape((-1,) + out.shape[2:])[:N]


def make_prune_evaluator(env, model, ranks, chunk: int = 0, mode: str = "stacked", finetune_steps: int = 0,
                         finetune_lr: float = 0.01, bn_adapt: bool = False):
    """`evaluate(widths (N, G), data) -> accuracy (N,)` on `data["images"]`,
    `data["labels"]` with the parameters `data["variables"]` shared by all actors.

    `finetune_steps > 0`: each candidate first takes that many plain SGD steps (rate
    `finetune_lr`, BatchNorm statistics not updated) from the shared parameters on the batches
    `data["train_images"]` (steps, b, H, W, C) / `data["train_labels"]` (the same for
    every candidate and episode), then is evaluated; the masked kernels get zero
    gradient, so this is a short fine-tune of the pruned network. Candidates run one
    after another in chunks of `chunk` (each has its own parameters; 0 = 1).

    `bn_adapt`: every BatchNorm uses the evaluation batch's own statistics, per
    candidate (adaptive BatchNorm, EagleEye; `batch_norm_batch_stats`)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown evaluation mode '{mode}'; choose one of {', '.join(EVAL_MODES)}")
    ranks = [np.asarray(r, np.int32) for r in ranks]
    defer = True
    forward = _forward(model, bn_adapt)
    if finetune_steps:
        def candidate_masks(widths, variables):
            return env.table.layer_masks([(jnp.asarray(r) < widths[g]).astype(jnp.float32)
                                          for g, r in enumerate(ranks)], variables.get("masks"))
        return _finetuned_evaluator(candidate_masks, forward, chunk or 1, finetune_lr)

    def masks_of(widths):  # (c, G) -> one (c, W_g) mask per group
        return [(jnp.asarray(r)[None, :] < widths[:, g:g + 1]).astype(jnp.float32) for g, r in enumerate(ranks)]

    def chunk_acc(widths, data):
        if mode == "stacked":
            logits = stacked_logits(model, env.table, data["variables"], data["images"], masks_of(widths), defer,
                                    bn_adapt)
            return correct_fraction(logits, data["labels"][None])

        def one(gm):
            variables = data["variables"]
            masks = env.table.layer_masks(gm, variables.get("masks"))
            return correct_fraction(forward({**variables, "masks": masks}, data["images"]), data["labels"])
        return jax.vmap(one)(masks_of(widths))

    def evaluate(values, data):
        nonlocal defer
        if defer and mode == "stacked":
            if data["images"].shape[0] < 2:
                defer = False  # a batch of 1 would broadcast silently where a stacked shape is needed
            try:  # deferred stacking traces only if the first group is read by layers alone
                jax.eval_shape(lambda v, d: chunk_acc(v, d), values[:min(2, values.shape[0])], data)
            except Exception:  # noqa: BLE001 -- any trace failure: fall back to stacking at once
                defer = False
        return _chunked(lambda w: chunk_acc(w, data), values, chunk)

    return evaluate


def _forward(model, bn_adapt: bool):
    """`apply(variables, x)` for inference: running or adaptive BatchNorm statistics."""
    return adaptive_bn(model) if bn_adapt else (lambda v, x: model.apply(v, x, train=False))


def _finetuned_evaluator(candidate_masks, forward, chunk: int, lr: float):
    """`evaluate(values, data)`: each candidate's masks (`candidate_masks(values_n,
    variables)`) take `lr` SGD steps on the fixed training batches, then are scored."""

    def one(values, data):
        variables = data["variables"]
        masks = candidate_masks(values, variables)

        def logits(params, x):
            return forward({**variables, "params": params, "masks": masks}, x)

        def sgd(params, batch):
            grads = jax.grad(lambda p: cross_entropy(logits(p, batch[0]), batch[1]).mean())(params)
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), None

        params, _ = jax.lax.scan(sgd, variables["params"], (data["train_images"], data["train_labels"]))
        return correct_fraction(logits(params, data["images"]), data["labels"])

    def evaluate(values, data):
        return _chunked(lambda w: jax.vmap(lambda x: one(x, data))(w), values, chunk)

    return evaluate


def element_ranks(table, variables) -> dict[tuple, np.ndarray]:
    """{kernel mask key: rank of every kernel entry by decreasing magnitude} (0 = the
    largest; entries already removed by `variables["masks"]` rank last). Keeping the
    entries of rank < k is `criteria.element_masks` removing n - k of the n weights."""
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    masks = traverse_util.flatten_dict(dict(variables.get("masks") or {}))
    group_masks = [np.asarray(m) for m in table.group_masks(variables.get("masks") or {})]
    out = {}
    for layer in table.layers:
        key = tuple(layer.path.split("/")) + ("kernel",)
        w = np.abs(np.asarray(flat[key])).reshape(-1)
        alive = table.kernel_keep(layer, group_masks).reshape(-1)
        if key in masks:
            alive = alive & (np.asarray(masks[key]).reshape(-1) > 0)
        order = np.argsort(np.where(alive, w, -1.0), kind="stable")  # ascending: removed first
        rank = np.empty(w.size, np.int32)
        rank[order] = w.size - 1 - np.arange(w.size)
        out[key] = rank.reshape(flat[key].shape)
    return out


def make_element_evaluator(env, model, variables, chunk: int = 1, bn_adapt: bool = False, finetune_steps: int = 0,
                           finetune_lr: float = 0.01):
    """`evaluate(kept (N, L), data) -> accuracy (N,)` for an `ElementEnv`: candidate n
    keeps the kept[n, l] largest-magnitude weights of layer l (ranks from `variables`,
    the parameters `data["variables"]` holds). Every actor's kernels differ, so the
    model is vmapped over the masks, actors in chunks of `chunk` (`lax.map`).
    `bn_adapt`: BatchNorm on each candidate's own batch statistics (`adaptive_bn`);
    `finetune_steps`, `finetune_lr`: as in `make_prune_evaluator`."""
    ranks = element_ranks(env.table, variables)
    forward = _forward(model, bn_adapt)
    keys = [tuple(layer.path.split("/")) + ("kernel",) for layer in env.table.layers]

    def candidate_masks(kept, variables):
        flat = traverse_util.flatten_dict(dict(variables.get("masks") or {}))
        for t, key in enumerate(keys):
            flat[key] = (jnp.asarray(ranks[key]) < kept[t]).astype(jnp.float32)
        return traverse_util.unflatten_dict(flat)

    if finetune_steps:
        return _finetuned_evaluator(candidate_masks, forward, chunk, finetune_lr)

    def one(kept, data):
        v = {**data["variables"], "masks": candidate_masks(kept, data["variables"])}
        return correct_fraction(forward(v, data["images"]), data["labels"])

    def evaluate(values, data):
        return _chunked(lambda k: jax.vmap(lambda x: one(x, data))(k), values, chunk)

    return evaluate


def make_quant_evaluator(env, model, bits_a: float | None = None, chunk: int = 1):
    """`evaluate(bits (N, L), data) -> accuracy (N,)`: the `quant` collection built
    in-graph from each actor's bits (activations at `bits_a` if given), actors in
    chunks of `chunk` (vmapped inside a chunk; 1 = one after another, best on CPU)."""

    def one(bits, data):
        variables = {**data["variables"], "quant": env.quant_tree(bits, bits_a)}
        return correct_fraction(model.apply(variables, data["images"], train=False), data["labels"])

    def evaluate(values, data):
        return _chunked(lambda b: jax.vmap(lambda x: one(x, data))(b), values, chunk)

    return evaluate
