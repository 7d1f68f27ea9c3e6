"""Exact parameter, MAC/FLOP and storage-byte counts from widths, masks and bits.

`count(table, widths)` is a pure jnp function of a (possibly traced, batched)
width vector: the RL environment and the budget solvers call it inside jit/vmap.
`summarize(table, masks, quant)` adds element sparsity and storage bytes, per
layer and in total, for reports.

Conventions: a MAC is one multiply-accumulate of a conv or dense layer, of an
attention layer's score (q.k) and value products (2 x heads x head_dim x query
positions x keys per example) or of `Embed.attend`; FLOPs = 2 * MACs (biases,
norms, softmax and activations are not counted, as in the papers' tables).
Parameters count weights, biases, norm scales and shifts (not BatchNorm's running
statistics), embeddings and any other parameter of the model (`ModelTable.
extra_params`; InformationDropout's training-only noise heads excepted). Bytes are exact: what `jaxcompress.quant.export` writes
(bit-packed weights at their bit width, scales or codebooks, Deep-Compression CSR
relative indices for element-pruned layers, float32 biases, folded BatchNorm and
activation ranges; see `jaxcompress.storage`).
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.models.table import ModelTable
from jaxcompress.storage import table_layer_storage


def _io(table: ModelTable, widths):
    a = table.arrays()
    w = jnp.asarray(widths, jnp.float32)
    cin = jnp.where(a["in_group"] >= 0, w[np.maximum(a["in_group"], 0)] * a["in_repeat"], a["in_fixed"])
    cout = jnp.where(a["out_group"] >= 0, w[np.maximum(a["out_group"], 0)] * a["out_repeat"], a["out_fixed"])
    return a, w, cin, cout


def _terms(terms, w):
    """Sum of `CostTerm`s (fixed x product of group widths) at widths `w`."""
    total = 0.0
    for t in terms:
        value = jnp.float32(t.fixed)
        for g in t.groups:
            value = value * w[g]
        total = total + value
    return total


def layer_counts(table: ModelTable, widths=None) -> dict[str, jnp.ndarray]:
    """Per-layer `weights`, `biases` and `macs` (arrays of length len(table.layers))."""
    a, _, cin, cout = _io(table, table.widths if widths is None else widths)
    weights = a["taps"] * cout * jnp.where(a["depthwise"], 1.0, cin)
    return dict(weights=weights, biases=a["use_bias"] * cout, macs=weights * a["positions"])


def count(table: ModelTable, widths=None) -> dict[str, jnp.ndarray]:
    """Total `params`, `macs` and `flops` of the dense network with these widths."""
    widths = table.widths if widths is None else widths
    per_layer = layer_counts(table, widths)
    w = jnp.asarray(widths, jnp.float32)
    macs = per_layer["macs"].sum() + _terms(table.extra_macs, w)
    return dict(params=per_layer["weights"].sum() + per_layer["biases"].sum() + _terms(table.extra_params, w),
                macs=macs, flops=2.0 * macs)


def effective_widths(table: ModelTable, masks: Mapping | None) -> np.ndarray:
    """Kept channels per group under `masks` (the widths surgery would produce)."""
    if masks is None:
        return np.asarray(table.widths, np.float32)
    return np.asarray([np.asarray(m).sum() for m in table.group_masks(masks)], np.float32)


def summarize(table: ModelTable, masks: Mapping | None = None, quant: Mapping | None = None, *,
              quantizer=None, index_bits: Mapping[str, int] | None = None) -> dict:
    """Python-number report: totals and one row per layer.

    Element masks (`masks/<layer>/kernel`) reduce `nonzero_weights` (and MACs, as a
    sparse kernel would) but not `weights`, the dense count after surgery.
    `quantizer` (a `jaxcompress.quant.WeightQuantizer`, default symmetric per channel:
    the layers' own) and `index_bits` ({"conv": 8, "dense": 5} by default) fix the
    storage format that `bytes` counts exactly.
    """
    widths = effective_widths(table, masks)
    per_layer = {k: np.asarray(v) for k, v in layer_counts(table, widths).items()}
    flat_masks = traverse_util.flatten_dict(dict(masks)) if masks is not None else {}
    flat_quant = traverse_util.flatten_dict(dict(quant)) if quant is not None else {}
    group_masks = [np.asarray(m) for m in table.group_masks(masks)] if masks is not None else None
    rows, totals = [], dict(params=0.0, nonzero_params=0.0, macs=0.0, sparse_macs=0.0, bytes=0.0)
    for i, layer in enumerate(table.layers):
        key = tuple(layer.path.split("/"))
        weights, biases = float(per_layer["weights"][i]), float(per_layer["biases"][i])
        nonzero = weights
        kernel_mask = flat_masks.get(key + ("kernel",))
        if kernel_mask is not None:
            keep = np.asarray(kernel_mask) > 0
            if group_masks is not None:
                keep = keep & table.kernel_keep(layer, group_masks)
            nonzero = float(keep.sum())
        bits_w = float(flat_quant.get(key + ("bits_w",), 32.0))
        cout = _cout(layer, widths)
        storage = table_layer_storage(table, layer, weights, cout, flat_masks, group_masks, flat_quant,
                                      quantizer, index_bits)
        n_bytes = float(storage.total)
        positions = layer.out_hw[0] * layer.out_hw[1] * layer.calls
        rows.append(dict(layer=layer.path, kind=layer.kind, weights=weights, nonzero_weights=nonzero,
                         biases=biases, macs=weights * positions, sparse_macs=nonzero * positions,
                         bits_w=bits_w, bytes=n_bytes, format=storage.format, entries=storage.entries,
                         weight_bytes=storage.weight_bytes, index_bytes=storage.index_bytes,
                         scale_bytes=storage.scale_bytes))
        totals["params"] += weights + biases
        totals["nonzero_params"] += nonzero + biases
        totals["macs"] += weights * positions
        totals["sparse_macs"] += nonzero * positions
        totals["bytes"] += n_bytes
    extra = float(_terms(table.extra_params, np.asarray(widths, np.float32)))  # norms, embeddings: float32
    for k in ("params", "nonzero_params"):
        totals[k] += extra
    totals["bytes"] += 4 * extra
    extra_macs = float(_terms(table.extra_macs, np.asarray(widths, np.float32)))
    totals["macs"] += extra_macs
    totals["sparse_macs"] += extra_macs
    totals["flops"] = 2 * totals["macs"]
    return dict(totals=totals, layers=rows, widths=[int(w) for w in widths])


def _cout(layer, widths) -> float:
    return float(widths[layer.out_group]) * layer.out_repeat if layer.out_group >= 0 else float(layer.out_fixed)
