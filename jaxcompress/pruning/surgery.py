"""Physical channel removal ("surgery"): masked network -> smaller dense network.

Hand-written (no JAX library removes channels). The pruned network is the same
model class built with the kept widths; every variable leaf is gathered along the
axes the layer table assigns to a channel group, so BatchNorm statistics, residual
streams, depthwise convs, flattened conv->dense rows, norms, embeddings and whole
attention heads (query / key / value kernels (d, heads, head_dim), out kernel
(heads, head_dim, d)) all follow. The result has
all-ones channel masks; element masks survive as gathered masks (and the weights
they zero stay zero), counted as sparse by `jaxcompress.cost`.
"""
from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.models.table import ModelTable


def kept_indices(table: ModelTable, masks: Mapping) -> list[np.ndarray]:
    """Indices of the kept channels of every group; raises if a group would be empty."""
    table.check_masks_consistent(masks)
    kept = [np.flatnonzero(np.asarray(m) > 0) for m in table.group_masks(masks)]
    for g, idx in enumerate(kept):
        if idx.size == 0:
            raise ValueError(f"channel group {g} ({table.group_names[g]}) would lose every channel; "
                             f"keep at least one channel per group")
    return kept


def _gather_leaf(leaf, axis_groups, kept, widths):
    leaf = np.asarray(leaf)
    for axis, ag in enumerate(axis_groups):
        if ag is None:
            continue
        idx = kept[ag.group]
        if ag.repeat > 1:  # NHWC flatten: row index = position * width + channel
            idx = (np.arange(ag.repeat)[:, None] * widths[ag.group] + idx[None, :]).reshape(-1)
        leaf = np.take(leaf, idx, axis=axis)  # host gather: no XLA compile per new shape
    return leaf


def without_masks(variables: Mapping) -> dict:
    """The variables without their `masks` collection: what a plain (or shrunk) network runs on."""
    return {k: v for k, v in variables.items() if k != "masks"}


def shrink(table: ModelTable, variables: Mapping) -> tuple[nn.Module, dict]:
    """Returns `(smaller_model, smaller_variables)` with pruned channels removed.

    `variables` holds `params` (and optionally `batch_stats`, `masks`, `quant`);
    outputs of the result equal the masked network's outputs.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("shrink takes the model's variables ({'params': ..., 'masks': ..., ...}), "
                         f"got {type(variables).__name__} without a 'params' collection")
    masks = variables.get("masks")
    if masks is None:
        return table.model, dict(variables)
    _check_shapes(table, variables)
    kept = kept_indices(table, masks)
    new_model = table.model.clone(widths=tuple(int(k.size) for k in kept))
    out = {}
    for col, tree in variables.items():
        if col == "quant":
            out[col] = _freeze_weight_scales(table, variables, kept)
            continue
        axes = dict(table.axes.get(col, {}))
        if col == "masks":  # element masks have their kernel's axes
            axes.update({p: ax for p, ax in table.axes["params"].items() if p[-1] == "kernel"})
        flat = {}
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            leaf = _gather_leaf(leaf, axes[path], kept, table.widths) if path in axes else leaf
            if col == "masks" and path[-1] == "channel":
                leaf = jnp.ones_like(leaf)
            flat[path] = jnp.asarray(leaf)
        out[col] = traverse_util.unflatten_dict(flat)
    return new_model, out


def _check_shapes(table: ModelTable, variables: Mapping) -> None:
    """One-line error when `variables` are not the variables of `table.model`."""
    for col, tree in variables.items():
        if col == "quant":
            continue
        axes = dict(table.axes.get(col, {}))
        if col == "masks":  # element masks have their kernel's axes
            axes.update({p: ax for p, ax in table.axes["params"].items() if p[-1] == "kernel"})
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            if path not in axes:
                continue  # passed through unchanged by shrink
            for axis, (n, ag) in enumerate(zip(np.shape(leaf), axes[path])):
                if ag is not None and n != table.widths[ag.group] * ag.repeat:
                    raise ValueError(
                        f"shrink: {col}/{'/'.join(path)} has {n} entries on axis {axis} where the table "
                        f"expects {table.widths[ag.group] * ag.repeat} (channel group {ag.group} "
                        f"({table.group_names[ag.group]})); these variables belong to a model of other widths: "
                        f"describe that model")


def _freeze_weight_scales(table: ModelTable, variables: Mapping, kept) -> dict:
    """The `quant` collection for the shrunk network.

    A masked layer's per-channel weight scale max|w| also spans rows of pruned input
    channels, which surgery removes; storing the masked network's scales as
    `range_w` keeps the shrunk network's fake-quantized outputs equal to the masked
    network's.
    """
    flat_q = traverse_util.flatten_dict(dict(variables["quant"]))
    flat_p = traverse_util.flatten_dict(dict(variables["params"]))
    flat_m = traverse_util.flatten_dict(dict(variables.get("masks", {})))
    for layer in table.layers:
        key = tuple(layer.path.split("/"))
        if key + ("bits_w",) not in flat_q or key + ("range_w",) in flat_q:
            continue
        kernel = np.asarray(flat_p[key + ("kernel",)])
        if key + ("kernel",) in flat_m:
            kernel = kernel * np.asarray(flat_m[key + ("kernel",)])
        n_in = kernel.ndim - layer.out_ndim  # one scale per output (every output axis), as the layer computes
        w_max = np.abs(kernel).max(axis=tuple(range(n_in)))
        w_max = _gather_leaf(w_max, table.kernel_axes(layer)[n_in:], kept, table.widths)
        flat_q[key + ("range_w",)] = jnp.asarray(w_max, jnp.float32)
    return traverse_util.unflatten_dict(flat_q)
