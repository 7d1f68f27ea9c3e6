"""Quantization-aware apply: every zoo model, every weight quantizer, one pure function.

The layers quantize activations themselves (`bits_a`, `range_a` in the `quant`
collection). Weights are fake-quantized here, before `model.apply`, by a
`WeightQuantizer` (symmetric / asymmetric, per channel / per tensor, k-means), with
the straight-through estimator of the two-stage paper's QAT stage (Zhan et al. 2021,
Sec. 4.2) and HAQ (Wang et al. 2019). `bits_w` (and, for k-means, the fixed cluster
assignment `assign_w`) stay in the `quant` collection, so they are checkpointed with
the parameters; `quantized_apply` hands the layers a `quant` collection without them,
so weights are never quantized twice. For the default quantizer (symmetric, per
channel) the result equals the layers' own `bits_w` path up to float rounding (this
path multiplies by exactly rounded reciprocals instead of dividing, so that training,
export and loading compute identical numbers); unlike it, pruned elements stay exactly
zero at one bit.

    apply_fn = make_quantized_apply(model, WeightQuantizer("kmeans"))
    state = state.replace(apply_fn=apply_fn)   # then `fit` trains it (QAT)
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import traverse_util

from jaxcompress.quant.quantizers import FLOAT_BITS, WeightQuantizer, fake_quant_weight, kmeans_1d

WEIGHT_KEYS = ("bits_w", "assign_w")


def weight_mask(flat_masks: Mapping, path: tuple, shape) -> jnp.ndarray | None:
    """Element mask times the output-channel mask of a kernel (None when unmasked)."""
    km, cm = flat_masks.get(path + ("kernel",)), flat_masks.get(path + ("channel",))
    if km is None and cm is None:
        return None
    mask = jnp.ones(shape, jnp.float32)
    if km is not None:
        mask = mask * jnp.asarray(km, jnp.float32)
    if cm is not None:
        mask = mask * jnp.asarray(cm, jnp.float32)
    return mask


def activation_quant(quant: Mapping | None) -> dict:
    """The `quant` collection without the weight entries (what the layers should see)."""
    if not quant:
        return {}
    flat = {k: v for k, v in traverse_util.flatten_dict(dict(quant)).items() if k[-1] not in WEIGHT_KEYS}
    return traverse_util.unflatten_dict(flat) if flat else {}


def quantized_params(params: Mapping, masks: Mapping | None, quant: Mapping | None,
                     quantizer: WeightQuantizer) -> dict:
    """`params` with every kernel that has a `bits_w` replaced by its fake-quantized value."""
    if not quant:
        return params
    flat_q = traverse_util.flatten_dict(dict(quant))
    flat_p = dict(traverse_util.flatten_dict(dict(params)))
    flat_m = traverse_util.flatten_dict(dict(masks)) if masks else {}
    for key, bits in flat_q.items():
        if key[-1] != "bits_w":
            continue
        path = key[:-1]
        kernel = flat_p[path + ("kernel",)]
        mask = weight_mask(flat_m, path, kernel.shape)
        flat_p[path + ("kernel",)] = fake_quant_weight(kernel, bits, quantizer, mask,
                                                       flat_q.get(path + ("assign_w",)))
    return traverse_util.unflatten_dict(flat_p)


def make_quantized_apply(model, quantizer: WeightQuantizer | None = None):
    """`apply(variables, x, **kw)` like `model.apply`, with weights quantized by `quantizer`."""
    quantizer = quantizer or WeightQuantizer()

    def apply(variables, *args, **kwargs):
        quant = variables.get("quant")
        if quant:
            variables = dict(variables)
            variables["params"] = quantized_params(variables["params"], variables.get("masks"), quant, quantizer)
            act = activation_quant(quant)
            if act:
                variables["quant"] = act
            else:
                del variables["quant"]
        return model.apply(variables, *args, **kwargs)

    return apply


def add_kmeans_assignments(params: Mapping, masks: Mapping | None, quant: Mapping, iters: int = 20) -> dict:
    """Runs Lloyd's k-means on every kernel with `bits_w` < 32 and stores the cluster
    indices as `assign_w` (fixed afterwards: QAT then fine-tunes the centroids)."""
    flat_q = dict(traverse_util.flatten_dict(dict(quant)))
    flat_p = traverse_util.flatten_dict(dict(params))
    flat_m = traverse_util.flatten_dict(dict(masks)) if masks else {}
    for key, bits in list(flat_q.items()):
        if key[-1] != "bits_w" or float(bits) >= FLOAT_BITS:
            continue
        path = key[:-1]
        kernel = flat_p[path + ("kernel",)]
        assign, _ = kmeans_1d(kernel, bits, weight_mask(flat_m, path, kernel.shape), iters=iters)
        flat_q[path + ("assign_w",)] = assign
    return traverse_util.unflatten_dict(flat_q)
