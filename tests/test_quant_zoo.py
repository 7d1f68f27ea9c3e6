"""Packed export of zoo models (thin widths): the file rebuilds the model from its zoo name and
widths, its size equals the accounting, and its outputs equal the fake-quantized network's."""
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import cost
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import shrink
from jaxcompress.quant import (WeightQuantizer, add_kmeans_assignments, compare_outputs, export_packed,
                               fold_batchnorm, load_packed, make_quant, make_quantized_apply, norm_epsilons)

# Compiling the deeper models costs minutes on a 2-core CPU: they run with JAXCOMPRESS_SLOW_TESTS=1.
_slow = pytest.mark.skipif(not os.environ.get("JAXCOMPRESS_SLOW_TESTS"), reason="set JAXCOMPRESS_SLOW_TESTS=1")
CASES = [  # (model, width multiplier, quantizer, element-prune a layer?, groups losing their channel 0)
    ("lenet300_100", 0.1, WeightQuantizer("kmeans"), True, (0,)),
    # the ViT: the residual stream, one of block 0's two heads and an MLP neuron; attention
    # projections (heads, head_dim) quantized with one scale per output, LayerNorms and the
    # position embedding stored as float32
    ("vit", 0.5, WeightQuantizer("symmetric", "channel"), False, (0, 1, 7)),
    pytest.param("resnet20", 0.25, WeightQuantizer("asymmetric", "channel"), False, (0,), marks=_slow),
    pytest.param("mobilenet_v2_cifar", 0.125, WeightQuantizer("symmetric", "tensor"), True, (0,), marks=_slow),
]


@pytest.mark.parametrize("name,multiplier,quantizer,element,groups", CASES,
                         ids=["lenet300_100", "vit", "resnet20", "mobilenet_v2"])
def test_zoo_export_round_trip(name, multiplier, quantizer, element, groups):
    shape = get_spec(name).input_shape
    model = create_model(name, 10, multiplier)
    table = describe(model, shape)
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    v = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
    # prune one channel of the first group and (optionally) half of one layer's weights, then shrink
    group_masks = [jnp.ones(w).at[0].set(0.0) if g in groups else jnp.ones(w) for g, w in enumerate(table.widths)]
    masks = table.layer_masks(group_masks, v["masks"])
    if element:
        layer = table.layers[-1]
        kernel = v["params"][layer.path]["kernel"]
        masks[layer.path]["kernel"] = (jnp.arange(kernel.size).reshape(kernel.shape) % 2).astype(jnp.float32)
    small, sv = shrink(table, {**v, "masks": masks})
    stable = describe(small, shape)
    quant = make_quant(stable, bits_w=3, bits_a=8)
    if quantizer.scheme == "kmeans":
        quant = add_kmeans_assignments(sv["params"], sv["masks"], quant, iters=5)
    sv = {**sv, "quant": quant}
    with tempfile.TemporaryDirectory() as d:
        info = export_packed(f"{d}/m.npz", stable, sv, model_name=name, num_classes=10, quantizer=quantizer)
        loaded_model, loaded, meta = load_packed(f"{d}/m.npz")  # rebuilt from the zoo name + widths
    assert tuple(loaded_model.widths) == tuple(stable.widths) == tuple(meta["widths"])
    assert info["payload_bytes"] == cost.summarize(stable, sv["masks"], quant, quantizer=quantizer)["totals"]["bytes"]
    # the accounting of the masked (unshrunk) network is the same number
    assert info["payload_bytes"] == cost.summarize(table, masks, quant, quantizer=quantizer)["totals"]["bytes"]
    folded = fold_batchnorm(sv, norm_epsilons(small, shape))
    out = compare_outputs(make_quantized_apply(small, quantizer), folded, loaded_model.apply, loaded, x)
    assert out["max_abs_diff"] == 0.0, out
    assert np.isfinite(out["max_abs_output"]) and out["max_abs_output"] > 0
