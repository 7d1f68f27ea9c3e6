"""`Conv`, `Dense` and `BatchNorm` are true drop-ins for `nn.Conv`, `nn.Dense`, `nn.BatchNorm`.

Every field of the Flax layer exists with the same default; initialised with the same
key, our layer creates the same parameters, and without masks / quant entries (or with
all-ones masks) its output is *bitwise* equal to the Flax layer's. Channel masks and
fake quantization work on 1-D and 3-D convolutions too, and activation quantization
without a calibrated range is per example, never batch-dependent.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import cost
from jaxcompress.layers import BatchNorm, Conv, Dense, quantize_activation, quantize_weight
from jaxcompress.models.table import describe
from jaxcompress.pruning import shrink

# ----------------------------------------------------------------------------------------------
# Same fields, same defaults.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours, ref", [(Conv, nn.Conv), (Dense, nn.Dense), (BatchNorm, nn.BatchNorm)])
def test_every_flax_field_with_the_same_default(ours, ref):
    fields = {f.name: f for f in dataclasses.fields(ours)}
    for f in dataclasses.fields(ref):
        assert f.name in fields, f.name
        g = fields[f.name]
        assert (g.default is f.default or g.default == f.default), f.name
        assert g.default_factory is f.default_factory, f.name
    assert issubclass(ours, ref)
    extra = set(fields) - {f.name for f in dataclasses.fields(ref)}
    assert extra <= {"signed_input"}


def test_batchnorm_default_momentum_is_flax_0_99():
    assert BatchNorm().momentum == nn.BatchNorm().momentum == 0.99
    assert BatchNorm().epsilon == nn.BatchNorm().epsilon == 1e-5


# ----------------------------------------------------------------------------------------------
# Unmasked, unquantized: bitwise what Flax computes.
# ----------------------------------------------------------------------------------------------

CONV_CASES = {
    "int_kernel_is_1d": (dict(features=4, kernel_size=3), (2, 9, 3)),
    "1d_causal_dilated_s2": (dict(features=4, kernel_size=(3,), strides=2, padding="CAUSAL",
                                  kernel_dilation=2), (2, 9, 3)),
    "2d_kernel_and_input_dilation": (dict(features=4, kernel_size=(3, 3), kernel_dilation=(2, 1),
                                          input_dilation=2, padding=((1, 1), (2, 0))), (2, 7, 7, 3)),
    "2d_circular_dilated": (dict(features=4, kernel_size=(3, 3), kernel_dilation=2, padding="CIRCULAR"),
                            (2, 7, 7, 3)),
    "2d_grouped_reflect": (dict(features=6, kernel_size=(3, 3), feature_group_count=3, padding="REFLECT"),
                           (2, 7, 7, 3)),
    "2d_bfloat16": (dict(features=4, kernel_size=(3, 3), strides=2, dtype=jnp.bfloat16), (2, 7, 7, 3)),
    "2d_param_bfloat16_precision": (dict(features=4, kernel_size=(3, 3), param_dtype=jnp.bfloat16,
                                         precision=jax.lax.Precision.HIGHEST), (2, 7, 7, 3)),
    "2d_flax_weight_mask": (dict(features=2, kernel_size=(2, 2), padding="VALID",
                                 mask=jnp.tril(jnp.ones((2, 2, 3, 2)))), (2, 5, 5, 3)),
    "2d_unbatched": (dict(features=4, kernel_size=(3, 3)), (7, 7, 3)),
    "2d_two_batch_dims": (dict(features=4, kernel_size=(3, 3), use_bias=False), (2, 3, 6, 6, 3)),
    "3d": (dict(features=4, kernel_size=(2, 3, 3), strides=(1, 2, 2), padding="VALID"), (2, 4, 6, 6, 3)),
    "3d_bfloat16_dilated": (dict(features=3, kernel_size=(2, 2, 2), kernel_dilation=(1, 2, 1),
                                 dtype=jnp.bfloat16), (2, 4, 6, 6, 2)),
}


def _random_biases(params, key):
    """Flax initialises biases to zero; random ones make bias handling observable."""
    return jax.tree_util.tree_map_with_path(
        lambda p, l: jax.random.normal(jax.random.fold_in(key, l.size), l.shape, l.dtype)
        if p[-1].key == "bias" else l, params)


def _setup(ours_cls, ref_cls, kwargs, shape, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(jax.random.fold_in(key, 1), shape)
    ref, ours = ref_cls(**kwargs), ours_cls(**kwargs)
    ref_vars, our_vars = ref.init(key, x), ours.init(key, x)
    return ref, ours, ref_vars, our_vars, x


def _assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_is_bitwise_nn_conv(case):
    kwargs, shape = CONV_CASES[case]
    ref, ours, ref_vars, our_vars, x = _setup(Conv, nn.Conv, kwargs, shape)
    # same key -> the very same parameters, plus an all-ones channel mask
    jax.tree.map(_assert_bitwise, our_vars["params"], ref_vars["params"])
    np.testing.assert_array_equal(our_vars["masks"]["channel"], np.ones(kwargs["features"]))
    params = _random_biases(ref_vars["params"], jax.random.key(9))
    y_ref = ref.apply({"params": params}, x)
    _assert_bitwise(ours.apply({"params": params}, x), y_ref)
    _assert_bitwise(ours.apply({"params": params, "masks": our_vars["masks"]}, x), y_ref)
    _assert_bitwise(jax.jit(ours.apply)({"params": params}, x), jax.jit(ref.apply)({"params": params}, x))


DENSE_CASES = {
    "bias": (dict(features=5), (3, 4)),
    "bfloat16": (dict(features=5, dtype=jnp.bfloat16), (3, 4)),
    "param_bfloat16_nobias": (dict(features=5, param_dtype=jnp.bfloat16, use_bias=False), (3, 4)),
    "precision_tokens": (dict(features=3, precision="highest"), (2, 6, 4)),
    "unbatched": (dict(features=3), (4,)),
    "dot_general": (dict(features=3, dot_general=lambda *a, **k: 2.0 * jax.lax.dot_general(*a, **k)), (3, 4)),
    "dot_general_f32_accum": (dict(features=3, dtype=jnp.bfloat16, dot_general=functools.partial(
        jax.lax.dot_general, preferred_element_type=jnp.float32)), (3, 4)),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_dense_is_bitwise_nn_dense(case):
    kwargs, shape = DENSE_CASES[case]
    ref, ours, ref_vars, our_vars, x = _setup(Dense, nn.Dense, kwargs, shape)
    jax.tree.map(_assert_bitwise, our_vars["params"], ref_vars["params"])
    params = _random_biases(ref_vars["params"], jax.random.key(9))
    y_ref = ref.apply({"params": params}, x)
    _assert_bitwise(ours.apply({"params": params}, x), y_ref)
    _assert_bitwise(ours.apply({"params": params, "masks": our_vars["masks"]}, x), y_ref)
    if case == "dot_general":  # the custom dot_general really ran
        np.testing.assert_allclose(y_ref - params["bias"], 2.0 * (x @ params["kernel"]), rtol=1e-6)


def _bn_variables(key, c):
    return ({"scale": jax.random.uniform(jax.random.fold_in(key, 1), (c,), minval=0.5, maxval=1.5),
             "bias": jax.random.normal(jax.random.fold_in(key, 2), (c,))},
            {"mean": 0.3 * jax.random.normal(jax.random.fold_in(key, 3), (c,)),
             "var": jax.random.uniform(jax.random.fold_in(key, 4), (c,), minval=0.5, maxval=1.5)})


@pytest.mark.parametrize("kwargs", [{}, {"axis": 1}, {"dtype": jnp.bfloat16}, {"use_scale": False, "use_bias": False},
                                    {"momentum": 0.5, "epsilon": 1e-3}])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_is_bitwise_nn_batchnorm(kwargs, train):
    key = jax.random.key(0)
    x = 1.0 + 2.0 * jax.random.normal(key, (4, 3, 5, 5))
    c = x.shape[kwargs.get("axis", -1)]
    params, stats = _bn_variables(key, c)
    params = {k: v for k, v in params.items() if kwargs.get(f"use_{'scale' if k == 'scale' else 'bias'}", True)}
    ours, ref = BatchNorm(use_running_average=not train, **kwargs), nn.BatchNorm(use_running_average=not train,
                                                                                **kwargs)
    assert ours.init(key, x)["masks"]["channel"].shape == (c,)
    variables = {"params": params, "batch_stats": stats}
    y, state = ours.apply(variables, x, mutable=["batch_stats"])
    y_ref, state_ref = ref.apply(variables, x, mutable=["batch_stats"])
    _assert_bitwise(y, y_ref)
    jax.tree.map(_assert_bitwise, state, state_ref)
    if train and not kwargs:  # Flax's default momentum 0.99: new = 0.99 old + 0.01 batch mean
        np.testing.assert_allclose(state["batch_stats"]["mean"],
                                   0.99 * stats["mean"] + 0.01 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-5)


def test_batchnorm_channel_mask_on_axis_1():
    key = jax.random.key(1)
    x = jax.random.normal(key, (2, 3, 4, 4))  # NCHW
    params, stats = _bn_variables(key, 3)
    mask = jnp.array([1.0, 0.0, 1.0])
    variables = {"params": params, "batch_stats": stats}
    y = BatchNorm(use_running_average=True, axis=1).apply({**variables, "masks": {"channel": mask}}, x)
    y_ref = nn.BatchNorm(use_running_average=True, axis=1).apply(variables, x)
    np.testing.assert_array_equal(y[:, 1], 0.0)
    _assert_bitwise(y[:, [0, 2]], y_ref[:, [0, 2]])


@pytest.mark.parametrize("layer, x_shape", [(Conv(4, (3, 3)), (2, 5, 5, 3)), (Dense(4), (2, 3)),
                                             (BatchNorm(use_running_average=True), (2, 5, 5, 3))])
def test_interceptors_see_one_call_per_layer_call(layer, x_shape):
    """Like the Flax layer (calibration, the RL evaluator and STAMP rely on it)."""
    x = jnp.ones(x_shape)
    variables = layer.init(jax.random.key(0), x)
    seen = []

    def record(next_fun, args, kwargs, context):
        seen.append(context.method_name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        layer.apply(variables, x)
    assert seen == ["__call__"]


# ----------------------------------------------------------------------------------------------
# Masks and fake quantization on 1-D and 3-D convolutions.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["int_kernel_is_1d", "1d_causal_dilated_s2", "3d", "2d_kernel_and_input_dilation"])
def test_conv_channel_mask_beyond_2d(case):
    kwargs, shape = CONV_CASES[case]
    ref, ours, ref_vars, _, x = _setup(Conv, nn.Conv, kwargs, shape, seed=2)
    params = _random_biases(ref_vars["params"], jax.random.key(3))
    mask = jnp.asarray(np.arange(kwargs["features"]) % 2, jnp.float32)  # drop channels 0, 2
    y = np.asarray(ours.apply({"params": params, "masks": {"channel": mask}}, x))
    y_ref = np.asarray(ref.apply({"params": params}, x))
    np.testing.assert_array_equal(y[..., [0, 2]], 0.0)
    assert np.abs(y_ref[..., [0, 2]]).max() > 0
    np.testing.assert_array_equal(y[..., [1, 3]], y_ref[..., [1, 3]])


@pytest.mark.parametrize("case", ["int_kernel_is_1d", "3d"])
def test_conv_element_mask_and_weight_quant_beyond_2d(case):
    kwargs, shape = CONV_CASES[case]
    ref, ours, ref_vars, _, x = _setup(Conv, nn.Conv, kwargs, shape, seed=4)
    params = _random_biases(ref_vars["params"], jax.random.key(5))
    kernel = params["kernel"]
    km = jnp.asarray(np.random.default_rng(0).random(kernel.shape) < 0.6, jnp.float32)
    y = ours.apply({"params": params, "masks": {"kernel": km}, "quant": {"bits_w": jnp.float32(3.0)}}, x)
    # by hand: per-output-channel 3-bit grid of the element-masked kernel, then plain Flax
    k = np.asarray(kernel * km, np.float64)
    s = np.abs(k).max(axis=tuple(range(k.ndim - 1))) / 3.0
    hand = {"kernel": jnp.asarray(np.round(k / s) * s, jnp.float32), "bias": params["bias"]}
    np.testing.assert_allclose(y, ref.apply({"params": hand}, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quantize_weight(kernel * km, 3.0), hand["kernel"], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Uncalibrated activation ranges are per example.
# ----------------------------------------------------------------------------------------------

def test_quantize_activation_per_example_range_by_hand():
    x = jnp.array([[0.0, 0.9, 2.2, 4.0], [0.0, 1.0, 2.0, 8.0]])
    # 2 bits: row 0 s = 4/3: 0, 0.675, 1.65, 3 -> 0, 1, 2, 3; row 1 s = 8/3: 0, 0.375, 0.75, 3 -> 0, 0, 1, 3
    y = quantize_activation(x, 2.0)
    np.testing.assert_allclose(y, [[0.0, 4 / 3, 8 / 3, 4.0], [0.0, 0.0, 8 / 3, 8.0]], atol=1e-6)
    # the calibrated range still wins: s = 2/3 for both rows; 0.9 / s = 1.35 -> 1, 1 / s = 1.5 -> 2 (half to even)
    np.testing.assert_allclose(quantize_activation(x, 2.0, 2.0), [[0, 2 / 3, 2, 2], [0, 4 / 3, 2, 2]], atol=1e-6)


@pytest.mark.parametrize("layer, shape, signed", [
    (Dense(3), (4, 6), False), (Dense(3), (4, 5, 6), True), (Conv(3, (3, 3)), (4, 5, 5, 2), False),
    (Conv(3, 3, signed_input=True), (4, 7, 2), True), (Conv(3, (2, 2, 2)), (4, 3, 4, 4, 2), False)])
def test_uncalibrated_activation_quant_is_not_batch_dependent(layer, shape, signed):
    layer = layer.clone(signed_input=signed)
    key = jax.random.key(0)
    x = jax.random.uniform(key, shape, minval=-1.0 if signed else 0.0, maxval=2.0)
    variables = jax.jit(layer.init)(key, x)
    variables = {"params": variables["params"], "quant": {"bits_a": jnp.float32(3.0)}}
    apply = jax.jit(layer.apply)
    y = apply(variables, x)
    others = x.at[1:].multiply(50.0)  # the rest of the batch changes a lot
    np.testing.assert_array_equal(apply(variables, others)[0], y[0])
    # alone in its batch (another batch size may change the matmul's float rounding)
    np.testing.assert_allclose(apply(variables, x[:1])[0], y[0], rtol=1e-5, atol=1e-5)
    # and the quantization is real: not the float output
    assert np.abs(np.asarray(y) - np.asarray(apply({"params": variables["params"]}, x))).max() > 1e-3


def test_unbatched_conv_input_is_one_example():
    layer = Conv(3, (3, 3))
    x = jax.random.uniform(jax.random.key(1), (5, 5, 2), maxval=2.0)
    variables = layer.init(jax.random.key(0), x)
    variables = {"params": variables["params"], "quant": {"bits_a": jnp.float32(2.0)}}
    np.testing.assert_allclose(layer.apply(variables, x), layer.apply(variables, x[None])[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Described models using the new fields: masked == shrunk, cost by hand.
# ----------------------------------------------------------------------------------------------

class DilatedTokens(nn.Module):
    """Dilated conv -> BatchNorm (momentum 0.9) -> conv with input dilation -> per-position Dense
    on the (H*W) tokens -> mean -> classifier."""

    widths: tuple = (6, 5, 7)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.widths[0], (3, 3), kernel_dilation=2, signed_input=True, name="c1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
        x = nn.relu(Conv(self.widths[1], (2, 2), input_dilation=2, padding=((0, 0), (0, 0)),
                            name="c2")(x))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, tokens, C)
        x = nn.relu(Dense(self.widths[2], name="tok")(x))
        return Dense(4, name="head")(x.mean(axis=1))


def test_model_with_dilations_and_token_dense_shrinks_and_counts():
    model = DilatedTokens()
    table = describe(model, (6, 6, 2))
    rows = {l.path: l for l in table.layers}
    # c1 SAME 6x6; c2 on the input-dilated 11x11 map, VALID 2x2 -> 10x10; tok on 100 tokens
    assert rows["c1"].out_hw == (6, 6) and rows["c2"].out_hw == (10, 10) and rows["tok"].out_hw == (100, 1)
    assert (rows["tok"].in_group, rows["tok"].out_group, rows["head"].in_group) == (1, 2, 2)
    macs = 36 * 9 * 2 * 6 + 100 * 4 * 6 * 5 + 100 * 5 * 7 + 7 * 4
    params = (9 * 2 * 6 + 6) + 2 * 6 + (4 * 6 * 5 + 5) + (5 * 7 + 7) + (7 * 4 + 4)
    counts = cost.count(table)
    assert float(counts["macs"]) == macs and float(counts["params"]) == params
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    variables = {**variables, "params": _random_biases(variables["params"], jax.random.key(2)),
                 "batch_stats": jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])}
    gms = [jnp.asarray(m, jnp.float32) for m in ([1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0, 1])]
    masked = {**variables, "masks": table.layer_masks(gms, variables["masks"])}
    small_model, small_vars = shrink(table, masked)
    assert small_model.widths == (4, 3, 4)
    np.testing.assert_allclose(jax.jit(small_model.apply)(small_vars, x), jax.jit(model.apply)(masked, x),
                               rtol=1e-5, atol=1e-6)
    small = cost.count(describe(small_model, (6, 6, 2)))
    assert float(small["macs"]) == 36 * 9 * 2 * 4 + 100 * 4 * 4 * 3 + 100 * 3 * 4 + 4 * 4
