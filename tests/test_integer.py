"""Integer execution (`jaxcompress.quant.integer`): int8 x int8 -> int32 accumulations equal
NumPy's exact integer products, and networks agree with their fake-quantized selves."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxcompress.layers import Conv, Dense
from jaxcompress.layers.functional import activation_codes, quantize_activation
from jaxcompress.models import create_model, describe
from jaxcompress.quant import WeightQuantizer, make_quant, make_quantized_apply
from jaxcompress.quant.integer import (ACCUMULATE, FLOAT_EXACT_TERMS, INTEGER, accumulates_in_float, integer_apply,
                                       integer_layers, integerize)
from jaxcompress.quant.job import int8_ops
from jaxcompress.stablehlo import export_stablehlo, load_stablehlo


@pytest.mark.parametrize("signed,bits,calibrated", [(False, 8, True), (False, 4, False), (True, 8, False),
                                                    (True, 3, True)])
def test_activation_codes_times_step_is_the_fake_quantized_value(signed, bits, calibrated):
    x = jax.random.normal(jax.random.key(0), (4, 5, 6, 3)) * 3
    x_range = jnp.float32(2.5) if calibrated else None
    codes, step = activation_codes(x, bits, x_range, signed, batch_dims=1)
    np.testing.assert_array_equal(codes * step, quantize_activation(x, bits, x_range, signed, batch_dims=1))
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    assert float(jnp.max(codes)) == top and float(jnp.min(codes)) == (-top if signed else 0)
    assert np.all(np.asarray(codes) == np.round(np.asarray(codes)))


def _int_conv_reference(codes_x, codes_w, stride):
    """NumPy int64 'SAME' convolution (odd kernel, NHWC x HWIO)."""
    k = codes_w.shape[0]
    p = k // 2
    xp = np.pad(codes_x.astype(np.int64), ((0, 0), (p, p), (p, p), (0, 0)))
    n, h, w, _ = codes_x.shape
    out = np.zeros((n, (h + stride - 1) // stride, (w + stride - 1) // stride, codes_w.shape[-1]), np.int64)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, codes_w.astype(np.int64))
    return out


class _One(nn.Module):
    """One layer (`layer`: "conv" or "dense") as a described model (widths, one group)."""

    widths: tuple = (6,)
    layer: str = "conv"
    signed: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        if self.layer == "conv":
            return Conv(self.widths[0], (3, 3), strides=2, signed_input=self.signed, name="l")(x)
        return Dense(self.widths[0], name="l")(x)


def _quantized(model, x, bits_w, bits_a, **masks):
    v = model.init(jax.random.key(0), x)
    return {**v, "masks": {"l": {**v["masks"]["l"], **masks}},
            "quant": {"l": {"bits_w": jnp.float32(bits_w), "bits_a": jnp.float32(bits_a)}}}


@pytest.mark.parametrize("signed,granularity", [(False, "channel"), (True, "tensor")])
def test_conv_accumulates_exactly_in_int32_and_scales_once(signed, granularity):
    conv = _One(signed=signed)
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 4))
    x = x if signed else jax.nn.relu(x)
    v = _quantized(conv, x, 5, 8)
    iv = integerize(describe(conv, (7, 7, 4)), v, WeightQuantizer("symmetric", granularity))
    codes_w = np.asarray(iv[INTEGER]["l"]["kernel"])
    assert codes_w.dtype == np.int8 and np.abs(codes_w).max() == 15  # 5 bits: -15..15
    codes_x, step_a = activation_codes(x, 8, None, signed, batch_dims=1)
    acc = _int_conv_reference(np.asarray(codes_x).astype(np.int64), codes_w, 2)
    want = acc.astype(np.float32) * (np.asarray(step_a) * np.asarray(iv[INTEGER]["l"]["step_w"])) + np.asarray(
        v["params"]["l"]["bias"])
    got = integer_apply(conv, WeightQuantizer("symmetric", granularity))(iv, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # only the last multiply and the bias round
    # the program really multiplies int8 by int8 into int32
    # the program convolves int8 with int8 into int32, and nothing in float: the batch, plus
    # (unsigned input, zero point 128) one example of ones for the correction term
    hlo = jax.jit(integer_apply(conv)).lower(iv, x).as_text()
    convs = [line.split(" : ")[-1].strip() for line in hlo.splitlines() if "stablehlo.convolution" in line]
    want_convs = ["(tensor<2x7x7x4xi8>, tensor<3x3x4x6xi8>) -> tensor<2x4x4x6xi32>"]
    if not signed:
        want_convs.append("(tensor<1x7x7x4xi8>, tensor<3x3x4x6xi8>) -> tensor<1x4x4x6xi32>")
    assert convs == want_convs, convs
    fake = make_quantized_apply(conv, WeightQuantizer("symmetric", granularity))(v, x)
    np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(fake))))


@pytest.mark.parametrize("signed", [False, True])
def test_float32_accumulation_of_the_codes_is_bit_identical_to_int32(signed):
    conv = _One(signed=signed)
    x = jax.random.normal(jax.random.key(4), (3, 7, 7, 4))
    x = x if signed else jax.nn.relu(x)
    v = _quantized(conv, x, 8, 8)
    iv = integerize(describe(conv, (7, 7, 4)), v)
    outs = {mode: np.asarray(jax.jit(integer_apply(conv, accumulate=mode))(iv, x)) for mode in ACCUMULATE}
    np.testing.assert_array_equal(outs["float32"], outs["int32"])
    np.testing.assert_array_equal(outs["auto"], outs["int32"])
    # the float32 mode's program convolves in float32 (the int8 codes converted), no int8 product left
    hlo = jax.jit(integer_apply(conv, accumulate="float32")).lower(iv, x).as_text()
    convs = [line.split(" : ")[-1].strip() for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert convs and all("xf32>, tensor<3x3x4x6xf32>" in c for c in convs), convs
    with pytest.raises(ValueError, match="accumulate='int16'"):
        integer_apply(conv, accumulate="int16")


def test_which_convolutions_accumulate_in_float():
    small, wide = (3, 3, 16, 16), (3, 3, 64, 64)
    assert FLOAT_EXACT_TERMS == 1032  # 2**24 // (128 * 127)
    assert [accumulates_in_float(small, m, "cpu") for m in ACCUMULATE] == [False, True, True]
    assert [accumulates_in_float(wide, m, "cpu") for m in ACCUMULATE] == [False, True, False]  # XLA:CPU has int8
    assert not accumulates_in_float(small, "auto", "gpu")
    assert not accumulates_in_float((5, 5, 1, 6), "auto", "cpu")  # a grey image: XLA:CPU's s32 path is faster
    # 3x3x128 = 1152 terms: a float32 sum could round, so int32 even when float32 is asked for
    assert not accumulates_in_float((3, 3, 128, 8), "float32", "cpu")
    assert accumulates_in_float((1, 1032, 8), "float32", "cpu") and not accumulates_in_float((1, 1033, 8), "float32",
                                                                                              "cpu")


def test_dense_with_batch_axes_pruned_weights_and_zero_point():
    dense = _One(widths=(5,), layer="dense")
    x = jax.nn.relu(jax.random.normal(jax.random.key(2), (3, 4, 7)))  # (batch, tokens, features)
    kernel_mask = (jnp.arange(35).reshape(7, 5) % 3 != 0).astype(jnp.float32)
    v = _quantized(dense, x, 8, 8, kernel=kernel_mask)
    iv = integerize(describe(dense, (4, 7)), v)
    codes_w = np.asarray(iv[INTEGER]["l"]["kernel"]).astype(np.int64)
    assert np.all(codes_w[np.asarray(kernel_mask) == 0] == 0)
    codes_x, step_a = activation_codes(x, 8, None, False, batch_dims=1)
    acc = np.einsum("bti,io->bto", np.asarray(codes_x).astype(np.int64), codes_w)
    want = acc * (np.asarray(step_a) * np.asarray(iv[INTEGER]["l"]["step_w"])) + np.asarray(v["params"]["l"]["bias"])
    np.testing.assert_allclose(integer_apply(dense)(iv, x), want, rtol=1e-6, atol=1e-6)


def test_lenet5_integer_network_agrees_with_fake_quant_and_leaves_float_layers_float(tmp_path):
    model = create_model("lenet5", 10, 1.0)
    x = jax.random.normal(jax.random.key(3), (16, 28, 28, 1))
    v = model.init(jax.random.key(0), x[:1], train=False)
    table = describe(model, (28, 28, 1))
    quant = make_quant(table, bits_w=4, bits_a=8)
    quant["fc3"]["bits_w"] = jnp.float32(32)  # a float layer stays float
    v = {**v, "quant": quant}
    assert integer_layers(table, quant) == [("conv1",), ("conv2",), ("fc1",), ("fc2",)]
    iv = integerize(table, v)
    assert set(iv[INTEGER]) == {"conv1", "conv2", "fc1", "fc2"}
    got = jax.jit(functools.partial(integer_apply(model), train=False))(iv, x)
    # conv2 (6 input channels) summed by the float32 kernel on the CPU: the same bits
    auto = jax.jit(functools.partial(integer_apply(model, accumulate="auto"), train=False))(iv, x)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(got))
    want = jax.jit(functools.partial(make_quantized_apply(model), train=False))(v, x)
    # equal to float rounding, except where an activation sits on a rounding boundary and moves
    # by one code (the module doc): which examples that hits depends on the CPU's float
    # summation order (one of these 16 on an AVX2 EPYC, none on the CI machine of 2026-12-04)
    scale = float(jnp.max(jnp.abs(want)))
    per_example = np.asarray(jnp.max(jnp.abs(got - want), -1))
    assert np.sum(per_example > 1e-5 * scale) <= 2 and per_example.max() <= 1e-2 * scale, per_example
    np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(want, -1))
    # exported as StableHLO, the integer network keeps its int8 x int8 products and runs with plain JAX
    path = str(tmp_path / "model.int8.stablehlo")
    apply = functools.partial(integer_apply(model), train=False)
    export_stablehlo(path, apply, iv, (28, 28, 1))
    exported = load_stablehlo(path)
    np.testing.assert_allclose(np.asarray(exported.call(x)), np.asarray(got), rtol=1e-5, atol=1e-5)
    text = exported.mlir_module()
    # conv1, conv2, fc1, fc2, and conv2's zero-point correction on one example of ones (conv2
    # reads unsigned ReLU codes; the dense layers' correction is a sum of the kernel, no product)
    assert int8_ops(text) == 5
    assert int8_ops(jax.jit(functools.partial(make_quantized_apply(model), train=False)).lower(v, x).as_text()) == 0


def test_int8_ops_counts_only_products_of_int8_operands():
    text = "\n".join([
        '%0 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f] : (tensor<2x8x8x3xi8>, tensor<3x3x3x4xi8>) '
        '-> tensor<2x8x8x4xi32>',
        '%1 = stablehlo.dot_general %c, %d, contracting_dims = [1] x [0] : (tensor<2x5xi8>, tensor<5x3xi8>) '
        '-> tensor<2x3xi32>',
        '%2 = stablehlo.dot_general %e, %f, contracting_dims = [1] x [0] : (tensor<2x5xf32>, tensor<5x3xf32>) '
        '-> tensor<2x3xf32>',
        '%3 = stablehlo.convert %a : (tensor<2x8x8x3xi8>) -> tensor<2x8x8x3xf32>'])
    assert int8_ops(text) == 2 and int8_ops(text + "\n" + text) == 2  # a second platform's copy: the same ops


def test_refusals_are_one_line_and_attention_projections_stay_float():
    dense = _One(widths=(3,), layer="dense")
    v, table = dense.init(jax.random.key(0), jnp.ones((1, 4))), describe(dense, (4,))
    with pytest.raises(ValueError, match="no Conv or Dense layer has both bits_w and bits_a in"):
        integerize(table, v)
    with pytest.raises(ValueError, match="asymmetric weight grid has no zero-free integer codes"):
        integerize(table, _quantized(dense, jnp.ones((1, 4)), 8, 8), WeightQuantizer("asymmetric"))
    vit = create_model("vit", 10, 0.125)
    vit_table = describe(vit, (32, 32, 3))
    paths = ["/".join(p) for p in integer_layers(vit_table, make_quant(vit_table, bits_w=8, bits_a=8))]
    # the patch embedding and the MLPs run integer; q/k/v/out (DenseGeneral) stay fake-quantized float
    assert paths[:3] == ["patch_embed", "block0_fc1", "block0_fc2"] and not any("_attn/" in p for p in paths)
    assert len(paths) == len(vit_table.layers) - 4 * sum(p.endswith("_attn/query") for p in
                                                         (l.path for l in vit_table.layers))
