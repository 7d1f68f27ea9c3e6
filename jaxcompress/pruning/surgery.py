"""Physical channel removal ("surgery"): masked network -> smaller dense network.

Hand-written (no JAX library removes channels). The pruned network is the same
model class built with the kept widths; every variable leaf is gathered along the
axes the layer table assigns to a channel group, so BatchNorm statistics, residual
streams, depthwise convs and flattened conv->dense rows all follow. The result has
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
    for axis, ag in enumerate(axis_groups):
        if ag is None:
            continue
        idx = kept[ag.group]
        if ag.repeat > 1:  # NHWC flatten: row index = position * width + channel
            idx = (np.arange(ag.repeat)[:, None] * widths[ag.group] + idx[None, :]).reshape(-1)
        leaf = jnp.take(leaf, idx, axis=axis)
    return leaf


def shrink(table: ModelTable, variables: Mapping) -> tuple[nn.Module, dict]:
    """Returns `(smaller_model, smaller_variables)` with pruned channels removed.

    `variables` holds `params` (and optionally `batch_stats`, `masks`, `quant`);
    outputs of the result equal the masked network's outputs.
    """
    masks = variables.get("masks")
    if masks is None:
        return table.model, dict(variables)
    kept = kept_indices(table, masks)
    new_model = table.model.clone(widths=tuple(int(k.size) for k in kept))
    out = {}
    for col, tree in variables.items():
        if col == "quant":  # per-layer scalars: unaffected by widths
            out[col] = tree
            continue
        axes = dict(table.axes.get(col, {}))
        if col == "masks":  # element masks have their kernel's axes
            axes.update({p: ax for p, ax in table.axes["params"].items() if p[-1] == "kernel"})
        flat = {}
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            leaf = _gather_leaf(leaf, axes[path], kept, table.widths) if path in axes else leaf
            if col == "masks" and path[-1] == "channel":
                leaf = jnp.ones_like(leaf)
            flat[path] = leaf
        out[col] = traverse_util.unflatten_dict(flat)
    return new_model, out
